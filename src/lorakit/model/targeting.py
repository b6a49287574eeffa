"""Which modules a config selects, and why nothing matched. Read-only: nothing here changes a model.

Module names are full dotted paths relative to the model the adapter is applied to, as in PEFT.
Rules (PEFT's, so a config selects the same modules in both libraries):

* a list entry matches a module whose name equals it or ends with ``"." + entry``;
* a string is a regular expression that must match the whole name;
* ``exclude_modules`` uses the same rules and wins over ``target_modules``;
* ``modules_to_save`` modules (and their children) are never LoRA targets;
* a child its parent reads without calling (an ``nn.MultiheadAttention``'s ``out_proj``, see
  ``LoraLayer.bypassed_children``) is not a target of its own: ``"all-linear"`` skips it and naming
  it is refused (:func:`bypassed_modules`);
* ``layers_to_transform`` keeps modules whose first numbered path segment (after
  ``layers_pattern`` when given) is one of the listed layer indices; like PEFT, it does not filter
  a module whose full name is listed.

``target_parameters`` (PEFT's rules too) selects parameters rather than modules: the key
``<module path>.<parameter name>`` of a parameter registered on its module must equal an entry or
end with ``"." + entry``. ``exclude_modules``, ``layers_to_transform`` and ``modules_to_save`` do not
filter parameters (as in PEFT, so that a config selects the same tensors in both libraries). The
parameters of one module are wrapped one inside the other in their registration order, the last
outermost (:class:`ParameterTarget`'s ``path``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

from lorakit.config import ALL_LINEAR, LoraConfig, TaskType
from lorakit.errors import TargetingError
from lorakit.layers import (
    LoraLayer,
    ModulesToSaveWrapper,
    TrainableTokensWrapper,
    lora_layer_for,
    parameter_layer_for,
    supported_kinds,
    wrapper_chain,
)

__all__ = [
    "resolve_config",
    "select_targets",
    "ParameterTarget",
    "select_parameters",
    "targetable_parameters",
    "matches_target",
    "excluded_names",
    "no_match_message",
    "rank_and_alpha",
    "iter_plain_modules",
    "targetable_modules",
    "bypassed_modules",
    "model_type_of",
    "register_default_targets",
    "register_config_rewrite",
    "default_targets_for",
    "suffix_summary",
    "parameter_summary",
]

SEQ_CLS_HEADS = ("classifier", "score")


def model_type_of(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


# Where ``target_modules=None`` finds its names: lookups registered by the integrations that know a
# model family (transformers' model_type table registers itself), asked in order; the first that
# knows the model wins. Kept as a registry so that this layer does not import the integrations.
# A lookup is called as ``lookup(model, peft_only)``: with ``peft_only`` it answers only where PEFT's
# own table has an entry (the rule when ``target_parameters`` is set, see :func:`resolve_config`).
_DEFAULT_TARGET_LOOKUPS: list[Callable[[nn.Module, bool], list[str] | None]] = []


def register_default_targets(lookup: Callable[[nn.Module, bool], list[str] | None]) -> None:
    """Add a source of default ``target_modules``: ``lookup(model, peft_only)`` gives names, or ``None``."""
    if lookup not in _DEFAULT_TARGET_LOOKUPS:
        _DEFAULT_TARGET_LOOKUPS.append(lookup)


# Rewrites of a config for a model before its targets are resolved, registered by the integrations
# (transformers-4 names of experts that transformers 5 fused into parameters); applied in order.
_CONFIG_REWRITES: list[Callable[[nn.Module, LoraConfig], LoraConfig]] = []


def register_config_rewrite(rewrite: Callable[[nn.Module, LoraConfig], LoraConfig]) -> None:
    """Add ``rewrite(model, config) -> config``, run by :func:`resolve_config` before it resolves."""
    if rewrite not in _CONFIG_REWRITES:
        _CONFIG_REWRITES.append(rewrite)


def default_targets_for(model: nn.Module, *, peft_only: bool = False) -> list[str] | None:
    """The default ``target_modules`` for ``model``, or ``None`` when no registered lookup has one
    (with ``peft_only``: when PEFT's table has none)."""
    for lookup in _DEFAULT_TARGET_LOOKUPS:
        names = lookup(model, peft_only)
        if names is not None:
            return names
    return None


def iter_plain_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` (same order, each module once) without the insides of LoRA layers and
    modules-to-save wrappers, which are not descended into."""
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper)):
            continue
        children = [
            (f"{name}.{child_name}" if name else child_name, child)
            for child_name, child in module._modules.items()
            if child is not None
        ]
        stack.extend(reversed(children))


def _is_linear(module: nn.Module) -> bool:
    """A Linear or Conv1D, or a LoRA layer around one (a second adapter may target it too)."""
    if isinstance(module, LoraLayer):
        module = module.base_layer
    kind = lora_layer_for(module)
    return kind is not None and kind.is_linear


def _name_in(name: str, names: list[str]) -> bool:
    return name in names or any(name.endswith("." + n) for n in names)


def _is_module_to_save(name: str, modules_to_save: list[str] | None) -> bool:
    if not modules_to_save:
        return False
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in modules_to_save)


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    return int(match.group("idx")) if match else None


def _in_layers(config: LoraConfig, name: str) -> bool:
    layers = config.layers_to_transform
    if layers is None or layers == []:
        return True
    index = _layer_index(name, config.layers_pattern)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def matches_target(config: LoraConfig, name: str) -> bool:
    """Whether module ``name`` is selected by a config whose targets are already resolved."""
    targets = config.target_modules
    if targets is None or targets == ALL_LINEAR:
        raise TargetingError("matches_target needs a resolved config; call resolve_config first")
    excluded = config.exclude_modules
    if excluded is not None and (
        re.fullmatch(excluded, name) if isinstance(excluded, str) else _name_in(name, excluded)
    ):
        return False
    if _is_module_to_save(name, config.modules_to_save):
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    if name in targets:  # as in PEFT, a full name is taken as given, without layers_to_transform
        return True
    return any(name.endswith("." + t) for t in targets) and _in_layers(config, name)


def excluded_names(config: LoraConfig, model: nn.Module) -> list[str]:
    """The modules ``config.exclude_modules`` matches (whether or not they were targeted)."""
    excluded = config.exclude_modules
    if not excluded:
        return []
    names = [n for n, _ in iter_plain_modules(model) if n]
    if isinstance(excluded, str):
        return [n for n in names if re.fullmatch(excluded, n)]
    return [n for n in names if _name_in(n, list(excluded))]


def no_match_message(config: LoraConfig, model: nn.Module) -> str:
    """PEFT's sentence for a config that targets nothing, by its cases: every module excluded,
    target names found nowhere, or a mix (some excluded or kept for ``modules_to_save``, the rest
    not matched)."""
    names = [n for n, _ in iter_plain_modules(model) if n]
    excluded = set(excluded_names(config, model))
    excluded |= {n for n in names if _is_module_to_save(n, config.modules_to_save)}
    unmatched = [n for n in names if n not in excluded]
    if excluded and not unmatched:
        return (
            "All modules were excluded. This is likely unintended. Check your `target_modules`, "
            "`exclude_modules` and `modules_to_save` configuration."
        )
    if not excluded:
        message = (
            f"Target modules {config.target_modules} not found in the base model. "
            "Please check the target modules and try again."
        )
    else:
        message = (
            "No modules were targeted for adaptation. This might be caused by a combination of mismatched "
            "target modules and excluded modules. Please check your `target_modules` and `exclude_modules` "
            "configuration. You may also have only targeted modules that are marked to be saved "
            "(`modules_to_save`)."
        )
    if config.layers_to_transform is not None:
        message += f" Note: You specified 'layers_to_transform': {config.layers_to_transform}."
    if config.layers_pattern is not None:
        message += f" You also specified 'layers_pattern': {config.layers_pattern}."
    return message


def _output_head_names(model: nn.Module, config: LoraConfig) -> set[str]:
    """The output embedding (``lm_head``) or, for classification, the classifier head."""
    heads: list[nn.Module] = []
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads.append(out)
    elif config.task_type == TaskType.SEQ_CLS:
        heads.extend(m for n in SEQ_CLS_HEADS if isinstance(m := getattr(model, n, None), nn.Module))
    return {name for name, module in model.named_modules() if any(module is h for h in heads)}


def resolve_config(config: LoraConfig, model: nn.Module, *, rewrite: bool = True) -> LoraConfig:
    """The config with concrete targets: ``None`` → the model type's defaults (with
    ``target_parameters``: PEFT's defaults, or none); ``"all-linear"`` → the full names of every
    selected linear layer, as PEFT saves them. With ``rewrite`` the registered config rewrites run
    first (:func:`register_config_rewrite`)."""
    if rewrite:
        for rewriter in _CONFIG_REWRITES:
            config = rewriter(model, config)
    targets = config.target_modules
    if targets is None:
        # With target_parameters PEFT adds its table's modules where it has an entry and otherwise
        # adapts the parameters alone; the same here, so that the config (and its saved file, which
        # keeps target_modules=None) selects the same tensors in both libraries.
        defaults = default_targets_for(model, peft_only=bool(config.target_parameters))
        if defaults is None and config.target_parameters:
            return dataclasses.replace(config, target_modules=[])
        if defaults is None:
            raise TargetingError(
                f"target_modules=None and lorakit has no default for model_type "
                f"{model_type_of(model)!r}; pass target_modules. {suffix_summary(model)}"
            )
        return dataclasses.replace(config, target_modules=defaults)
    if targets == ALL_LINEAR:
        heads = _output_head_names(model, config)
        skip = heads | set(bypassed_modules(model))
        linear = [n for n, m in iter_plain_modules(model) if n and _is_linear(m) and n not in skip]
        # A list of full names (not a regex) so that layers_to_transform stays valid and applies.
        provisional = dataclasses.replace(config, target_modules=linear)
        return dataclasses.replace(
            config,
            target_modules=sorted(
                n for n in linear if matches_target(provisional, n) and _in_layers(config, n)
            ),
        )
    return config


def select_targets(config: LoraConfig, model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs a resolved config adapts; a module already wrapped by a LoRA layer
    is returned as that layer (a second adapter goes into the same wrapper)."""
    return [(n, m) for n, m in iter_plain_modules(model) if n and matches_target(config, n)]


@dataclasses.dataclass(frozen=True)
class ParameterTarget:
    """A parameter ``target_parameters`` selects: ``key`` is what was matched, ``module`` the path of
    the module that holds it (``owner``), ``parameter`` its name there, ``path`` where its LoRA layer
    is once injected (``module`` plus one ``.base_layer`` per parameter of the same module wrapped
    outside it) and ``layer`` that LoRA layer if it exists already (a further adapter joins it)."""

    key: str
    module: str
    owner: nn.Module
    parameter: str
    path: str
    layer: LoraLayer | None


def _parameter_matches(names: list[str], key: str) -> bool:
    return key in names or any(key.endswith("." + n) for n in names)


def select_parameters(config: LoraConfig, model: nn.Module) -> tuple[list[ParameterTarget], list[str]]:
    """The parameters ``config.target_parameters`` selects, each module's in registration order,
    and the problems that stop some from being adapted (a module already adapted otherwise, a
    parameter of the model itself, a new parameter of a module whose others are wrapped already)."""
    names = list(config.target_parameters or [])
    if not names:
        return [], []
    found: list[ParameterTarget] = []
    problems: list[str] = []
    for path, module in iter_plain_modules(model):
        chain, owner = wrapper_chain(module)
        if isinstance(owner, LoraLayer):  # another kind wraps it: the module is a target_modules target
            owner = owner.base_layer
            hit = [p for p in owner._parameters if _parameter_matches(names, f"{path}.{p}")]
            problems.extend(
                f"{path}.{p}: its module is already adapted through target_modules; target it one way only"
                for p in hit
            )
            continue
        matched = [p for p in owner._parameters if _parameter_matches(names, f"{path}.{p}" if path else p)]
        if not matched:
            continue
        if not path:
            problems.extend(
                f"{p}: a parameter of the model itself cannot be wrapped (as in PEFT)" for p in matched
            )
            continue
        wrapped = [w.parameter_name for w in chain]
        if chain and not set(matched) <= set(wrapped):
            new = sorted(set(matched) - set(wrapped))
            problems.append(
                f"{path}: adapters here adapt {sorted(wrapped)}; a further adapter must target the same "
                f"parameters (not also {new}), as in PEFT (the nesting is part of the file keys)"
            )
            continue
        for i, p in enumerate(matched):
            depth = wrapped.index(p) if chain else len(matched) - 1 - i
            layer = chain[depth] if chain else None
            found.append(ParameterTarget(f"{path}.{p}", path, owner, p, path + ".base_layer" * depth, layer))
    return found, problems


def rank_and_alpha(config: LoraConfig, name: str) -> tuple[int, float]:
    """``r`` and ``lora_alpha`` for module ``name``: the first ``rank_pattern`` / ``alpha_pattern``
    key whose regex matches the end of the name (after a dot) wins, else the config's values."""

    def lookup(pattern: dict[str, Any], default: Any) -> Any:
        for key, value in pattern.items():
            if re.match(rf"(.*\.)?({key})$", name):
                return value
        return default

    return lookup(config.rank_pattern, config.r), lookup(config.alpha_pattern, config.lora_alpha)


def bypassed_modules(model: nn.Module) -> dict[str, str]:
    """Modules their parent reads without calling (``LoraLayer.bypassed_children``), which LoRA
    cannot adapt on their own: name → the parent's name (the module to target instead)."""
    found: dict[str, str] = {}
    for name, module in iter_plain_modules(model):
        kind = lora_layer_for(module)
        if kind is not None:
            found.update({(f"{name}.{c}" if name else c): name for c in kind.bypassed_children(module)})
    return found


def targetable_modules(model: nn.Module) -> list[dict[str, Any]]:
    """Every module lorakit can adapt: name, type, weight shape and parameter count."""
    rows = []
    bypassed = bypassed_modules(model)
    for name, module in iter_plain_modules(model):
        base = module.base_layer if isinstance(module, LoraLayer) else module
        kind = lora_layer_for(base)
        if not name or kind is None or name in bypassed:
            continue
        shape, params = kind.base_summary(base)
        rows.append({"name": name, "type": type(base).__name__, "shape": shape, "params": params})
    return rows


def targetable_parameters(model: nn.Module) -> list[dict[str, Any]]:
    """The parameters ``target_parameters`` is for, which ``target_modules`` cannot reach: stacks
    of experts (3-D) and the ``weight`` matrices of modules that are no layer kind (the routers of
    MoE layers): name, owning module's type, shape, parameter count. (Other 2-D parameters can be
    targeted too, and adapt if the module multiplies by them; they are not listed.)"""
    rows = []
    for path, module in iter_plain_modules(model):
        _, owner = wrapper_chain(module)
        if not path or isinstance(owner, LoraLayer) or lora_layer_for(owner) is not None:
            continue
        for pname, param in owner._parameters.items():
            if param is None or not (param.dim() == 3 or pname == "weight"):
                continue
            if parameter_layer_for(owner, pname) is not None:
                rows.append(
                    {
                        "name": f"{path}.{pname}",
                        "type": type(owner).__name__,
                        "shape": tuple(param.shape),
                        "params": param.numel(),
                    }
                )
    return rows


def suffix_summary(model: nn.Module, limit: int = 40) -> str:
    """'Modules that could be targeted: q_proj, k_proj, ...' (deduplicated last name parts)."""
    suffixes = list(dict.fromkeys(row["name"].rsplit(".", 1)[-1] for row in targetable_modules(model)))
    if not suffixes:
        return f"The model has no module lorakit can adapt ({', '.join(supported_kinds())})."
    shown = ", ".join(suffixes[:limit]) + (", ..." if len(suffixes) > limit else "")
    return f"Modules that could be targeted: {shown}"


def parameter_summary(model: nn.Module, limit: int = 40) -> str:
    """'Parameters that could be targeted: experts.gate_up_proj, ...' (the last two name parts)."""
    keys = list(dict.fromkeys(".".join(r["name"].rsplit(".", 2)[-2:]) for r in targetable_parameters(model)))
    if not keys:
        return "The model has no parameter for target_parameters (2-D or 3-D, outside linear layers)."
    shown = ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "")
    return f"Parameters that could be targeted: {shown}"
