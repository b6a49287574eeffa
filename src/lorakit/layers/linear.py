"""LoRA for ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's fan-in-first linear layer).

``y = base(x) + s · B A dropout(x)`` with x: (…, k), A: (r, k), B: (d, r), y: (…, d).
``Conv1D`` stores its weight as (k, d), so its ``ΔW`` is transposed (``fan_in_fan_out``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import parse_init
from lorakit.functional import fused
from lorakit.functional import init as LI
from lorakit.functional import lora as LF
from lorakit.layers.base import BASE_ROWS, LoraLayer, rows_for


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D``, recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features k, out_features d) of a Linear or Conv1D."""
    if is_conv1d(module):
        k, d = module.weight.shape
        return int(k), int(d)
    return int(module.in_features), int(module.out_features)


class Linear(LoraLayer):
    """LoRA around a ``nn.Linear`` or ``Conv1D``; A and B are bias-free ``nn.Linear`` layers
    (B gets a bias with ``lora_bias``)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_shape(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)
        # the stacked factors of the last mixed batch (inference only); see _stacks
        self._mixed_cache: dict[str, tuple] = {}

    def create_adapter(self, name: str, r: int, *, init: bool | str, lora_bias: bool) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=lora_bias)
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        kind, niter = parse_init(init) or ("default", None)
        if kind in ("pissa", "olora"):
            self._init_from_weight(name, kind, niter)
        elif kind == "orthogonal":
            new_a, new_b = LI.orthogonal(self.out_features, self.in_features, r)
            with torch.no_grad():
                a.copy_(new_a)
                b.copy_(new_b)
        else:
            LF.init_lora_linear_(a, b, init, r)
        if lora_bias and init is not False:
            nn.init.zeros_(self.lora_B[name].bias)

    @torch.no_grad()
    def _init_from_weight(self, name: str, kind: str, niter: int | None) -> None:
        """PiSSA / OLoRA: the adapter takes the principal part of W and the base keeps the residual
        (computed in float32, rounded once into the weight's dtype)."""
        weight = self.base_layer.weight
        w = weight.T if self.fan_in_fan_out else weight  # (d, k)
        r, s = self.r[name], self.scaling[name]
        a, b, residual = LI.pissa(w, r, s, niter) if kind == "pissa" else LI.olora(w, r, s)
        self.lora_A[name].weight.copy_(a)
        self.lora_B[name].weight.copy_(b)
        weight.copy_((residual.T if self.fan_in_fan_out else residual).to(weight.dtype))

    @property
    def out_axis(self) -> int:  # type: ignore[override]
        return 1 if self.fan_in_fan_out else 0

    def base_without_bias(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(weight.dtype), weight.T if self.fan_in_fan_out else weight)

    def delta_weight(self, name: str) -> torch.Tensor:
        return LF.linear_delta(
            self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name], self.fan_in_fan_out
        )

    def forward(
        self, x: torch.Tensor, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any
    ) -> torch.Tensor:
        name = None if args or kwargs else self._sole_plain_adapter(x, adapter_names)
        if name is None:
            return super().forward(x, *args, adapter_names=adapter_names, **kwargs)
        base = self.base_layer
        return fused.lora_linear_with_base(
            x,
            base.weight,
            base.bias,
            self.lora_A[name].weight,
            self.lora_B[name].weight,
            self.scaling[name],
            self._dropout_p(name),
            self.training,
        )

    def _sole_plain_adapter(self, x: torch.Tensor, adapter_names: Sequence[str] | None) -> str | None:
        """The adapter whose update may share one autograd node with the base product, or ``None``.

        That needs one plain LoRA adapter (no variant, no ``lora_bias``) on the whole batch, and a
        base that is exactly a frozen ``nn.Linear`` nobody hooks (its forward is bypassed, so
        offloading, ZeRO-3 gathering or user hooks on it rule this out) in x's dtype, no autocast.
        """
        if self.disable_adapters or rows_for(x, adapter_names) is not None:
            return None
        base = self.base_layer
        if type(base) is not nn.Linear or _hooked(base):
            return None
        pending = [n for n in self.active_adapters if n not in self.merged_adapters and self.has_adapter(n)]
        if len(pending) != 1 or pending[0] in self.lora_variant or self.lora_B[pending[0]].bias is not None:
            return None
        weight, bias = base.weight, base.bias
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return None
        if type(weight) not in (nn.Parameter, torch.Tensor) or x.dtype != weight.dtype:
            return None
        if fused.compute_dtype(x) != x.dtype or x.device != weight.device:
            return None
        return pending[0]

    def _dropout_p(self, name: str) -> float:
        dropout = self.lora_dropout[name]
        return dropout.p if isinstance(dropout, nn.Dropout) else 0.0

    def add_branch(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """The fused path: accumulate in place, dropout without a copy of ``x``."""
        a, b = self.lora_A[name], self.lora_B[name]
        return fused.lora_linear_accumulate_(
            result, x, a.weight, b.weight, self.scaling[name], self._dropout_p(name), self.training, b.bias
        )

    def add_mixed_(self, result: torch.Tensor, x: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
        """One batched product for a batch that mixes adapters.

        The adapters' factors are stacked (zero-padded to the largest rank, which adds exactly 0;
        slot 0 is all zeros for ``"__base__"`` rows) and gathered per row, so the cost is two
        ``bmm`` whatever the number of adapters: x (n, L, k) @ A_rowsᵀ (n, k, r) → (n, L, r) @
        (s·B)_rowsᵀ (n, r, d) → (n, L, d). Rows of variant adapters (DoRA) are done first, by
        the generic per-adapter path.
        """
        names = [n for n in dict.fromkeys(adapter_names) if n != BASE_ROWS and self.has_adapter(n)]
        if any(n in self.lora_variant for n in names):
            only_variants = [n if n in self.lora_variant else BASE_ROWS for n in adapter_names]
            result = super().add_mixed_(result, x, only_variants)
            adapter_names = [BASE_ROWS if n in self.lora_variant else n for n in adapter_names]
            names = [n for n in names if n not in self.lora_variant]
        dropout_active = self.training and any(isinstance(self.lora_dropout[n], nn.Dropout) for n in names)
        if not names or dropout_active:
            return super().add_mixed_(result, x, adapter_names)
        a_stack, b_stack, bias_stack = self._stacks(names, fused.compute_dtype(x), x.device)
        slot = {n: i + 1 for i, n in enumerate(names)}
        rows = torch.tensor([slot.get(n, 0) for n in adapter_names], device=x.device)
        x3 = x.to(a_stack.dtype).reshape(x.shape[0], -1, self.in_features)  # (n, L, k)
        h = torch.bmm(x3, a_stack.index_select(0, rows).transpose(1, 2))  # (n, L, r)
        out = torch.bmm(h, b_stack.index_select(0, rows).transpose(1, 2))  # (n, L, d)
        if bias_stack is not None:
            out = out + bias_stack.index_select(0, rows).unsqueeze(1)
        return result.add_(out.reshape(result.shape))

    def _stacks(
        self, names: list[str], dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(A (m+1, r_max, k), s·B (m+1, d, r_max), s·b_B (m+1, d) or None) for adapters ``names``.

        Without autograd the stacks are cached and rebuilt only when a factor changes (its tensor
        version counts every in-place write: optimizer steps, loads, hot-swaps) or is replaced.
        """
        factors = [
            t
            for n in names
            for t in (self.lora_A[n].weight, self.lora_B[n].weight, self.lora_B[n].bias)
            if t is not None
        ]
        cacheable = not (torch.is_grad_enabled() and any(t.requires_grad for t in factors))
        key = (tuple(names), dtype, device)
        stamp = (key, tuple((id(t), t._version) for t in factors), tuple(self.scaling[n] for n in names))
        cached = self._mixed_cache.get("stacks")
        if cacheable and cached is not None and cached[0] == stamp:
            return cached[1]
        r_max = max(self.r[n] for n in names)
        zeros = torch.zeros
        a_stack = torch.stack(
            [zeros(r_max, self.in_features, dtype=dtype, device=device)]
            + [F.pad(self.lora_A[n].weight.to(dtype), (0, 0, 0, r_max - self.r[n])) for n in names]
        )
        b_stack = torch.stack(
            [zeros(self.out_features, r_max, dtype=dtype, device=device)]
            + [
                F.pad(self.lora_B[n].weight.to(dtype) * self.scaling[n], (0, r_max - self.r[n]))
                for n in names
            ]
        )
        biases = [self.lora_B[n].bias for n in names]
        bias_stack = None
        if any(b is not None for b in biases):
            bias_stack = torch.stack(
                [zeros(self.out_features, dtype=dtype, device=device)]
                + [
                    zeros(self.out_features, dtype=dtype, device=device)
                    if b is None
                    else b.to(dtype) * self.scaling[n]
                    for n, b in zip(names, biases, strict=True)
                ]
            )
        stacks = (a_stack, b_stack, bias_stack)
        if cacheable:
            self._mixed_cache["stacks"] = (stamp, stacks)
        return stacks

    def lora_branch(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(a.weight.dtype))
        return b(a(x)) * self.scaling[name]


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs more than its class's ``forward`` (hooks, a patched forward)."""
    global_hooks = (
        nn.modules.module._global_forward_hooks,
        nn.modules.module._global_forward_pre_hooks,
        nn.modules.module._global_backward_hooks,
        nn.modules.module._global_backward_pre_hooks,
    )
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or "forward" in module.__dict__
        or any(global_hooks)
    )
