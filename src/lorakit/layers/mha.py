"""LoRA for ``nn.MultiheadAttention`` (PEFT's layout): its packed input projection and its output
projection both get an adapter.

* **in_proj**: ``W_in`` (3E × E) holds the q, k and v projections stacked; this layer's ``lora_A``
  (r × E) and ``lora_B`` (3E × r) give ``W_in + s · B A``.
* **out_proj**: ``W_out`` (E × E) is wrapped in a LoRA :class:`~lorakit.layers.linear.Linear` at
  ``base_layer.out_proj`` with the same rank and alpha, so keys read as PEFT's
  (``<m>.base_layer.out_proj.lora_A.weight``).

torch's attention (``F.multi_head_attention_forward`` and the fused kernels) reads
``in_proj_weight`` and ``out_proj.weight`` directly and never calls ``out_proj.forward``, so the
updates must enter through the weights. PEFT merges them into the module before each forward and
subtracts them after it (which does not restore the weights bit for bit). Here forward calls the
base module with the adapted tensors ``W + Σ s·B A`` (and biases ``b + Σ s·b_B``) swapped in for
the duration of the call (``torch.func.functional_call``): nothing is written, gradients reach A and
B through the sums, and the stored weights are never touched. Merging writes the same sums into the
weights (exactly undone by ``unmerge``).

What is refused, as in PEFT: separate q/k/v weights (``kdim`` / ``vdim`` ≠ ``embed_dim``), DoRA,
inits that read the base weight (PiSSA, OLoRA, orthogonal; PEFT fails on them) and mixed batches
(``adapter_names``). ``lora_dropout`` has no effect (the input is never seen apart from
the weights; a warning says so). Targeting ``out_proj`` on its own is refused
(:meth:`MultiheadAttention.bypassed_children`): the attention would never call it.

Difference from PEFT 0.21: PEFT applies the out_proj update twice (``W_out + 2·s·B A``, in forward
and in merges; huggingface/peft#3774); lorakit applies it once. The in_proj update is the same.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lorakit.config import parse_init
from lorakit.errors import AdapterError, MixedBatchError
from lorakit.functional import lora as LF
from lorakit.layers.base import LoraLayer
from lorakit.layers.linear import Linear
from lorakit.layers.rows import rows_for
from lorakit.layers.variant import LoraVariant

__all__ = ["MultiheadAttention"]

_INITS = ("default", "none", "gaussian")  # True, False, "gaussian": the ones that do not read the base weight


class MultiheadAttention(LoraLayer):
    """LoRA around an ``nn.MultiheadAttention`` with ``kdim == vdim == embed_dim`` (see the module
    docstring). ``in_features`` is E and ``out_features`` 3E, the in_proj's."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        embed_dim = int(base_layer.embed_dim)  # type: ignore[arg-type]
        self.in_features, self.out_features = embed_dim, 3 * embed_dim
        if not isinstance(base_layer.out_proj, LoraLayer):
            base_layer.out_proj = Linear(base_layer.out_proj)  # type: ignore[arg-type]
        # nn.TransformerEncoderLayer's fused inference path reads self_attn.in_proj_weight itself and
        # never calls self_attn, which would skip the adapters; it is not taken while any submodule
        # has a hook, so this layer carries one that does nothing.
        self.register_forward_pre_hook(_keep_called)

    # -- what the kind accepts -------------------------------------------------------------------
    @classmethod
    def option_problems(
        cls, base: nn.Module, *, init: bool | str, lora_bias: bool, variant: LoraVariant | None
    ) -> list[str]:
        problems = []
        if not getattr(base, "_qkv_same_embed_dim", True):
            problems.append(
                "nn.MultiheadAttention with kdim/vdim different from embed_dim (separate q, k, v weights) "
                "is not supported"
            )
        out_proj = getattr(base, "out_proj", None)
        if not isinstance(out_proj.base_layer if isinstance(out_proj, LoraLayer) else out_proj, nn.Linear):
            problems.append("its out_proj is not an nn.Linear")
        if variant is not None:
            problems.append(f"{variant.name} is not supported on nn.MultiheadAttention (use_dora=False)")
        if (parse_init(init) or ("default", None))[0] not in _INITS:
            problems.append(
                f"init_lora_weights={init!r} is not supported on nn.MultiheadAttention; it takes True, "
                "False or 'gaussian'"
            )
        return problems

    @classmethod
    def bypassed_children(cls, base: nn.Module) -> list[str]:
        return ["out_proj"]  # read through .weight / .bias by the attention, never called

    @classmethod
    def throwaway(cls, base: nn.Module) -> LoraLayer:
        """Built on a copy of ``base`` whose tensors are on the meta device (no data is copied):
        wrapping replaces ``base.out_proj``, which must not happen to the caller's module."""
        memo: dict[int, Any] = {}
        for t in itertools.chain(base.parameters(), base.buffers()):
            meta = torch.empty_like(t, device="meta")
            memo[id(t)] = (
                nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
            )
        return cls(copy.deepcopy(base, memo))

    @classmethod
    def base_summary(cls, base: nn.Module) -> tuple[tuple[int, ...], int]:
        weight = base.in_proj_weight
        if not isinstance(weight, torch.Tensor):  # separate q, k, v weights (refused, but listed)
            weight = base.q_proj_weight
        shape = tuple(int(n) for n in weight.shape)  # type: ignore[union-attr]
        return shape, sum(p.numel() for p in base.parameters())

    # -- the base weights ------------------------------------------------------------------------
    @property
    def _out(self) -> Linear:
        return self.base_layer.out_proj  # type: ignore[return-value]  # wrapped in __init__

    def dense_weight(self) -> torch.Tensor:
        weight: torch.Tensor = self.base_layer.in_proj_weight  # type: ignore[assignment]
        return weight

    def base_bias(self) -> torch.Tensor | None:
        bias = self.base_layer.in_proj_bias
        return bias if isinstance(bias, torch.Tensor) else None

    def unloaded(self, dtype: torch.dtype | None = None) -> nn.Module:
        self.base_layer.out_proj = self._out.unloaded(dtype)
        return self.base_layer

    # -- adapters: the in_proj's here, the out_proj's in the wrapped out_proj ----------------------
    def create_adapter(self, name: str, r: int, *, init: bool | str, lora_bias: bool) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=lora_bias)
        a, b = self.factors(name)
        LF.init_lora_linear_(a, b, init, r)
        bias = self.lora_b_bias(name)
        if bias is not None and init is not False:
            nn.init.zeros_(bias)

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        *,
        use_rslora: bool,
        dropout: float,
        init: bool | str,
        lora_bias: bool,
        variant: LoraVariant | None = None,
        meta: bool = False,
    ) -> None:
        if variant is not None:  # injection refuses it first (option_problems)
            raise AdapterError(f"{variant.name} is not supported on nn.MultiheadAttention")
        if dropout > 0:
            warnings.warn(
                f"lora_dropout={dropout} has no effect on nn.MultiheadAttention: its LoRA updates enter "
                "through the weights, where dropout cannot apply (as in PEFT)",
                stacklevel=2,
            )
        options = {
            "use_rslora": use_rslora,
            "dropout": dropout,
            "init": init,
            "lora_bias": lora_bias,
            "meta": meta,
        }
        super().add_adapter(name, r, alpha, **options)  # type: ignore[arg-type]
        self._out.add_adapter(name, r, alpha, **options)  # type: ignore[arg-type]

    def delete_adapter(self, name: str) -> None:
        if name in self._out.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged into the base weights; unmerge it first")
        super().delete_adapter(name)
        self._out.delete_adapter(name)

    def set_active(self, names: Sequence[str]) -> None:
        super().set_active(names)
        self._out.set_active(names)

    def delta_weight(self, name: str) -> torch.Tensor:
        """The in_proj's ``ΔW = s · B A`` (3E × E), float32 (the out_proj's is its layer's)."""
        a, b = self.factors(name)
        return LF.linear_delta(a, b, self.scaling[name])

    def lora_branch(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The in_proj's update for an input ``x`` (…, E) → (…, 3E): ``s · B A x`` (+ ``s · b_B``)."""
        a, b = self.factors(name)
        return LF.lora_linear(x, a, b, self.scaling[name], lora_b_bias=self.lora_b_bias(name))

    # -- merging: the in_proj here, the out_proj in its layer, checked together first -------------
    def merge_problem(self, names: Sequence[str] | None = None) -> str | None:
        return super().merge_problem(names) or self._out.merge_problem(names)

    def merge(
        self, names: Sequence[str] | None = None, *, safe_merge: bool = False, keep_original: bool = True
    ) -> None:
        problem = self.merge_problem(names)
        if problem:
            raise AdapterError(f"cannot merge: {problem}; the weights were left unchanged")
        if safe_merge:
            for layer in (self, self._out):
                result = layer.merge_result(names)
                if result is not None and not all(torch.isfinite(t).all() for t in result if t is not None):
                    raise AdapterError(
                        "safe_merge: merging gives non-finite weights in nn.MultiheadAttention; "
                        "the weights were left unchanged"
                    )
        super().merge(names, keep_original=keep_original)
        self._out.merge(names, keep_original=keep_original)

    def unmerge(self) -> None:
        super().unmerge()
        self._out.unmerge()

    # -- forward ---------------------------------------------------------------------------------
    def forward(  # type: ignore[override]
        self, query: torch.Tensor, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if rows_for(query, adapter_names) is not None:
            raise MixedBatchError(
                "lora.MultiheadAttention does not support mixed adapter batches (adapter_names): its "
                "updates live in the weights, which every row shares"
            )
        tensors = self.adapted_tensors()
        if tensors:
            out = torch.func.functional_call(self.base_layer, tensors, (query, *args), kwargs, strict=False)
        else:
            out = self.base_layer(query, *args, **kwargs)
        attn, weights = out
        # as PEFT: the outputs in the query's dtype (float32 adapters on a low-precision base)
        return attn.to(query.dtype), (weights.to(query.dtype) if weights is not None else None)

    def adapted_tensors(self) -> dict[str, torch.Tensor]:
        """The base module's tensors forward uses in place of the stored ones, by their path in the
        base: ``in_proj_weight`` (``W_in + Σ s·B A``), ``out_proj.base_layer.weight``, and the biases
        of adapters with ``lora_bias``; empty when no update is pending (disabled, merged, none
        active). Summed in float32 and rounded once into the weight's dtype, as a merge does."""
        if self.disable_adapters:
            return {}
        tensors = _adapted(self, "in_proj_weight", "in_proj_bias")
        if not self._out.disable_adapters:
            out = _adapted(self._out, "weight", "bias")
            tensors.update({f"out_proj.base_layer.{k}": v for k, v in out.items()})
        return tensors

    # -- the attributes torch and PEFT users read on the attention module --------------------------
    @property
    def embed_dim(self) -> int:
        return int(self.base_layer.embed_dim)  # type: ignore[arg-type]

    @property
    def kdim(self) -> int:
        return int(self.base_layer.kdim)  # type: ignore[arg-type]

    @property
    def vdim(self) -> int:
        return int(self.base_layer.vdim)  # type: ignore[arg-type]

    @property
    def _qkv_same_embed_dim(self) -> bool:
        return bool(self.base_layer._qkv_same_embed_dim)

    @property
    def num_heads(self) -> int:
        return int(self.base_layer.num_heads)  # type: ignore[arg-type]

    @property
    def dropout(self) -> float:
        """The attention's dropout probability (the adapters' is ``lora_dropout``)."""
        return float(self.base_layer.dropout)  # type: ignore[arg-type]

    @property
    def batch_first(self) -> bool:
        return bool(self.base_layer.batch_first)

    @property
    def head_dim(self) -> int:
        return int(self.base_layer.head_dim)  # type: ignore[arg-type]

    @property
    def in_proj_weight(self) -> torch.Tensor:
        return self.dense_weight()

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.base_bias()

    @property
    def out_proj(self) -> nn.Module:
        """The original output projection (its LoRA layer is ``base_layer.out_proj``)."""
        return self._out.base_layer

    @property
    def bias_k(self) -> torch.Tensor | None:
        return self.base_layer.bias_k  # type: ignore[return-value]

    @property
    def bias_v(self) -> torch.Tensor | None:
        return self.base_layer.bias_v  # type: ignore[return-value]

    @property
    def add_zero_attn(self) -> bool:
        return bool(self.base_layer.add_zero_attn)

    def merge_masks(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_layer.merge_masks(*args, **kwargs)  # type: ignore[operator]

    def _restore_weights(self) -> None:
        """Nothing to do: PEFT's layer unregisters the attention's weights while merged and has code
        call this to register them again; lorakit never unregisters them."""


def _keep_called(module: nn.Module, args: tuple[Any, ...]) -> None:
    """A forward pre-hook that changes nothing (see ``MultiheadAttention.__init__``)."""
    return None


def _adapted(layer: LoraLayer, weight_name: str, bias_name: str) -> dict[str, torch.Tensor]:
    """``{weight_name: W + Σ ΔW, bias_name: b + Σ s·b_B}`` over ``layer``'s pending adapters (the
    bias only if one of them has a LoRA bias); differentiable in the factors."""
    pending = layer.pending_adapters()
    if not pending:
        return {}
    weight = layer.dense_weight()
    delta = layer.delta_weight(pending[0])
    for name in pending[1:]:
        delta = delta + layer.delta_weight(name)
    tensors = {weight_name: (weight.float() + delta).to(weight.dtype)}
    biases = [(n, b) for n in pending if (b := layer.lora_b_bias(n)) is not None]
    if biases:
        base_bias = layer.base_bias()
        total = torch.zeros(weight.shape[0], device=weight.device) if base_bias is None else base_bias.float()
        for name, b in biases:
            total = total + b.float() * layer.scaling[name]
        tensors[bias_name] = total.to(weight.dtype)
    return tensors
