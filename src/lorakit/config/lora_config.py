"""`LoraConfig` and `TaskType`: PEFT's names and defaults, validated once, never mutated.

A config is data. It is checked when it is built and frozen afterwards; code that needs a variant
(for example the concrete module names behind ``"all-linear"``) derives a new one with
:func:`dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from typing import Any, Literal

from lorakit.config import files, peft_json
from lorakit.config.inits import INIT_NAMES, parse_init
from lorakit.config.task_type import TaskType
from lorakit.errors import ConfigError

__all__ = ["LoraConfig", "TaskType", "ConfigError", "config_from_peft_dict"]

BIAS_MODES = ("none", "all", "lora_only")
ALL_LINEAR = "all-linear"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _names(value: Any) -> list[str] | None:
    """A list of module names as PEFT accepts them (list, tuple or set of str), sorted if unordered."""
    if isinstance(value, (set, frozenset)):
        value = sorted(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA settings, with PEFT's field names and defaults.

    The update is ``h = W x + s · B A x`` with ``A`` (r × k), ``B`` (d × r) and the scaling
    ``s = lora_alpha / r`` (or ``lora_alpha / √r`` with ``use_rslora``, Kalajdzievski 2023).

    ``target_modules``: a list of names (a module matches when its full name equals an entry or ends
    with ``"." + entry``), a regex string (full match against the full name), ``"all-linear"``
    (every linear / Conv1D layer except the output head) or ``None`` (the default table for the
    model's ``model_type``). ``exclude_modules`` uses the same rules.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, float] = dataclasses.field(default_factory=dict)
    use_dora: bool = False
    lora_bias: bool = False
    task_type: TaskType | str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        normalized = _validate(self, problems)
        if problems:
            raise ConfigError("invalid LoraConfig:\n  - " + "\n  - ".join(problems))
        for name, value in normalized.items():
            object.__setattr__(self, name, value)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: lists for module sets, the task type as its string value."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, TaskType):
                value = value.value
            elif isinstance(value, dict):
                value = dict(value)
            elif isinstance(value, list):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown LoraConfig field(s) {unknown}; known fields: {', '.join(sorted(known))}"
            )
        return cls(**dict(data))

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        """Write ``save_directory/adapter_config.json`` in PEFT 0.21's format (every PEFT key,
        ``peft_type: "LORA"``, ``inference_mode: true``), atomically. See :mod:`lorakit.config.peft_json`."""
        files.save_config_text(save_directory, peft_json.dumps(peft_json.config_to_peft_dict(self)))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], subfolder: str | None = None) -> LoraConfig:
        """Read the ``adapter_config.json`` of an adapter directory (lorakit's or PEFT's), or that
        file itself. PEFT keys lorakit does not implement are accepted at their neutral values; a
        config that enables one is refused with an error naming the key and value."""
        data, source = files.read_config_dict(path, subfolder)
        return config_from_peft_dict(data, source)

    def scaling_for(self, r: int, alpha: float) -> float:
        """The factor ``s`` applied to ``B A x``: ``alpha / r`` or ``alpha / √r`` (rsLoRA)."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _validate(cfg: LoraConfig, problems: list[str]) -> dict[str, Any]:
    """Collect every problem with `cfg` and return the normalised values of the fields."""
    out: dict[str, Any] = {}
    if not (isinstance(cfg.r, int) and not isinstance(cfg.r, bool) and cfg.r > 0):
        problems.append(f"r={cfg.r!r}: must be a positive integer (e.g. 8)")
    if not (_is_number(cfg.lora_alpha) and cfg.lora_alpha > 0):
        problems.append(f"lora_alpha={cfg.lora_alpha!r}: must be a positive number (e.g. 16)")
    if not (_is_number(cfg.lora_dropout) and 0.0 <= cfg.lora_dropout < 1.0):
        problems.append(f"lora_dropout={cfg.lora_dropout!r}: must be a number in [0, 1)")
    if cfg.bias not in BIAS_MODES:
        problems.append(f"bias={cfg.bias!r}: must be one of {', '.join(BIAS_MODES)}")
    init = cfg.init_lora_weights
    parsed = parse_init(init)
    if parsed is None:
        choices = ", ".join(repr(c) for c in INIT_NAMES)
        problems.append(f"init_lora_weights={init!r}: must be one of {choices} (N ≥ 0 iterations)")
    elif parsed[0] == "orthogonal":
        odd = {"r": cfg.r} if isinstance(cfg.r, int) and cfg.r % 2 else {}
        if isinstance(cfg.rank_pattern, Mapping):
            odd.update(
                {
                    f"rank_pattern[{k!r}]": v
                    for k, v in cfg.rank_pattern.items()
                    if isinstance(v, int) and v % 2
                }
            )
        if odd:
            problems.append(f"init_lora_weights='orthogonal' needs even ranks; odd: {odd}")
    if cfg.lora_bias is True and init not in (True, False):
        problems.append(
            f"lora_bias=True works with init_lora_weights=True or False only (as in PEFT), got {init!r}"
        )
    for name in ("fan_in_fan_out", "use_rslora", "inference_mode", "use_dora", "lora_bias"):
        if not isinstance(getattr(cfg, name), bool):
            problems.append(f"{name}={getattr(cfg, name)!r}: must be True or False")
    if cfg.use_dora is True and cfg.lora_bias is True:
        problems.append(
            "lora_bias=True cannot be combined with use_dora=True (as in PEFT): DoRA "
            "rescales the whole output, so a separate LoRA bias has no exact merge"
        )

    _check_modules(cfg, "target_modules", problems, out, allow_regex=True)
    _check_modules(cfg, "exclude_modules", problems, out, allow_regex=True)
    _check_modules(cfg, "modules_to_save", problems, out, allow_regex=False)
    _check_layers(cfg, problems, out)
    for field, kind in (("rank_pattern", "int"), ("alpha_pattern", "float")):
        _check_pattern(field, getattr(cfg, field), kind, problems, out)

    if cfg.task_type is not None:
        try:
            out["task_type"] = TaskType.__members__.get(str(cfg.task_type)) or TaskType(cfg.task_type)
        except ValueError:
            choices = ", ".join(sorted(TaskType.__members__))  # names include the aliases
            problems.append(f"task_type={cfg.task_type!r}: must be one of {choices} or None")
    for name in ("base_model_name_or_path", "revision"):
        value = getattr(cfg, name)
        if value is not None and not isinstance(value, str):
            problems.append(f"{name}={value!r}: must be a string or None")
    return out


def _check_modules(
    cfg: LoraConfig, field: str, problems: list[str], out: dict[str, Any], *, allow_regex: bool
) -> None:
    value = getattr(cfg, field)
    if value is None:
        return
    if isinstance(value, str):
        if not allow_regex:
            out[field] = [value]
            return
        if value.lower() == ALL_LINEAR and field == "target_modules":
            out[field] = ALL_LINEAR
            return
        try:
            re.compile(value)
        except re.error as exc:
            problems.append(f"{field}={value!r}: not a valid regular expression ({exc})")
        return
    names = _names(value)
    if names is None:
        kinds = "a list of module names, a regex string" if allow_regex else "a list of module names"
        problems.append(f"{field}={value!r}: must be {kinds} or None")
        return
    out[field] = names


def _check_layers(cfg: LoraConfig, problems: list[str], out: dict[str, Any]) -> None:
    layers = cfg.layers_to_transform
    if layers is not None:
        ok_int = isinstance(layers, int) and not isinstance(layers, bool) and layers >= 0
        ok_list = isinstance(layers, (list, tuple)) and all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
        )
        if not (ok_int or ok_list):
            problems.append(f"layers_to_transform={layers!r}: must be a non-negative int or a list of them")
        elif ok_list:
            out["layers_to_transform"] = list(layers)  # type: ignore[arg-type]
        if isinstance(cfg.target_modules, str) and cfg.target_modules.lower() != ALL_LINEAR:
            problems.append(
                "layers_to_transform cannot be used with a regex target_modules "
                f"({cfg.target_modules!r}); put the layer numbers in the regex, or give a list of names"
            )
    pattern = cfg.layers_pattern
    if pattern is not None:
        if layers is None:
            problems.append(
                f"layers_pattern={pattern!r} only applies together with layers_to_transform, which is None"
            )
        if not (isinstance(pattern, str) or _names(pattern) is not None):
            problems.append(f"layers_pattern={pattern!r}: must be a string, a list of strings or None")


def _check_pattern(field: str, value: Any, kind: str, problems: list[str], out: dict[str, Any]) -> None:
    if value is None:
        out[field] = {}
        return
    if not isinstance(value, Mapping):
        problems.append(f"{field}={value!r}: must be a dict of module-name pattern -> {kind}")
        return
    for key, item in value.items():
        if not isinstance(key, str):
            problems.append(f"{field} key {key!r}: must be a string (a module-name pattern)")
        else:
            try:
                re.compile(key)
            except re.error as exc:
                problems.append(f"{field} key {key!r}: not a valid regular expression ({exc})")
        if kind == "int":
            good = isinstance(item, int) and not isinstance(item, bool) and item > 0
        else:
            good = _is_number(item) and item > 0
        if not good:
            problems.append(f"{field}[{key!r}]={item!r}: must be a positive {kind}")
    out[field] = dict(value)


def config_from_peft_dict(data: Any, source: str = "adapter_config.json") -> LoraConfig:
    """A :class:`LoraConfig` from a PEFT ``adapter_config.json`` mapping (see
    :mod:`lorakit.config.peft_json` for which keys are read and which are refused).

    Every problem is collected and raised once as :class:`ConfigError` naming ``source``, each
    offending key and its value.
    """
    kwargs = peft_json.config_kwargs(data, [f.name for f in dataclasses.fields(LoraConfig)], source)
    try:
        return LoraConfig(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except TypeError as exc:  # a key of LoraConfig given a value of the wrong shape
        raise ConfigError(f"{source}: {exc}") from None
