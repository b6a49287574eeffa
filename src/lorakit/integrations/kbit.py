"""``prepare_model_for_kbit_training``: PEFT's preparation of a quantized model for QLoRA training.

On a model whose linear weights are quantized (bitsandbytes 4/8-bit, torchao), before adding LoRA:

1. every parameter is frozen (the adapters added afterwards are the only trainable ones);
2. the parameters that stayed in float16/bfloat16 (norms, embeddings, the output head) are cast to
   float32 — not on torchao models, as in PEFT — so the small non-quantized part of the network
   computes in full precision (quantized storage is left as it is);
3. with ``use_gradient_checkpointing`` (the default) gradient checkpointing is turned on and, for
   reentrant checkpointing, the input embeddings' output is made to require grad (otherwise the
   checkpointed blocks of a frozen model get no backward pass and the adapters no gradient);
4. lorakit's own step: bitsandbytes' CPU repacking is turned off on every 4-bit layer
   (:func:`lorakit.layers.bnb.prepare_base`: after it, gradients stop flowing through the layer).

Memory: step 2 costs 2 bytes per non-quantized parameter (for Llama-style models, mostly the
embeddings and the head).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.integrations import gradient_checkpointing
from lorakit.layers import prepare_model

__all__ = ["prepare_model_for_kbit_training"]


def _quantization_method(model: nn.Module) -> str | None:
    method = getattr(model, "quantization_method", None)
    value = getattr(method, "value", method)  # transformers' QuantizationMethod enum or a string
    return str(value) if value is not None else None


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    auto_clear_cache: bool = True,
) -> nn.Module:
    """Prepare a quantized transformers model for training LoRA adapters on it (PEFT's function,
    same name, arguments and effect; see the module docstring). Returns ``model``, changed in place.

    ``gradient_checkpointing_kwargs`` go to ``torch.utils.checkpoint`` (e.g.
    ``{"use_reentrant": False}``); ``auto_clear_cache`` empties the accelerator's cache after the
    casts."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"prepare_model_for_kbit_training needs an nn.Module, got {type(model).__name__}")
    kwargs = dict(gradient_checkpointing_kwargs or {})
    method = _quantization_method(model)
    quantized = bool(
        getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False) or method
    )
    for param in model.parameters():
        param.requires_grad_(False)
    if method != "torchao":
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param) in (nn.Parameter, torch.Tensor):
                param.data = param.data.float()
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    prepare_model(model)
    if quantized and use_gradient_checkpointing:
        gradient_checkpointing.enable(model, kwargs or None)
    return model
