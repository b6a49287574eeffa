"""Every experts module of transformers that holds its experts as 3-D parameters, built small.

``EXPERTS`` is found by reading transformers' modeling files (a class named ``*Experts`` that makes
an ``nn.Parameter``; reading, not importing, keeps test collection fast), so a family added by a
later transformers release joins the tests on its own, and fails them until it builds small here.
``experts_module(name)`` builds one from its family's config class with small sizes (4 experts,
hidden size 16, width 4: no expert matrix is square) and seeded weights; ``experts_inputs(module)``
gives the arguments of its forward.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

_MODELS = Path(transformers.__file__).parent / "models"
_CLASS = re.compile(r"^class (\w*Experts)\(nn\.Module\):\n(?:(?!^class ).*\n)*?.*nn\.Parameter\(", re.M)

# config fields the experts classes read, set small (a field a config lacks is simply added)
_SIZES: dict[str, Any] = {
    "hidden_size": 16,
    "intermediate_size": 4,
    "moe_intermediate_size": 4,
    "expert_ffn_hidden_size": 4,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "moe_num_experts": 4,
    "moe_hidden_size": 16,
    "n_shared_experts": 2,
    "num_experts_per_tok": 2,
    "zero_expert_num": 0,
    "hidden_act": "silu",
}
TOKENS, TOP_K = 6, 2


def _discover() -> dict[str, tuple[str, str]]:
    """class name → (model family, modeling module) for every class with 3-D parameters."""
    found = {}
    for path in sorted(_MODELS.glob("*/modeling_*.py")):
        text = path.read_text(encoding="utf-8")
        for match in _CLASS.finditer(text):
            found[match.group(1)] = (path.parent.name, path.stem)
    return found


_FOUND = _discover()


def _small_module(family: str, module: str, name: str) -> nn.Module | None:
    cls = getattr(importlib.import_module(f"transformers.models.{family}.{module}"), name)
    configs = importlib.import_module(f"transformers.models.{family}.configuration_{family}")
    for _, config_cls in inspect.getmembers(configs, inspect.isclass):
        if (
            not issubclass(config_cls, transformers.PretrainedConfig)
            or config_cls.__module__ != configs.__name__
        ):
            continue
        try:
            config = config_cls()
            for key, value in _SIZES.items():
                setattr(config, key, value)
            built = cls(config)
        except Exception:  # noqa: BLE001 (a config class this experts module does not take)
            continue
        stacks = [p for p in built.parameters(recurse=False) if p.dim() == 3]
        if stacks and all(p.numel() <= 8 * 16 * 16 for p in stacks):
            return built
    return None


def experts_module(name: str, seed: int = 0) -> nn.Module:
    """Experts class ``name`` (a key of ``EXPERTS``) built small, weights ~ N(0, 0.3²)."""
    family, module = _FOUND[name]
    built = _small_module(family, module, name)
    if built is None:
        raise KeyError(f"{name}: no config of {family} builds it small")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in built.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return built.eval()


def stacked_parameters(module: nn.Module) -> list[str]:
    """The names of ``module``'s 3-D parameters (its experts), in registration order."""
    return [n for n, p in module.named_parameters(recurse=False) if p.dim() == 3]


def experts_inputs(module: nn.Module, seed: int = 1) -> tuple[torch.Tensor, ...]:
    """Arguments of ``module.forward``: (hidden (T, H), top_k_index (T, k), top_k_weights (T, k))
    for transformers' experts interface; Llama4's rows grouped by expert (E·T, H); a shared-experts
    module's (hidden (T, H), gammas (T, E))."""
    first = getattr(module, stacked_parameters(module)[0])
    experts = first.shape[0]
    hidden = first.shape[1] if getattr(module, "is_transposed", False) else first.shape[2]
    gen = torch.Generator().manual_seed(seed)
    params = list(inspect.signature(module.forward).parameters)
    if len(params) >= 3:
        index = torch.stack([torch.randperm(experts, generator=gen)[:TOP_K] for _ in range(TOKENS)])
        return torch.randn(TOKENS, hidden, generator=gen), index, torch.rand(TOKENS, TOP_K, generator=gen)
    if len(params) == 1:
        return (torch.randn(experts * TOKENS, hidden, generator=gen),)
    return torch.randn(TOKENS, hidden, generator=gen), torch.rand(TOKENS, experts, generator=gen)


# Experts classes whose constructor takes more than a config (tested on their own).
BUILT_ELSEWHERE = {
    "JetMoeParallelExperts": "(num_experts, input_size, output_size): tests/layers/test_parameter.py",
}
EXPERTS: list[str] = sorted(set(_FOUND) - set(BUILT_ELSEWHERE))
