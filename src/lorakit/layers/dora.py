"""DoRA (Liu et al. 2024) as an adapter variant; the math is :mod:`lorakit.functional.dora`.

Forward: ``y = f ⊙ (base(x) − b + s · B A dropout(x)) + b`` with ``f = m / ‖W + ΔW‖_c`` (norm
detached, §4.3), computed from the base output the layer already has. The magnitude ``m`` lives in
PEFT's ``lora_magnitude_vector`` container and is saved under ``<module>.lora_magnitude_vector``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorakit.functional import dora as LD
from lorakit.layers.variant import VariantHost

__all__ = ["DoraMagnitude", "Dora", "DORA"]


class DoraMagnitude(nn.Module):
    """Holds DoRA's magnitude ``m`` as ``.weight`` (PEFT's layout). Shape (C_out,), or
    (1, C_out, 1, …) for a convolution."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.weight.shape)}"

    def __repr__(self) -> str:
        return "lora.dora." + super().__repr__()


class Dora:
    """The DoRA strategy (stateless: one shared instance, :data:`DORA`)."""

    name = "DoRA"
    container = "lora_magnitude_vector"
    combine_problem = "their magnitudes have no defined combination"

    def applies(self, config: Any) -> bool:
        return bool(getattr(config, "use_dora", False))

    def _magnitude(self, layer: VariantHost, adapter: str) -> torch.Tensor:
        return layer.container(self.container)[adapter].weight  # type: ignore[return-value]

    @torch.no_grad()
    def init(self, layer: VariantHost, adapter: str, *, empty: bool = False) -> None:
        if empty:  # low_cpu_mem_usage: the magnitude will be loaded, not computed
            with torch.device("meta"):
                layer.container(self.container)[adapter] = DoraMagnitude(torch.empty(layer.magnitude_shape()))
            return
        weight = layer.original_weight()
        m = LD.magnitude_init(weight, layer.norm_delta(adapter), layer.out_axis)
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        magnitude = m.reshape(layer.magnitude_shape()).to(device=weight.device, dtype=dtype)
        layer.container(self.container)[adapter] = DoraMagnitude(magnitude)

    def tensors(self, layer: VariantHost, adapter: str) -> dict[str, torch.Tensor]:
        # PEFT stores the magnitude without the ``.weight`` of the module that holds it.
        return {self.container: self._magnitude(layer, adapter)}

    def delta(self, layer: VariantHost, adapter: str, weight: torch.Tensor) -> torch.Tensor:
        magnitude = self._magnitude(layer, adapter)
        return LD.dora_delta(weight, layer.delta_weight(adapter), magnitude, layer.out_axis)

    def factor(self, layer: VariantHost, adapter: str) -> torch.Tensor:
        """``f = m / ‖W₀ + ΔW‖_c`` (C_out,), with ``W₀`` the weight before any merge."""
        with torch.no_grad():
            delta = layer.norm_delta(adapter)
        magnitude = self._magnitude(layer, adapter)
        return LD.dora_factor(magnitude, layer.original_weight(), delta, layer.out_axis)

    def _base_no_bias(self, layer: VariantHost, base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if layer.merged_adapters:  # base(x) holds merged adapters: recompute W₀ x
            return layer.base_without_bias(x, layer.original_weight()).to(base.dtype)
        bias = layer.original_bias()
        return base if bias is None else base - layer.channel_view(bias.to(base.dtype), base)

    def add_update(
        self,
        layer: VariantHost,
        result: torch.Tensor,
        base: torch.Tensor,
        x: torch.Tensor,
        adapter: str,
        *,
        consume_base: bool,
    ) -> torch.Tensor:
        """``result`` plus this adapter's change to the output.

        With ``consume_base`` (``result`` is ``base`` and nothing else needs ``base``), the
        low-rank branch is accumulated into ``base − b`` in place (the layer's fused path) and the
        output is ``f ⊙ (…) + b``: one multiply beyond LoRA. Otherwise the change
        ``(f − 1) ⊙ (W x) + f ⊙ s·B A x`` is added to ``result``.
        """
        consume_base = consume_base and not layer.merged_adapters
        f = self.factor(layer, adapter)
        base_nb = self._base_no_bias(layer, base, x)
        if consume_base:
            t = layer.add_branch(base_nb, x, adapter)
            out = t * layer.channel_view(f.to(t.dtype), t)
            bias = layer.original_bias()
            return out if bias is None else out + layer.channel_view(bias.to(out.dtype), out)
        return result + self._change(layer, base_nb, x, adapter, f)

    def _change(
        self, layer: VariantHost, base_nb: torch.Tensor, x: torch.Tensor, adapter: str, f: torch.Tensor
    ) -> torch.Tensor:
        branch = layer.lora_branch(x, adapter)
        fv = layer.channel_view(f.to(branch.dtype), branch)
        return base_nb * (fv - 1) + branch * fv

    def rows_update(
        self, layer: VariantHost, base: torch.Tensor, x: torch.Tensor, adapter: str
    ) -> torch.Tensor:
        """The change for the rows ``x`` of a mixed batch, given their base output ``base``."""
        f = self.factor(layer, adapter)
        return self._change(layer, self._base_no_bias(layer, base, x), x, adapter, f)


DORA = Dora()
