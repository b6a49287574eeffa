"""Resize an adapter to another rank by SVD, with the Eckart–Young error of each module.

For a module with ``ΔW = s · B A = U Σ Vᵀ`` (singular values σ₁ ≥ … ≥ σ_r), the best rank-k
approximation in Frobenius norm is ``U_k Σ_k V_kᵀ`` and its relative error is
``sqrt(Σ_{i>k} σ_i²) / sqrt(Σ_i σ_i²)`` (Eckart & Young 1936). The new factors are
``B' = U_k Σ_k^{1/2} / √s'`` and ``A' = Σ_k^{1/2} V_kᵀ / √s'`` for the new scaling ``s'``; a rank
above the current one pads with zero singular values (lossless).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import torch

from lorakit.config import LoraConfig
from lorakit.errors import AdapterError, AdapterFileError, ConfigError
from lorakit.functional import lora as LF
from lorakit.rank.factors import ModuleFactors, module_name, pattern_key, split_factors, target_name
from lorakit.rank.spectra import lowrank_svd, rank_keeping, relative_error, split_svd

__all__ = ["ResizeResult", "resize_adapter", "resize_adapter_files", "truncate_factors"]


@dataclasses.dataclass
class ResizeResult:
    """The resized adapter (config + PEFT-format tensors) and, per module, rank and error."""

    config: LoraConfig
    state_dict: dict[str, torch.Tensor]
    ranks: dict[str, int]
    errors: dict[str, float]


def truncate_factors(
    a: torch.Tensor, b: torch.Tensor, s: float, k: int, new_s: float
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-k factors (A' (k, …), B' (d, k, …)) with ``new_s · B' A' ≈ s · B A``, and the
    relative Frobenius error (exactly the discarded singular values' share)."""
    u, sigma, v = lowrank_svd(a, b, s)
    a_new, b_new = split_svd(u, sigma, v, k, new_s)
    a_shape = (k, *a.shape[1:])
    b_shape = (b.shape[0], k, *b.shape[2:])
    return (a_new.reshape(a_shape).to(a.dtype), b_new.reshape(b_shape).to(b.dtype), relative_error(sigma, k))


def _target_rank(m: ModuleFactors, rank: int | None, energy: float | None) -> int:
    if rank is not None:
        return rank
    assert energy is not None  # resize_adapter checked that exactly one is given
    return rank_keeping(lowrank_svd(m.a, m.b, m.scaling)[1], energy)


def resize_adapter(
    config: LoraConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    rank: int | None = None,
    energy: float | None = None,
) -> ResizeResult:
    """Resize every module to ``rank``, or each to the smallest rank keeping ``energy`` of its
    ‖ΔW‖_F². Other tensors (modules to save, biases, DoRA magnitudes) are kept as they are."""
    if (rank is None) == (energy is None):
        raise ConfigError("give exactly one of rank (a positive int) or energy (a number in (0, 1])")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ConfigError(f"rank={rank!r}: must be a positive integer")
    if energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"energy={energy!r}: must be in (0, 1]")
    modules, rest = split_factors(config, state_dict)
    if not modules:
        raise AdapterFileError(
            "the adapter has no LoRA factors to resize (no lora_A / lora_embedding_A keys)"
        )
    grouped = [module_name(m.prefix) for m in modules if m.groups > 1]
    if grouped:  # a truncated SVD of the update is not a grouped B times an A
        raise AdapterError(f"cannot resize the adapters of grouped convolutions: {grouped}")
    # a target and the LoRA layers nested in it (an attention's out_proj) share one rank
    by_target: dict[str, int] = {}
    for m in modules:
        k = _target_rank(m, rank, energy)
        by_target[target_name(m.prefix)] = max(k, by_target.get(target_name(m.prefix), 0))
    ranks = {module_name(m.prefix): by_target[target_name(m.prefix)] for m in modules}
    base_r = max(set(by_target.values()), key=list(by_target.values()).count)
    alpha = float(config.lora_alpha)
    out: dict[str, torch.Tensor] = dict(rest)
    errors = {}
    for m in modules:
        name = module_name(m.prefix)
        k = ranks[name]
        new_s = LF.scaling(alpha, k, config.use_rslora)
        out[m.a_key], out[m.b_key], errors[name] = truncate_factors(m.a, m.b, m.scaling, k, new_s)
        bias_key = m.prefix + ".lora_B.bias"
        if bias_key in out:  # the bias enters as s · b: keep s · b fixed under the new scaling
            out[bias_key] = (state_dict[bias_key].double() * m.scaling / new_s).to(state_dict[bias_key].dtype)
    rank_pattern = {pattern_key(n): k for n, k in by_target.items() if k != base_r}
    new_config = dataclasses.replace(
        config, r=base_r, lora_alpha=alpha, rank_pattern=rank_pattern, alpha_pattern={}
    )
    return ResizeResult(new_config, out, ranks, errors)


def resize_adapter_files(
    source: str | Path, out: str | Path, *, rank: int | None = None, energy: float | None = None
) -> ResizeResult:
    """:func:`resize_adapter` from the adapter folder ``source`` into a new PEFT-format folder
    ``out`` (written atomically; the base-model fingerprint is carried over)."""
    from lorakit.persistence.adapter_dir import read_adapter, save_adapter_tensors
    from lorakit.persistence.fingerprint import METADATA_KEY

    files = read_adapter(source)
    result = resize_adapter(files.config, files.tensors, rank=rank, energy=energy)
    kept = {k: v for k, v in files.metadata.items() if k == METADATA_KEY}
    save_adapter_tensors(out, result.config, result.state_dict, kept)
    return result
