"""Tiny models quantized on CPU exactly as users quantize theirs: saved by ``save_pretrained`` and
loaded by ``from_pretrained(..., quantization_config=...)`` (transformers' ``BitsAndBytesConfig`` or
``TorchAoConfig``). Requires the ``bnb`` and ``torchao`` extras (``make test`` installs both).

``SCHEMES``: the quantizations users pick (``nf4``: QLoRA's NF4 with double quantization;
``nf4-bf16``: the same computing in bfloat16 on a bfloat16 model; ``nf4-single``: NF4 without
double quantization; ``fp4``; ``int8``: LLM.int8();
``int8-ao``: torchao int8 weight-only). ``ARCHS``: a Llama (``nn.Linear``), a GPT-2 (transformers
``Conv1D``, transposed into quantized linears by transformers) and a BERT classifier (biases).
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from zoo.transformers_models import bert_cls, gpt2, llama

__all__ = ["SCHEMES", "ARCHS", "quantized", "full_precision", "saved", "scheme_dtype", "no_cpu_repacking"]


def _bnb(**kwargs: Any) -> Callable[[list[str]], Any]:
    return lambda skip: transformers.BitsAndBytesConfig(**kwargs, llm_int8_skip_modules=skip or None)


def _torchao_int8(skip: list[str]) -> Any:
    from torchao.quantization import Int8WeightOnlyConfig

    return transformers.TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=skip or None)


# scheme → the quantization config, given the modules to leave in full precision
SCHEMES: dict[str, Callable[[list[str]], Any]] = {
    "nf4": _bnb(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ),
    "nf4-bf16": _bnb(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),
    "nf4-single": _bnb(  # without double quantization: reloads LoftQ's quantized weights exactly
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    ),
    "fp4": _bnb(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": _bnb(load_in_8bit=True),
    "int8-ao": _torchao_int8,
}

# arch → (the zoo builder, the auto class that loads it, the modules kept in full precision: a
# classification head is trained in full (modules_to_save), so users keep it out of quantization)
ARCHS: dict[str, tuple[Callable[[], nn.Module], str, list[str]]] = {
    "llama": (llama, "AutoModelForCausalLM", []),
    "gpt2": (gpt2, "AutoModelForCausalLM", []),
    "bert": (bert_cls, "AutoModelForSequenceClassification", ["classifier"]),
}

_ROOT: Path | None = None


def saved(arch: str, model: nn.Module | None = None) -> Path:
    """The zoo's ``arch`` model saved once per process (full precision, float32); with ``model``,
    that model saved under a new folder (returned)."""
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="lorakit-quantized-zoo-"))
        atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
    if model is not None:
        path = Path(tempfile.mkdtemp(prefix=f"{arch}-", dir=_ROOT))
        model.save_pretrained(path)
        return path
    path = _ROOT / arch
    if not path.is_dir():
        ARCHS[arch][0]().save_pretrained(path)
    return path


def scheme_dtype(scheme: str) -> torch.dtype:
    """The dtype the model's unquantized parts (embeddings, norms, head) are loaded in."""
    return torch.bfloat16 if scheme.endswith("bf16") else torch.float32


def quantized(arch: str, scheme: str, path: Path | None = None) -> nn.Module:
    """``arch`` (or the model saved in ``path``) loaded with quantization ``scheme``, in eval mode,
    as ``from_pretrained`` gives it."""
    _, auto_class, skip = ARCHS[arch]
    model = getattr(transformers, auto_class).from_pretrained(
        path or saved(arch), quantization_config=SCHEMES[scheme](skip), dtype=scheme_dtype(scheme)
    )
    return model.eval()


def full_precision(arch: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``arch`` loaded from the same folder without quantization."""
    auto = getattr(transformers, ARCHS[arch][1])
    return auto.from_pretrained(saved(arch), dtype=dtype).eval()


def no_cpu_repacking(model: nn.Module) -> nn.Module:
    """Turn off bitsandbytes' AVX512-BF16 repacking on every 4-bit layer (what lorakit does on the
    models it adapts), so that a PEFT model computes with the same kernel as lorakit's."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model
