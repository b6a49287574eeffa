"""Every experts module transformers ships with 3-D expert parameters (``zoo.experts.EXPERTS``, found
by reading transformers' code): LoRA on all its stacked parameters gives PEFT's outputs and PEFT's
gradients (of the factors and of the input), with the module's own forward ("eager") and, once per
distinct layout (the ``use_experts_implementation`` flags: transposed, biases, gate), with
transformers' shared "grouped_mm" and "batched_mm" implementations, whose code is common to all.

PEFT adds ``ΔW_e`` to the weight (a parametrization) and runs the module; lorakit never forms ΔW and
adds ``s · B_e A_e x`` inside each product. Both are float32 and compute the same sums in another
association: per product of reduction length k, each result differs by at most ~(k + r)·u·Σ|terms|
(u = 2⁻²⁴, Higham §3.1). An experts forward chains two products (up, down) plus the activation, so
the difference is bounded by ``TOL = 2 · (k_max + r) · u`` relative to the output's scale.
"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn
from zoo.experts import EXPERTS, experts_inputs, experts_module, stacked_parameters

import lorakit
from lorakit.layers.parameter import EXPERTS_IMPLEMENTATIONS

pytestmark = [pytest.mark.parity]

R = 2
U = torch.finfo(torch.float32).eps / 2
TOL = 2 * (16 + R) * U * 8  # k_max = hidden size 16; 8: headroom for the activation's own rounding


class Holder(nn.Module):
    """A parent for the experts module, as an MoE block is (targets are found by path)."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.experts(*args)


def _layout(module: nn.Module) -> tuple:
    flags = ("is_transposed", "has_bias", "has_gate", "is_concatenated", "has_post_expert_norm")
    return (*(getattr(module, f, None) for f in flags), type(module)._apply_gate.__qualname__)


_SHARED_RUN: dict[tuple, str] = {}  # layout → the experts class that runs the shared implementations


def _implementations(name: str, module: nn.Module) -> tuple[str | None, ...]:
    if not hasattr(module, "has_gate"):  # not transformers' experts interface: its own forward only
        return (None,)
    if _SHARED_RUN.setdefault(_layout(module), name) == name:
        return EXPERTS_IMPLEMENTATIONS
    return ("eager",)


def _scaled_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if a.numel() else 0.0


@pytest.mark.parametrize("name", EXPERTS)
def test_lora_on_experts_equals_peft(name):
    module = experts_module(name)
    params = stacked_parameters(module)
    kwargs = dict(
        target_modules=[],
        target_parameters=[f"experts.{p}" for p in params],
        r=R,
        lora_alpha=4,
        init_lora_weights=False,
    )
    ours = lorakit.inject_adapter_in_model(lorakit.LoraConfig(**kwargs), Holder(copy.deepcopy(module)))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for pname, p in ours.named_parameters():
            if "lora_" in pname:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    theirs = peft.inject_adapter_in_model(peft.LoraConfig(**kwargs), Holder(copy.deepcopy(module)))
    peft.set_peft_model_state_dict(theirs, lorakit.get_peft_model_state_dict(ours))
    for implementation in _implementations(name, module):
        if implementation is not None:
            module.config._experts_implementation = implementation  # the copies share the config
        args = experts_inputs(module)
        x_ours = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
        x_theirs = [a.clone().requires_grad_(a.is_floating_point()) for a in args]
        out, ref = ours(*x_ours), theirs(*x_theirs)
        out_, ref_ = out.detach(), ref.detach()
        assert _scaled_diff(out_, ref_) <= TOL, implementation
        with torch.no_grad():
            assert _scaled_diff(ref_, Holder(module)(*args)) > 1e-3  # the adapter changes the output
        ours.zero_grad()
        theirs.zero_grad()
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        (ref * torch.linspace(-1, 1, ref.numel()).view_as(ref)).sum().backward()
        grads = {n.replace(".default", ""): p.grad for n, p in ours.named_parameters() if p.grad is not None}
        ref_grads = {
            n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.grad is not None
        }
        assert grads.keys() == ref_grads.keys() and grads
        for key, grad in grads.items():
            assert _scaled_diff(grad, ref_grads[key]) <= 2 * TOL, (implementation, key)
        assert _scaled_diff(x_ours[0].grad, x_theirs[0].grad) <= 2 * TOL, implementation
