"""Loading adapter directories into models: ``PeftModel.from_pretrained`` and ``load_adapter``.

Everything is read and checked (config, keys, shapes, base fingerprint) before the model changes;
a load that fails afterwards is rolled back, so a failed load leaves the model as it was.
PEFT's keywords are taken as PEFT defines them (:class:`LoadOptions`).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterError, ConfigError
from lorakit.model import injection, state
from lorakit.persistence.adapter_dir import AdapterFiles, BaseMismatch, check_adapter, read_adapter
from lorakit.persistence.keys import FILE_PREFIX, parse_key
from lorakit.persistence.state_dict import IncompatibleKeys, set_peft_model_state_dict

__all__ = ["LoadOptions", "load_options", "load_new", "load_adapter", "load_weights", "config_for_state_dict"]

# Keywords PEFT's loaders accept that only matter for how files are downloaded from the Hugging Face
# Hub or for models accelerate dispatched with CPU/disk offloading; lorakit fetches a Hub id with
# ``revision`` / ``token`` (lorakit.hub) and puts each adapter on its base layer's device, so these
# are accepted and have nothing to do.
_HUB_OR_OFFLOAD = (
    "cache_dir",
    "use_auth_token",
    "local_files_only",
    "force_download",
    "proxies",
    "device_map",
    "max_memory",
    "offload_folder",
    "offload_dir",
    "offload_index",
    "use_safetensors",
)
_OWN = ("torch_device", "ignore_mismatched_sizes", "subfolder", "on_base_mismatch", "revision", "token")


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """How to load: PEFT's keywords, and lorakit's ``on_base_mismatch``.

    ``config``: use this config instead of the saved one (PEFT's ``config=``).
    ``autocast_adapter_dtype``: float32 adapters on a half-precision base (``False``: base dtype).
    ``low_cpu_mem_usage``: create the adapter on the meta device and give it the file's tensors.
    ``key_mapping``: regex → replacement, applied to each file key (without ``base_model.model.``);
    the first pattern that matches wins, as in PEFT.
    ``ignore_mismatched_sizes``: skip tensors whose shape differs (they keep their initial values).
    ``torch_device``: a device to check; the adapter always goes to its base layer's device.
    """

    config: LoraConfig | None = None
    autocast_adapter_dtype: bool = True
    low_cpu_mem_usage: bool = False
    key_mapping: Mapping[str, str] | None = None
    ignore_mismatched_sizes: bool = False
    on_base_mismatch: BaseMismatch = "warn"
    subfolder: str | None = None
    ephemeral_gpu_offload: bool = False
    revision: str | None = None
    token: str | bool | None = None


def load_options(
    kwargs: Mapping[str, Any],
    *,
    config: LoraConfig | None,
    autocast_adapter_dtype: bool,
    ephemeral_gpu_offload: bool,
    low_cpu_mem_usage: bool,
    key_mapping: Mapping[str, str] | None,
) -> LoadOptions:
    """Validate a loader's keywords (all of them, before anything is read) into :class:`LoadOptions`."""
    unknown = sorted(set(kwargs) - set(_OWN) - set(_HUB_OR_OFFLOAD))
    if unknown:
        raise AdapterError(
            f"unknown keyword argument(s) {unknown}; valid: config, autocast_adapter_dtype, "
            f"ephemeral_gpu_offload, low_cpu_mem_usage, key_mapping, {', '.join(_OWN + _HUB_OR_OFFLOAD)}"
        )
    if config is not None and not isinstance(config, LoraConfig):
        raise ConfigError(f"config must be a lorakit.LoraConfig, got {type(config).__name__}")
    device = kwargs.get("torch_device")
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise AdapterError(f"torch_device={device!r} is not a device: {exc}") from None
    if key_mapping is not None:
        bad = [p for p in key_mapping if not _compiles(p)]
        if bad:
            raise AdapterError(f"key_mapping has patterns that are not regular expressions: {bad}")
    return LoadOptions(
        config=config,
        autocast_adapter_dtype=bool(autocast_adapter_dtype),
        low_cpu_mem_usage=bool(low_cpu_mem_usage),
        key_mapping=dict(key_mapping) if key_mapping else None,
        ignore_mismatched_sizes=bool(kwargs.get("ignore_mismatched_sizes", False)),
        on_base_mismatch=kwargs.get("on_base_mismatch", "warn"),
        subfolder=kwargs.get("subfolder"),
        ephemeral_gpu_offload=bool(ephemeral_gpu_offload),
        revision=kwargs.get("revision"),
        token=kwargs.get("token", kwargs.get("use_auth_token")),
    )


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except (re.error, TypeError):
        return False
    return True


def _remap(
    tensors: Mapping[str, torch.Tensor], key_mapping: Mapping[str, str] | None
) -> dict[str, torch.Tensor]:
    """PEFT's ``key_mapping``: for each key, the first pattern that matches rewrites it."""
    if not key_mapping:
        return dict(tensors)
    out: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        for pattern, replacement in key_mapping.items():
            new, count = re.subn(pattern, replacement, key)
            if count:
                key = new
                break
        out[key] = value
    return out


def _read(
    model: nn.Module,
    path: str | os.PathLike[str],
    adapter_name: str,
    is_trainable: bool,
    options: LoadOptions,
) -> AdapterFiles:
    """The adapter's files with PEFT's keyword rules applied (a given config, key mapping)."""
    files_ = read_adapter(
        path,
        is_trainable=is_trainable,
        subfolder=options.subfolder,
        revision=options.revision,
        token=options.token,
    )
    key_mapping = options.key_mapping
    if key_mapping is None:  # transformers models that renamed modules carry their own mapping
        key_mapping = getattr(model, "_checkpoint_conversion_mapping", None) or None
    tensors = _remap(files_.tensors, key_mapping)
    config = files_.config
    if options.config is not None:
        config = options.config
        config.inference_mode = not is_trainable  # PEFT sets it on the given config
    if options.ephemeral_gpu_offload:
        config.runtime_config.ephemeral_gpu_offload = True
    return dataclasses.replace(files_, config=config, tensors=tensors)


def _fill(
    model: nn.Module, files_: AdapterFiles, adapter_name: str, options: LoadOptions
) -> IncompatibleKeys:
    """Copy the checked tensors into the freshly injected adapter; on any failure remove it again."""
    try:
        result = set_peft_model_state_dict(
            model, files_.tensors, adapter_name, ignore_mismatched_sizes=options.ignore_mismatched_sizes
        )
        if not options.autocast_adapter_dtype:
            state.place_adapter(model, adapter_name, autocast_dtype=False)
        return result
    except BaseException:
        injection.uninject(model, adapter_name)
        raise


def load_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    subfolder: str | None = None,
) -> IncompatibleKeys:
    """Copy an adapter directory's tensors into the *existing* adapter ``adapter_name`` (resuming a
    checkpoint). Every key and shape is checked before anything is copied."""
    files_ = read_adapter(path, subfolder=subfolder)
    return set_peft_model_state_dict(model, files_.tensors, adapter_name)


def load_new(
    model: nn.Module,
    path: str | os.PathLike[str],
    adapter_name: str,
    *,
    is_trainable: bool,
    build: Callable[..., Any],
    options: LoadOptions | None = None,
) -> Any:
    """``PeftModel.from_pretrained``: read and check, then ``build(model, config, adapter_name,
    ...)`` (which injects the adapter and wraps the model), then copy the weights in."""
    options = options or LoadOptions()
    files_ = _read(model, path, adapter_name, is_trainable, options)
    plan = check_adapter(
        model,
        files_,
        adapter_name,
        options.on_base_mismatch,
        ignore_mismatched_sizes=options.ignore_mismatched_sizes,
    )
    config = options.config if options.config is not None else plan.config
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    with injection.filling_from_file():
        wrapped = build(
            model,
            config,
            adapter_name,
            autocast_adapter_dtype=options.autocast_adapter_dtype,
            low_cpu_mem_usage=options.low_cpu_mem_usage,
        )
    try:
        _fill(model, files_, adapter_name, options)
    except BaseException:
        for param, flag in requires_grad:  # the wrapper froze the base; give it back as it was
            param.requires_grad_(flag)
        raise
    if options.config is not None:
        _adopt(wrapped, options.config, adapter_name)
    if not is_trainable:
        wrapped.eval()
    return wrapped


def _adopt(wrapped: Any, config: LoraConfig, adapter_name: str) -> None:
    """PEFT keeps the very config object passed as ``config=`` (updated with what resolving it on
    the model decided, as PEFT updates it); so does lorakit."""
    configs = getattr(wrapped, "peft_config", None)
    if not isinstance(configs, dict):
        return
    resolved = configs.get(adapter_name)
    if resolved is None or resolved is config:
        return
    for field in dataclasses.fields(config):
        if getattr(config, field.name) != getattr(resolved, field.name):
            setattr(config, field.name, getattr(resolved, field.name))
    configs[adapter_name] = config


def load_adapter(
    model: nn.Module,
    configs: dict[str, LoraConfig],
    path: str | os.PathLike[str],
    adapter_name: str,
    *,
    is_trainable: bool,
    options: LoadOptions | None = None,
    check: Callable[[LoraConfig], None] | None = None,
) -> IncompatibleKeys:
    """``PeftModel.load_adapter``: add adapter ``adapter_name`` from ``path`` to ``model`` (inactive;
    trainability is the caller's) and record its config in ``configs``. ``check(config)`` runs
    the caller's checks against the adapters present, before anything changes."""
    options = options or LoadOptions()
    files_ = _read(model, path, adapter_name, is_trainable, options)
    if check is not None:
        check(files_.config)
    plan = check_adapter(
        model,
        files_,
        adapter_name,
        options.on_base_mismatch,
        ignore_mismatched_sizes=options.ignore_mismatched_sizes,
    )
    with injection.filling_from_file():
        configs[adapter_name] = injection.inject(
            model, plan.config, adapter_name, low_cpu_mem_usage=options.low_cpu_mem_usage
        )
    try:
        return _fill(model, files_, adapter_name, options)
    except BaseException:
        configs.pop(adapter_name, None)
        raise


def config_for_state_dict(
    model: nn.Module, config: LoraConfig, state_dict: Mapping[str, torch.Tensor]
) -> LoraConfig:
    """``inject_adapter_in_model(..., state_dict=...)``: the config targeting exactly the modules that
    have LoRA tensors in ``state_dict`` (PEFT-format keys), with a warning when that differs from
    what the config's ``target_modules`` select."""
    modules = sorted({parse_key(k).module for k in state_dict if parse_key(k).is_adapter_tensor} - {""})
    prefix = FILE_PREFIX.rstrip(".")
    modules = [m[len(prefix) + 1 :] if m.startswith(prefix + ".") else m for m in modules]
    if not modules:
        raise AdapterError(
            "state_dict holds no LoRA tensor (lora_A / lora_B / lora_embedding_*) to inject from"
        )
    pattern = "|".join(re.escape(m) for m in modules)
    return dataclasses.replace(config, target_modules=f"(?:{pattern})")
