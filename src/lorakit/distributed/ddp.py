"""Gradient checkpointing under DDP: which modes work, and a clear error for the one that breaks.

transformers checkpoints non-reentrantly by default (``use_reentrant=False``); that mode works under
DDP with or without ``find_unused_parameters``, and is what lorakit recommends. Reentrant
checkpointing hides the parameters of a checkpointed block from the forward graph, so DDP with
``find_unused_parameters=True`` marks the LoRA weights unused, then sees their gradients arrive in
backward and fails deep inside autograd ("Expected to mark a variable ready only once"). Reentrant
checkpointing with ``find_unused_parameters=False`` (the default) works, provided the block inputs
require grad (transformers' ``enable_input_require_grads``, done by ``gradient_checkpointing_enable``).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from lorakit.errors import DistributedError

__all__ = ["reentrant_checkpointed_modules", "check_ddp", "wrap_ddp"]


def _is_reentrant(module: nn.Module) -> bool:
    if getattr(module, "gradient_checkpointing", False):  # transformers' checkpointed layers
        func = getattr(module, "_gradient_checkpointing_func", None)
        keywords = getattr(func, "keywords", {}) or {}
        return bool(keywords.get("use_reentrant", False))
    impl = getattr(module, "checkpoint_impl", None)  # torch's checkpoint_wrapper
    return getattr(impl, "name", "") == "REENTRANT"


def reentrant_checkpointed_modules(model: nn.Module) -> list[str]:
    """Names of the modules that run reentrant activation checkpointing."""
    return [name or "<root>" for name, module in model.named_modules() if _is_reentrant(module)]


def check_ddp(ddp_model: nn.Module) -> None:
    """Raise :class:`DistributedError` for a DDP model that cannot train its LoRA weights:
    reentrant checkpointing combined with ``find_unused_parameters=True``."""
    if not getattr(ddp_model, "find_unused_parameters", False):
        return
    inner = getattr(ddp_model, "module", ddp_model)
    reentrant = reentrant_checkpointed_modules(inner)
    if reentrant:
        raise DistributedError(
            f"DDP(find_unused_parameters=True) cannot be combined with reentrant gradient checkpointing "
            f"({len(reentrant)} modules, e.g. {reentrant[:2]}): DDP would mark the checkpointed LoRA weights "
            "unused and backward fails. Use non-reentrant checkpointing (the default of "
            "gradient_checkpointing_enable(), or gradient_checkpointing_kwargs={'use_reentrant': False}), "
            "or find_unused_parameters=False"
        )


def wrap_ddp(model: nn.Module, **ddp_kwargs: Any) -> nn.Module:
    """``DistributedDataParallel(model, **ddp_kwargs)`` after :func:`check_ddp`'s check."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, **ddp_kwargs)
    check_ddp(ddp)
    return ddp
