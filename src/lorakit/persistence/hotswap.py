"""Hot-swapping: replace a loaded adapter's weights in place with another adapter's, so that a
``torch.compile``d model keeps its compiled graphs (no module is created, no parameter changes
shape or identity, no Python number the graph depends on changes).

Two adapters differ in rank and in scaling ``s = α / r``; both are absorbed without recompiling:

* **Ranks** live in the parameters' shapes. :func:`prepare_model_for_compiled_hotswap` (called once,
  before compiling) pads every adapter's A (r × k) and B (d × r) with zeros to a ``target_rank`` R:
  ``B_pad A_pad = B A`` exactly. A later adapter of rank r' ≤ R is written into the first r' rows
  of A and columns of B, the rest zeroed.
  A grouped convolution's A is padded group by group (``rank_blocks``: block g of A's rows feeds
  group g of B), and its B to ``R / groups`` columns.
* **Scalings** are not touched: the layer keeps ``s`` and receives ``B' · s'/s`` (and the LoRA bias
  likewise), so ``s · B'(s'/s) A' = s' · B' A'`` — the new adapter's update.

The new adapter must target the same modules as the loaded one (a subset is fine: the layers it
lacks are zeroed, as in PEFT); anything else is refused before any weight changes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterError
from lorakit.layers import LoraLayer
from lorakit.layers.registry import variants
from lorakit.model import injection
from lorakit.model.targeting import rank_and_alpha
from lorakit.persistence.adapter_dir import read_adapter
from lorakit.persistence.keys import adapter_keys, from_file_keys, parse_key

__all__ = ["prepare_model_for_compiled_hotswap", "hotswap_adapter_from_state_dict", "hotswap_adapter"]


def _user_model(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # a torch.compile wrapper
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _configs(model: nn.Module) -> Mapping[str, LoraConfig]:
    model = getattr(model, "_orig_mod", model)
    configs = getattr(model, "peft_config", None)
    return configs if isinstance(configs, Mapping) else {}


def _padded(old: torch.Tensor, rank: int, axis: int) -> torch.Tensor:
    shape = list(old.shape)
    shape[axis] = rank
    new = old.new_zeros(shape)
    new.narrow(axis, 0, old.shape[axis]).copy_(old.detach())
    return new


def _copy_blocks(target: torch.Tensor, value: torch.Tensor, blocks: int) -> None:
    """Copy A ``value`` (r', …) into the larger ``target`` (R, …) block by block: rows
    ``g·r'/G …`` go to ``g·R/G …``, so that each group of a grouped B still reads its own rows."""
    step, new_step = target.shape[0] // blocks, value.shape[0] // blocks
    for g in range(blocks):
        rows = value[g * new_step : (g + 1) * new_step]
        target[g * step : g * step + new_step].copy_(rows.to(device=target.device, dtype=target.dtype))


@torch.no_grad()
def _pad_layer(layer: LoraLayer, name: str, rank: int) -> None:
    """Zero-pad adapter ``name``'s factors to ``rank`` (``B_pad A_pad = B A``); the scaling keeps
    the adapter's own rank."""
    a, b = layer.factors(name)
    blocks = layer.rank_blocks
    new_a = a.new_zeros((rank, *a.shape[1:]))
    _copy_blocks(new_a, a.detach(), blocks)
    layer.set_factors(name, new_a, _padded(b, rank // blocks, 1))


def prepare_model_for_compiled_hotswap(
    model: nn.Module, *, target_rank: int | None = None, config: object = None, check_compiled: str = "error"
) -> None:
    """Pad every adapter of ``model`` to rank ``target_rank`` (default: the largest rank present)
    so that adapters up to that rank can be hot-swapped in without recompiling. Call it before
    ``torch.compile``; outputs are unchanged (the padding is zeros).

    ``config`` is accepted for PEFT's signature and not needed: lorakit never turns scalings into
    tensors (a swap folds the new scaling into B). ``check_compiled``: ``"error"`` (default),
    ``"warn"`` or ``"ignore"`` when ``model`` is already compiled (padding then recompiles)."""
    if check_compiled not in ("error", "warn", "ignore"):
        raise AdapterError(f"check_compiled={check_compiled!r}: must be one of 'error', 'warn', 'ignore'")
    if hasattr(model, "_orig_mod"):
        message = "prepare_model_for_compiled_hotswap must be called before torch.compile(model)"
        if check_compiled == "error":
            raise AdapterError(message)
        if check_compiled == "warn":
            warnings.warn(message, stacklevel=2)
    layers = [m for _, m in injection.lora_modules(_user_model(model)) if isinstance(m, LoraLayer)]
    if not layers:
        raise AdapterError("the model holds no LoRA layer to prepare for hot-swapping")
    _refuse_parameters(_configs(model).values())
    largest = max(r for layer in layers for r in layer.r.values())
    rank = largest if target_rank is None else target_rank
    if not isinstance(rank, int) or rank < largest:
        raise AdapterError(
            f"target_rank={target_rank!r}: must be an integer ≥ the largest rank present ({largest})"
        )
    grouped = sorted({layer.rank_blocks for layer in layers if rank % layer.rank_blocks})
    if grouped:
        raise AdapterError(
            f"target_rank={rank} is not a multiple of the groups of grouped convolution(s) {grouped}; "
            "choose a multiple of them"
        )
    for layer in layers:
        for name in layer.adapter_names:
            if layer.r[name] < rank:
                _pad_layer(layer, name, rank)


def _refuse_parameters(configs: Iterable[LoraConfig | None]) -> None:
    """The factors of several experts interleave their ranks (``lorakit.functional.experts``):
    padding them to another rank would mix experts, so such adapters are not hot-swapped."""
    if any(c is not None and c.target_parameters for c in configs):
        raise AdapterError(
            "hot-swapping adapters that use target_parameters (experts of MoE layers) is not supported: "
            "their per-expert factors cannot be padded to another rank; load the adapter with "
            "load_adapter and set_adapter instead"
        )


def _problems(
    live: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor], adapter_name: str
) -> list[str]:
    variant_of = {v.container: v.name for v in variants()}
    extra = sorted(set(new) - set(live))
    lines = [
        f"{k}: the new adapter uses {variant_of[parse_key(k).part]}, the loaded adapter {adapter_name!r} "
        "does not"
        for k in extra
        if parse_key(k).part in variant_of
    ]
    lines += [
        f"{k}: the new adapter has this tensor but the loaded adapter {adapter_name!r} has no such "
        "module (hot-swapping cannot add targets; load it with load_adapter instead)"
        for k in extra
        if parse_key(k).part not in variant_of
    ]
    lines += [
        f"{k}: the new adapter lacks the {variant_of[parse_key(k).part]} tensor the loaded one has"
        for k in sorted(set(live) - set(new))
        if parse_key(k).part in variant_of
    ]
    for key in sorted(set(new) & set(live)):
        old_shape, new_shape = tuple(live[key].shape), tuple(new[key].shape)
        if old_shape == new_shape:
            continue
        axis = parse_key(key).rank_axis
        pairs = enumerate(zip(old_shape, new_shape, strict=False))
        fits = (
            axis is not None
            and len(old_shape) == len(new_shape)
            and all(o == n or (i == axis and n < o) for i, (o, n) in pairs)
        )
        if not fits:
            hint = (
                (
                    " (a larger rank: call prepare_model_for_compiled_hotswap(model, target_rank=...) "
                    "before compiling)"
                )
                if axis is not None
                else ""
            )
            lines.append(f"{key}: shape {new_shape} does not fit the loaded {old_shape}{hint}")
    return lines


def _scale_ratios(user: nn.Module, adapter_name: str, config: LoraConfig | None) -> dict[str, float]:
    """Layer path → s_new / s_loaded for every layer holding ``adapter_name``."""
    ratios = {}
    for path, layer in injection.lora_modules(user):
        if isinstance(layer, LoraLayer) and layer.has_adapter(adapter_name):
            if config is None:
                ratios[path] = 1.0
            else:
                r, alpha = rank_and_alpha(config, path)
                ratios[path] = config.scaling_for(r, alpha) / layer.scaling[adapter_name]
    return ratios


@torch.no_grad()
def hotswap_adapter_from_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    adapter_name: str = "default",
    config: LoraConfig | None = None,
) -> None:
    """Write ``state_dict`` (PEFT's file keys, with or without ``base_model.model.``) into the loaded
    adapter ``adapter_name`` of ``model`` (a ``PeftModel``, a model with injected adapters, or a
    ``torch.compile`` wrapper of either), in place.

    ``config`` is the new adapter's config; its rank/alpha (and patterns, rsLoRA) give the new
    scalings. Without it the loaded scalings are assumed to apply. Every check runs first: on an
    error nothing changes.
    """
    _refuse_parameters([config, _configs(model).get(adapter_name)])
    user = _user_model(model)
    live = adapter_keys(user, adapter_name, "none").tensors
    if not live:
        raise AdapterError(f"the model holds no adapter named {adapter_name!r} to hot-swap")
    merged = [
        p
        for p, m in injection.lora_modules(user)
        if isinstance(m, LoraLayer) and adapter_name in m.merged_adapters
    ]
    if merged:
        raise AdapterError(
            f"adapter {adapter_name!r} is merged into {len(merged)} layer(s) "
            f"(e.g. {merged[0]}); unmerge before hot-swapping"
        )
    # without the base weights PEFT saves beside an adapter (an attention's nested out_proj adapter
    # has "base_layer" in its path too, so it is the key's own part that tells)
    new = {k: v for k, v in from_file_keys(state_dict).items() if parse_key(k).part != "base_layer"}
    lines = _problems(live, new, adapter_name)
    if lines:
        raise AdapterError(
            f"cannot hot-swap into adapter {adapter_name!r}; nothing was changed:\n  - "
            + "\n  - ".join(lines)
        )
    ratios = _scale_ratios(user, adapter_name, config)
    blocks = {p: m.rank_blocks for p, m in injection.lora_modules(user) if isinstance(m, LoraLayer)}
    for key, target in live.items():
        value = new.get(key)
        target.zero_()
        if value is None:
            continue
        parsed = parse_key(key)
        if parsed.role == "B":  # B and its bias carry the scaling ratio
            value = value * ratios.get(parsed.module, 1.0)
        if parsed.rank_axis == 0 and blocks.get(parsed.module, 1) > 1:
            _copy_blocks(target, value, blocks[parsed.module])
            continue
        region = target[tuple(slice(0, n) for n in value.shape)]
        region.copy_(value.to(device=target.device, dtype=target.dtype))


def hotswap_adapter(
    model: nn.Module,
    model_name_or_path: str | os.PathLike[str],
    adapter_name: str = "default",
    torch_device: str | None = None,
    subfolder: str | None = None,
) -> None:
    """Hot-swap the adapter saved in directory ``model_name_or_path`` (lorakit's or PEFT's format)
    into the loaded adapter ``adapter_name`` of ``model``; see :func:`hotswap_adapter_from_state_dict`.
    Settings that change what the layers compute (DoRA, LoRA bias, Conv1D layout, bias mode) must
    match the loaded adapter's config; rank, alpha, their patterns and rsLoRA may differ.
    ``torch_device`` is accepted for PEFT's signature: tensors always go to their parameter's device."""
    files_ = read_adapter(model_name_or_path, subfolder=subfolder)
    loaded = _configs(model).get(adapter_name)
    if loaded is not None:
        diffs = [
            f"{k}: loaded {getattr(loaded, k)!r}, new {getattr(files_.config, k)!r}"
            for k in ("use_dora", "lora_bias", "fan_in_fan_out", "bias")
            if getattr(loaded, k) != getattr(files_.config, k)
        ]
        if diffs:
            raise AdapterError(
                f"cannot hot-swap {str(model_name_or_path)!r} into adapter {adapter_name!r}; "
                "the configs differ in what the layers compute: " + "; ".join(diffs)
            )
    hotswap_adapter_from_state_dict(model, files_.tensors, adapter_name, files_.config)
