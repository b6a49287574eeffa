"""LoRA on bitsandbytes' quantized linears: ``Linear4bit`` (NF4 / FP4, QLoRA) and ``Linear8bitLt``.

Module layout, file keys and math are PEFT's ``lora.Linear4bit`` / ``lora.Linear8bitLt``:
``y = base(x) + s · B A dropout(x)`` with the base product computed by bitsandbytes itself (it
dequantizes ``Q`` block by block and recomputes it in backward: no dense weight is kept for
backward). Merging and unloading follow :mod:`lorakit.layers.quantized` (never a silent
re-quantization; exact unmerge).

``deq(Q)`` in float32:

* 4-bit: ``W[i] = code[q_i] · absmax[⌊i / blocksize⌋]`` over the flattened (d × k) weight, ``code``
  the 16 NF4 or FP4 levels; with double quantization the block scales are themselves 8-bit:
  ``absmax = code₈[a_j] · absmax₂[⌊j / 256⌋] + offset``.
* 8-bit (LLM.int8()): ``W[i, :] = C[i, :] · SCB[i] / 127``, one scale per output row.

**bitsandbytes' CPU repacking.** On CPUs with AVX512-BF16 (Intel Sapphire Rapids and later, AMD
Zen 4 and later), the first forward of a ``Linear4bit`` in eval mode without gradients rewrites its
weight in place into a layout for a bf16 kernel: the block scales are rounded to bfloat16 (outputs
then change by up to 2⁻⁹ relative, and float32 compute gets bf16-level error), double quantization
is undone, and *gradients no longer flow through the layer* afterwards (measured with
bitsandbytes 0.50.2: ``x.grad`` stays ``None``). An adapted model must train after evaluating, so
:func:`prepare_base` turns that repacking off on every ``Linear4bit`` of a model lorakit adapts
(bitsandbytes' ``support_avx512bf16_for_cpu`` switch) and restores the standard layout of any
layer that was already repacked (the conversion bitsandbytes itself applies before saving). The
model then computes the same on every CPU, in train and eval mode; the switch stays off after
unloading.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from lorakit.errors import AdapterError
from lorakit.layers.quantized import QuantizedLinear

__all__ = ["Linear4bit", "Linear8bitLt", "is_bnb_4bit", "is_bnb_8bit", "prepare_base"]


def _bnb_class(name: str) -> type | None:
    """``bitsandbytes.nn.<name>`` if bitsandbytes is imported (a module of it can exist only then)."""
    bnb = sys.modules.get("bitsandbytes")
    return getattr(getattr(bnb, "nn", None), name, None) if bnb is not None else None


def is_bnb_4bit(module: nn.Module) -> bool:
    cls = _bnb_class("Linear4bit")
    return cls is not None and isinstance(module, cls)


def is_bnb_8bit(module: nn.Module) -> bool:
    cls = _bnb_class("Linear8bitLt")
    return cls is not None and isinstance(module, cls)


def prepare_base(model: nn.Module) -> None:
    """Make every bitsandbytes 4-bit layer of ``model`` safe to train and evaluate (see the module
    docstring): repacking off, any repacked weight back in the standard layout."""
    for module in model.modules():
        if is_bnb_4bit(module):
            _stop_cpu_repacking(module)


def _stop_cpu_repacking(module: Any) -> None:
    _unpack_for_cpu(module)
    module.support_avx512bf16_for_cpu = False


def _unpack_for_cpu(module: nn.Module) -> None:
    weight: Any = module.weight
    state = getattr(weight, "quant_state", None)
    if not getattr(state, "packing_format_for_cpu", False):
        return
    import bitsandbytes.functional as BF

    inverse = getattr(BF, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:  # a bitsandbytes version that packs without this inverse
        raise AdapterError(
            "this Linear4bit was repacked for bitsandbytes' CPU bf16 kernel (an eval forward on an "
            "AVX512-BF16 CPU) and this bitsandbytes version offers no way back; load the model again "
            "and adapt it before evaluating"
        )
    weight.data, weight.quant_state = inverse(weight.data, state)
    module.quant_state = weight.quant_state


class Linear4bit(QuantizedLinear):
    """LoRA around ``bitsandbytes.nn.Linear4bit`` (NF4 or FP4, any ``quant_storage``)."""

    def __init__(self, base_layer: nn.Module) -> None:
        _stop_cpu_repacking(base_layer)
        super().__init__(base_layer)

    def holds_quantized_weight(self) -> bool:
        params = _bnb_class("Params4bit")
        return params is not None and isinstance(self.base_layer.weight, params)

    @property
    def compute_dtype(self) -> torch.dtype:
        dtype = getattr(self.base_layer, "compute_dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else torch.float32

    @staticmethod
    def dequantize(base: nn.Module) -> torch.Tensor:
        import bitsandbytes.functional as BF

        weight: Any = base.weight
        state = weight.quant_state
        absmax = state.absmax
        if state.nested:  # double quantization: the block scales are 8-bit codes themselves
            absmax = BF.dequantize_blockwise(absmax, state.state2) + state.offset
        float32_state = BF.QuantState(  # the same codes and scales, dequantized into float32
            absmax=absmax.float(),
            shape=state.shape,
            code=state.code,
            blocksize=state.blocksize,
            quant_type=state.quant_type,
            dtype=torch.float32,
        )
        return BF.dequantize_4bit(weight.data, quant_state=float32_state)

    def quantize_like(self, weight: torch.Tensor) -> nn.Module:
        import bitsandbytes as bnb

        base: Any = self.base_layer
        old = base.weight
        new = bnb.nn.Linear4bit(
            self.in_features,
            self.out_features,
            bias=False,
            compute_dtype=base.compute_dtype,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            device="meta",
        )
        dense = weight.detach().to(device="cpu", dtype=old.quant_state.dtype).contiguous()
        params: Any = bnb.nn.Params4bit(
            dense,
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=new,
        )
        new.weight = params.to(old.device)  # quantizes
        new.bias = base.bias
        new.support_avx512bf16_for_cpu = False
        new.train(base.training)
        return new


class Linear8bitLt(QuantizedLinear):
    """LoRA around ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8(), frozen int8 weights)."""

    @classmethod
    def option_problems(cls, base: nn.Module, **kwargs: Any) -> list[str]:
        problems = super().option_problems(base, **kwargs)
        if getattr(getattr(base, "state", None), "has_fp16_weights", False):
            problems.append(
                "Linear8bitLt with has_fp16_weights=True keeps trainable 16-bit weights and is not a "
                "quantized base; load it with has_fp16_weights=False (transformers' default)"
            )
        return problems

    def holds_quantized_weight(self) -> bool:
        params = _bnb_class("Int8Params")
        return params is not None and isinstance(self.base_layer.weight, params)

    @staticmethod
    def _row_scales(base: Any) -> torch.Tensor:
        weight = base.weight
        scales = getattr(weight, "SCB", None)
        if scales is None:  # after the first forward bitsandbytes keeps them on the layer's state
            scales = base.state.SCB  # type: ignore[union-attr]
        return scales

    @staticmethod
    def dequantize(base: nn.Module) -> torch.Tensor:
        import bitsandbytes.functional as BF

        weight: Any = base.weight
        return BF.int8_vectorwise_dequant(weight.data, Linear8bitLt._row_scales(base)).float()

    def quantize_like(self, weight: torch.Tensor) -> nn.Module:
        import bitsandbytes as bnb

        base: Any = self.base_layer
        device = base.weight.device
        new = bnb.nn.Linear8bitLt(
            self.in_features,
            self.out_features,
            bias=False,
            has_fp16_weights=False,
            threshold=base.state.threshold,
            index=base.index,
            device="meta",
        )
        params: Any = bnb.nn.Int8Params(
            weight.detach().to(device="cpu", dtype=torch.float16).contiguous(),
            requires_grad=False,
            has_fp16_weights=False,
        )
        new.weight = params.to(device)  # quantizes
        new.bias = base.bias
        new.train(base.training)
        return new
