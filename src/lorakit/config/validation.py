"""Checking a :class:`~lorakit.config.LoraConfig`: every problem is collected, then raised once.

:func:`validate` reads a config's fields and returns the problems and the normalised values
(module sets become sorted lists, ``"ALL-LINEAR"`` becomes ``"all-linear"``, the task type its
member); the config applies the values only when there is no problem.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections.abc import Mapping
from typing import Any

from lorakit.config.features import INIT_SUBCONFIGS, feature_problems, init_problem
from lorakit.config.init_configs import EvaConfig, LoraGAConfig, sub_config
from lorakit.config.inits import INIT_NAMES, parse_init
from lorakit.config.task_type import PeftType, TaskType

__all__ = ["BIAS_MODES", "ALL_LINEAR", "validate"]

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


def validate(cfg: Any, problems: list[str]) -> dict[str, Any]:
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
    if parsed is None and (problem := init_problem(init)):
        problems.append(problem)
    elif parsed is None:
        choices = ", ".join(repr(c) for c in INIT_NAMES)
        problems.append(f"init_lora_weights={init!r}: must be one of {choices} (N ≥ 0 iterations)")
    elif parsed[0] == "loftq" and init != "loftq":
        problems.append(f"init_lora_weights={init!r}: LoftQ is init_lora_weights='loftq' with a loftq_config")
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
    _check_init_configs(cfg, parsed[0] if parsed else None, problems, out)
    if cfg.lora_bias is True and init not in (True, False):
        problems.append(
            "The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
            f"init_lora_weights={init!r} instead"
        )
    flags = ["fan_in_fan_out", "use_rslora", "inference_mode", "use_dora", "lora_bias"]
    if cfg.ensure_weight_tying is None:  # PEFT's "off" reads None too
        out["ensure_weight_tying"] = False
    else:
        flags.append("ensure_weight_tying")
    for name in flags:
        if not isinstance(getattr(cfg, name), bool):
            problems.append(f"{name}={getattr(cfg, name)!r}: must be True or False")
    if cfg.use_dora is True and cfg.lora_bias is True:
        problems.append(
            "The argument lora_bias=True is not supported for DoRA, please pass use_dora=False: DoRA "
            "rescales the whole output, so a separate LoRA bias has no exact merge"
        )

    _check_modules(cfg, "target_modules", problems, out, allow_regex=True)
    _check_modules(cfg, "exclude_modules", problems, out, allow_regex=True)
    _check_modules(cfg, "modules_to_save", problems, out, allow_regex=False)
    if cfg.target_parameters is not None:
        names = _names(cfg.target_parameters) if not isinstance(cfg.target_parameters, str) else None
        if names is None:
            problems.append(
                f"target_parameters={cfg.target_parameters!r}: must be a list of parameter names "
                "(e.g. ['experts.gate_up_proj', 'experts.down_proj']) or None; a regex is not supported "
                "(as in PEFT)"
            )
        else:
            out["target_parameters"] = names
    _check_layers(cfg, problems, out)
    for field, kind in (("rank_pattern", "int"), ("alpha_pattern", "float")):
        _check_pattern(field, getattr(cfg, field), kind, problems, out)

    if cfg.task_type is not None:
        try:
            out["task_type"] = TaskType.__members__.get(str(cfg.task_type)) or TaskType(cfg.task_type)
        except ValueError:
            choices = ", ".join(sorted(TaskType.__members__))  # names include the aliases
            problems.append(f"task_type={cfg.task_type!r}: must be one of {choices} or None")
    for name in ("base_model_name_or_path", "revision", "peft_version", "megatron_core"):
        value = getattr(cfg, name)
        if value is not None and not isinstance(value, str):
            problems.append(f"{name}={value!r}: must be a string or None")
    if cfg.peft_type is not None and str(cfg.peft_type) != PeftType.LORA.value:
        problems.append(f"peft_type={cfg.peft_type!r}: a LoraConfig is of type {PeftType.LORA.value!r}")
    out["peft_type"] = PeftType.LORA
    if cfg.auto_mapping is not None and not isinstance(cfg.auto_mapping, Mapping):
        problems.append(f"auto_mapping={cfg.auto_mapping!r}: must be a dict or None")
    if not (isinstance(cfg.qalora_group_size, int) and not isinstance(cfg.qalora_group_size, bool)):
        problems.append(f"qalora_group_size={cfg.qalora_group_size!r}: must be an integer")
    _check_token_indices(cfg.trainable_token_indices, problems, out)
    _check_subconfigs(cfg, parsed, problems, out)
    _check_loftq(cfg, problems, out)
    problems.extend(feature_problems(cfg))
    return out


LOFTQ_KEYS = {"loftq_bits": (4, (4, 8)), "loftq_iter": (1, None)}  # key → (PEFT's default, choices)


def _check_loftq(cfg: Any, problems: list[str], out: dict[str, Any]) -> None:
    """``loftq_config`` (a dict or PEFT's ``LoftQConfig``) is needed by, and only by, LoftQ."""
    value = cfg.loftq_config
    if value is not None and not isinstance(value, Mapping) and hasattr(value, "loftq_bits"):
        value = vars(value)  # a LoftQConfig object, stored as a dict (as PEFT does)
    if cfg.init_lora_weights != "loftq":
        if value:
            warnings.warn(
                f"loftq_config is set but init_lora_weights={cfg.init_lora_weights!r} is not 'loftq': it is "
                "ignored (as in PEFT, which also empties it)",
                stacklevel=5,
            )
        out["loftq_config"] = {}
        return
    if not isinstance(value, Mapping) or not value:
        problems.append(
            "init_lora_weights='loftq' needs loftq_config, e.g. {'loftq_bits': 4, 'loftq_iter': 1} "
            "(or LoftQConfig(loftq_bits=4))"
        )
        return
    unknown = sorted(set(value) - set(LOFTQ_KEYS))
    if unknown:
        problems.append(f"loftq_config has unknown key(s) {unknown}; keys: {', '.join(LOFTQ_KEYS)}")
    normalized = {}
    for key, (default, allowed) in LOFTQ_KEYS.items():
        item = value.get(key, default)
        good = isinstance(item, int) and not isinstance(item, bool) and item >= 1
        if not good or (allowed is not None and item not in allowed):
            wanted = f"one of {', '.join(map(str, allowed))}" if allowed else "a positive integer"
            problems.append(f"loftq_config[{key!r}]={item!r}: must be {wanted}")
        normalized[key] = item
    out["loftq_config"] = normalized


def _indices_problem(value: Any) -> str | None:
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value
    ):
        return "must be a list of non-negative token ids"
    repeated = sorted({i for i in value if list(value).count(i) > 1})
    return f"repeats token ids {repeated}" if repeated else None


def _check_token_indices(value: Any, problems: list[str], out: dict[str, Any]) -> None:
    """``trainable_token_indices``: token ids (rows of the input embedding) or a dict module name →
    token ids."""
    if value is None:
        return
    if isinstance(value, Mapping):
        found = [
            f"trainable_token_indices[{key!r}]={ids!r}: {problem}"
            for key, ids in value.items()
            if (
                problem := "the key must be a module name"
                if not isinstance(key, str)
                else _indices_problem(ids)
            )
        ]
        problems.extend(found)
        if not found:
            out["trainable_token_indices"] = {k: list(v) for k, v in value.items()}
        return
    problem = _indices_problem(value)
    if problem:
        problems.append(
            f"trainable_token_indices={value!r}: {problem}, or a dict of module name -> token ids"
        )
        return
    out["trainable_token_indices"] = list(value)


def _check_subconfigs(
    cfg: Any, parsed: tuple[str, int | None] | None, problems: list[str], out: dict[str, Any]
) -> None:
    """``corda_config`` (of an init lorakit refuses) is a dict (a PEFT config object becomes one);
    next to another init it is ignored with a warning, as PEFT does. (``loftq_config``:
    :func:`_check_loftq`.)"""
    init = cfg.init_lora_weights
    for field, owner in INIT_SUBCONFIGS.items():
        value = getattr(cfg, field)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = out[field] = dataclasses.asdict(value)
        if value is not None and not isinstance(value, Mapping):
            problems.append(f"{field}={value!r}: must be a dict or None")
            continue
        if not value or (isinstance(init, str) and init.lower() == owner):
            continue
        if parsed is not None or init is True or init is False:
            warnings.warn(
                f"{field} is set but init_lora_weights={init!r} is not {owner!r}: it is ignored (as in PEFT)",
                stacklevel=5,
            )


_INIT_TITLES = {"eva": "EVA", "lora_ga": "LoRA-GA"}


def _check_init_configs(cfg: Any, kind: str | None, problems: list[str], out: dict[str, Any]) -> None:
    """``eva_config`` / ``lora_ga_config``: dicts from a file become their dataclasses; the init
    without its sub-config gets the defaults and a sub-config without its init is kept and
    unused, each with PEFT's warning."""
    for field, cls, init in (("eva_config", EvaConfig, "eva"), ("lora_ga_config", LoraGAConfig, "lora_ga")):
        given = getattr(cfg, field)
        value = sub_config(field, given, cls, problems)
        if given is None and kind == init:
            warnings.warn(  # PEFT's sentence, then the defaults used
                f"`init_lora_weights` is {init!r} but `{field}` is not specified. Using default "
                f"{_INIT_TITLES[init]} config: {cls()!r}",
                stacklevel=5,
            )
            value = cls()
        elif value is not None and kind != init:
            warnings.warn(
                f"`{field}` specified but will be ignored when `init_lora_weights` is not {init!r}.",
                stacklevel=5,
            )
        out[field] = value


def _check_modules(
    cfg: Any, field: str, problems: list[str], out: dict[str, Any], *, allow_regex: bool
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


def _check_layers(cfg: Any, problems: list[str], out: dict[str, Any]) -> None:
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
                "`layers_to_transform` cannot be used when `target_modules` is a str. "
                f"(target_modules={cfg.target_modules!r}: put the layer numbers in the regex, or give a "
                "list of names)"
            )
    pattern = cfg.layers_pattern
    if pattern is not None:
        if layers is None:
            problems.append(
                "When `layers_pattern` is specified, `layers_to_transform` must also be specified. "
                f"(layers_pattern={pattern!r}, layers_to_transform=None)"
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
