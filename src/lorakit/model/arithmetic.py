"""Adapter arithmetic: a new adapter made from weighted existing ones (PEFT's
``add_weighted_adapter``), with the combination math of :mod:`lorakit.combine`.

For adapters i with factors (A_i, B_i), scalings s_i and weights w_i the new adapter has scaling 1
and, per layer:

* ``cat``: ``A = [w_1 s_1 A_1; …; w_n s_n A_n]`` (Σ r_i × k), ``B = [B_1 … B_n]``, so
  ``B A = Σ w_i s_i B_i A_i`` exactly; rank Σ r_i.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the method applied to
  the A_i with weights ``sign(w_i s_i) √|w_i s_i|`` and to the B_i with ``√|w_i s_i|`` (same ranks
  needed). For ``linear`` this is ``(Σ c_i A_i)`` and ``(Σ c'_i B_i)``, not ``Σ w_i s_i B_i A_i``:
  the cross terms are PEFT's definition (exact only for one adapter).
* ``svd`` and ``<method>_svd``: the method applied to the full updates ``ΔW_i = s_i B_i A_i``
  (``svd`` = ``linear``), then the best rank-``svd_rank`` factorisation of the result
  (truncated SVD ``U S Vᵀ``: ``B = U S``, ``A = Vᵀ``), optionally clamped to the ``svd_clamp``
  quantile of their entries.

Checks run before anything changes: names, weights, ranks, a single ``modules_to_save`` copy per
module, no DoRA adapter (magnitudes have no defined combination), and no combination a layer kind
cannot form (``LoraLayer.combine_problem``: a grouped convolution takes only the factor types).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from lorakit.config import LoraConfig, load_only, moves_base_weight
from lorakit.errors import AdapterError
from lorakit.functional import combine as LC
from lorakit.layers import LoraLayer, ModulesToSaveWrapper, variant_for
from lorakit.model import injection

__all__ = ["COMBINATION_TYPES", "add_weighted_adapter"]

FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATION_TYPES = ("cat",) + FACTOR_TYPES + SVD_TYPES
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def _max_rank(config: LoraConfig) -> int:
    return max([config.r, *config.rank_pattern.values()])


def _check(
    model: nn.Module,
    configs: Mapping[str, LoraConfig],
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str,
    svd_rank: int | None,
    density: float | None,
    majority_sign_method: str,
) -> list[str]:
    problems: list[str] = []
    unknown = [a for a in adapters if a not in configs]
    if unknown or not adapters:
        problems.append(f"adapters={list(adapters)!r}: unknown {unknown}; existing adapters: {list(configs)}")
    if len(weights) != len(adapters):
        problems.append(f"weights has {len(weights)} entries for {len(adapters)} adapters")
    if adapter_name in configs:
        problems.append(f"adapter_name={adapter_name!r} already exists; choose a new name")
    if combination_type not in COMBINATION_TYPES:
        problems.append(
            f"combination_type={combination_type!r}: must be one of {', '.join(COMBINATION_TYPES)}"
        )
    if majority_sign_method not in LC.SIGN_METHODS:
        problems.append(f"majority_sign_method={majority_sign_method!r}: must be one of {LC.SIGN_METHODS}")
    if combination_type.removesuffix("_svd") in _NEEDS_DENSITY and not (
        isinstance(density, (int, float)) and 0 < density <= 1
    ):
        problems.append(
            f"density={density!r}: combination_type={combination_type!r} needs a density in (0, 1]"
        )
    if svd_rank is not None and not (isinstance(svd_rank, int) and svd_rank > 0):
        problems.append(f"svd_rank={svd_rank!r}: must be a positive integer or None")
    if unknown:
        return problems
    by_variant: dict[str, list[str]] = {}
    for adapter in adapters:
        variant = variant_for(configs[adapter])
        if variant is not None and variant.combine_problem:
            by_variant.setdefault(f"{variant.name}; {variant.combine_problem}", []).append(adapter)
    problems += [f"adapters {names} use {why}" for why, names in by_variant.items()]
    ranks = {a: _max_rank(configs[a]) for a in adapters}
    if combination_type in FACTOR_TYPES and len(adapters) > 1 and len(set(ranks.values())) > 1:
        problems.append(
            f"combination_type={combination_type!r} needs adapters of one rank, got {ranks}; "
            "use 'cat' or an '_svd' type"
        )
    if len({type(configs[a].target_modules) for a in adapters}) > 1:
        problems.append("the adapters' target_modules mix lists and regular expressions; give them one kind")
    single = len(adapters) == 1  # acts as "linear" (see add_weighted_adapter)
    with_tokens = [a for a in adapters if configs[a].trainable_token_indices is not None]
    if with_tokens:
        problems.append(
            f"adapters {with_tokens} train token rows (trainable_token_indices), which have no defined "
            "combination"
        )
    for name, module in injection.lora_modules(model):
        if isinstance(module, ModulesToSaveWrapper) and sum(module.has_adapter(a) for a in adapters) > 1:
            problems.append(f"{name}: several of the adapters have their own copy of this module to save")
        if isinstance(module, LoraLayer) and not single and any(module.has_adapter(a) for a in adapters):
            refused = module.combine_problem(combination_type)
            if refused:
                problems.append(f"{name}: {refused}")
    return problems


def _new_config(configs: Mapping[str, LoraConfig], adapters: Sequence[str], rank: int) -> LoraConfig:
    first = configs[adapters[0]]
    targets = [configs[a].target_modules for a in adapters]
    if isinstance(targets[0], str):
        new_targets: list[str] | str = "|".join(f"({t})" for t in dict.fromkeys(targets))  # type: ignore[arg-type]
    else:
        new_targets = list(dict.fromkeys(n for t in targets for n in (t or [])))
    # scaling 1: alpha = r, or √r with rsLoRA (alpha / √r = 1)
    alpha = math.sqrt(rank) if first.use_rslora else rank
    # the factors are overwritten; an init that rewrites the base weight (PiSSA, OLoRA) must not run,
    # nor one that only a file can fill (EVA, MiCA)
    init = first.init_lora_weights
    init = True if moves_base_weight(init) or load_only(init) else init
    return dataclasses.replace(
        first,
        r=rank,
        lora_alpha=alpha,
        target_modules=new_targets,
        rank_pattern={},
        alpha_pattern={},
        init_lora_weights=init,
        use_dora=False,
    )


def _svd_factors(
    layer: LoraLayer,
    delta: torch.Tensor,
    rank: int,
    clamp: float | None,
    full_matrices: bool,
    driver: str | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` (A, B) with ``B A ≈ delta`` (given in the weight's layout)."""
    matrix = layer.to_matrix(delta)  # (d, k)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=full_matrices, driver=driver)
    b, a = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank, :]
    if b.shape[1] < rank:  # the update has fewer singular vectors than the rank: pad with zeros
        b = torch.nn.functional.pad(b, (0, rank - b.shape[1]))
        a = torch.nn.functional.pad(a, (0, 0, 0, rank - a.shape[0]))
    if clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return a, b


@torch.no_grad()
def _fill_layer(
    layer: LoraLayer,
    new: str,
    adapters: Sequence[str],
    weights: Sequence[float],
    combination_type: str,
    options: dict,
) -> None:
    present = [(a, w) for a, w in zip(adapters, weights, strict=True) if layer.has_adapter(a)]
    target_a, target_b = layer.factors(new)
    target_a.zero_()
    target_b.zero_()
    if not present:
        return
    if combination_type == "cat":
        a = torch.cat([layer.factors(n)[0] * (w * layer.scaling[n]) for n, w in present], dim=0)
        b = torch.cat([layer.factors(n)[1] for n, _ in present], dim=1)
        target_a[: a.shape[0]] = a
        target_b[:, : b.shape[1]] = b
        return
    method = combination_type.removesuffix("_svd")
    if combination_type in SVD_TYPES:
        method = "linear" if method == "svd" else method
        delta = LC.combine(
            [layer.delta_weight(n) for n, _ in present],
            [w for _, w in present],
            method,
            options["density"],
            options["majority_sign_method"],
        )
        a, b = _svd_factors(
            layer,
            delta,
            layer.r[new],
            options["svd_clamp"],
            options["svd_full_matrices"],
            options["svd_driver"],
        )
        target_a.copy_(a.reshape(target_a.shape))
        target_b.copy_(b.reshape(target_b.shape))
        return
    c = [w * layer.scaling[n] for n, w in present]
    weights_a = [math.copysign(math.sqrt(abs(x)), x) for x in c]
    weights_b = [math.sqrt(abs(x)) for x in c]
    a = LC.combine(
        [layer.factors(n)[0] for n, _ in present],
        weights_a,
        method,
        options["density"],
        options["majority_sign_method"],
    )
    b = LC.combine(
        [layer.factors(n)[1] for n, _ in present],
        weights_b,
        method,
        options["density"],
        options["majority_sign_method"],
    )
    target_a.copy_(a)
    target_b.copy_(b)


def add_weighted_adapter(
    model: nn.Module,
    configs: Mapping[str, LoraConfig],
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> LoraConfig:
    """Add adapter ``adapter_name`` to ``model`` combining ``adapters`` (see the module docstring);
    returns its config. The new adapter is neither active nor changed by later edits of the others.
    With a single adapter every type acts as ``linear`` (as in PEFT)."""
    adapters, weights = list(adapters), [float(w) for w in weights]
    problems = _check(
        model,
        configs,
        adapters,
        weights,
        adapter_name,
        combination_type,
        svd_rank,
        density,
        majority_sign_method,
    )
    if problems:
        raise AdapterError(
            "cannot add the weighted adapter, nothing was changed:\n  - " + "\n  - ".join(problems)
        )
    if len(adapters) == 1:
        combination_type = "linear"
    ranks = [_max_rank(configs[a]) for a in adapters]
    rank = (
        sum(ranks)
        if combination_type == "cat"
        else (svd_rank or max(ranks) if combination_type in SVD_TYPES else ranks[0])
    )
    config = injection.inject(model, _new_config(configs, adapters, rank), adapter_name)
    options = {
        "density": 1.0 if density is None else density,
        "majority_sign_method": majority_sign_method,
        "svd_clamp": svd_clamp,
        "svd_full_matrices": svd_full_matrices,
        "svd_driver": svd_driver,
    }
    for _, module in injection.lora_modules(model):
        if isinstance(module, LoraLayer) and module.has_adapter(adapter_name):
            _fill_layer(module, adapter_name, adapters, weights, combination_type, options)
    return config
