"""The contract of an adapter variant: an adapter that is more than ``s · B A`` (DoRA, say).

A plain LoRA adapter needs no variant. A variant is a strategy object the layer holds per adapter
(``layer.lora_variant[name]``); the layer calls it at five points and nowhere else:

=====================  ==========================================================================
``init``               after A and B exist: create the variant's own tensors on the layer
                       (``empty=True``: on the meta device, uncomputed, for a load to fill)
``delta``              the change the adapter makes to the weight (what merging writes)
``add_update``         the adapter's change to a whole batch's output
``rows_update``        the same for the rows of a mixed batch that use the adapter
``tensors``            the adapter's own tensors under their PEFT file keys (relative to the layer)
=====================  ==========================================================================

plus three facts: ``name``, ``container`` (the attribute of PEFT's layer layout that holds its
tensors) and ``combine_problem`` (why adapter arithmetic cannot combine it, or ``None``).

A variant reads from the layer only what :class:`VariantHost` lists, so a layer kind supports
every variant by providing those methods (see :class:`lorakit.layers.base.LoraLayer`), and a kind
that cannot (an embedding without a per-channel base output, say) refuses it in
``option_problems``. The registry from config to variant is :mod:`lorakit.layers.registry`.

Adding a variant: its math in :mod:`lorakit.functional`, its strategy in ``layers/<name>.py``, one
line in the registry and its switch in :class:`~lorakit.config.LoraConfig`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["VariantHost", "LoraVariant"]


class VariantHost(Protocol):
    """What a variant may use of the LoRA layer that holds it."""

    merged_adapters: list[str]

    @property
    def out_axis(self) -> int: ...

    def container(self, name: str) -> nn.ModuleDict: ...

    def original_weight(self) -> torch.Tensor: ...

    def original_bias(self) -> torch.Tensor | None: ...

    def delta_weight(self, name: str) -> torch.Tensor: ...

    def norm_delta(self, name: str) -> torch.Tensor: ...

    def lora_branch(self, x: torch.Tensor, name: str) -> torch.Tensor: ...

    def add_branch(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor: ...

    def base_without_bias(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor: ...

    def magnitude_shape(self) -> tuple[int, ...]: ...

    def channel_view(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor: ...


class LoraVariant(Protocol):
    """An adapter variant as a strategy (see the module docstring for when each method runs)."""

    @property
    def name(self) -> str: ...

    @property
    def container(self) -> str: ...

    @property
    def combine_problem(self) -> str | None: ...

    def applies(self, config: Any) -> bool:
        """Whether ``config`` (a :class:`~lorakit.config.LoraConfig`) asks for this variant."""
        ...

    def init(self, layer: VariantHost, adapter: str, *, empty: bool = False) -> None: ...

    def delta(self, layer: VariantHost, adapter: str, weight: torch.Tensor) -> torch.Tensor: ...

    def add_update(
        self,
        layer: VariantHost,
        result: torch.Tensor,
        base: torch.Tensor,
        x: torch.Tensor,
        adapter: str,
        *,
        consume_base: bool,
    ) -> torch.Tensor: ...

    def rows_update(
        self, layer: VariantHost, base: torch.Tensor, x: torch.Tensor, adapter: str
    ) -> torch.Tensor: ...

    def tensors(self, layer: VariantHost, adapter: str) -> dict[str, torch.Tensor]: ...
