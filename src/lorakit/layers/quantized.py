"""What LoRA layers on quantized linear bases share (bitsandbytes 4/8-bit, torchao int8).

The base weight is stored quantized, ``Q`` (packed 4-bit codes with block scales, int8 rows with
row scales, ...); ``deq(Q)`` is its value as a float32 matrix (d × k). The layer computes

    ``y = base(x) + s · B A dropout(x)``,  ``base(x) = x · deq(Q)ᵀ (+ b)`` as the base module does it,

so the adapter is PEFT's on the same base (same module layout, same file keys). What differs from a
plain linear layer is what may happen to ``Q``:

* **Nothing is ever re-quantized silently, and ``Q`` is never written.** Merging computes
  ``W' = deq(Q) + Σ s·B·A`` in float32 and keeps ``W'`` *beside* the base (``merged_weight``, float32:
  4 bytes per element while merged, 8× an NF4 weight); forward then uses ``W'``. Unmerging drops it,
  so the quantized data is exactly as before, bit for bit.
* ``merge_and_unload()`` replaces each merged layer by a dense ``nn.Linear`` holding ``W'`` rounded
  once into the model's dtype. Re-quantizing ``W'`` (PEFT's merge) is available only on request
  (:meth:`QuantizedLinear.requantized`), and reports what it lost.
* FSDP2 (``fully_shard``) is refused: it turns the quantized weight into a ``DTensor`` shard
  without its quantization state (bitsandbytes then rebuilds the state from the module, which
  gave different losses for ``quant_storage`` uint8 and float32 in lorakit's gloo trial); DDP works.
* Inits that rewrite the base weight (PiSSA, OLoRA) would have to re-quantize it and are refused;
  LoftQ is applied to the full-precision model before quantizing (as in PEFT).

A kind provides :meth:`dequantize` (``deq(Q)``, float32), :meth:`quantize_like` (a module of the
same kind storing a given dense weight) and its predicate in :mod:`lorakit.layers.registry`.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import parse_init
from lorakit.errors import AdapterError
from lorakit.layers.base import RequantizeReport
from lorakit.layers.linear import Linear
from lorakit.layers.variant import LoraVariant

__all__ = ["QuantizedLinear"]


class QuantizedLinear(Linear):
    """LoRA around a linear layer whose weight is stored quantized (see the module docstring)."""

    is_quantized = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.register_buffer("_merged_weight", None, persistent=False)

    @property
    def merged_weight(self) -> torch.Tensor | None:
        """``W' = deq(Q) + Σ s·B·A`` (float32) while adapters are merged, else ``None``. (Read from
        the buffers directly: the base constructor asks for the weight before the buffer exists.)"""
        return self._buffers.get("_merged_weight")

    # -- what a quantized kind provides ------------------------------------------------------------
    @staticmethod
    @abc.abstractmethod
    def dequantize(base: nn.Module) -> torch.Tensor:
        """``deq(Q)`` of a base module of this kind: its stored weight's value as a float32
        (d × k) matrix."""

    @abc.abstractmethod
    def quantize_like(self, weight: torch.Tensor) -> nn.Module:
        """A new base module of this kind (same format and options) that stores ``weight``
        quantized; the bias is the base's."""

    @abc.abstractmethod
    def holds_quantized_weight(self) -> bool:
        """Whether the base still holds its weight as the quantized tensor type of its kind (an
        engine may have swapped in a plain tensor: FSDP2 does)."""

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the base computes its product in."""
        return torch.float32

    def dequantized(self) -> torch.Tensor:
        """``deq(Q)`` of this layer's base (float32, d × k)."""
        return self.dequantize(self.base_layer)

    # -- options ---------------------------------------------------------------------------------
    @classmethod
    def option_problems(
        cls, base: nn.Module, *, init: bool | str, lora_bias: bool, variant: LoraVariant | None
    ) -> list[str]:
        parsed = parse_init(init)
        kind = parsed[0] if parsed else None
        if kind in ("pissa", "olora"):
            return [
                f"init_lora_weights={init!r} replaces the base weight by a residual, which would have "
                "to be re-quantized on this quantized layer (losing most of the principal part); "
                "initialise on the full-precision model, save it, then quantize"
            ]
        if kind == "loftq":
            return [
                "init_lora_weights='loftq' needs the full-precision weight and this layer only holds "
                "its quantized version; apply LoftQ to the full-precision model (it stores the "
                "quantized weights it fitted), save that base, then load it quantized"
            ]
        return []

    # -- the weight ------------------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The base module's stored (quantized) weight, as PEFT's layers return it."""
        weight: torch.Tensor = self.base_layer.weight  # type: ignore[assignment]
        return weight

    def dense_weight(self) -> torch.Tensor:
        """The merged weight while adapters are merged, else ``deq(Q)`` (float32)."""
        merged = self.merged_weight
        return merged if merged is not None else self.dequantized()

    def original_weight(self) -> torch.Tensor:
        return self.dequantized()

    def write_base(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Keep ``weight`` (float32) beside the untouched quantized weight; the bias, a plain
        tensor, is written in place."""
        self.register_buffer("_merged_weight", weight.detach().float(), persistent=False)
        base_bias = self.base_bias()
        if bias is not None and base_bias is not None:
            with torch.no_grad():
                base_bias.copy_(bias)

    def keep_base(self, new_bias: torch.Tensor | None) -> None:
        """Only a bias the merge changes needs a copy: the quantized weight is never written."""
        base_bias = self.base_bias()
        if new_bias is not None and self._original_bias is None and base_bias is not None:
            self._original_bias = base_bias.detach().clone()

    def restore_base(self) -> None:
        self.register_buffer("_merged_weight", None, persistent=False)
        base_bias = self.base_bias()
        if self._original_bias is not None and base_bias is not None:
            with torch.no_grad():
                base_bias.copy_(self._original_bias)
        self._original_bias = None

    def base_output(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base module's output, or ``x · W'ᵀ + b`` (float32 product) while merged."""
        merged = self.merged_weight
        if merged is None:
            if not self.holds_quantized_weight():
                raise AdapterError(
                    f"the quantized weight of this {type(self.base_layer).__name__} was replaced by a plain "
                    f"{type(self.base_layer.weight).__name__} (FSDP2's fully_shard does that): lorakit does "
                    "not train LoRA on a sharded quantized base (its quantization state is not sharded "
                    "with it, so outputs are not to be trusted); use DDP (lorakit.distributed.wrap_ddp), "
                    "or FSDP on an unquantized base"
                )
            result: torch.Tensor = self.base_layer(x, *args, **kwargs)
            # bitsandbytes may return a view of its autograd Function's output, which autograd
            # forbids modifying in place (the adapter adds into it): copy only that case.
            return result if result._base is None else result.clone()
        bias = self.base_bias()
        out = F.linear(x.to(merged.dtype), merged, None if bias is None else bias.to(merged.dtype))
        return out.to(x.dtype)

    # -- leaving ---------------------------------------------------------------------------------
    def unloaded(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The quantized base module, or, while merged, a dense ``nn.Linear`` holding the merged
        weight rounded once into ``dtype`` (default: the base's compute dtype)."""
        merged = self.merged_weight
        if merged is None:
            return self.base_layer
        dtype = dtype or self.compute_dtype
        bias = self.base_bias()
        dense = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device="meta")
        dense.weight = nn.Parameter(merged.to(dtype), requires_grad=False)
        if bias is not None:
            dense.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=bias.requires_grad)
        dense.train(self.base_layer.training)
        return dense

    @torch.no_grad()
    def requantized(self, name: str = "") -> tuple[nn.Module, RequantizeReport]:
        """The lossy merge, asked for explicitly: a new quantized base module storing ``q(W')``,
        and what that cost (:class:`RequantizeReport`). The layer must be merged."""
        merged = self.merged_weight
        if merged is None:
            raise AdapterError(f"{name or type(self).__name__}: nothing is merged, nothing to re-quantize")
        update = merged - self.dequantized()
        module = self.quantize_like(merged)
        kept = self.dequantize(module)
        update_norm = float(update.norm())
        error = float((kept - merged).norm()) / update_norm if update_norm > 0 else 0.0
        return module, RequantizeReport(name, error, update_norm)
