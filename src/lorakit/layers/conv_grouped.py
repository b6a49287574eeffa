"""LoRA for grouped convolutions: ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d`` with ``groups=G > 1``.

The layout is PEFT's: A is an ordinary convolution like the base one (C_in → r, same kernel,
stride, padding), B a 1×…×1 convolution (r → C_out) with the base's ``G`` groups, so the rank must
be a multiple of ``G`` and group ``g`` of B reads the ``r/G`` channels ``g·r/G …`` of A's output.
Forward is ``y = base(x) + s · B(A(dropout(x)))``.

The composite ``B ∘ A`` is an ordinary convolution that links every input channel to every output
channel (:func:`lorakit.functional.lora.grouped_conv_delta`, (C_out, C_in, *kernel)); the grouped
base weight (C_out, C_in/G, *kernel) cannot hold it. So, as in PEFT, the adapter cannot be merged
(``merge`` and ``merge_and_unload`` are refused before any weight changes; ``unload`` works), and
combinations that need ΔW or a plain rank axis (``cat``, the SVD types) are refused. DoRA works, with
PEFT's channel norms (:meth:`GroupedConv.norm_delta`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lorakit.functional import lora as LF
from lorakit.layers.conv import Conv

__all__ = ["GroupedConv", "is_grouped_conv"]


def is_grouped_conv(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups > 1


class GroupedConv(Conv):
    """LoRA around an ``nn.ConvNd`` with ``groups > 1`` (see the module docstring)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.rank_blocks = int(self._conv.groups)

    @classmethod
    def rank_problems(cls, base: nn.Module, r: int) -> list[str]:
        groups = int(base.groups)  # type: ignore[arg-type]
        if r % groups:
            return [
                f"r={r} is not a multiple of the convolution's groups={groups} (LoRA's B is grouped like "
                f"the base); choose r in {[groups * k for k in range(1, 5)]}, ... or do not target it"
            ]
        return []

    def delta_weight(self, name: str) -> torch.Tensor:
        """The composite's ΔW as an ordinary convolution's weight: (C_out, C_in, *kernel), float32.
        It does not have the grouped base weight's shape (hence no merging)."""
        a, b = self.factors(name)
        return LF.grouped_conv_delta(a, b, self.scaling[name], self.rank_blocks)

    def norm_delta(self, name: str) -> torch.Tensor:
        """PEFT's update for DoRA's channel norms, in the base weight's shape
        (:func:`lorakit.functional.lora.conv_delta_flat`)."""
        a, b = self.factors(name)
        return LF.conv_delta_flat(a, b, self.scaling[name], self.dense_weight().shape)

    def merge_problem(self, names: Sequence[str] | None = None) -> str | None:
        pending = self.merge_result_names(names)
        if not pending:
            return None
        return (
            f"adapter(s) {pending} are on a grouped convolution (groups={self.rank_blocks}): their update "
            "connects every input channel to every output channel, which the grouped weight cannot hold. "
            "Use the adapter unmerged, or unload() it"
        )

    def combine_problem(self, combination_type: str) -> str | None:
        if combination_type == "cat" or combination_type.endswith("svd"):
            return (
                f"combination_type={combination_type!r} is not defined on a grouped convolution "
                f"(groups={self.rank_blocks}): its B is grouped; use 'linear', 'ties', 'dare_linear', "
                "'dare_ties' or 'magnitude_prune'"
            )
        return None
