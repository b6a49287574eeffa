"""PEFT's state-dict functions: an adapter's tensors under PEFT's keys, and the base model's own.

* :func:`get_peft_model_state_dict` / :func:`set_peft_model_state_dict`: one adapter, keys as in
  an adapter file (:mod:`lorakit.persistence.keys` has the grammar). Loading checks every key and
  shape before it copies anything.
* :func:`get_base_model_state_dict` / :func:`set_base_model_state_dict`: the user's model without
  any adapter tensor, under the keys it had before LoRA was added (``<m>.base_layer.weight`` is
  ``<m>.weight`` again), e.g. to save or load base weights of a model that FSDP wraps.

Names inserted by distributed engines (``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``,
``_orig_mod.``) never reach a key: a state dict taken from a wrapped model loads into a plain one.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Literal, NamedTuple

import torch
from torch import nn

from lorakit.errors import AdapterError, AdapterShapeError, AdapterStateDictError
from lorakit.layers import LoraLayer, ModulesToSaveWrapper
from lorakit.model import engines
from lorakit.model.injection import lora_modules
from lorakit.persistence.keys import adapter_keys, loadable_embedding_tensors, saved_tensors

__all__ = [
    "IncompatibleKeys",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
    "get_base_model_state_dict",
    "set_base_model_state_dict",
]


class IncompatibleKeys(NamedTuple):
    """What a load did not match, as ``torch``'s ``load_state_dict`` and PEFT report it."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _bias_mode(model: nn.Module, adapter_name: str) -> str:
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, Mapping) and adapter_name in configs:
        return str(getattr(configs[adapter_name], "bias", "none"))
    return "none"


def _refuse_shards(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """A sharded engine's pieces are not the adapter: say how to get the whole tensors."""
    root = next((m for _, m in model.named_modules() if engines.recorded(m) is not None), model)
    problems = engines.shard_problems(tensors, engines.expected_shapes(root, tensors))
    if problems:
        raise AdapterError(
            f"{len(problems)} adapter tensor(s) are shards of a distributed engine, not whole tensors:\n  - "
            + "\n  - ".join(problems[:10])
            + "\nCall lorakit.distributed.gather_adapter_state_dict(model) "
            "on every rank, or pass a gathered full state_dict"
        )


def _unwrapped(model: nn.Module, unwrap_compiled: bool) -> nn.Module:
    return getattr(model, "_orig_mod", model) if unwrap_compiled else model


def get_peft_model_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    unwrap_compiled: bool = False,
    save_embedding_layers: bool | Literal["auto"] = "auto",
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys (adapter name removed), detached, on their device.

    If ``state_dict`` is given (e.g. a gathered full state dict), values are read from it by their
    in-memory key instead of from the live model. ``save_embedding_layers``: whether the input and
    output embeddings' base weights are included: ``"auto"`` (PEFT's rule: when an embedding is a
    target), ``True`` or ``False``. A merged embedding contributes its unmerged weight. Keys never
    carry a distributed engine's wrapper names.
    """
    model = _unwrapped(model, unwrap_compiled)
    configs = getattr(model, "peft_config", None)
    config = configs.get(adapter_name) if isinstance(configs, Mapping) else None
    tensors = saved_tensors(
        model,
        adapter_name,
        _bias_mode(model, adapter_name),
        getattr(config, "target_modules", None),
        save_embedding_layers=save_embedding_layers,
        trainable_tokens=getattr(config, "trainable_token_indices", None) is not None,
    )
    if state_dict is None:
        _refuse_shards(model, tensors)
        return {engines.canonical_name(k): t.detach() for k, t in tensors.items()}
    live = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    return {engines.canonical_name(k): state_dict[live[id(t)]] for k, t in tensors.items() if id(t) in live}


def _assign(model: nn.Module, target: torch.Tensor, value: torch.Tensor) -> None:
    """Give a meta-device parameter (``low_cpu_mem_usage``) real storage holding ``value``."""
    for module in model.modules():
        for pname, param in module._parameters.items():
            if param is target:
                module._parameters[pname] = nn.Parameter(value, requires_grad=param.requires_grad)
                return
    raise AdapterError("internal: a meta-device adapter tensor belongs to no module of the model")


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: Mapping[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> IncompatibleKeys:
    """Load PEFT-format tensors into adapter ``adapter_name``; every key must fit.

    All problems (keys that match nothing, adapter tensors the dict lacks, shape mismatches) are
    collected and raised together before any tensor is copied; a size mismatch raises
    :class:`~lorakit.errors.AdapterShapeError` (also a ``RuntimeError``, PEFT's type).
    ``ignore_mismatched_sizes``: tensors whose shape differs are skipped with a warning (they keep
    their initial values) instead. An adapter created with ``low_cpu_mem_usage`` (on the meta
    device) gets its storage here, on its base layer's device; ``low_cpu_mem_usage`` is accepted
    for PEFT's signature (meta tensors are recognised either way). Keys may carry a distributed
    engine's wrapper names (a dict taken from an FSDP-wrapped model).

    Returns PEFT's result: ``missing_keys`` and ``unexpected_keys`` (empty, since lorakit refuses
    what PEFT would report there).
    """
    given = {engines.canonical_name(k): v for k, v in peft_model_state_dict.items()}
    keys = {engines.canonical_name(k): t for k, t in adapter_keys(model, adapter_name, "all").tensors.items()}
    keys.update({engines.canonical_name(k): t for k, t in loadable_embedding_tensors(model).items()})
    expected = [
        engines.canonical_name(k)
        for k in adapter_keys(model, adapter_name, _bias_mode(model, adapter_name)).tensors
    ]
    if not expected:
        raise AdapterError(f"the model holds no adapter named {adapter_name!r} to load into")
    mismatched = {
        k: (tuple(keys[k].shape), tuple(v.shape))
        for k, v in given.items()
        if k in keys and tuple(v.shape) != tuple(keys[k].shape)
    }
    if ignore_mismatched_sizes and mismatched:
        warnings.warn(
            f"Some weights of {type(model).__name__} were not initialized from the model checkpoint and "
            "are being ignored because you passed `ignore_mismatched_sizes=True`: "
            + "; ".join(
                f"{k}: found shape {f} in the checkpoint, the model has {m}"
                for k, (m, f) in mismatched.items()
            ),
            UserWarning,
            stacklevel=2,
        )
        given = {k: v for k, v in given.items() if k not in mismatched}
    unknown = sorted(k for k in given if k not in keys)
    missing = sorted(
        k for k in expected if k not in given and not (ignore_mismatched_sizes and k in mismatched)
    )
    lines = []
    if unknown:
        lines.append(f"{len(unknown)} key(s) match no adapter tensor of the model: {unknown[:20]}")
    if missing:
        lines.append(f"{len(missing)} adapter tensor(s) missing from the state dict: {missing[:20]}")
    if mismatched and not ignore_mismatched_sizes:
        lines.append(
            f"size mismatch for {len(mismatched)} tensor(s): "
            + "; ".join(f"{k}: model expects {m}, got {f}" for k, (m, f) in list(mismatched.items())[:20])
            + " (pass ignore_mismatched_sizes=True to skip them)"
        )
    if lines:
        error = AdapterShapeError if mismatched and not ignore_mismatched_sizes else AdapterError
        raise error(
            f"cannot load adapter {adapter_name!r}; nothing was changed:\n  - " + "\n  - ".join(lines)
        )
    materialised: set[int] = set()
    with torch.no_grad():
        for k, v in given.items():
            target = keys[k]
            if target.is_meta:
                _assign(model, target, v.detach().clone())
                materialised.add(id(target))
            else:
                target.copy_(v.to(device=target.device, dtype=target.dtype))
    if materialised:  # now on the file's device and dtype: move them next to their base layers
        for _, module in lora_modules(model):
            if isinstance(module, LoraLayer) and module.has_adapter(adapter_name):
                module.place_adapter(adapter_name)
    return IncompatibleKeys(missing_keys=[], unexpected_keys=[])


def _base_key_map(model: nn.Module) -> dict[str, str]:
    """Key in ``model.state_dict()`` → the key the base model had before LoRA, for every tensor
    that is not an adapter's (LoRA factors and modules-to-save copies are left out)."""
    renames: list[tuple[str, str]] = []  # (prefix in the LoRA model, prefix in the base model)
    dropped: list[str] = []
    for name, module in lora_modules(model):
        prefix = f"{name}." if name else ""
        if isinstance(module, LoraLayer):
            renames.append((f"{prefix}base_layer.", prefix))
            dropped.extend(f"{prefix}{attr}." for attr in module.adapter_param_names)
        elif isinstance(module, ModulesToSaveWrapper):
            renames.append((f"{prefix}original_module.", prefix))
            dropped.append(f"{prefix}modules_to_save.")
    mapping: dict[str, str] = {}
    for key in model.state_dict(keep_vars=True):
        if any(key.startswith(d) for d in dropped):
            continue
        original = key
        for old, new in sorted(renames, key=lambda r: -len(r[0])):
            if key.startswith(old):
                original = new + key[len(old) :]
                break
        mapping[key] = engines.canonical_name(original)
    return mapping


def _user_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def get_base_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the model without its adapters, under the base model's own keys. Weights
    that have adapters merged into them are given as they are without them."""
    user = _user_model(model)
    live = user.state_dict()
    originals: dict[str, torch.Tensor] = {}
    for name, module in lora_modules(user):
        if isinstance(module, LoraLayer) and module.merged:
            prefix = f"{name}.base_layer." if name else "base_layer."
            originals[prefix + "weight"] = module.original_weight().detach()
            bias = module.original_bias()
            if bias is not None:
                originals[prefix + "bias"] = bias.detach()
    return {new: originals.get(old, live[old]) for old, new in _base_key_map(user).items()}


def set_base_model_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], strict: bool = True
) -> IncompatibleKeys:
    """Load a state dict keyed as the base model was (``<m>.weight``) into a model with adapters.

    ``strict=True``: missing or unexpected keys raise :class:`~lorakit.errors.AdapterStateDictError`
    (a ``RuntimeError`` too) and nothing is loaded; ``strict=False``: what matches is loaded and the
    rest reported. Refused while adapters are merged (the new weights would mix with merged ones).
    """
    user = _user_model(model)
    merged = [n for n, m in lora_modules(user) if isinstance(m, LoraLayer) and m.merged]
    if merged:
        raise AdapterError(
            f"cannot set base weights while adapters are merged (in {merged[:5]}); unmerge first"
        )
    to_peft = {new: old for old, new in _base_key_map(user).items()}
    unexpected = [k for k in state_dict if k not in to_peft]
    missing = [k for k in to_peft if k not in state_dict]
    if strict and (missing or unexpected):
        lines = []
        if missing:
            lines.append(f"Missing key(s) in state_dict: {missing[:20]}")
        if unexpected:
            lines.append(f"Unexpected key(s) in state_dict: {unexpected[:20]}")
        raise AdapterStateDictError(
            "Error(s) in loading state_dict; nothing was loaded:\n\t" + "\n\t".join(lines)
        )
    user.load_state_dict({to_peft[k]: v for k, v in state_dict.items() if k in to_peft}, strict=False)
    return IncompatibleKeys(missing_keys=missing, unexpected_keys=unexpected)
