"""LoftQ's quantizers: the value ``q(W)`` a weight takes once quantized, as LoftQ's alternation
needs it (:func:`lorakit.functional.init.loftq`).

``loftq_bits=4``: bitsandbytes NF4, block size 64, without double quantization (PEFT's choice), so
that loading the saved base with ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``
reproduces ``Q`` exactly (double quantization then changes each block scale by at most 2⁻⁸ of it).
``loftq_bits=8``: bitsandbytes LLM.int8() rows, ``C ⊙ SCB / 127``. Both run on CPU or GPU.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

__all__ = ["BITS", "quantizer", "missing_package", "BNB_INSTALL_HINT"]

BNB_INSTALL_HINT = "pip install 'lorakit[bnb]' (bitsandbytes)"

BITS = (4, 8)


def missing_package() -> str | None:
    """Why LoftQ cannot run here (bitsandbytes absent), or ``None``."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return f"init_lora_weights='loftq' quantizes with bitsandbytes: {BNB_INSTALL_HINT}"
    return None


def quantizer(bits: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``W ↦ q(W)`` in float32 for ``loftq_bits=bits`` (4: NF4, 8: int8 rows)."""
    import bitsandbytes.functional as BF

    def nf4(w: torch.Tensor) -> torch.Tensor:
        codes, state = BF.quantize_4bit(w.float().contiguous(), blocksize=64, quant_type="nf4")
        return BF.dequantize_4bit(codes, state).float()

    def int8(w: torch.Tensor) -> torch.Tensor:
        codes, scales, _ = BF.int8_vectorwise_quant(w.to(torch.float16).contiguous())
        return BF.int8_vectorwise_dequant(codes, scales).float()

    return nf4 if bits == 4 else int8
