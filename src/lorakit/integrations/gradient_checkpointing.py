"""Gradient (activation) checkpointing for a LoRA model whose embeddings are frozen.

With reentrant checkpointing (``torch.utils.checkpoint(..., use_reentrant=True)``) a checkpointed
block only gets a backward pass if one of its *inputs* requires grad. With frozen embeddings none
does, so the LoRA weights inside the blocks would silently receive no gradient. The fix is PEFT's
and transformers': make the input embeddings' output require grad
(``enable_input_require_grads``). It costs nothing in the non-reentrant mode, so it is always done.

``use_cache=False`` during checkpointed training is handled by transformers' checkpointed layers
(they drop the cache and warn), so nothing is changed in the model's config here.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lorakit.errors import ConfigError

__all__ = ["enable", "disable", "is_enabled"]


def enable(model: nn.Module, checkpointing_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """Turn on checkpointing in transformers model ``model`` (the user's model inside a PeftModel).

    ``checkpointing_kwargs`` go to ``torch.utils.checkpoint.checkpoint`` (e.g.
    ``{"use_reentrant": True}``); ``kwargs`` (``every_n_layers``, ``offload``) to transformers.
    """
    new_api = getattr(model, "activation_checkpointing_enable", None)
    old_api = getattr(model, "gradient_checkpointing_enable", None)
    if callable(new_api):
        new_api(activation_checkpointing_kwargs=checkpointing_kwargs, **kwargs)
    elif callable(old_api):
        old_api(gradient_checkpointing_kwargs=checkpointing_kwargs, **kwargs)
    else:
        raise ConfigError(
            f"{type(model).__name__} has no activation_checkpointing_enable / gradient_checkpointing_enable; "
            f"gradient checkpointing needs a transformers model (or wrap blocks in torch.utils.checkpoint)"
        )
    _inputs_require_grad(model)


def _inputs_require_grad(model: nn.Module) -> None:
    """Make the input embeddings' output require grad (idempotent: transformers keeps one hook)."""
    if getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None):
        return
    hook = getattr(model, "enable_input_require_grads", None)
    if callable(hook):
        hook()
        return
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embeddings, nn.Module):
        embeddings.register_forward_hook(_output_requires_grad)


def _output_requires_grad(_module: nn.Module, _inputs: Any, output: Any) -> None:
    output.requires_grad_(True)


def disable(model: nn.Module) -> None:
    """Turn checkpointing off again (the input-grad hook stays: it is harmless)."""
    new_api = getattr(model, "activation_checkpointing_disable", None)
    old_api = getattr(model, "gradient_checkpointing_disable", None)
    if callable(new_api):
        new_api()
    elif callable(old_api):
        old_api()


def is_enabled(model: nn.Module) -> bool:
    flag = getattr(model, "is_activation_checkpointing", None)
    if flag is None:
        flag = getattr(model, "is_gradient_checkpointing", False)
    return bool(flag)
