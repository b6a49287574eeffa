"""Loading a base model quantized, by name, and measuring what its weights occupy.

``quantization_config(name)`` gives the transformers config for ``from_pretrained(...,
quantization_config=...)``; the names are those of ``lorakit train --quantize``:

==========  ======================================================================================
``nf4``     bitsandbytes 4-bit NormalFloat with double quantization (QLoRA, Dettmers et al. 2023)
``fp4``     bitsandbytes 4-bit float
``int8``    bitsandbytes LLM.int8() (8-bit rows with outlier handling)
``int8-ao`` torchao int8 weight-only (per-row scales; pure PyTorch)
==========  ======================================================================================

4-bit schemes compute in ``compute_dtype`` (default: float32 on CPU, bfloat16 where a GPU is, as
QLoRA does). The packages are optional extras: a name whose package is missing is refused with the
one line that installs it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.layers import LoraLayer

__all__ = ["QUANTIZATIONS", "quantization_config", "base_model_bytes"]

# name → (the package it needs, the extra that installs it, what it is)
QUANTIZATIONS: dict[str, tuple[str, str, str]] = {
    "nf4": ("bitsandbytes", "bnb", "bitsandbytes 4-bit NormalFloat, double quantization (QLoRA)"),
    "fp4": ("bitsandbytes", "bnb", "bitsandbytes 4-bit float"),
    "int8": ("bitsandbytes", "bnb", "bitsandbytes LLM.int8()"),
    "int8-ao": ("torchao", "torchao", "torchao int8 weight-only"),
}


def quantization_config(
    name: str, *, compute_dtype: torch.dtype | None = None, skip_modules: Sequence[str] = ()
) -> Any:
    """The transformers quantization config for ``name`` (see the module docstring);
    ``skip_modules`` stay in full precision (e.g. a new classification head that is trained)."""
    if name not in QUANTIZATIONS:
        raise ConfigError(f"unknown quantization {name!r}; choose one of: {', '.join(QUANTIZATIONS)}")
    package, extra, _ = QUANTIZATIONS[name]
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"quantization {name!r} needs {package}: pip install 'lorakit[{extra}]'")
    import transformers

    skip = list(skip_modules) or None  # None: transformers picks (the output head stays unquantized)
    if name == "int8-ao":
        from torchao.quantization import Int8WeightOnlyConfig

        return transformers.TorchAoConfig(Int8WeightOnlyConfig(), modules_to_not_convert=skip)
    if name == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if compute_dtype is None:
        compute_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=name,
        bnb_4bit_use_double_quant=name == "nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip,
    )


def _tensor_bytes(tensor: Any) -> int:
    """Bytes a tensor stores: its own, or its parts' for a tensor subclass (torchao), plus the
    quantization state bitsandbytes keeps beside a 4-bit weight (block scales, ...)."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        names = tensor.__tensor_flatten__()[0]
        return sum(_tensor_bytes(getattr(tensor, n)) for n in names)
    total = tensor.numel() * tensor.element_size()
    state = getattr(tensor, "quant_state", None)
    if state is not None and hasattr(state, "as_dict"):
        total += sum(v.numel() * v.element_size() for v in state.as_dict(packed=True).values())
    scales = getattr(tensor, "SCB", None)
    if isinstance(scales, torch.Tensor):
        total += scales.numel() * scales.element_size()
    return total


def base_model_bytes(model: nn.Module) -> int:
    """Bytes held by ``model``'s base weights and buffers as stored (quantized weights at their
    quantized size), without any LoRA adapter's tensors or merge copies."""
    skip: set[int] = set()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name in module.adapter_names:
                skip.update(id(p) for p in module.adapter_parameters(name))
            skip.update(id(b) for b in module.buffers(recurse=False))
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in skip or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += _tensor_bytes(tensor)
    return total
