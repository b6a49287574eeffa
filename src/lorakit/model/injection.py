"""The only code that changes a model's structure: wrapping targets in LoRA layers, and unwrapping.

``inject`` first plans everything (targets, layer kinds, ranks, modules to save) and raises one
error listing every problem; only a complete plan mutates the model, so a failed call leaves the
model exactly as it was.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import copy
import dataclasses
import re
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from lorakit.config import LOAD_ONLY_INITS, LoraConfig, LoraGAConfig, load_only, loftq_init_token, parse_init
from lorakit.errors import (
    AdapterError,
    ConfigError,
    NoMatchingPeftModuleError,
    PeftWarning,
    TargetingError,
    TargetingTypeError,
)
from lorakit.layers import (
    BASE_ROWS,
    LoraLayer,
    ModulesToSaveWrapper,
    RequantizeReport,
    TrainableTokensWrapper,
    lora_layer_for,
    parameter_layer_for,
    prepare_model,
    supported_kinds,
    supported_parameter_kinds,
    variant_for,
)
from lorakit.layers.variant import LoraVariant
from lorakit.model import engines, lora_ga, tying
from lorakit.model.targeting import (
    ParameterTarget,
    bypassed_modules,
    excluded_names,
    iter_plain_modules,
    no_match_message,
    parameter_summary,
    rank_and_alpha,
    resolve_config,
    select_parameters,
    select_targets,
    suffix_summary,
)

__all__ = [
    "inject",
    "uninject",
    "remove_at",
    "unload",
    "unload_requantized",
    "lora_modules",
    "has_lora_layers",
    "check_adapter_name",
    "Plan",
    "plan",
    "model_dtype",
    "filling_from_file",
    "share_factors",
    "rerecord",
]

# Set while a loader injects adapters whose tensors it then copies from a file (see filling_from_file).
_FILLING = contextvars.ContextVar("lorakit_filling_from_file", default=False)


@contextlib.contextmanager
def filling_from_file() -> Iterator[None]:
    """Within the block, injected adapters are about to be filled from an adapter file, so an init
    that lorakit does not compute but that leaves the base weights as they are (EVA, MiCA:
    :data:`~lorakit.config.LOAD_ONLY_INITS`) is accepted; its factors are created plainly and
    overwritten. Outside it, such an init is refused."""
    token = _FILLING.set(True)
    try:
        yield
    finally:
        _FILLING.reset(token)


def _creation_problem(config: LoraConfig) -> None:
    init = config.init_lora_weights
    if load_only(init) and not _FILLING.get():
        kind = (parse_init(init) or ("", None))[0]
        raise ConfigError(
            f"init_lora_weights={init!r}: {LOAD_ONLY_INITS[kind]}. lorakit loads adapters trained with it "
            "(PeftModel.from_pretrained, load_adapter) but cannot create a new one; create it with PEFT, "
            "or use another init (True, 'gaussian', 'pissa', 'olora', 'orthogonal', 'eva', 'lora_ga', "
            "'loftq')"
        )


@dataclasses.dataclass
class Plan:
    """What :func:`inject` will do: the resolved config, the LoRA targets (modules, and parameters
    from ``target_parameters``), the modules to save, the modules with trainable token rows, and the
    modules tied to the input embedding that share its adapter (``ensure_weight_tying``)."""

    config: LoraConfig
    targets: list[tuple[str, nn.Module]]
    to_save: list[tuple[str, nn.Module]]
    tokens: list[tying.TokenTarget] = dataclasses.field(default_factory=list)
    ties: tying.Ties = dataclasses.field(default_factory=tying.Ties)
    parameters: list[ParameterTarget] = dataclasses.field(default_factory=list)

    def parameter_weights(self) -> list[tuple[str, torch.Tensor]]:
        """(path of its LoRA layer once injected, the unmerged weight) of each targeted parameter."""
        out = []
        for t in self.parameters:
            weight = t.layer.original_weight() if t.layer is not None else t.owner._parameters[t.parameter]
            if weight is not None:
                out.append((t.path, weight))
        return out


AdapterModule = LoraLayer | ModulesToSaveWrapper | TrainableTokensWrapper


def lora_modules(model: nn.Module) -> Iterator[tuple[str, AdapterModule]]:
    """Every LoRA layer, modules-to-save wrapper and trainable-tokens wrapper in ``model``, with its
    name."""
    for name, module in model.named_modules():
        if isinstance(module, (LoraLayer, ModulesToSaveWrapper, TrainableTokensWrapper)):
            yield name, module


def has_lora_layers(model: nn.Module) -> bool:
    """Whether ``model`` already holds a LoRA layer (of any adapter)."""
    return any(isinstance(m, LoraLayer) for m in model.modules())


def check_adapter_name(model: nn.Module, name: str, *, must_be_new: bool) -> None:
    if not isinstance(name, str) or not name or "." in name or name == BASE_ROWS:
        raise AdapterError(
            f"adapter name {name!r} is not usable: it must be a non-empty string without '.' "
            f"and not {BASE_ROWS!r}"
        )
    existing = sorted({a for _, m in lora_modules(model) for a in m.adapter_names})
    if must_be_new and name in existing:
        raise AdapterError(f"an adapter named {name!r} already exists; existing adapters: {existing}")


def _init_kind(config: LoraConfig) -> str:
    return (parse_init(config.init_lora_weights) or ("",))[0]


def _fan_in_fan_out(config: LoraConfig, targets: list[tuple[str, nn.Module]]) -> LoraConfig:
    """Some kinds store weights input-first (transformers' Conv1D); the flag follows the layers,
    with a warning if the user's value disagreed (PEFT warns likewise)."""
    flags = []
    for _, module in targets:
        base = module.base_layer if isinstance(module, LoraLayer) else module
        kind = lora_layer_for(base)
        flag = None if kind is None else kind.stores_input_first(base)
        if flag is not None:
            flags.append(flag)
    if not flags:
        return config
    wanted = all(flags)
    if config.fan_in_fan_out != wanted:
        warnings.warn(
            f"fan_in_fan_out={config.fan_in_fan_out} does not fit the targeted layers "
            f"({'transformers Conv1D' if wanted else 'nn.Linear'}); using fan_in_fan_out={wanted}",
            stacklevel=3,
        )
        return dataclasses.replace(config, fan_in_fan_out=wanted)
    return config


def layer_init(config: LoraConfig) -> bool | str:
    """What each LoRA layer receives as its init: ``init_lora_weights``, with LoftQ's settings
    folded in (``"loftq_4bit_1iter"``), since layers see nothing else of the config."""
    if config.init_lora_weights == "loftq":
        settings = config.loftq_config or {}
        return loftq_init_token(int(settings["loftq_bits"]), int(settings["loftq_iter"]))
    return config.init_lora_weights


# Containers a modules-to-save copy cannot stand in for: they have no forward of their own, so
# the wrapper (which selects a copy by calling it) would break the model at its first forward.
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


def _modules_to_save(config: LoraConfig, model: nn.Module) -> list[tuple[str, nn.Module]]:
    names = config.modules_to_save or []
    found: list[tuple[str, nn.Module]] = []
    for name, module in iter_plain_modules(model):
        if name and any(name == n or name.endswith("." + n) for n in names):
            if any(name.startswith(prev + ".") for prev, _ in found):
                continue
            if isinstance(module, TrainableTokensWrapper):
                raise TargetingError(
                    f"modules_to_save selects {name}, which has trainable token rows for another adapter; "
                    "a module is trained either in full or by rows, not both"
                )
            found.append((name, module))
    if names and not found:
        raise TargetingError(
            f"modules_to_save={names} matches no module of the model. "
            f"Top-level modules: {', '.join(n for n, _ in model.named_children())}"
        )
    containers = [f"{n} ({type(m).__name__})" for n, m in found if isinstance(m, _CONTAINERS)]
    if containers:
        raise TargetingTypeError(
            "modules_to_save cannot be applied to modules of type "
            f"{', '.join(c.__name__ for c in _CONTAINERS)}: modules_to_save={names} names "
            f"{', '.join(containers)}, a container without a forward of its own; name the modules inside it"
        )
    lora = [n for n, m in found if isinstance(m, LoraLayer)]
    if lora:
        raise TargetingError(
            f"modules_to_save={names} names {', '.join(lora)}, already targeted by a LoRA adapter "
            "(modules_to_save cannot be applied to modules that are targeted by PEFT)"
        )
    return found


# PEFT's sentence when neither target list selects anything, first, so code matching it keeps working
_NO_TARGETS = (
    "No `target_modules` passed but also no `target_parameters` found. Please check the values for "
    "these arguments."
)


def plan(model: nn.Module, config: LoraConfig, adapter_name: str, *, replacing: bool = False) -> Plan:
    """Validate ``config`` against ``model`` and say what injecting it would change (read-only).
    ``replacing``: an adapter named ``adapter_name`` may exist (it is about to be deleted)."""
    _refuse_wrapped(model)
    _creation_problem(config)
    check_adapter_name(model, adapter_name, must_be_new=not replacing)
    resolved, ties = tying.tie_adapters(resolve_config(config, model), model)
    tied = {n for n, _ in ties}
    targets = [(n, m) for n, m in select_targets(resolved, model) if n not in tied]
    parameters, problems = select_parameters(resolved, model)
    if not targets and resolved.target_modules != []:
        filtered = (
            " (after exclude_modules / layers_to_transform)"
            if config.exclude_modules or config.layers_to_transform is not None
            else ""
        )
        raise NoMatchingPeftModuleError(
            f"{no_match_message(resolved, model)} (lorakit: target_modules={resolved.target_modules!r} "
            f"matches no module of the model{filtered}.) "
            f"{suffix_summary(model)}"
        )
    if resolved.target_parameters and not parameters and not problems:
        raise NoMatchingPeftModuleError(
            f"{_NO_TARGETS} (lorakit: target_parameters={resolved.target_parameters!r} matches no "
            "parameter of the model.) "
            f"{parameter_summary(model)}"
        )
    if not targets and not parameters and not problems:
        raise NoMatchingPeftModuleError(
            f"{_NO_TARGETS} (lorakit: target_modules=[] and no target_parameters: nothing to adapt.) "
            f"{suffix_summary(model)} {parameter_summary(model)}"
        )
    variant = variant_for(resolved)
    bypassed = bypassed_modules(model)
    for name, module in targets:
        base = module.base_layer if isinstance(module, LoraLayer) else module
        kind = lora_layer_for(base)
        if name in bypassed:
            parent = model.get_submodule(bypassed[name])
            problems.append(
                f"{name} ({type(parent).__name__} {bypassed[name]!r} reads its weights without calling it, "
                f"so LoRA on it alone would change nothing; target {bypassed[name]!r} instead)"
            )
            continue
        if isinstance(module, (ModulesToSaveWrapper, TrainableTokensWrapper)) or kind is None:
            problems.append(f"{name} ({type(base).__name__})")
            continue
        refused = kind.option_problems(
            base, init=layer_init(resolved), lora_bias=resolved.lora_bias, variant=variant
        )
        refused += kind.rank_problems(base, rank_and_alpha(resolved, name)[0])
        problems.extend(f"{name} ({reason})" for reason in refused)
        if _init_kind(resolved) == "lora_ga":
            problems.extend(lora_ga.layer_problems(name, base, rank_and_alpha(resolved, name)[0], kind))
    problems.extend(_parameter_problems(parameters, {n for n, _ in targets}, resolved, variant))
    if problems:
        hint = f"Supported layer kinds: {', '.join(supported_kinds())}. {suffix_summary(model)}"
        if resolved.target_parameters:
            hint += f" Parameters: {', '.join(supported_parameter_kinds())}. {parameter_summary(model)}"
        raise TargetingError("cannot add LoRA to: " + "; ".join(problems) + ". " + hint)
    resolved = _fan_in_fan_out(resolved, targets)
    tying.check_ties(ties, resolved, [n for n, _ in targets])
    tokens = tying.token_targets(resolved, model, [n for n, _ in targets])
    return Plan(resolved, targets, _modules_to_save(resolved, model), tokens, ties, parameters)


def _parameter_problems(
    parameters: list[ParameterTarget], targeted: set[str], resolved: LoraConfig, variant: LoraVariant | None
) -> list[str]:
    """Why each targeted parameter cannot be adapted (empty: all can); ``targeted``: the module
    paths ``target_modules`` adapts, which a parameter of theirs may not be adapted through too."""
    problems: list[str] = []
    for t in parameters:
        kind = parameter_layer_for(t.owner, t.parameter)
        if t.module in targeted:
            problems.append(f"{t.key} (its module is also in target_modules; target it one way only)")
        elif kind is None:
            param = t.owner._parameters[t.parameter]
            shape = None if param is None else tuple(param.shape)
            problems.append(f"{t.key} (shape {shape}: {', '.join(supported_parameter_kinds())} only)")
        else:
            refused = kind.parameter_problems(
                t.owner,
                t.parameter,
                init=resolved.init_lora_weights,
                lora_bias=resolved.lora_bias,
                variant=variant,
            )
            problems.extend(f"{t.key} ({reason})" for reason in refused)
    return problems


def _refuse_wrapped(model: nn.Module) -> None:
    """LoRA added after an engine wrapped or sharded the model would not be sharded, synchronised
    or saved by it (training silently diverges across ranks), so it is refused."""
    problems = engines.wrapping_problems(model)
    if problems:
        raise TargetingError(
            "cannot inject LoRA into a model that is already wrapped or sharded by a distributed "
            "engine:\n  - " + "\n  - ".join(problems) + "\nInject first (get_peft_model / "
            "inject_adapter_in_model on the plain model, on every rank), then wrap it with DDP, "
            "fully_shard, FSDP or deepspeed.initialize"
        )


def _parent_slots(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(module) → every (parent, attribute name) holding it (shared modules have several).

    ``_modules`` rather than ``named_children()``: the latter yields a module once even when the
    parent holds it under two names, and the second name would keep the unwrapped module."""
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for child_name, child in parent._modules.items():
            if child is not None:
                slots.setdefault(id(child), []).append((parent, child_name))
    return slots


def _replace(slots: dict[int, list[tuple[nn.Module, str]]], old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is a child. ``new`` then holds ``old``'s slots too, so that a
    LoRA layer nested in ``old`` (a second targeted parameter of one module) and now in its place is
    unwrapped into the right parent when its turn comes."""
    held = slots.get(id(old), [])
    for parent, child_name in held:
        setattr(parent, child_name, new)
    if held:
        slots[id(new)] = list(held)


def inject(
    model: nn.Module, config: LoraConfig, adapter_name: str, *, low_cpu_mem_usage: bool = False
) -> LoraConfig:
    """Add adapter ``adapter_name`` to ``model`` in place; returns the resolved config.

    The new adapter is not activated and its parameters are left as created; activation and
    trainability are the caller's (see :mod:`lorakit.model.state`). ``low_cpu_mem_usage``: the
    adapter's tensors are created on the meta device, uninitialised, for a load to fill (an init
    that rewrites the base weight, PiSSA, OLoRA or LoRA-GA, still runs for real).
    """
    p = plan(model, config, adapter_name)
    _warn_unused_patterns(model, config, p)
    # New layers take the model's active list (as PEFT's do), so every layer reports the same one.
    active = next((list(m.active_adapters) for _, m in lora_modules(model) if isinstance(m, LoraLayer)), [])
    cfg = p.config
    variant = variant_for(cfg)
    prepare_model(model)
    slots = _parent_slots(model)
    layers: dict[str, LoraLayer] = {}
    for name, module in p.targets:
        layer = _lora_layer(module, slots, active)
        r, alpha = rank_and_alpha(cfg, name)
        layer.add_adapter(
            adapter_name,
            r,
            alpha,
            use_rslora=cfg.use_rslora,
            dropout=cfg.lora_dropout,
            init=layer_init(cfg),
            lora_bias=cfg.lora_bias,
            variant=variant,
            meta=low_cpu_mem_usage,
        )
        if _init_kind(cfg) == "lora_ga":  # right after its factors are drawn, as in PEFT (same RNG order)
            settings = cfg.lora_ga_config if isinstance(cfg.lora_ga_config, LoraGAConfig) else LoraGAConfig()
            lora_ga.initialize(layer, adapter_name, settings)
        # New modules start in train mode; an eval model must stay eval (no LoRA dropout).
        layer.train(layer.base_layer.training)
        layers[name] = layer
    for _name, module in p.ties.targets:
        _tie_lora(layers[str(p.ties.embedding)], _lora_layer(module, slots, active), adapter_name, cfg)
    _add_to_parameters(p.parameters, slots, active, adapter_name, cfg, meta=low_cpu_mem_usage)
    copies: dict[str, nn.Module] = {}
    for name, module in p.to_save:
        wrapper = module if isinstance(module, ModulesToSaveWrapper) else ModulesToSaveWrapper(module)
        if wrapper is not module:
            _replace(slots, module, wrapper)
        wrapper.add_adapter(adapter_name)
        wrapper.set_active(active)
        wrapper.train(wrapper.original_module.training)
        copies[name] = wrapper.modules_to_save[adapter_name]
    for _name, module in p.ties.saves:
        # the tied module's copy is the original with the embedding copy's weight in place of its own
        weight = copies[str(p.ties.embedding)].weight
        wrapper = module if isinstance(module, ModulesToSaveWrapper) else ModulesToSaveWrapper(module)
        original = wrapper.original_module
        if wrapper is not module:
            _replace(slots, module, wrapper)
        wrapper.add_adapter(adapter_name, copy.deepcopy(original, memo={id(original.weight): weight}))
        wrapper.set_active(active)
        wrapper.train(original.training)
    _add_tokens(model, p.tokens, adapter_name, slots, active)
    rerecord(model, adapter_name)
    return cfg


def _warn_unused_patterns(model: nn.Module, config: LoraConfig, p: Plan) -> None:
    """PEFT's warnings for settings that cannot act: ``exclude_modules`` that excluded no module,
    ``rank_pattern`` / ``alpha_pattern`` keys that match no targeted module, and ``lora_bias`` on a
    layer without a bias to merge it into."""
    if config.exclude_modules and not excluded_names(config, model):
        warnings.warn(
            f"You have passed exclude_modules={config.exclude_modules} but no modules were excluded. "
            "Please check that exclude_modules was set correctly.",
            UserWarning,
            stacklevel=4,
        )
    if config.lora_bias:
        no_bias = [
            f"{n} ({type(m.base_layer if isinstance(m, LoraLayer) else m).__name__})"
            for n, m in p.targets
            if getattr(m.base_layer if isinstance(m, LoraLayer) else m, "bias", None) is None
        ]
        if no_bias:
            warnings.warn(
                f"`lora_bias=True` was passed but the targeted layer of type "
                f"{no_bias[0].split('(')[1].rstrip(')')} has no bias: {', '.join(no_bias)}. This means that "
                "merging LoRA weights won't be possible.",
                PeftWarning,
                stacklevel=4,
            )
    targets = [n for n, _ in p.targets]
    for attr in ("rank_pattern", "alpha_pattern"):
        patterns = getattr(config, attr) or {}
        unmatched = sorted(k for k in patterns if not any(re.match(rf"(.*\.)?({k})$", n) for n in targets))
        if unmatched:
            warnings.warn(
                f"The following {attr} keys did not match any targeted module and were ignored: {unmatched}.",
                RuntimeWarning,
                stacklevel=4,
            )


def _lora_layer(
    module: nn.Module, slots: dict[int, list[tuple[nn.Module, str]]], active: list[str]
) -> LoraLayer:
    """``module`` if it is a LoRA layer, else a new LoRA layer put in its place, with the model's
    active adapters (as PEFT's new layers take them, so every layer reports the same list)."""
    if isinstance(module, LoraLayer):
        return module
    layer_cls = lora_layer_for(module)
    assert layer_cls is not None  # guaranteed by plan()
    layer = layer_cls(module)
    layer.set_active(active)
    _replace(slots, module, layer)
    return layer


def _tie_lora(embedding: LoraLayer, layer: LoraLayer, adapter_name: str, cfg: LoraConfig) -> None:
    """Give ``layer`` (an output head whose weight is the embedding's) the embedding's adapter: its
    A is the embedding's Bᵀ and its B the embedding's Aᵀ, the same tensors (PEFT's layout), with the
    embedding's rank and scaling, so that both change the shared weight by the same ΔW."""
    layer.add_adapter(
        adapter_name,
        embedding.r[adapter_name],
        embedding.lora_alpha[adapter_name],
        use_rslora=cfg.use_rslora,
        dropout=cfg.lora_dropout,
        init=True,
        lora_bias=False,
    )
    share_factors(embedding, layer, adapter_name)
    layer.train(layer.base_layer.training)


def share_factors(embedding: LoraLayer, head: LoraLayer, adapter_name: str) -> None:
    """Make ``head``'s factors of ``adapter_name`` views of ``embedding``'s: A_head = B_embᵀ (r × D),
    B_head = A_embᵀ (V × r), so that s·B_head·A_head = (s·B_emb·A_emb)ᵀ, the embedding's ΔW."""
    a, b = embedding.factors(adapter_name)  # (r, V), (D, r)
    head.set_factors(adapter_name, b.detach().T, a.detach().T)


def _add_tokens(
    model: nn.Module,
    tokens: list[tying.TokenTarget],
    adapter_name: str,
    slots: dict[int, list[tuple[nn.Module, str]]],
    active: list[str],
) -> None:
    """Wrap the trainable-token targets (the ones with rows of their own first, then the tied ones,
    which share the rows of the wrapper they are tied to) and give ``adapter_name`` its rows."""
    wrappers: dict[str, TrainableTokensWrapper] = {}
    for target in sorted(tokens, key=lambda t: t.tied_to is not None):
        module = target.module
        if isinstance(module, TrainableTokensWrapper):
            wrapper = module
        else:
            tied_to = None if target.tied_to is None else wrappers[target.tied_to]
            wrapper = TrainableTokensWrapper(module, tied_to)
            wrapper.active_adapters = list(active)
            wrapper.train(module.training)
            _replace(slots, module, wrapper)
        wrappers[target.name] = wrapper
        if target.tied_to is None:
            wrapper.add_adapter(adapter_name, target.indices)


def _add_to_parameters(
    targets: list[ParameterTarget],
    slots: dict[int, list[tuple[nn.Module, str]]],
    active: list[str],
    adapter_name: str,
    cfg: LoraConfig,
    *,
    meta: bool,
) -> None:
    """Give each targeted parameter's LoRA layer (wrapping it first if needed) ``adapter_name``."""
    for target, layer in _wrap_parameters(targets, slots, active):
        r, alpha = rank_and_alpha(cfg, target.key)
        layer.add_adapter(
            adapter_name,
            r,
            alpha,
            use_rslora=cfg.use_rslora,
            dropout=cfg.lora_dropout,
            init=cfg.init_lora_weights,
            lora_bias=cfg.lora_bias,
            meta=meta,
        )
        layer.train(target.owner.training)


def _wrap_parameters(
    targets: list[ParameterTarget], slots: dict[int, list[tuple[nn.Module, str]]], active: list[str]
) -> list[tuple[ParameterTarget, LoraLayer]]:
    """Each target's LoRA layer: its existing one, or a new wrapper. The new wrappers of one module
    nest in the targets' order (the first innermost) and the outermost takes the module's place."""
    out: list[tuple[ParameterTarget, LoraLayer]] = []
    outermost: dict[int, tuple[nn.Module, nn.Module]] = {}  # id(owner) → (owner, its outer wrapper)
    for t in targets:
        if t.layer is not None:
            out.append((t, t.layer))
            continue
        inner = outermost.get(id(t.owner), (t.owner, t.owner))[1]
        kind = parameter_layer_for(t.owner, t.parameter)
        assert kind is not None  # guaranteed by plan()
        layer = kind(inner, t.parameter)
        layer.set_active(active)
        outermost[id(t.owner)] = (t.owner, layer)
        out.append((t, layer))
    for owner, wrapper in outermost.values():
        _replace(slots, owner, wrapper)
    return out


def unload(model: nn.Module, *, keep_merged: bool = False) -> nn.Module:
    """Remove every LoRA layer and wrapper from ``model`` and return it.

    ``keep_merged=False`` (``unload()``): merged weights are first restored, so the result holds the
    original weights bit for bit and wrappers give back their original modules.
    ``keep_merged=True`` (``merge_and_unload()``): base layers keep what was merged into them and
    each modules-to-save wrapper is replaced by its active copy.
    """
    slots = _parent_slots(model)
    dtype = model_dtype(model)
    for _, module in list(lora_modules(model)):  # outermost first
        if isinstance(module, (LoraLayer, TrainableTokensWrapper)):
            if not keep_merged:
                module.unmerge()
            _replace(slots, module, module.unloaded(dtype))
        else:
            replacement = module.active_module if keep_merged else module.original_module
            _replace(slots, module, replacement)
    return model


def unload_requantized(model: nn.Module) -> list[RequantizeReport]:
    """``unload(model, keep_merged=True)``, except that each merged *quantized* layer is replaced by
    a new quantized module storing its merged weight re-quantized (lossy: PEFT's merge). Returns
    what each re-quantization lost (:class:`~lorakit.layers.RequantizeReport`)."""
    slots = _parent_slots(model)
    dtype = model_dtype(model)
    reports = []
    for name, module in list(lora_modules(model)):
        if isinstance(module, (LoraLayer, TrainableTokensWrapper)):
            replacement = module.unloaded(dtype)
            if isinstance(module, LoraLayer) and module.is_quantized and module.merged:
                replacement, report = module.requantized(name)
                reports.append(report)
            _replace(slots, module, replacement)
        else:
            _replace(slots, module, module.active_module)
    return reports


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating dtype activations flow in through ``model``: a transformers model's ``dtype``,
    else the most common dtype of its plain floating parameters (LoRA factors and quantized
    tensors aside); ``None`` if it has none."""
    dtype = getattr(model, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    adapter_params = {
        id(p) for _, m in lora_modules(model) for n in m.adapter_names for p in m.adapter_parameters(n)
    }
    counts = collections.Counter(
        p.dtype
        for p in model.parameters()
        if p.is_floating_point() and type(p) in (nn.Parameter, torch.Tensor) and id(p) not in adapter_params
    )
    return counts.most_common(1)[0][0] if counts else None


def uninject(model: nn.Module, adapter_name: str) -> None:
    """Undo :func:`inject`: remove ``adapter_name`` everywhere and unwrap every LoRA layer or
    wrapper left without any adapter, so the model's structure is as before the injection.
    (Used to roll back a load that failed after injecting; the adapter must not be merged.)"""
    slots = _parent_slots(model)
    modules = [m for _, m in lora_modules(model)]  # outermost first, as in unload
    for module in modules:  # first everywhere: tied wrappers lose the adapter with their embedding's
        if adapter_name in module.adapter_names:
            module.delete_adapter(adapter_name)
    for module in modules:
        if not module.adapter_names:
            if isinstance(module, (LoraLayer, TrainableTokensWrapper)):
                _replace(slots, module, module.base_layer)
            else:
                _replace(slots, module, module.original_module)


def remove_at(model: nn.Module, names: Iterable[str], adapter_name: str) -> None:
    """Remove ``adapter_name`` from the LoRA layers at module paths ``names`` of ``model``, and put
    back the base layer of each one left without any adapter (EVA drops the layers it gives rank 0)."""
    wanted = set(names)
    slots = _parent_slots(model)
    for name, module in list(model.named_modules()):
        if name in wanted and isinstance(module, LoraLayer):
            module.delete_adapter(adapter_name)
            if not module.adapter_names:
                _replace(slots, module, module.base_layer)


def rerecord(model: nn.Module, adapter_name: str) -> None:
    """Record ``adapter_name``'s parameters and shapes again after an operation replaced them
    (EVA's new ranks), so that distributed checks compare against the new shapes."""
    params = [
        p
        for _, m in lora_modules(model)
        if m.has_adapter(adapter_name)
        for p in m.adapter_parameters(adapter_name)
    ]
    engines.record(model, adapter_name, params)
