"""`LoraConfig`: every field of PEFT 0.21.2's, PEFT's defaults, validated whenever it changes.

A config is data. It is checked when it is built, and an assignment to a field checks the whole
config again before it takes effect: an invalid value raises :class:`ConfigError` and leaves the
config as it was (PEFT users set fields after construction, e.g. PiSSA's conversion recipe sets
``init_lora_weights``). Code that needs a variant of a config (the concrete module names behind
``"all-linear"``, say) derives a new one with :func:`dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any, Literal

from lorakit.config import files, peft_json
from lorakit.config.init_configs import EvaConfig, LoraGAConfig
from lorakit.config.task_type import PeftType, TaskType
from lorakit.config.validation import ALL_LINEAR, BIAS_MODES, validate
from lorakit.errors import ConfigError

__all__ = [
    "LoraConfig",
    "LoraRuntimeConfig",
    "LoftQConfig",
    "TaskType",
    "PeftType",
    "ConfigError",
    "config_from_peft_dict",
    "ALL_LINEAR",
    "BIAS_MODES",
]


@dataclasses.dataclass
class LoraRuntimeConfig:
    """Settings that change how, not what, lorakit computes; never saved (PEFT's runtime config).

    ``ephemeral_gpu_offload``: PEFT moves CPU-offloaded weights to a GPU for initialisations; lorakit
    computes initialisations on the weight's own device, so the flag changes nothing here.
    """

    ephemeral_gpu_offload: bool = False


@dataclasses.dataclass
class LoftQConfig:
    """PEFT's LoftQ settings: ``loftq_bits`` (4: NF4, 8: int8) and ``loftq_iter`` (alternating
    rounds of quantizing and fitting). Pass it as ``LoraConfig(init_lora_weights="loftq",
    loftq_config=LoftQConfig(...))``; the config stores it as a dict, as PEFT does."""

    loftq_bits: int = 4
    loftq_iter: int = 1


@dataclasses.dataclass
class LoraConfig:
    """LoRA settings, with PEFT's field names and defaults.

    The update is ``h = W x + s · B A x`` with ``A`` (r × k), ``B`` (d × r) and the scaling
    ``s = lora_alpha / r`` (or ``lora_alpha / √r`` with ``use_rslora``, Kalajdzievski 2023).

    ``target_modules``: a list of names (a module matches when its full name equals an entry or ends
    with ``"." + entry``), a regex string (full match against the full name), ``"all-linear"``
    (every linear / Conv1D layer except the output head) or ``None`` (the default table for the
    model's ``model_type``). ``exclude_modules`` uses the same rules.

    Every other field of PEFT 0.21.2's ``LoraConfig`` is accepted too: at its "off" value it changes
    nothing; a value that turns on a feature lorakit lacks is refused here, naming the field
    (:mod:`lorakit.config.features`).
    """

    # lorakit's fields (PEFT's names, types and defaults)
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
    # what PEFT records about the file
    peft_type: PeftType | str | None = PeftType.LORA
    auto_mapping: dict[str, Any] | None = None
    peft_version: str | None = None
    # PEFT's fields for features lorakit lacks: accepted "off", refused "on" (config.features)
    megatron_config: dict[str, Any] | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    loftq_config: dict[str, Any] | None = dataclasses.field(default_factory=dict)
    eva_config: EvaConfig | dict[str, Any] | None = None  # with init_lora_weights="eva"
    corda_config: Any = None
    lora_ga_config: LoraGAConfig | dict[str, Any] | None = None  # with init_lora_weights="lora_ga"
    velora_config: Any = None
    alora_invocation_tokens: list[int] | None = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Any = None
    layer_replication: list[tuple[int, int]] | None = None
    target_parameters: list[str] | None = None
    use_bdlora: Any = None
    arrow_config: Any = None
    kasa_config: Any = None
    ensure_weight_tying: bool = False
    runtime_config: LoraRuntimeConfig = dataclasses.field(default_factory=LoraRuntimeConfig)

    def __post_init__(self) -> None:
        problems: list[str] = []
        normalized = validate(self, problems)
        if problems:
            raise ConfigError("invalid LoraConfig:\n  - " + "\n  - ".join(problems))
        for name, value in normalized.items():
            object.__setattr__(self, name, value)
        if self.peft_version is None:
            object.__setattr__(self, "peft_version", peft_json.PEFT_FORMAT_VERSION)
        if isinstance(self.runtime_config, Mapping):
            object.__setattr__(self, "runtime_config", LoraRuntimeConfig(**self.runtime_config))
        object.__setattr__(self, "_checked", True)
        self._warn_conversion()

    def _warn_conversion(self) -> None:
        """PEFT's warning: a PiSSA/OLoRA adapter with rsLoRA and rank/alpha patterns cannot be
        converted to plain LoRA at save time (its per-module scalings are not recoverable)."""
        init = self.init_lora_weights
        rewrites = isinstance(init, str) and init.split("_")[0] in ("pissa", "olora")
        if rewrites and self.use_rslora and (self.rank_pattern or self.alpha_pattern):
            warnings.warn(
                "Using Rank-Stabilized LoRA with rank_pattern/alpha_pattern and post-training conversion of "
                "modified base weights (PiSSA, OLoRA) means that you won't be able to pass "
                "`path_initial_model_for_weight_conversion` to `save_pretrained` to restore the initial "
                "values of the base weights; if you intend to do this, please ensure not to use rslora or "
                "rank_pattern/alpha_pattern.",
                UserWarning,
                stacklevel=4,
            )

    def __setattr__(self, name: str, value: Any) -> None:
        """Assigning a field validates the config with the new value first (nothing changes on error)."""
        if not self.__dict__.get("_checked") or name not in _FIELD_NAMES:
            object.__setattr__(self, name, value)
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the check's copy would repeat the config's warnings
            checked = dataclasses.replace(self, **{name: value})
        object.__setattr__(self, name, getattr(checked, name))

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: lists for module sets, enums as their string values (the runtime
        config is not part of it, as in PEFT)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "runtime_config":
                continue
            value = getattr(self, f.name)
            if isinstance(value, (TaskType, PeftType)):
                value = value.value
            elif isinstance(value, (EvaConfig, LoraGAConfig)):
                value = dataclasses.asdict(value)
            elif isinstance(value, dict):
                value = dict(value)
            elif isinstance(value, list):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoraConfig:
        """Build a config from :meth:`to_dict` output; unknown keys are an error naming them."""
        unknown = sorted(set(data) - set(_FIELD_NAMES))
        if unknown:
            known = ", ".join(sorted(_FIELD_NAMES))
            raise ConfigError(f"unknown LoraConfig field(s) {unknown}; known fields: {known}")
        return cls(**dict(data))

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> dict[str, Any]:
        """The JSON object of a config file, as a dict (PEFT's ``from_json_file``)."""
        data, source = files.read_config_dict(path)
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object of config keys, got {type(data).__name__}")
        return data

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> None:
        """Write ``save_directory/adapter_config.json`` in PEFT 0.21's format: every PEFT key, this
        config's values (``inference_mode`` included, as PEFT writes it), atomically. Keyword
        arguments name config keys whose written value they replace, as in PEFT."""
        data = peft_json.config_to_peft_dict(self, inference_mode=self.inference_mode)
        unknown = sorted(set(kwargs) - set(data))
        if unknown:
            raise ConfigError(f"save_pretrained: unknown config key(s) {unknown}")
        data.update(kwargs)
        files.save_config_text(save_directory, peft_json.dumps(data))

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike[str], subfolder: str | None = None, **kwargs: Any
    ) -> LoraConfig:
        """Read the ``adapter_config.json`` of an adapter directory (lorakit's or PEFT's; a path or a
        Hugging Face Hub id), or that file itself; ``kwargs`` override fields of the file, except
        ``revision`` and ``token``, which choose what is fetched from the Hub (as in PEFT). PEFT keys
        for features lorakit lacks are accepted at their neutral values; a config that enables one is
        refused with an error naming the key and value; a key PEFT 0.21 does not know is ignored
        with a warning."""
        hub = {k: kwargs.pop(k) for k in ("revision", "token") if k in kwargs}
        data, source = files.read_config_dict(path, subfolder, **hub)
        if isinstance(data, dict):
            data = {**data, **kwargs}
        return config_from_peft_dict(data, source)

    def scaling_for(self, r: int, alpha: float) -> float:
        """The factor ``s`` applied to ``B A x``: ``alpha / r`` or ``alpha / √r`` (rsLoRA)."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


_FIELD_NAMES = tuple(f.name for f in dataclasses.fields(LoraConfig))


def config_from_peft_dict(data: Any, source: str = "adapter_config.json") -> LoraConfig:
    """A :class:`LoraConfig` from a PEFT ``adapter_config.json`` mapping.

    Every problem is collected and raised once as :class:`ConfigError` naming ``source``, each
    offending key and its value; keys PEFT 0.21 does not know are ignored with a warning.
    """
    kwargs = peft_json.config_kwargs(data, _FIELD_NAMES, source)
    try:
        return LoraConfig(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except TypeError as exc:  # a key of LoraConfig given a value of the wrong shape
        raise ConfigError(f"{source}: {exc}") from None
