"""LoRA+ (Hayou, Ghosh and Yu 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models").

The paper's analysis (§3, §4) shows that with one learning rate for both factors, feature learning is
inefficient in wide models: B should learn faster than A. LoRA+ sets ``η_B = λ · η_A`` with a ratio
``λ ≫ 1`` (the paper uses λ = 2⁴ for most runs) and reports +1–2 % accuracy and up to 2× faster
convergence at the same cost.

:func:`create_loraplus_optimizer` builds an optimizer with PEFT's four parameter groups, in PEFT's
order (``peft.optimizers.create_loraplus_optimizer``):

==========  =====================================================  ================  ==================
group       parameters                                              learning rate     weight decay
==========  =====================================================  ================  ==================
A           every other trainable parameter (``lora_A``, full       ``lr``            ``loraplus_weight_
            matrices of ``modules_to_save``)                                          decay``
embedding   the factors of embedding LoRA layers                    ``loraplus_lr_    ``loraplus_weight_
            (``lora_embedding_A`` / ``lora_embedding_B``)           embedding``       decay``
B           ``lora_B`` weights and every other 1-D parameter         ``lr · ratio``    ``loraplus_weight_
            (DoRA magnitudes, ...) that is neither a bias nor                          decay``
            inside a ``nn.LayerNorm``
B, no decay ``lora_B`` biases, other biases, ``nn.LayerNorm``        ``lr · ratio``    0
            parameters
==========  =====================================================  ================  ==================

Parameters are told apart by the container holding them (PEFT's per-adapter containers, see
:data:`lorakit.layers.base.CONTAINERS`), never by a substring of their names; "bias" is a parameter
whose own attribute name contains ``bias`` (PEFT tests the whole dotted name).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lorakit.errors import ConfigError
from lorakit.layers import LoraLayer

__all__ = ["create_loraplus_optimizer", "loraplus_param_groups", "EIGHT_BIT_OPTIMIZERS"]

# bitsandbytes optimizers that keep 8-bit state: PEFT keeps embeddings' state in 32 bits with them
EIGHT_BIT_OPTIMIZERS = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")

_EMBEDDING = ("lora_embedding_A", "lora_embedding_B")


def _roles(model: nn.Module) -> dict[int, str]:
    """id(parameter) → "embedding" or "B" for the parameters LoRA layers hold in those containers."""
    roles: dict[int, str] = {}
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for attr, role in (*((c, "embedding") for c in _EMBEDDING), ("lora_B", "B")):
            for param in getattr(module, attr).parameters():
                roles[id(param)] = role
    return roles


def _no_decay(model: nn.Module) -> set[int]:
    """id(parameter) of biases and of every parameter inside a ``nn.LayerNorm`` (the convention of
    transformers' ``Trainer``, which PEFT's LoRA+ follows)."""
    out: set[int] = set()
    for module in model.modules():
        for pname, param in module.named_parameters(recurse=isinstance(module, nn.LayerNorm)):
            if isinstance(module, nn.LayerNorm) or "bias" in pname:
                out.add(id(param))
    return out


def _check_number(name: str, value: Any, *, minimum: float, inclusive: bool) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value >= minimum if inclusive else value > minimum):
        return None
    bound = f"≥ {minimum}" if inclusive else f"> {minimum}"
    return f"{name}={value!r}: must be a finite number {bound}"


def loraplus_param_groups(
    model: nn.Module,
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_weight_decay: float = 0.0,
    loraplus_lr_embedding: float = 1e-6,
) -> list[dict[str, Any]]:
    """The four LoRA+ parameter groups of ``model``'s trainable parameters (table above), in
    PEFT's order, each ``{"params": [...], "weight_decay": ..., "lr": ...}``; a group may be empty.

    For use with any optimizer: ``torch.optim.AdamW(loraplus_param_groups(model, lr=2e-4,
    loraplus_lr_ratio=16))``.
    """
    problems = [
        p
        for p in (
            _check_number("lr", lr, minimum=0.0, inclusive=False),
            _check_number("loraplus_lr_ratio", loraplus_lr_ratio, minimum=0.0, inclusive=False),
            _check_number("loraplus_weight_decay", loraplus_weight_decay, minimum=0.0, inclusive=True),
            _check_number("loraplus_lr_embedding", loraplus_lr_embedding, minimum=0.0, inclusive=True),
        )
        if p
    ]
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        problems.append(
            f"{type(model).__name__} has no trainable parameter (an adapter loaded for inference? "
            "load it with is_trainable=True, or call get_peft_model first)"
        )
    if problems:
        raise ConfigError("create_loraplus_optimizer:\n  - " + "\n  - ".join(problems))
    roles, no_decay = _roles(model), _no_decay(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for _, param in trainable:
        role = roles.get(id(param))
        if role == "embedding":
            groups["embedding"].append(param)
        elif role == "B" or param.ndim == 1:
            groups["B_no_decay" if id(param) in no_decay else "B"].append(param)
        else:
            groups["A"].append(param)
    fast = lr * loraplus_lr_ratio
    return [
        {"params": groups["A"], "weight_decay": loraplus_weight_decay, "lr": lr},
        {"params": groups["embedding"], "weight_decay": loraplus_weight_decay, "lr": loraplus_lr_embedding},
        {"params": groups["B"], "weight_decay": loraplus_weight_decay, "lr": fast},
        {"params": groups["B_no_decay"], "weight_decay": 0.0, "lr": fast},
    ]


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: Callable[..., torch.optim.Optimizer],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_weight_decay: float = 0.0,
    loraplus_lr_embedding: float = 1e-6,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """A LoRA+ optimizer (PEFT's name, signature and defaults): ``optimizer_cls`` over the groups of
    :func:`loraplus_param_groups`, where B learns ``loraplus_lr_ratio`` times faster than A.

    ``lr`` is η_A; ``loraplus_lr_ratio`` is λ = η_B / η_A (the paper: λ ≫ 1, e.g. 16, with ``lr``
    somewhat below a plain-LoRA learning rate); ``loraplus_lr_embedding`` is the learning rate of
    embedding adapters (PEFT's default 1e-6); ``loraplus_weight_decay`` the decay of every group
    but biases and LayerNorm parameters. Other keywords go to ``optimizer_cls`` (``betas``, ...).

    With a bitsandbytes 8-bit optimizer (``AdamW8bit``, ...) the state of every ``nn.Embedding``
    weight is kept in 32 bits, as PEFT does.
    """
    groups = loraplus_param_groups(
        model,
        lr=lr,
        loraplus_lr_ratio=loraplus_lr_ratio,
        loraplus_weight_decay=loraplus_weight_decay,
        loraplus_lr_embedding=loraplus_lr_embedding,
    )
    optimizer = optimizer_cls(groups, lr=lr, **kwargs)
    if getattr(optimizer_cls, "__name__", "") in EIGHT_BIT_OPTIMIZERS:
        import bitsandbytes  # the optimizer class came from it, so it is installed

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer
