"""The fast paths of the LoRA linear layer: when each applies, and what it runs instead.

:class:`lorakit.layers.linear.Linear` computes ``base(x) + s · B A dropout(x)`` (its
``lora_branch``); its ``forward``, ``add_branch`` and ``add_mixed_`` are the functions here, which
compute the same with less memory and time and are tested equal to the plain path:

* :func:`forward`: one plain adapter over a frozen, unhooked ``nn.Linear`` (:func:`fusable`) lets one
  autograd node own the base product and the adapter
  (:func:`lorakit.functional.fused.lora_linear_with_base`); anything else takes the generic forward.
* :func:`add_branch`: the branch is added into the base output in place, and dropout keeps a packed
  mask instead of a copy of ``x``.
* :func:`add_mixed_`: a batch that mixes adapters runs two batched products whatever the number of
  adapters, from factors stacked once and reused until a factor changes (:class:`StackedFactors`).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.functional import fused
from lorakit.layers.base import LoraLayer
from lorakit.layers.rows import BASE_ROWS, rows_for

__all__ = ["forward", "add_branch", "add_mixed_", "fusable", "StackedFactors", "hooked"]


def forward(
    layer: LoraLayer, x: torch.Tensor, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any
) -> torch.Tensor:
    """``Linear.forward``: fused with the base product when :func:`_fusable_adapter` finds one."""
    name = None if args or kwargs else _fusable_adapter(layer, x, adapter_names)
    if name is None:
        return LoraLayer.forward(layer, x, *args, adapter_names=adapter_names, **kwargs)
    a, b = layer.factors(name)
    base: nn.Linear = layer.base_layer  # type: ignore[assignment]  # fusable() checked its type
    return fused.lora_linear_with_base(
        x, base.weight, base.bias, a, b, layer.scaling[name], layer.dropout_p(name), layer.training
    )


def _fusable_adapter(layer: LoraLayer, x: torch.Tensor, adapter_names: Sequence[str] | None) -> str | None:
    """The one plain adapter (no variant, no ``lora_bias``) applied to the whole batch, if the
    base product may join its autograd node (:func:`fusable`)."""
    if layer.disable_adapters or rows_for(x, adapter_names) is not None:
        return None
    pending = layer.pending_adapters()
    if len(pending) != 1 or pending[0] in layer.lora_variant or layer.lora_bias[pending[0]]:
        return None
    return pending[0] if fusable(layer.base_layer, x) else None


def add_branch(layer: LoraLayer, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """``result += s · (B A dropout(x) + b_B)`` in place, without a copy of ``x`` for dropout."""
    a, b = layer.factors(name)
    s, p, bias = layer.scaling[name], layer.dropout_p(name), layer.lora_b_bias(name)
    return fused.lora_linear_accumulate_(result, x, a, b, s, p, layer.training, bias)


def add_mixed_(
    layer: LoraLayer, result: torch.Tensor, x: torch.Tensor, adapter_names: Sequence[str]
) -> torch.Tensor:
    """Rows of variant adapters (DoRA) and, in training with dropout, all rows go through the
    generic per-adapter path; the others share two batched products (:func:`add_stacked_`)."""
    names = [n for n in dict.fromkeys(adapter_names) if n != BASE_ROWS and layer.has_adapter(n)]
    if any(n in layer.lora_variant for n in names):
        only_variants = [n if n in layer.lora_variant else BASE_ROWS for n in adapter_names]
        result = LoraLayer.add_mixed_(layer, result, x, only_variants)
        adapter_names = [BASE_ROWS if n in layer.lora_variant else n for n in adapter_names]
        names = [n for n in names if n not in layer.lora_variant]
    dropout_active = layer.training and any(layer.dropout_p(n) > 0 for n in names)
    if not names or dropout_active:
        return LoraLayer.add_mixed_(layer, result, x, adapter_names)
    entries = [(*layer.factors(n), layer.lora_b_bias(n), layer.scaling[n]) for n in names]
    stacks = _stacked_factors(layer).get(entries, fused.compute_dtype(x), x.device)
    slot = {n: i + 1 for i, n in enumerate(names)}
    slots = torch.tensor([slot.get(n, 0) for n in adapter_names], device=x.device)
    return add_stacked_(result, x, slots, stacks)


def _stacked_factors(layer: LoraLayer) -> StackedFactors:
    """The layer's cache of stacked factors, created on its first mixed batch."""
    cache = layer.__dict__.get("_stacked_factors")
    if cache is None:
        cache = layer.__dict__["_stacked_factors"] = StackedFactors()
    return cache


def hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its class's ``forward`` (hooks, a patched forward):
    offloading, ZeRO-3 gathering and user hooks live there, and the fused path bypasses the call.

    torch offers no public query for global hooks, so its module-level registries are read (with a
    default, should they ever be renamed: then only per-module hooks are seen)."""
    registries = (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
    global_hooks = any(getattr(nn.modules.module, r, None) for r in registries)
    own = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks)
    return bool(
        any(own)
        or getattr(module, "_backward_pre_hooks", None)
        or "forward" in module.__dict__
        or global_hooks
    )


def fusable(base: nn.Module, x: torch.Tensor) -> bool:
    """Whether the base product may move into the adapter's autograd node: ``base`` is exactly a
    frozen ``nn.Linear`` nobody hooks, with weights of plain tensors in x's dtype and device, and
    no autocast is active (the caller checks the adapter side: one plain adapter on the batch)."""
    if type(base) is not nn.Linear or hooked(base):
        return False
    weight, bias = base.weight, base.bias
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        return False
    if type(weight) not in (nn.Parameter, torch.Tensor) or x.dtype != weight.dtype:
        return False
    return fused.compute_dtype(x) == x.dtype and x.device == weight.device


Stacks = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


class StackedFactors:
    """The factors of several adapters stacked for one batched product, cached between calls.

    ``A`` (m+1, r_max, k), ``s·B`` (m+1, d, r_max) and ``s·b_B`` (m+1, d) or ``None``; slot 0 is
    all zeros (the ``"__base__"`` rows) and smaller ranks are zero-padded, which adds exactly 0.
    Without autograd the stacks are reused while every factor is the same tensor object, at the
    same version (its version counts every in-place write: optimizer steps, loads, hot-swaps),
    with the same scaling. Tensors are compared by identity through weak references, so a
    deleted adapter's tensor can never be mistaken for a new one that happens to reuse its id.
    """

    def __init__(self) -> None:
        self._stamp: tuple | None = None
        self._refs: list[weakref.ref[torch.Tensor]] = []
        self._stacks: Stacks | None = None

    def clear(self) -> None:
        self._stamp, self._refs, self._stacks = None, [], None

    def __getstate__(self) -> dict:
        return {}  # a cache (of weak references): pickles and copies start empty

    def __setstate__(self, state: dict) -> None:
        self.clear()

    def _fresh(self, stamp: tuple, factors: Sequence[torch.Tensor]) -> bool:
        return (
            self._stacks is not None
            and self._stamp == stamp
            and len(self._refs) == len(factors)
            and all(ref() is t for ref, t in zip(self._refs, factors, strict=True))
        )

    def get(
        self,
        adapters: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]],
        dtype: torch.dtype,
        device: torch.device,
    ) -> Stacks:
        """The stacks for ``adapters`` = [(A (r, k), B (d, r), b_B (d,) or None, s), ...]."""
        factors = [t for a, b, bias, _ in adapters for t in (a, b, bias) if t is not None]
        cacheable = not (torch.is_grad_enabled() and any(t.requires_grad for t in factors))
        stamp = (
            dtype,
            device,
            tuple((a.shape[0], bias is not None, s) for a, _, bias, s in adapters),
            tuple(t._version for t in factors),
        )
        if cacheable and self._fresh(stamp, factors):
            assert self._stacks is not None
            return self._stacks
        stacks = _stack(adapters, dtype, device)
        if cacheable:
            self._stamp, self._refs, self._stacks = stamp, [weakref.ref(t) for t in factors], stacks
        else:
            self.clear()
        return stacks


def _stack(
    adapters: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]],
    dtype: torch.dtype,
    device: torch.device,
) -> Stacks:
    r_max = max(a.shape[0] for a, _, _, _ in adapters)
    d, k = adapters[0][1].shape[0], adapters[0][0].shape[1]
    a_stack = torch.stack(
        [torch.zeros(r_max, k, dtype=dtype, device=device)]
        + [F.pad(a.to(dtype), (0, 0, 0, r_max - a.shape[0])) for a, _, _, _ in adapters]
    )
    b_stack = torch.stack(
        [torch.zeros(d, r_max, dtype=dtype, device=device)]
        + [F.pad(b.to(dtype) * s, (0, r_max - b.shape[1])) for _, b, _, s in adapters]
    )
    bias_stack = None
    if any(bias is not None for _, _, bias, _ in adapters):
        zeros = torch.zeros(d, dtype=dtype, device=device)
        bias_stack = torch.stack(
            [zeros] + [zeros if bias is None else bias.to(dtype) * s for _, _, bias, s in adapters]
        )
    return a_stack, b_stack, bias_stack


def add_stacked_(result: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, stacks: Stacks) -> torch.Tensor:
    """``result[i] += s·B_j A_j x[i] (+ s·b_j)`` with ``j = slots[i]``: two ``bmm`` for the batch.

    x (n, …, k) is viewed as (n, L, k); (n, L, k) @ A_rowsᵀ (n, k, r) → (n, L, r) @ (s·B)_rowsᵀ
    (n, r, d) → (n, L, d).
    """
    a_stack, b_stack, bias_stack = stacks
    x3 = x.to(a_stack.dtype).reshape(x.shape[0], -1, a_stack.shape[-1])  # (n, L, k)
    h = torch.bmm(x3, a_stack.index_select(0, slots).transpose(1, 2))  # (n, L, r)
    out = torch.bmm(h, b_stack.index_select(0, slots).transpose(1, 2))  # (n, L, d)
    if bias_stack is not None:
        out = out + bias_stack.index_select(0, slots).unsqueeze(1)
    return result.add_(out.reshape(result.shape))
