"""The LoRA factors of each module in a PEFT-format adapter state dict (keys without adapter name,
with or without the ``base_model.model.`` file prefix).

Linear / Conv1D / conv: ``<m>.lora_A.weight`` (r, k[, kh, kw]) and ``<m>.lora_B.weight``
(d, r[, 1, 1]), optional ``<m>.lora_B.bias``; a grouped convolution's B is (d, r/G, 1, …) with G
groups; embedding: ``<m>.lora_embedding_A`` (r, V) and ``<m>.lora_embedding_B`` (D, r); DoRA adds
``<m>.lora_magnitude_vector``. A LoRA layer nested in a target's base layer (an attention's
out_proj, ``<m>.base_layer.out_proj.lora_A.weight``) takes its rank and alpha from the target
``<m>``. Everything else (modules to save, biases) passes through untouched.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch

from lorakit.config import LoraConfig
from lorakit.errors import AdapterError
from lorakit.functional import lora as LF
from lorakit.model.targeting import rank_and_alpha
from lorakit.persistence.keys import FILE_PREFIX, PAIRED_B, parse_key

__all__ = ["ModuleFactors", "split_factors", "module_name", "target_name", "layer_and_kind"]


@dataclasses.dataclass
class ModuleFactors:
    """One adapted module: its key prefix, factors, scaling, and the keys they came from."""

    prefix: str
    a_key: str
    b_key: str
    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def groups(self) -> int:
        """G of a grouped convolution's B (d, r/G, 1, …); 1 otherwise."""
        return self.rank // int(self.b.shape[1]) if self.b.dim() > 2 else 1

    def dense_b(self) -> torch.Tensor:
        """B as the (d, r) matrix with ``ΔW = s · B A``: a grouped B (d, r/G) spread block-diagonally
        (output channel o of group g reads A's rows g·r/G …), any other B flattened."""
        b = self.b.flatten(1)  # (d, r/G)
        if self.groups == 1:
            return b
        d, per = b.shape
        dense = b.new_zeros(d, self.rank)
        for g in range(self.groups):
            rows = slice(g * d // self.groups, (g + 1) * d // self.groups)
            dense[rows, g * per : (g + 1) * per] = b[rows]
        return dense


def module_name(prefix: str) -> str:
    """The module path relative to the model (what target_modules and rank_pattern match)."""
    return prefix[len(FILE_PREFIX) :] if prefix.startswith(FILE_PREFIX) else prefix


def target_name(prefix: str) -> str:
    """The module the config targeted: a LoRA layer nested in a target's base layer (an attention's
    out_proj) belongs to that target, whose rank and alpha it shares."""
    return module_name(prefix).split(".base_layer.", 1)[0]


def split_factors(
    config: LoraConfig, state_dict: Mapping[str, torch.Tensor]
) -> tuple[list[ModuleFactors], dict[str, torch.Tensor]]:
    """(the factors of every adapted module, every other tensor)."""
    modules, used = [], set()
    for key in sorted(state_dict):
        parsed = parse_key(key)
        if parsed.rank_axis != 0:  # each module is found through its A
            continue
        prefix = key[: -len(".".join(p for p in (parsed.part, parsed.tensor) if p)) - 1]
        b_key = f"{prefix}.{PAIRED_B[parsed.part]}" + (f".{parsed.tensor}" if parsed.tensor else "")
        if b_key not in state_dict:
            raise AdapterError(f"{key} has no matching {b_key} in the adapter")
        r, alpha = rank_and_alpha(config, target_name(prefix))
        rank = int(state_dict[key].shape[0])
        s = LF.scaling(alpha, rank, config.use_rslora)
        if rank != r:
            raise AdapterError(
                f"{key} has rank {rank} but the config gives this module r={r}; "
                "the adapter's config does not describe its weights"
            )
        modules.append(ModuleFactors(prefix, key, b_key, state_dict[key], state_dict[b_key], s))
        used.update({key, b_key})
    rest = {k: v for k, v in state_dict.items() if k not in used}
    return modules, rest


def pattern_key(name: str) -> str:
    """A rank_pattern / alpha_pattern key that matches exactly the module ``name``."""
    return re.escape(name)


def layer_and_kind(name: str) -> tuple[int | None, str]:
    """(first numbered path segment, last name part): ``model.layers.3.self_attn.q_proj`` → (3, q_proj)."""
    match = re.search(r"\.(\d+)\.", f".{name}.")
    return (int(match.group(1)) if match else None), name.rsplit(".", 1)[-1]
