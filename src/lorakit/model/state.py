"""Named state changes of the adapters in a model: activate, train, disable, merge, delete.

Every function takes the model (any ``nn.Module`` holding LoRA layers) and validates its arguments
before it changes anything. Temporary states are context managers that restore in ``finally``.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

from torch import nn

from lorakit.errors import AdapterError, AdapterMergeError
from lorakit.layers import Embedding, LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper
from lorakit.model import engines
from lorakit.model.injection import lora_modules, share_factors

__all__ = [
    "adapter_names",
    "active_adapters",
    "set_active",
    "set_adapter",
    "set_trainable",
    "set_requires_grad",
    "enable_layers",
    "delete",
    "disabled",
    "merge",
    "unmerge",
    "merged_adapters",
    "count_parameters",
    "place_adapter",
]


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter present in ``model``, in order of first appearance."""
    names: dict[str, None] = {}
    for _, module in lora_modules(model):
        names.update(dict.fromkeys(module.adapter_names))
    return list(names)


def _check_known(model: nn.Module, names: Sequence[str]) -> None:
    known = adapter_names(model)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise AdapterError(f"no adapter named {', '.join(map(repr, unknown))}; existing adapters: {known}")


def active_adapters(model: nn.Module) -> list[str]:
    """The model's active list, as its LoRA layers record it (a modules-to-save wrapper records
    only the active adapters it has a copy for)."""
    for _, module in lora_modules(model):
        if isinstance(module, LoraLayer) and module.active_adapters:
            return list(module.active_adapters)
    return []


def set_active(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the adapters forward applies (several LoRA adapters sum their updates).

    Trainability is not touched: call :func:`set_trainable` for that.
    """
    names = [names] if isinstance(names, str) else list(names)
    _check_known(model, names)
    savers = [m for _, m in lora_modules(model) if isinstance(m, ModulesToSaveWrapper)]
    for wrapper in savers:
        if sum(wrapper.has_adapter(n) for n in names) > 1:
            raise AdapterError(
                "Only one adapter can be set at a time for ModulesToSaveWrapper: adapters "
                f"{names} each carry their own copy of a module to save, so only one of them can be active"
            )
    for name, module in lora_modules(model):
        if isinstance(module, TrainableTokensWrapper) and (problem := module.overlap_problem(names)):
            raise AdapterError(f"{name}: {problem}")
    for _, module in lora_modules(model):
        module.set_active(names)


def set_adapter(model: nn.Module, names: str | Sequence[str], *, inference_mode: bool = False) -> None:
    """PEFT's ``set_adapter``: activate ``names`` and make exactly their adapter tensors (and
    modules-to-save copies) trainable, or freeze them all with ``inference_mode``; other parameters
    keep their ``requires_grad``. A merged layer is first unmerged, with a warning (merged weights
    would otherwise stay in effect beside the new adapters)."""
    names = [names] if isinstance(names, str) else list(names)
    set_active(model, names)  # validates first
    if merged_adapters(model):
        warnings.warn(
            "Adapter cannot be set when the model is merged. Unmerging the model first.",
            UserWarning,
            stacklevel=3,
        )
        unmerge(model)
    for _, module in lora_modules(model):
        module.set_adapter(names, inference_mode=inference_mode)


def set_requires_grad(model: nn.Module, names: str | Sequence[str], requires_grad: bool = True) -> None:
    """Switch ``requires_grad`` of the adapter tensors and modules-to-save copies of ``names``."""
    names = [names] if isinstance(names, str) else list(names)
    _check_known(model, names)
    for _, module in lora_modules(model):
        module.set_requires_grad(names, requires_grad)


def enable_layers(model: nn.Module, enabled: bool) -> None:
    """PEFT's ``enable_adapter_layers`` / ``disable_adapter_layers``: every layer computes with its
    adapters or as its base layer; disabling freezes the adapters, enabling makes the active ones
    trainable again (PEFT's rule; the ``disabled()`` block restores the exact previous flags)."""
    for _, module in lora_modules(model):
        module.enable_adapters(enabled)


def set_trainable(model: nn.Module, names: str | Sequence[str], bias: str = "none") -> None:
    """``requires_grad`` on exactly: the LoRA weights and modules-to-save copies of ``names``, and
    the biases selected by ``bias`` (``"all"``: every bias; ``"lora_only"``: biases of adapted
    layers). Everything else is frozen."""
    names = [names] if isinstance(names, str) else list(names)
    _check_known(model, names)
    for param in model.parameters():
        param.requires_grad_(False)
    for _, module in lora_modules(model):
        for name in names:
            params = (
                module.trainable_parameters(name)
                if isinstance(module, LoraLayer)
                else module.adapter_parameters(name)
            )
            for param in params:
                param.requires_grad_(True)
        if bias == "lora_only" and isinstance(module, LoraLayer):
            base_bias = getattr(module.base_layer, "bias", None)
            if base_bias is not None and any(module.has_adapter(n) for n in names):
                base_bias.requires_grad_(True)
    if bias == "all":
        # The frozen originals behind modules-to-save copies never train (as in PEFT).
        originals = {
            id(p)
            for _, m in lora_modules(model)
            if isinstance(m, ModulesToSaveWrapper)
            for p in m.original_module.parameters()
        }
        for pname, param in model.named_parameters():
            if (
                "bias" in pname.rsplit(".", 1)[-1]
                and not _is_adapter_param(model, pname)
                and id(param) not in originals
            ):
                param.requires_grad_(True)


def _is_adapter_param(model: nn.Module, pname: str) -> bool:
    parts = pname.split(".")
    return any(p in LoraLayer.adapter_param_names or p == "modules_to_save" for p in parts)


def delete(model: nn.Module, name: str) -> list[str]:
    """Remove adapter ``name`` and every parameter it owns; returns the adapters active afterwards.

    The LoRA layers stay in place (with no adapter left, they compute as their base layers), as in
    PEFT. If ``name`` was the only active adapter, the first remaining adapter by sorted name becomes
    active (PEFT's choice), with a warning; its tensors become trainable, as PEFT's ``set_adapter``
    makes them."""
    _check_known(model, [name])
    merged = [
        n
        for n, m in lora_modules(model)
        if isinstance(m, (LoraLayer, TrainableTokensWrapper)) and name in m.merged_adapters
    ]
    if merged:
        raise AdapterError(
            f"Cannot delete adapter(s) {[name]} while they are merged. Please unmerge them first. "
            f"(merged into {len(merged)} layer(s), e.g. {merged[0]})"
        )
    active = active_adapters(model)
    for _, module in lora_modules(model):
        module.delete_adapter(name)
    if name not in active:
        return active
    remaining_active = [a for a in active if a != name]
    if remaining_active:
        new_active = remaining_active
    else:
        remaining = sorted(adapter_names(model))
        new_active = remaining[:1]
        if new_active:
            warnings.warn(
                f"Adapter {name} was active which is now deleted. Setting active adapter to {new_active[0]}.",
                UserWarning,
                stacklevel=3,
            )
    for _, module in lora_modules(model):
        module.set_adapter(new_active)
    return new_active


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Within the block the model computes as its base model and no adapter tensor requires a
    gradient. Merged adapters are unmerged (exactly) on entry and merged again on exit; the enabled
    flags and ``requires_grad`` of every adapter tensor are restored exactly."""
    modules = [m for _, m in lora_modules(model)]
    merged = [(m, list(m.merged_adapters)) for m in _merge_writers(modules) if m.merged]
    previous = [m.disable_adapters for m in modules]
    grads = [(p, p.requires_grad) for m in modules for a in m.adapter_names for p in m.adapter_parameters(a)]
    try:
        for layer, _ in merged:
            layer.unmerge()
        for m in modules:
            m.disable_adapters = True
        for param, _ in grads:
            param.requires_grad_(False)
        yield
    finally:
        for m, flag in zip(modules, previous, strict=True):
            m.disable_adapters = flag
        for param, flag in grads:
            param.requires_grad_(flag)
        _merge_layers([(m, names) for m, names in merged if isinstance(m, LoraLayer)], keep_original=True)
        for m, names in merged:
            if isinstance(m, TrainableTokensWrapper):
                m.merge(names)


def _merge_writers(modules: Sequence[nn.Module]) -> list[LoraLayer | TrainableTokensWrapper]:
    """The modules that write merges into base weights: LoRA layers, and trainable-tokens wrappers
    that are not tied (a tied one's merges are its embedding's)."""
    return [
        m
        for m in modules
        if isinstance(m, LoraLayer) or (isinstance(m, TrainableTokensWrapper) and not m.tied)
    ]


def merged_adapters(model: nn.Module) -> list[str]:
    names: dict[str, None] = {}
    for _, m in lora_modules(model):
        if isinstance(m, (LoraLayer, TrainableTokensWrapper)):
            names.update(dict.fromkeys(m.merged_adapters))
    return list(names)


def merge(
    model: nn.Module,
    names: Sequence[str] | None = None,
    *,
    safe_merge: bool = False,
    keep_original: bool = True,
) -> None:
    """Merge ``names`` (default: the active adapters) into the base weights of every LoRA layer.

    With ``safe_merge`` every layer's result is checked first: if any is non-finite, nothing is
    written anywhere.
    """
    if isinstance(names, str):
        raise TypeError(f"adapter_names should be a list of strings, got {names!r}")
    if names is not None:
        _check_known(model, list(names))
    named = [(n, m) for n, m in lora_modules(model) if isinstance(m, LoraLayer)]
    _warn_already_merged(named, names)
    tokens = [(n, m) for n, m in lora_modules(model) if isinstance(m, TrainableTokensWrapper) and not m.tied]
    problems = [f"{lname}: {problem}" for lname, layer in named if (problem := _merge_problem(layer, names))]
    problems += [f"{n}: {problem}" for n, m in tokens if (problem := m.merge_problem(names))]
    problems += _tied_weight_problems(model, named, names)
    problems += _token_weight_problems(model, tokens, names)
    if problems:
        raise AdapterMergeError("cannot merge, nothing was merged:\n  - " + "\n  - ".join(problems))
    layers = [m for _, m in named]
    if safe_merge:
        bad = []
        for lname, layer in named:
            result = layer.merge_result(names)
            if result is not None and not all(t.isfinite().all() for t in result if t is not None):
                bad.append(lname)
        if bad:
            wanted = names if names is not None else active_adapters(model)
            raise AdapterError(
                f"NaNs detected in the merged weights. The adapter {', '.join(wanted)} seems to be broken "
                f"(safe_merge: merging would give non-finite weights in {', '.join(bad)}; nothing was merged)"
            )
    if safe_merge:
        bad_rows = [n for n, m in tokens if any(not m.rows(a).isfinite().all() for a in m.merge_names(names))]
        if bad_rows:
            raise AdapterError(
                f"safe_merge: non-finite token rows in {', '.join(bad_rows)}; nothing was merged"
            )
    _merge_layers([(layer, names) for layer in layers], keep_original=keep_original)
    for _, wrapper in tokens:
        wrapper.merge(names)


def _factors_tied(a: LoraLayer, b: LoraLayer, name: str) -> bool:
    """Whether layers ``a`` and ``b`` hold adapter ``name``'s factors in the same memory (an output
    head sharing the embedding's adapter, ``ensure_weight_tying``): then their ΔW are one."""
    if not (a.has_adapter(name) and b.has_adapter(name)):
        return False
    factors = [*a.factors(name), *b.factors(name)]
    if any(t.is_meta for t in factors):  # meta tensors (low_cpu_mem_usage) have no storage to share
        return False
    storages = [{t.untyped_storage().data_ptr() for t in layer.factors(name)} for layer in (a, b)]
    return storages[0] == storages[1]


def _merge_layers(pairs: Sequence[tuple[LoraLayer, Sequence[str] | None]], *, keep_original: bool) -> None:
    """Merge each layer's adapters. A layer whose base weight an earlier layer of the list merged
    into, with factors tied to that layer's, records that merge instead of adding ΔW a second time
    (PEFT adds it twice)."""
    leaders: dict[int, LoraLayer] = {}
    for layer, names in pairs:
        weight = layer.dense_weight()
        leader = leaders.get(id(weight))
        pending = layer.merge_result_names(names)
        if leader is not None and pending and all(_factors_tied(layer, leader, n) for n in pending):
            layer.follow_merge(leader, pending)
        else:
            layer.merge(names, keep_original=keep_original)
            leaders.setdefault(id(weight), layer)


def _warn_already_merged(named: list[tuple[str, LoraLayer]], names: Sequence[str] | None) -> None:
    """PEFT's warnings when merging into layers that already hold merged adapters."""
    already = list(dict.fromkeys(a for _, m in named for a in m.merged_adapters))
    if not already:
        return
    adding = list(dict.fromkeys(a for _, m in named if m.merged for a in m.merge_result_names(names)))
    if adding:
        message = (
            f"Already following adapters were merged {','.join(already)}. "
            f"You are now additionally merging {','.join(adding)}."
        )
    else:
        message = "All adapters are already merged, nothing to do."
    warnings.warn(message, UserWarning, stacklevel=4)


def _merge_problem(layer: LoraLayer, names: Sequence[str] | None) -> str | None:
    """What the layer refuses, or what an engine did to its weight (checked first: a sharded weight
    has nothing to merge into)."""
    sharded = engines.sharded_weight_problem(layer.dense_weight(), layer.base_weight_shape)
    return sharded or layer.merge_problem(names)


def _tied_weight_problems(
    model: nn.Module, named: list[tuple[str, LoraLayer]], names: Sequence[str] | None
) -> list[str]:
    """Merging writes into the base weight; a weight tied to another module (GPT-2's ``wte`` and
    ``lm_head``, say) would change that module too, so such a merge is refused."""
    owners: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname)
    layers = dict(named)
    problems = []
    for lname, layer in named:
        # the tensors a merge writes: the base layer's own (an attention's in_proj_weight, ...) or,
        # for a targeted parameter, that parameter of the owning module
        own = [layer.dense_weight(), *layer.base_layer.parameters(recurse=False)]
        sharing = max((owners.get(id(p), []) for p in own), key=len, default=[])
        pending = layer.merge_result_names(names)
        others = [p for p in sharing if not p.startswith(lname + ".")]
        # a head that shares the embedding's adapter (ensure_weight_tying) changes with it: allowed
        others = [
            p
            for p in others
            if not (
                (other := layers.get(p.removesuffix(".base_layer.weight"))) is not None
                and all(_factors_tied(layer, other, n) for n in pending)
            )
        ]
        if others and pending:
            problems.append(
                f"{lname}: its weight is tied to {', '.join(others)}; merging would change those too. "
                "Use the adapter unmerged, or untie the weights first (e.g. give the output head its own "
                "copy and set config.tie_word_embeddings=False)"
            )
    return problems


def _token_weight_problems(
    model: nn.Module, tokens: list[tuple[str, TrainableTokensWrapper]], names: Sequence[str] | None
) -> list[str]:
    """Merging token rows writes them into the base weight; every other module using that weight
    must compute with the same rows (a wrapper tied to this one), or the merge would change it."""
    owners: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname.rsplit(".", 1)[0])
    wrappers = [(n, m) for n, m in lora_modules(model) if isinstance(m, TrainableTokensWrapper)]
    problems = []
    for name, wrapper in tokens:
        if not wrapper.merge_names(names):
            continue
        group = {
            f"{n}.token_adapter.base_layer" for n, m in wrappers if m.token_indices is wrapper.token_indices
        }
        others = [o for o in owners.get(id(wrapper.weight), []) if o not in group]
        others = [o.removesuffix(".token_adapter.base_layer").removesuffix(".base_layer") for o in others]
        if others:
            problems.append(
                f"{name}: its weight is also used by {', '.join(others)}, which do not use its token rows; "
                "merging would change them. Use the adapter unmerged"
            )
    return problems


def unmerge(model: nn.Module) -> None:
    """Restore every merged base weight bit for bit."""
    for module in _merge_writers([m for _, m in lora_modules(model)]):
        module.unmerge()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, counting each shared parameter once (PEFT's numbers)."""
    trainable = total = 0
    for param in model.parameters():
        n = getattr(param, "ds_numel", 0) or param.numel()
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def place_adapter(model: nn.Module, name: str, *, autocast_dtype: bool = True) -> None:
    """Re-place adapter ``name``'s factors in every LoRA layer: float32 on a half-precision base
    (``autocast_dtype=True``, the default) or the base weight's dtype (``False``). Factors an
    output head shares with the embedding (``ensure_weight_tying``) stay shared."""
    _check_known(model, [name])
    layers = [m for _, m in lora_modules(model) if isinstance(m, LoraLayer) and m.has_adapter(name)]
    pairs = [(a, b) for i, a in enumerate(layers) for b in layers[i + 1 :] if _factors_tied(a, b, name)]
    # (embedding, head): the embedding keeps its factors as parameters, the head views them
    shared = [(a, b) if isinstance(a, Embedding) else (b, a) for a, b in pairs]
    for layer in layers:
        layer.place_adapter(name, autocast_dtype=autocast_dtype)
    for embedding, head in shared:  # a dtype change gave each its own copy: share again
        share_factors(embedding, head, name)
