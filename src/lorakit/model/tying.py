"""Tied embeddings, and the two features that depend on them. Read-only: this module plans, and
:mod:`lorakit.model.injection` carries the plan out.

**Which modules are tied.** A module is tied to the input embedding when its ``weight`` *is* the
embedding's weight (the same tensor: what transformers does for ``tie_word_embeddings=True``), unless
the model's config says ``tie_word_embeddings=False``.

**Trainable tokens** (``trainable_token_indices``): which modules get trainable rows, with which
indices, and which of them share the rows of another (PEFT's rules, :func:`token_targets`).

**``ensure_weight_tying``** (:func:`tie_adapters`): when the adapter adapts the input embedding or a
module tied to it (in ``target_modules`` or ``modules_to_save``), the adapter of the embedding is
shared with every tied module, so that they stay tied: the config then names the embedding and no
longer the tied modules, and :class:`Ties` lists the modules that take their adapter from it.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError, TargetingError
from lorakit.layers import LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper, token_layer_problem
from lorakit.model.targeting import iter_plain_modules

__all__ = [
    "EMBEDDING_NAMES",
    "input_embedding_name",
    "tied_names",
    "TokenTarget",
    "token_targets",
    "Ties",
    "tie_adapters",
]

# PEFT's names for the layers weight tying concerns (``EMBEDDING_LAYER_NAMES``).
EMBEDDING_NAMES = ("embed_tokens", "lm_head")


def _weight(module: nn.Module) -> torch.Tensor | None:
    """The module's own weight (behind any wrapper lorakit put there)."""
    if isinstance(module, ModulesToSaveWrapper):
        module = module.original_module
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def input_embedding_name(model: nn.Module) -> str | None:
    """The path of ``model.get_input_embeddings()`` (``None`` for a model without one)."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if callable(get) else None
    except NotImplementedError:  # transformers' default for models without embeddings
        return None
    if not isinstance(embedding, nn.Module):
        return None
    return next((n for n, m in iter_plain_modules(model) if m is embedding), None)


def tied_names(model: nn.Module) -> list[str]:
    """The modules whose weight is the input embedding's weight, the embedding excluded."""
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", None) is False:
        return []
    name = input_embedding_name(model)
    if name is None:
        return []
    modules = dict(iter_plain_modules(model))
    weight = _weight(modules[name])
    if weight is None:
        return []
    return [n for n, m in modules.items() if n and n != name and _weight(m) is weight]


def _matching(model: nn.Module, key: str) -> list[str]:
    return [n for n, _ in iter_plain_modules(model) if n and (n == key or n.endswith("." + key))]


# -- trainable tokens -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TokenTarget:
    """One module that gets trainable rows: its path, the module (or its existing wrapper), the row
    indices, and the target whose rows it shares (``None``: its own)."""

    name: str
    module: nn.Module
    indices: list[int]
    tied_to: str | None = None


def token_targets(config: LoraConfig, model: nn.Module, lora_targets: list[str]) -> list[TokenTarget]:
    """The modules ``config.trainable_token_indices`` selects, in PEFT's way:

    * a list trains those rows of the input embedding (``get_input_embeddings()``, else a module
      named ``embed_tokens``); a dict maps module names (same matching as ``target_modules``) to
      their rows;
    * if the input embedding gets rows and the model ties other modules to it, those modules share
      its rows (unless the dict gives a tied module other rows: then each keeps its own, and with
      ``ensure_weight_tying=True`` that is an error).

    Every problem is collected and raised once; nothing is changed.
    """
    spec = config.trainable_token_indices
    if spec is None:
        return []
    embedding = input_embedding_name(model)
    problems: list[str] = []
    wanted: dict[str, list[int]] = {}
    if isinstance(spec, dict):
        for key, indices in spec.items():
            found = _matching(model, key)
            if not found:
                problems.append(f"trainable_token_indices names {key!r}, which matches no module")
            wanted.update(dict.fromkeys(found, list(indices)))
    else:
        names = [embedding] if embedding is not None else _matching(model, "embed_tokens")
        if not names:
            problems.append(
                "trainable_token_indices is a list, which selects the input embedding, but the model has "
                "no get_input_embeddings() and no module named 'embed_tokens'; give a dict "
                "{module name: indices}"
            )
        wanted.update(dict.fromkeys(names, list(spec)))

    tied = tied_names(model)
    group = [n for n in wanted if n == embedding or n in tied]
    mismatch = len(group) > 1 and any(wanted[n] != wanted[group[0]] for n in group)
    if mismatch and config.ensure_weight_tying:
        shown = ", ".join(f"{n}: {wanted[n]}" for n in group)
        problems.append(
            f"ensure_weight_tying=True, but the tied modules get different token indices ({shown}); give "
            "them the same indices or set ensure_weight_tying=False"
        )
    if config.ensure_weight_tying and not tied:
        warnings.warn(
            "ensure_weight_tying=True but the model has no module tied to its input embedding; the "
            "trainable tokens are not tied",
            stacklevel=5,
        )
    share = embedding in wanted and not mismatch and bool(tied)
    modules = dict(iter_plain_modules(model))
    targets = [TokenTarget(n, modules[n], i) for n, i in wanted.items() if not (share and n in tied)]
    if share:
        assert embedding is not None  # share implies it
        targets += [TokenTarget(n, modules[n], wanted[embedding], embedding) for n in tied]
    problems += [p for t in targets if (p := _token_target_problem(t, config, lora_targets))]
    if problems:
        raise TargetingError("cannot add trainable tokens:\n  - " + "\n  - ".join(problems))
    return targets


def _token_target_problem(target: TokenTarget, config: LoraConfig, lora_targets: list[str]) -> str | None:
    name, module = target.name, target.module
    saved = config.modules_to_save or []
    if isinstance(module, ModulesToSaveWrapper) or any(name == m or name.endswith("." + m) for m in saved):
        return (
            f"{name} is also in modules_to_save (trained in full); train either the whole module "
            "(modules_to_save) or some of its rows (trainable_token_indices), not both"
        )
    if isinstance(module, LoraLayer) or name in lora_targets:
        return (
            f"{name} is also a LoRA target; trainable tokens replace rows of the plain embedding, "
            "so they cannot go on a LoRA layer (as in PEFT): remove it from target_modules"
        )
    if isinstance(module, TrainableTokensWrapper):
        if module.tied != (target.tied_to is not None):
            now = "shares the rows of the embedding it is tied to" if module.tied else "has rows of its own"
            return f"{name} {now} for another adapter; this adapter would change that"
        module = module.base_layer
    problem = token_layer_problem(module)
    if problem:
        return f"{name}: {problem}"
    weight = _weight(module)
    rows = 0 if weight is None else int(weight.shape[0])
    bad = [i for i in target.indices if not 0 <= i < rows]
    if bad:
        return f"{name}: token indices {bad} are out of range (the weight has {rows} rows)"
    return None


# -- ensure_weight_tying --------------------------------------------------------------------------
@dataclasses.dataclass
class Ties:
    """Modules that take their adapter from the input embedding's (``ensure_weight_tying``):
    ``targets`` get LoRA factors shared with the embedding's, ``saves`` a modules-to-save copy
    sharing the embedding copy's weight. ``embedding``: the embedding's path."""

    embedding: str | None = None
    targets: list[tuple[str, nn.Module]] = dataclasses.field(default_factory=list)
    saves: list[tuple[str, nn.Module]] = dataclasses.field(default_factory=list)

    def __iter__(self) -> Iterator[tuple[str, nn.Module]]:
        yield from self.targets
        yield from self.saves


def _names_an_embedding(names: list[str] | str | None) -> bool:
    """Whether a name list has an entry ending in ``embed_tokens`` / ``lm_head``, or a regex matches
    one of those bare names (PEFT's test, so both libraries tie the same modules)."""
    if isinstance(names, str):
        return any(re.fullmatch(names, n) for n in EMBEDDING_NAMES)
    return any(n.rsplit(".", 1)[-1] in EMBEDDING_NAMES for n in names or [])


def _without(names: list[str], tied: list[str]) -> list[str]:
    """``names`` without the first entry that selects each tied module (PEFT's rule)."""
    kept = list(names)
    for module in tied:
        for entry in kept:
            if re.match(rf"(^|.*\.){re.escape(entry)}($|\..*)", module):
                kept.remove(entry)
                break
    return kept


def tie_adapters(config: LoraConfig, model: nn.Module) -> tuple[LoraConfig, Ties]:
    """The config that ``ensure_weight_tying`` makes of ``config`` for ``model``, and the modules
    that share the embedding's adapter. Without the flag the config is returned as it is; PEFT's
    warnings are given where it gives them (a tied module adapted on its own is no longer tied)."""
    in_saves = _names_an_embedding(config.modules_to_save)
    in_targets = _names_an_embedding(config.target_modules)
    tied = tied_names(model)
    if not config.ensure_weight_tying:
        if (in_saves or in_targets) and tied:
            warnings.warn(
                "Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but "
                "`ensure_weight_tying` is not set to True: the model ties its input embedding to "
                f"{', '.join(tied)} and the adapter adapts one of them on its own, so they are no longer "
                "tied; set ensure_weight_tying=True to share the adapter between them",
                stacklevel=5,
            )
        return config, Ties()
    if not tied:
        warnings.warn(
            "ensure_weight_tying=True but no tied modules were found in the model; nothing is tied",
            stacklevel=5,
        )
        return config, Ties()
    embedding = input_embedding_name(model)
    assert embedding is not None  # tied modules imply an input embedding
    modules = dict(iter_plain_modules(model))
    if in_saves:
        saves = [*(config.modules_to_save or []), embedding]
        saves = list(dict.fromkeys(_without(saves, tied)))
        config = dataclasses.replace(config, modules_to_save=saves)
        return config, Ties(embedding, saves=[(n, modules[n]) for n in tied])
    if in_targets:
        targets = config.target_modules
        if isinstance(targets, str):
            new_targets: list[str] | str = rf"(?:{targets}|^{re.escape(embedding)}$)"
            tied_here = tied
        else:
            new_targets = sorted(set(_without([*(targets or []), embedding], tied)))
            tied_here = tied
        config = dataclasses.replace(config, target_modules=new_targets)
        return config, Ties(embedding, targets=[(n, modules[n]) for n in tied_here])
    warnings.warn(
        "ensure_weight_tying=True but neither target_modules nor modules_to_save adapts the input "
        "embedding or a module tied to it; no tied modules are added",
        stacklevel=5,
    )
    return config, Ties()


def check_ties(ties: Ties, config: LoraConfig, lora_targets: list[str]) -> None:
    """Problems with the modules ``ensure_weight_tying`` ties, raised together."""
    problems = []
    if ties.targets and ties.embedding not in lora_targets:
        problems.append(
            f"the input embedding {ties.embedding} is not a LoRA target (exclude_modules or "
            "layers_to_transform leave it out), so there is no adapter to share"
        )
    if ties.targets and config.use_dora:
        problems.append("DoRA magnitudes of an embedding and an output head cannot be shared")
    for name, module in ties.targets:
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if not isinstance(base, nn.Linear):
            problems.append(f"{name} ({type(base).__name__}) cannot share the LoRA factors of the embedding")
    for name, module in ties.saves:
        base = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        if not isinstance(base, (nn.Linear, nn.Embedding)):
            problems.append(f"{name} ({type(base).__name__}) cannot share the embedding's saved copy")
    if problems:
        raise ConfigError("ensure_weight_tying=True:\n  - " + "\n  - ".join(problems))
