"""Turn a full fine-tune into a LoRA adapter: per-module truncated SVD of ``W_tuned − W_base``.

Linear and Conv1D layers (and, on request, embeddings) whose weight changed become LoRA factors
of the chosen rank, with the Eckart–Young relative error of each; a changed bias of such a layer
goes into ``lora_B``'s bias (exact). Every other changed parameter — norms, heads, parameters the
base does not have — is kept in full through ``modules_to_save``. Tensors are read one module at a
time from the two checkpoints' safetensors files, so memory holds a few matrices, not two models.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.config import LoraConfig, TaskType
from lorakit.errors import AdapterFileError, ConfigError
from lorakit.hub import local_folder
from lorakit.layers import is_conv1d
from lorakit.rank.factors import pattern_key
from lorakit.rank.spectra import rank_keeping, relative_error, split_svd

__all__ = ["ExtractResult", "extract_adapter", "Checkpoint"]


@dataclasses.dataclass
class ExtractResult:
    """The adapter (config + tensors keyed by module path, as adapter files store them without the
    ``base_model.model.`` prefix), the rank and relative error of each low-rank module, and the
    modules kept in full."""

    config: LoraConfig
    state_dict: dict[str, torch.Tensor]
    ranks: dict[str, int]
    errors: dict[str, float]
    modules_to_save: list[str]


class Checkpoint:
    """Lazy access to the tensors of a transformers checkpoint directory (single or sharded), or
    of a Hub model id (its JSON and safetensors files, fetched into the HF cache if needed)."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = local_folder(path, files=["*.json", "*.safetensors"], what="model")
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (self.path / "model.safetensors").exists():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(
                f"{self.path} has no model.safetensors (or model.safetensors.index.json); "
                "save the model with save_pretrained(..., safe_serialization=True)"
            )
        self._handles = [safe_open(str(self.path / f), framework="pt") for f in files]
        self._where = {k: h for h in self._handles for k in h.keys()}  # noqa: SIM118 (safe_open)

    def keys(self) -> set[str]:
        return set(self._where)

    def get(self, key: str) -> torch.Tensor | None:
        handle = self._where.get(key)
        return None if handle is None else handle.get_tensor(key)


def _skeleton(path: Path) -> nn.Module:
    """The tuned model's module tree on the meta device (types and names, no memory)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise AdapterFileError(f"{path}/config.json names no transformers architecture ({arch!r})")
    with torch.device("meta"):
        return cls(config)


def _heads(model: nn.Module) -> set[str]:
    heads = []
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out) and get_out() is not None:
        heads.append(get_out())
    for attr in ("classifier", "score", "qa_outputs"):
        if isinstance(head := getattr(model, attr, None), nn.Module):
            heads.append(head)
    return {name for name, module in model.named_modules() if any(module is h for h in heads)}


def extract_adapter(
    base: str | Path,
    tuned: str | Path,
    *,
    rank: int | None = None,
    energy: float | None = None,
    include_embeddings: bool = False,
    out: str | Path | None = None,
    task_type: TaskType | str | None = None,
) -> ExtractResult:
    """A PEFT-format LoRA adapter that turns ``base`` into (approximately) ``tuned`` (folders or Hub
    ids); written to the folder ``out`` when given. ``task_type`` is recorded in the config, so that
    the adapter loads with the task's wrapper (``SEQ_CLS``: the head in ``modules_to_save``)."""
    result = _extract(base, tuned, rank=rank, energy=energy, include_embeddings=include_embeddings)
    if task_type is not None:
        result.config = dataclasses.replace(result.config, task_type=task_type)
    if out is not None:
        from lorakit.persistence.adapter_dir import save_adapter_tensors

        save_adapter_tensors(out, result.config, result.state_dict)
    return result


def _extract(
    base: str | Path, tuned: str | Path, *, rank: int | None, energy: float | None, include_embeddings: bool
) -> ExtractResult:
    if (rank is None) == (energy is None):
        raise ConfigError("give exactly one of rank (a positive int) or energy (a number in (0, 1])")
    if rank is not None and rank < 1 or energy is not None and not 0 < energy <= 1:
        raise ConfigError(f"rank={rank!r} / energy={energy!r}: rank must be ≥ 1, energy in (0, 1]")
    base_ckpt, tuned_ckpt = Checkpoint(base), Checkpoint(tuned)
    model = _skeleton(tuned_ckpt.path)
    prefix = getattr(model, "base_model_prefix", "")
    heads = _heads(model)
    factors: dict[str, _Delta] = {}
    to_save: list[str] = []
    for name, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        if not params:
            continue
        found = {p: _pair(base_ckpt, tuned_ckpt, f"{name}.{p}", prefix) for p, _ in params}
        changed = [p for p, (b, t) in found.items() if t is not None and (b is None or not torch.equal(b, t))]
        if not changed:
            continue
        lowrank = (
            (isinstance(module, nn.Linear) or is_conv1d(module))
            and name not in heads
            or (include_embeddings and isinstance(module, nn.Embedding))
        )
        weight_pair = found.get("weight", (None, None))
        only_weight_bias = set(changed) <= {"weight", "bias"}
        if lowrank and "weight" in changed and weight_pair[0] is not None and only_weight_bias:
            factors[name] = _delta(module, found, rank, energy)
        else:
            to_save.append(name)
    return _assemble(factors, to_save, tuned_ckpt, rank, str(base))


def _pair(
    base: Checkpoint, tuned: Checkpoint, key: str, prefix: str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    tuned_t = tuned.get(key)
    base_t = base.get(key)
    if base_t is None and prefix and key.startswith(prefix + "."):
        base_t = base.get(key[len(prefix) + 1 :])
    return base_t, tuned_t


def _delta(module: nn.Module, found: dict[str, Any], rank: int | None, energy: float | None) -> _Delta:
    """Factor one module's change right away and keep only the rank-k factors (for scaling 1), so
    no d × k matrix outlives its module."""
    base_w, tuned_w = found["weight"]
    delta = tuned_w.double() - base_w.double()
    embedding = isinstance(module, nn.Embedding)
    if is_conv1d(module) or embedding:
        delta = delta.T  # Conv1D stores (k, d); an embedding's factors map one-hot (V,) → (D,)
    u, sigma, vh = torch.linalg.svd(delta, full_matrices=False)
    k = rank if rank is not None else rank_keeping(sigma, energy if energy is not None else 1.0)
    a, b = split_svd(u, sigma, vh.T, k, 1.0)
    bias = None
    if "bias" in found and found["bias"][0] is not None and found["bias"][1] is not None:
        bias = found["bias"][1].double() - found["bias"][0].double()
    return _Delta(a, b, relative_error(sigma, k), bias, tuned_w.dtype, embedding)


@dataclasses.dataclass
class _Delta:
    """One module's change as rank-k factors with ``B A ≈ W_tuned − W_base`` (float64)."""

    a: torch.Tensor  # (k, in)
    b: torch.Tensor  # (out, k)
    error: float  # relative Frobenius error of the rank-k approximation
    bias: torch.Tensor | None
    dtype: torch.dtype
    embedding: bool

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def factors(self, s: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors for scaling ``s`` (``s · B' A' = B A``), in the checkpoint's dtype."""
        root = s**-0.5
        return (self.a * root).to(self.dtype), (self.b * root).to(self.dtype)


def _assemble(
    factors: dict[str, _Delta], to_save: list[str], tuned: Checkpoint, rank: int | None, base_path: str
) -> ExtractResult:
    ranks = {name: d.rank for name, d in factors.items()}
    counts = list(ranks.values())
    base_r = max(set(counts), key=counts.count) if counts else (rank or 8)
    alpha = float(base_r)
    lora_bias = any(d.bias is not None and bool(d.bias.abs().max() > 0) for d in factors.values())
    state: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for name, d in factors.items():
        s = alpha / ranks[name]
        a, b = d.factors(s)
        errors[name] = d.error
        key = name
        if d.embedding:
            state[f"{key}.lora_embedding_A"], state[f"{key}.lora_embedding_B"] = a, b
            continue
        state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = a, b
        if lora_bias:
            delta_b = d.bias if d.bias is not None else torch.zeros(b.shape[0], dtype=torch.float64)
            state[f"{key}.lora_B.bias"] = (delta_b / s).to(d.dtype)
    for name in to_save:
        for key in sorted(tuned.keys()):
            if key.startswith(name + ".") and "." not in key[len(name) + 1 :]:
                tensor = tuned.get(key)
                if tensor is not None:
                    state[key] = tensor
    config = LoraConfig(
        r=base_r,
        lora_alpha=alpha,
        target_modules=sorted(factors) or None,
        lora_bias=lora_bias,
        rank_pattern={pattern_key(n): k for n, k in ranks.items() if k != base_r},
        modules_to_save=sorted(to_save) or None,
        base_model_name_or_path=base_path,
    )
    return ExtractResult(config, state, ranks, errors, sorted(to_save))
