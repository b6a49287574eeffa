"""EVA, Explained Variance Adaptation (Paischer et al. 2024, §3), with PEFT's API.

::

    config = LoraConfig(r=16, target_modules=[...], init_lora_weights="eva", eva_config=EvaConfig(rho=2))
    model = get_peft_model(base, config)              # A is a placeholder, B = 0: the output is the base's
    initialize_lora_eva_weights(model, dataloader)    # A ← top principal directions of each layer's inputs

Each targeted linear layer's A (r × k) becomes the top-r right-singular vectors of its centred input
activations, computed incrementally over batches (:mod:`lorakit.model.eva_pass`); ranks are then
redistributed across layers by explained variance, each layer getting between 0 and
``round(r · rho)``, the total staying ``Σ r``. B stays zero, so the model still computes the base
model's outputs. A layer given rank 0 loses its adapter. The config records the new ranks in
``rank_pattern`` (and, with ``adjust_scaling_factors``, ``alpha_pattern`` keeps ``alpha / r``), so
the saved adapter is PEFT's format and loads in PEFT as in lorakit.

Differences from PEFT 0.21.2, each in the user's favour:

* a state dict from ``get_eva_state_dict`` on the plain model (keys ``model.layers.0...``) or on the
  ``PeftModel`` (``base_model.model.model.layers.0...``) both load; PEFT silently ignores the first;
* keys that name no adapted linear layer, or tensors of the wrong width, are an error before
  anything changes (PEFT ignores the keys and fails midway on the shapes);
* layers EVA does not cover (embeddings) keep their initialisation (PEFT draws it again, with a
  warning in both);
* with ``whiten=True``, every layer's components are divided once by ``√S`` (PEFT divides in place,
  so layers sharing inputs, such as q/k/v, are divided once per sharing layer);
* a layer's largest rank is capped at its input width (PEFT fails when ``r · rho`` exceeds it).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from lorakit.config import LoraConfig, parse_init
from lorakit.config.init_configs import EvaConfig
from lorakit.errors import AdapterError, ConfigError
from lorakit.layers import LoraLayer, linear_shape, lora_layer_for
from lorakit.model import eva_pass, injection, state
from lorakit.model.targeting import rank_and_alpha, resolve_config, select_targets

__all__ = [
    "get_eva_state_dict",
    "initialize_lora_eva_weights",
    "forward_fn_dict",
    "prepare_model_inputs_fn_language_modeling",
    "prepare_layer_inputs_fn_language_modeling",
    "load_eva_state_dict",
]

RHO_CEILING = 1000  # above this, rho is capped at (largest weight dimension) // r, as in PEFT

# prepare_layer_inputs_fn: one function for every layer, one per module name, or None (every position)
PrepareArg = (
    Callable[[Any, Any, str], torch.Tensor] | Mapping[str, Callable[[Any, Any, str], torch.Tensor]] | None
)


def forward_fn_dict(model: nn.Module, inputs: Mapping[str, Any]) -> Any:
    """The default forward: ``model(**inputs)``."""
    return model(**inputs)


def prepare_model_inputs_fn_language_modeling(model_input: Any, peft_config: LoraConfig) -> torch.Tensor:
    """The (n, 2) indices (batch, position) of the tokens the SVD uses: those the attention mask
    keeps and, with ``eva_config.use_label_mask``, whose label is not ``label_mask_value``."""
    if not isinstance(model_input, Mapping) or "input_ids" not in model_input:
        raise ConfigError(
            "EVA's default prepare_model_inputs_fn needs batches that are dicts with 'input_ids' "
            f"(got {type(model_input).__name__}); pass prepare_model_inputs_fn=None and "
            "prepare_layer_inputs_fn=None to use every position of every layer input"
        )
    ids = model_input["input_ids"]
    mask = model_input.get("attention_mask", torch.ones_like(ids)).bool()
    eva = _eva_of(peft_config)
    if isinstance(eva, EvaConfig) and eva.use_label_mask and "labels" in model_input:
        mask = mask & (model_input["labels"] != eva.label_mask_value)
    return mask.nonzero()


def prepare_layer_inputs_fn_language_modeling(
    layer_input: Any, model_input: torch.Tensor, layer_name: str
) -> torch.Tensor:
    """The rows of a (batch, seq, k) layer input at the (n, 2) token indices: (n, k)."""
    x = eva_pass.first_tensor(layer_input, layer_name)
    return x[model_input.T.unbind()]


def _eva_of(config: LoraConfig) -> EvaConfig:
    """The config's EVA settings (normalised to an EvaConfig by LoraConfig), PEFT's defaults if none."""
    return config.eva_config if isinstance(config.eva_config, EvaConfig) else EvaConfig()


def _root(model: nn.Module) -> nn.Module:
    """The module LoRA was injected into (a PeftModel's base model, else the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _prefix(model: nn.Module, root: nn.Module) -> str:
    return next((n for n, m in model.named_modules() if m is root), "")


def _configs(model: nn.Module) -> Mapping[str, LoraConfig] | None:
    configs = getattr(model, "peft_config", None)
    return configs if isinstance(configs, Mapping) else None


def _in_features(module: nn.Module) -> int:
    """k, the width of a linear layer's input (a LoRA layer's or a plain Linear / Conv1D's)."""
    width = getattr(module, "in_features", None)
    if isinstance(width, int):
        return width
    if isinstance(module, LoraLayer):
        return int(module.to_matrix(module.dense_weight()).shape[1])
    return linear_shape(module)[0]


def _model_device(model: nn.Module) -> torch.device | None:
    devices = {p.device for p in model.parameters() if p.device.type != "meta"}
    if len(devices) > 1:
        warnings.warn(
            f"EVA: the model is on several devices {sorted(map(str, devices))}; inputs stay where they are",
            stacklevel=3,
        )
    return next(iter(devices)) if len(devices) == 1 else None


def _candidates(
    model: nn.Module, config: LoraConfig, adapter_name: str, adapted: bool
) -> list[tuple[str, nn.Module, str]]:
    """(name in ``model``, module to hook, name relative to the injected model) of every linear layer
    EVA initialises: LoRA layers holding ``adapter_name`` if ``adapted``, else the config's targets."""
    if adapted:
        root = _root(model)
        prefix = _prefix(model, root)
        return [
            (f"{prefix}.{rel}" if prefix else rel, m, rel)
            for rel, m in root.named_modules()
            if isinstance(m, LoraLayer) and m.has_adapter(adapter_name) and m.is_linear
        ]
    resolved = resolve_config(config, model)
    return [
        (n, m, n)
        for n, m in select_targets(resolved, model)
        if (kind := lora_layer_for(m)) is not None and kind.is_linear
    ]


def _targets(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str,
    adapted: bool,
    prepare_layer_inputs_fn: PrepareArg,
) -> list[eva_pass.Target]:
    eva = _eva_of(config)
    rho = eva.rho
    if rho > RHO_CEILING:
        largest = max(max(p.shape) for p in model.parameters() if p.ndim)
        rho = min(rho, largest // config.r)
    per_layer = dict(prepare_layer_inputs_fn) if isinstance(prepare_layer_inputs_fn, Mapping) else {}
    targets = []
    for name, module, rel in _candidates(model, config, adapter_name, adapted):
        rank = rank_and_alpha(config, rel)[0]
        width = _in_features(module)
        if isinstance(prepare_layer_inputs_fn, Mapping):
            prepare = per_layer.pop(name, None) or eva_pass.flat_inputs
        else:
            prepare = prepare_layer_inputs_fn or eva_pass.flat_inputs
        targets.append(eva_pass.Target(name, module, width, rank, min(round(rank * rho), width), prepare))
    if per_layer:
        raise ConfigError(
            f"prepare_layer_inputs_fn names module(s) EVA does not initialise: {sorted(per_layer)}"
        )
    if not targets:
        raise AdapterError(
            f"EVA found no linear layer to initialise (adapter {adapter_name!r}); EVA initialises "
            "nn.Linear / Conv1D layers, not embeddings or convolutions"
        )
    return targets


def _progress(show: bool) -> Callable[[Any], Any] | None:
    if not show:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # the bar is a convenience; tqdm is not a dependency of lorakit's core
        return None
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    return lambda it: tqdm(it, desc="EVA: batches until the SVDs converge", leave=False)


@torch.no_grad()
def get_eva_state_dict(
    model: nn.Module,
    dataloader: Iterable[Any],
    peft_config: LoraConfig | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable[[Any, LoraConfig], Any]
    | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: PrepareArg = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> dict[str, torch.Tensor]:
    """EVA's initial A of every targeted linear layer: module name → (r_layer × k) float32, the
    layer's redistributed rank r_layer ≥ 0 (PEFT's name and arguments).

    ``model``: a model with LoRA adapters (the adapter ``adapter_name`` is switched off during the
    pass) or a plain model with ``peft_config`` (its targets). ``forward_fn(model, batch)`` runs a
    batch; ``prepare_model_inputs_fn(batch, config)`` turns a batch into what
    ``prepare_layer_inputs_fn(layer_input, that, layer_name)`` needs to return the rows (n × k) of
    a layer's input for the SVD; the defaults select the tokens that are not padding (nor
    ignored labels). ``prepare_layer_inputs_fn=None`` uses every position; a dict gives one function
    per module name. In a process group, each layer's rows are gathered from every rank
    (``gather_distributed_inputs``).
    """
    configs = _configs(model)
    adapted = configs is not None and adapter_name in configs
    if peft_config is None:
        if not adapted:
            raise ConfigError(
                "get_eva_state_dict: peft_config is required for a model without the adapter "
                f"{adapter_name!r} (adapters: {sorted(configs) if configs else []})"
            )
        peft_config = configs[adapter_name]  # type: ignore[index]
    if not isinstance(peft_config, LoraConfig):
        raise ConfigError(f"peft_config must be a lorakit.LoraConfig, got {type(peft_config).__name__}")
    targets = _targets(model, peft_config, adapter_name, adapted, prepare_layer_inputs_fn)
    eva = _eva_of(peft_config)
    device = _model_device(model)
    config = peft_config

    def prepare_batch(batch: Any) -> tuple[Any, Any]:
        batch = eva_pass.move_to(batch, device)
        return batch, (prepare_model_inputs_fn(batch, config) if prepare_model_inputs_fn else batch)

    context: AbstractContextManager[Any] = state.disabled(_root(model)) if adapted else nullcontext()
    training = model.training
    model.eval()
    try:
        with context:
            states, ranks, head_of = eva_pass.run(
                model,
                dataloader,
                targets,
                tau=eva.tau,
                forward_fn=forward_fn or forward_fn_dict,
                prepare_batch=prepare_batch,
                gather=gather_distributed_inputs,
                progress=_progress(show_progress_bar),
            )
    finally:
        model.train(training)
    out = {}
    for target in targets:
        svd = states[head_of[target.name]]
        rank = ranks[target.name]
        u = svd.components[:rank]
        if eva.whiten:
            u = u / svd.singular_values[:rank].sqrt()[:, None]
        out[target.name] = u.float().to(device) if device is not None else u.float()
    return out


@torch.no_grad()
def initialize_lora_eva_weights(
    model: nn.Module,
    dataloader: Iterable[Any] | None = None,
    eva_state_dict: Mapping[str, torch.Tensor] | None = None,
    forward_fn: Callable[[nn.Module, Any], Any] | None = forward_fn_dict,
    prepare_model_inputs_fn: Callable[[Any, LoraConfig], Any]
    | None = prepare_model_inputs_fn_language_modeling,
    prepare_layer_inputs_fn: PrepareArg = prepare_layer_inputs_fn_language_modeling,
    adapter_name: str = "default",
    gather_distributed_inputs: bool = True,
    show_progress_bar: bool = True,
) -> nn.Module:
    """Initialise adapter ``adapter_name`` of ``model`` (from ``get_peft_model`` or
    ``inject_adapter_in_model`` with ``init_lora_weights="eva"``) by EVA, from ``dataloader`` or
    from a precomputed ``eva_state_dict`` (PEFT's name and arguments; see
    :func:`get_eva_state_dict`). Layers get their redistributed ranks, ``model.peft_config``
    records them; everything is checked before the model changes. Returns ``model``."""
    configs = _configs(model)
    if configs is None or adapter_name not in configs:
        raise AdapterError(
            "initialize_lora_eva_weights needs a model from get_peft_model / inject_adapter_in_model "
            f"holding adapter {adapter_name!r} (adapters: {sorted(configs) if configs else []})"
        )
    config = configs[adapter_name]
    if (parse_init(config.init_lora_weights) or ("",))[0] != "eva":
        raise ConfigError(
            f"initialize_lora_eva_weights: adapter {adapter_name!r} has init_lora_weights="
            f"{config.init_lora_weights!r}; create it with init_lora_weights='eva'"
        )
    active = state.active_adapters(_root(model))
    if len(active) > 1:
        raise AdapterError(f"EVA works with one active adapter; active: {active} (as in PEFT)")
    merged = state.merged_adapters(_root(model))
    if merged:
        raise AdapterError(f"adapters {merged} are merged; unmerge them before initialising with EVA")
    if eva_state_dict is None:
        if dataloader is None:
            raise ConfigError("initialize_lora_eva_weights needs a dataloader or an eva_state_dict")
        eva_state_dict = get_eva_state_dict(
            model,
            dataloader,
            forward_fn=forward_fn,
            prepare_model_inputs_fn=prepare_model_inputs_fn,
            prepare_layer_inputs_fn=prepare_layer_inputs_fn,
            adapter_name=adapter_name,
            gather_distributed_inputs=gather_distributed_inputs,
            show_progress_bar=show_progress_bar,
        )
    configs[adapter_name] = load_eva_state_dict(model, config, eva_state_dict, adapter_name)  # type: ignore[index]
    return model


def _matched(
    model: nn.Module, eva_state_dict: Mapping[str, torch.Tensor], layers: dict[str, LoraLayer]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict's tensors by module path relative to the injected model, and the problems."""
    prefix = _prefix(model, _root(model))
    given: dict[str, torch.Tensor] = {}
    problems = []
    for key, w in eva_state_dict.items():
        rel = key[len(prefix) + 1 :] if prefix and key.startswith(prefix + ".") else key
        layer = layers.get(rel)
        if layer is None:
            problems.append(f"{key!r} names no layer holding the adapter")
        elif not layer.is_linear:
            problems.append(
                f"{key!r}: EVA initialises linear layers, this one wraps {type(layer.base_layer).__name__}"
            )
        elif not (isinstance(w, torch.Tensor) and w.ndim == 2 and w.shape[1] == _in_features(layer)):
            shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            problems.append(f"{key!r}: expected a (rank, {_in_features(layer)}) tensor, got {shape}")
        else:
            given[rel] = w
    if problems and any("names no layer" in p for p in problems):
        problems.append(
            f"layers with the adapter: {', '.join(list(layers)[:8])}{', ...' if len(layers) > 8 else ''}"
        )
    return given, problems


@torch.no_grad()
def load_eva_state_dict(
    model: nn.Module, config: LoraConfig, eva_state_dict: Mapping[str, torch.Tensor], adapter_name: str
) -> LoraConfig:
    """Put EVA's components into adapter ``adapter_name``'s A matrices and return the config that
    describes the result (``rank_pattern`` / ``alpha_pattern`` / ``target_modules``).

    A layer with a new rank r' gets A = the components (r' × k), B = 0 (d × r'), and with
    ``adjust_scaling_factors`` ``alpha · r'/r``; a layer with rank 0 loses the adapter."""
    root = _root(model)
    layers = {
        n: m for n, m in root.named_modules() if isinstance(m, LoraLayer) and m.has_adapter(adapter_name)
    }
    given, problems = _matched(model, eva_state_dict, layers)
    if problems:
        raise AdapterError("cannot load the EVA state dict:\n  - " + "\n  - ".join(problems))
    eva = _eva_of(config)
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    dropped, missing = [], []
    for rel, layer in layers.items():
        r, alpha = rank_and_alpha(config, rel)
        if rel not in given:
            missing.append(rel)
            new_rank = r
        else:
            w = given[rel]
            new_rank = int(w.shape[0])
            if new_rank == 0:
                dropped.append(rel)
                continue
            a, b = layer.factors(adapter_name)
            if new_rank != r:
                alpha = alpha * new_rank / r if eva.adjust_scaling_factors else alpha
                layer.set_factors(adapter_name, w.to(a), b.new_zeros(b.shape[0], new_rank))
                layer.set_alpha(adapter_name, alpha, use_rslora=config.use_rslora)
            else:
                a.copy_(w)
        if new_rank != config.r:
            rank_pattern[rel] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[rel] = alpha
    injection.remove_at(root, dropped, adapter_name)
    injection.rerecord(root, adapter_name)
    if missing:
        warnings.warn(
            f"EVA did not initialise {missing} (EVA covers linear layers); they keep their initialisation",
            stacklevel=3,
        )
    targets = config.target_modules if not dropped else [n for n in layers if n not in dropped]
    return dataclasses.replace(
        config, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, target_modules=targets
    )
