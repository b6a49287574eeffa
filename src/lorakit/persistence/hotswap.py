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
lacks are zeroed, as in PEFT); anything else is refused before any weight changes. A model that is
not compiled also takes an adapter of larger rank (its factors grow, as PEFT swaps them in); a
compiled one needs the padding.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterError, AdapterStateDictError
from lorakit.layers import LoraLayer
from lorakit.layers.registry import variants
from lorakit.model import engines, injection
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


def _record_shapes(user: nn.Module) -> None:
    """After factors changed shape, record the new shapes as the adapter's own (saving checks
    tensors against what was recorded, to recognise a distributed engine's shards)."""
    if engines.recorded(user) is None:
        return
    for name in {a for _, m in injection.lora_modules(user) for a in m.adapter_names}:
        params = [p for _, m in injection.lora_modules(user) for p in m.adapter_parameters(name)]
        engines.record(user, name, params)


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


def _is_compiled(model: nn.Module) -> bool:
    """A ``torch.compile`` wrapper, or a module compiled in place (``module.compile()``)."""
    return hasattr(model, "_orig_mod") or bool(getattr(model, "_compiled_call_impl", None))


def prepare_model_for_compiled_hotswap(
    model: nn.Module,
    *,
    target_rank: int | None = None,
    config: LoraConfig | Mapping[str, LoraConfig] | None = None,
    check_compiled: str = "error",
) -> None:
    """Pad every adapter of ``model`` to rank ``target_rank`` (default: the largest rank present)
    so that adapters up to that rank can be hot-swapped in without recompiling. Call it before
    ``torch.compile``; outputs are unchanged (the padding is zeros).

    ``config``: the loaded adapter's config, or the model's ``peft_config`` dict; each is updated
    to describe the padded adapters (``r`` and every ``rank_pattern`` entry become ``target_rank``,
    as in PEFT, and ``lora_alpha`` / ``alpha_pattern`` are rescaled so that each layer's scaling,
    and so a save of the padded adapter, stays what it was). lorakit never turns scalings into
    tensors: a swap folds the new scaling into B. ``check_compiled``: ``"error"`` (default),
    ``"warn"`` or ``"ignore"`` when ``model`` is already compiled (padding then recompiles)."""
    if check_compiled not in ("error", "warn", "ignore"):
        raise AdapterError(
            f"check_compiles should be one of 'error', 'warn', or 'ignore', got {check_compiled!r} instead."
        )
    if _is_compiled(model):
        if check_compiled == "error":
            raise AdapterError(
                "Call prepare_model_for_compiled_hotswap *before* compiling the model (or pass "
                "check_compiled='warn' / 'ignore' to pad anyway and recompile)"
            )
        if check_compiled == "warn":
            warnings.warn(
                "prepare_model_for_compiled_hotswap was called with a model that is already compiled. "
                "This will likely result in re-compilation, hurting performance. Call the function "
                "before compiling the model.",
                UserWarning,
                stacklevel=2,
            )
    layers = [m for _, m in injection.lora_modules(_user_model(model)) if isinstance(m, LoraLayer)]
    if not layers:
        raise AdapterError(
            "No adapter layers found on the model, make sure call `prepare_model_for_compiled_hotswap` after "
            "loading the first adapter and before loading the second adapter."
        )
    _refuse_parameters(_configs(model).values())
    largest = max(r for layer in layers for r in layer.r.values())
    rank = largest if target_rank is None else target_rank
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < largest:
        raise AdapterError(
            f"Trying to pad the adapter to the target rank {target_rank}, but the original rank is larger "
            f"({largest}): target_rank={target_rank!r} must be an integer ≥ the largest rank present"
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
    _record_shapes(_user_model(model))
    if config is not None and target_rank is not None:
        for cfg in config.values() if isinstance(config, Mapping) else [config]:
            _describe_padding(cfg, rank)


def _describe_padding(config: LoraConfig, rank: int) -> None:
    """Make ``config`` say rank ``rank`` everywhere while keeping each pattern's scaling
    (``α / r`` → ``α' / rank`` with ``α' = α · rank / r``; with rsLoRA ``α · √(rank / r)``)."""

    def alpha_for(alpha: float, r: int) -> float:
        factor = (rank / r) ** 0.5 if config.use_rslora else rank / r
        return alpha * factor

    alpha_pattern = dict(config.alpha_pattern or {})
    for key, r in (config.rank_pattern or {}).items():
        alpha_pattern[key] = alpha_for(alpha_pattern.get(key, config.lora_alpha), r)
    for key in list(alpha_pattern):
        if key not in (config.rank_pattern or {}):
            alpha_pattern[key] = alpha_for(alpha_pattern[key], config.r)
    config.lora_alpha = alpha_for(config.lora_alpha, config.r)
    config.alpha_pattern = alpha_pattern
    config.rank_pattern = dict.fromkeys(config.rank_pattern or {}, rank)
    config.r = rank


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
    live: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor], adapter_name: str, *, can_grow: bool
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
        pairs = list(enumerate(zip(old_shape, new_shape, strict=False)))
        fits = (
            axis is not None
            and len(old_shape) == len(new_shape)
            and all(o == n or (i == axis and (n < o or can_grow)) for i, (o, n) in pairs)
        )
        if not fits:
            hint = (
                (
                    " (a larger rank in a compiled model: call prepare_model_for_compiled_hotswap(model, "
                    "target_rank=...) before compiling)"
                )
                if axis is not None
                else ""
            )
            lines.append(f"{key}: shape {new_shape} does not fit the loaded {old_shape}{hint}")
    return lines


def _grow(
    user: nn.Module, live: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor], adapter_name: str
) -> None:
    """Give the layers where the new adapter's rank is larger that rank (zero-padded factors, new
    parameters): only for a model that is not compiled, where parameter shapes may change."""
    ranks: dict[str, int] = {}
    for key, value in new.items():
        parsed = parse_key(key)
        axis = parsed.rank_axis
        if axis is not None and key in live and value.shape[axis] > live[key].shape[axis]:
            ranks[parsed.module] = max(ranks.get(parsed.module, 0), int(value.shape[axis]))
    for path, rank in ranks.items():
        layer = user.get_submodule(path)
        if isinstance(layer, LoraLayer):
            _pad_layer(layer, adapter_name, rank)


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
    can_grow = not _is_compiled(model)
    lines = _problems(live, new, adapter_name, can_grow=can_grow)
    if lines:
        raise AdapterStateDictError(
            f"Hot swapping the adapter did not succeed: cannot hot-swap into adapter {adapter_name!r}; "
            "nothing was changed:\n  - " + "\n  - ".join(lines)
        )
    if can_grow:
        _grow(user, live, new, adapter_name)
        _record_shapes(user)
        live = adapter_keys(user, adapter_name, "none").tensors
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
