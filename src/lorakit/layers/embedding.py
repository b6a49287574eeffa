"""LoRA for ``nn.Embedding``: ``y = E[ids] + s · (Aᵀ[ids]) Bᵀ``.

A: (r, V) and B: (D, r) are plain parameters (``lora_embedding_A`` / ``lora_embedding_B``), so the
branch is a lookup of r-dimensional rows followed by a rank-r projection. As in PEFT and loralib, A
starts at zero and B random; no dropout is applied to token ids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import parse_init
from lorakit.errors import TargetingError
from lorakit.functional import lora as LF
from lorakit.layers.base import LoraLayer
from lorakit.layers.variant import LoraVariant


class Embedding(LoraLayer):
    """LoRA around a ``nn.Embedding`` (or a subclass such as a scaled word embedding)."""

    factor_containers = ("lora_embedding_A", "lora_embedding_B")
    out_axis = 1  # the table is (V, D): output channels are its columns

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        vocab, dim = self.dense_weight().shape
        self.in_features, self.out_features = int(vocab), int(dim)  # (V, D)

    @classmethod
    def option_problems(
        cls, base: nn.Module, *, init: bool | str, lora_bias: bool, variant: LoraVariant | None
    ) -> list[str]:
        problems = ["lora_bias=True is not supported for Embedding"] if lora_bias else []
        if (parse_init(init) or ("default", None))[0] == "loftq":
            problems.append("init_lora_weights='loftq' is implemented for linear layers only")
        return problems

    def create_adapter(self, name: str, r: int, *, init: bool | str, lora_bias: bool) -> None:
        if lora_bias:
            raise TargetingError("lora_bias=True is not supported on embedding layers")
        self.lora_embedding_A[name] = nn.Parameter(torch.randn(r, self.in_features))
        self.lora_embedding_B[name] = nn.Parameter(torch.randn(self.out_features, r))
        LF.init_lora_embedding_(self.lora_embedding_A[name], self.lora_embedding_B[name], init)

    def to_matrix(self, weight_like: torch.Tensor) -> torch.Tensor:
        return weight_like.T  # (V, D) → (D, V) = B A

    @property
    def _table(self) -> nn.Embedding:
        return self.base_layer  # type: ignore[return-value]  # what the registry wraps

    def base_without_bias(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        base = self._table
        out = F.embedding(
            x, weight, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )
        return self._scaled(out)

    def _scaled(self, out: torch.Tensor) -> torch.Tensor:
        """Some embeddings (e.g. Gemma's) scale their rows in forward; apply the same scale."""
        scale = getattr(self.base_layer, "embed_scale", None)
        if scale is None:
            return out
        return out * (scale.to(out.dtype) if isinstance(scale, torch.Tensor) else scale)

    def delta_weight(self, name: str) -> torch.Tensor:
        a, b = self.lora_embedding_A[name], self.lora_embedding_B[name]
        return LF.linear_delta(a, b, self.scaling[name], fan_in_fan_out=True)  # (V, D)

    def lora_branch(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self._table
        rows = F.embedding(
            x,
            self.lora_embedding_A[name].T,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )  # (…, r)
        return self._scaled((rows @ self.lora_embedding_B[name].T) * self.scaling[name])  # (…, D)
