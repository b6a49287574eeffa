"""LoRA for ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's fan-in-first linear layer).

``y = base(x) + s · B A dropout(x)`` with x: (…, k), A: (r, k), B: (d, r), y: (…, d) (Hu et al.
2021, eq. 3). ``Conv1D`` stores its weight as (k, d), so its ``ΔW`` is transposed
(``fan_in_fan_out``). The math is :func:`lorakit.functional.lora.lora_linear`; the faster paths that
compute the same are :mod:`lorakit.layers.linear_fast`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import LORA_GA_GRAD, parse_init
from lorakit.functional import init as LI
from lorakit.functional import lora as LF
from lorakit.layers import linear_fast as fast
from lorakit.layers.base import LoraLayer

__all__ = ["Linear", "is_conv1d", "linear_shape"]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D``, recognised without importing transformers."""
    weight = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(weight, "ndim", 0) == 2


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features k, out_features d) of a Linear or Conv1D."""
    if is_conv1d(module):
        k, d = getattr(module, "weight").shape  # noqa: B009 (typed as Tensor | Module otherwise)
        return int(k), int(d)
    return int(module.in_features), int(module.out_features)  # type: ignore[arg-type]


class Linear(LoraLayer):
    """LoRA around a ``nn.Linear`` or ``Conv1D``; A and B are bias-free ``nn.Linear`` layers
    (B gets a bias with ``lora_bias``)."""

    is_linear = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = linear_shape(base_layer)
        self.fan_in_fan_out = is_conv1d(base_layer)

    @classmethod
    def stores_input_first(cls, base: nn.Module) -> bool | None:
        return is_conv1d(base)

    @property
    def out_axis(self) -> int:  # type: ignore[override]
        return 1 if self.fan_in_fan_out else 0

    # -- adapters --------------------------------------------------------------------------------
    def create_adapter(self, name: str, r: int, *, init: bool | str, lora_bias: bool) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=lora_bias)
        a, b = self.factors(name)
        kind, niter = parse_init(init) or ("default", None)
        if kind in ("pissa", "olora"):
            self._init_from_weight(name, kind, niter)
        elif kind == "eva" or (kind == "lora_ga" and hasattr(self.base_layer, LORA_GA_GRAD)):
            # A stays a placeholder until EVA / LoRA-GA sets it (no draw: PEFT's RNG order); B = 0
            nn.init.zeros_(b)
        elif kind == "lora_ga":  # no gradient estimate (e.g. loading a saved adapter): PEFT's default
            LF.init_lora_linear_(a, b, True, r)
        elif kind == "orthogonal":
            new_a, new_b = LI.orthogonal(self.out_features, self.in_features, r)
            with torch.no_grad():
                a.copy_(new_a)
                b.copy_(new_b)
        else:
            LF.init_lora_linear_(a, b, init, r)
        bias = self.lora_b_bias(name)
        if bias is not None and init is not False:
            nn.init.zeros_(bias)

    @torch.no_grad()
    def _init_from_weight(self, name: str, kind: str, niter: int | None) -> None:
        """PiSSA / OLoRA: the adapter takes the principal part of W and the base keeps the residual
        (computed in float32, rounded once into the weight's dtype)."""
        weight = self.dense_weight()
        w = self.to_matrix(weight)  # (d, k)
        r, s = self.r[name], self.scaling[name]
        a, b, residual = LI.pissa(w, r, s, niter) if kind == "pissa" else LI.olora(w, r, s)
        new_a, new_b = self.factors(name)
        new_a.copy_(a)
        new_b.copy_(b)
        weight.copy_(self.to_matrix(residual).to(weight.dtype))  # (d, k) → the stored layout

    # -- the math ----------------------------------------------------------------------------------
    def to_matrix(self, weight_like: torch.Tensor) -> torch.Tensor:
        return weight_like.T if self.fan_in_fan_out else weight_like

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.factors(name)
        return LF.linear_delta(a, b, self.scaling[name], self.fan_in_fan_out)

    def lora_branch(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self.lora_A[name], self.lora_B[name]
        x = self.lora_dropout[name](x.to(self.factors(name)[0].dtype))
        return b(a(x)) * self.scaling[name]

    def base_without_bias(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(weight.dtype), self.to_matrix(weight))

    # -- the fast paths: the same results with less memory and time (tested equal) ----------------
    forward = fast.forward  # one autograd node with the base product when that is allowed
    add_branch = fast.add_branch  # accumulated in place; dropout keeps a packed mask, not a copy of x
    add_mixed_ = fast.add_mixed_  # two batched products whatever the number of adapters
