"""The one place for PEFT's state-dict key rules.

In memory an adapter's tensors carry the adapter name; in PEFT's format they do not:

====================================================  ===========================================
in memory (relative to the model root)                in the adapter state dict / file
====================================================  ===========================================
``<m>.lora_A.<name>.weight``                          ``<m>.lora_A.weight``
``<m>.lora_B.<name>.weight`` / ``.bias``              ``<m>.lora_B.weight`` / ``.bias``
``<m>.lora_embedding_A.<name>``                       ``<m>.lora_embedding_A``
``<m>.lora_magnitude_vector.<name>.weight``           ``<m>.lora_magnitude_vector``
``<m>.modules_to_save.<name>.<p>``                    ``<m>.<p>``
``<m>.base_layer.bias`` (bias="all"/"lora_only")      unchanged
``<m>.original_module.bias``, ``<m>.modules_to_save.  unchanged (PEFT writes a modules-to-save
<name>.bias`` (bias="all")                            wrapper's biases also under these paths)
``<emb>.base_layer.weight`` (targeted embed_tokens /  unchanged; optional on load (PEFT writes it
lm_head, see ``EMBEDDING_LAYER_NAMES``)               when such a layer is targeted)
``<m>.token_adapter.trainable_tokens_delta.<name>``   ``<m>.token_adapter.trainable_tokens_delta``
(trainable tokens; a tied wrapper writes nothing)
``<m>.token_adapter.base_layer.weight``               unchanged; optional on load (PEFT writes it
                                                      when the vocabulary was resized)
``<m>.base_layer.lora_A.<name>.weight`` (a second     ``<m>.base_layer.lora_A.weight`` (PEFT nests
targeted parameter of module ``<m>``)                 one wrapper per parameter of a module)
====================================================  ===========================================

Adapter tensors are found by module type (LoRA layer, modules-to-save wrapper), never by substring;
a key read from a file is split into its parts by :func:`parse_key`, the one reader of this grammar.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping
from typing import cast

import torch
from torch import nn

from lorakit.errors import AdapterError
from lorakit.layers import (
    LoraLayer,
    ModulesToSaveWrapper,
    TrainableTokensWrapper,
    lora_layer_for,
    parameter_layer_for,
    variant_for,
)
from lorakit.model.injection import Plan
from lorakit.model.targeting import rank_and_alpha

__all__ = [
    "AdapterKey",
    "parse_key",
    "AdapterKeys",
    "FILE_PREFIX",
    "adapter_keys",
    "planned_shapes",
    "saved_tensors",
    "planned_embedding_shapes",
    "embedding_base_tensors",
    "loadable_embedding_tensors",
    "saves_embedding_base",
    "to_file_keys",
    "from_file_keys",
]

FILE_PREFIX = "base_model.model."  # what a PeftModel's file puts before each module path
# PEFT also saves the base weights of a targeted input / output embedding with these names (so that
# adapters trained after resizing the vocabulary carry the resized embedding); loading accepts them.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


# Which factor each of PEFT's factor containers holds (A: rank on axis 0; B: rank on axis 1).
TOKEN_ADAPTER = "token_adapter"  # PEFT's container of trainable token rows (and of its base layer)
TOKEN_ROWS = "trainable_tokens_delta"

FACTOR_ROLES = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "A", "lora_embedding_B": "B"}
PAIRED_B = {"lora_A": "lora_B", "lora_embedding_A": "lora_embedding_B"}  # the B beside each A


@dataclasses.dataclass(frozen=True)
class AdapterKey:
    """One key of an adapter file, split: ``<module>.<part>[.<tensor>]``.

    ``part`` is one of PEFT's per-adapter containers (``lora_A``, ``lora_B``, ``lora_embedding_A``,
    ``lora_embedding_B``, ``lora_magnitude_vector``), ``"token_adapter"`` (trainable token rows,
    ``tensor`` ``trainable_tokens_delta``, or its base layer), ``"base_layer"`` (a base tensor PEFT
    also saves) or ``""`` (a module saved in full, or a bias); ``tensor`` is what follows
    (``weight``, ``bias``; empty for parameters stored directly in the container).
    """

    module: str
    part: str
    tensor: str

    @property
    def role(self) -> str | None:
        """``"A"`` or ``"B"`` for a LoRA factor (its bias included), else ``None``."""
        return FACTOR_ROLES.get(self.part)

    @property
    def rank_axis(self) -> int | None:
        """The axis that has the adapter's rank: 0 for A, 1 for B; ``None`` for anything else."""
        if self.role is None or self.tensor == "bias":
            return None
        return 0 if self.role == "A" else 1

    @property
    def is_adapter_tensor(self) -> bool:
        """A tensor of the adapter itself (a factor, its bias, a variant's, trainable token rows),
        not a saved module."""
        return self.part in LoraLayer.adapter_param_names or (
            self.part == TOKEN_ADAPTER and self.tensor == TOKEN_ROWS
        )


def parse_key(key: str) -> AdapterKey:
    """Split a file key (with or without ``base_model.model.``) at its LoRA container: the last one,
    since a LoRA layer can sit inside another's base layer (an attention's out_proj:
    ``mha.base_layer.out_proj.lora_A.weight`` is module ``mha.base_layer.out_proj``, part ``lora_A``)."""
    key = key[len(FILE_PREFIX) :] if key.startswith(FILE_PREFIX) else key
    parts = key.split(".")
    for i in reversed(range(len(parts))):
        if parts[i] in LoraLayer.adapter_param_names or parts[i] in ("base_layer", TOKEN_ADAPTER):
            return AdapterKey(".".join(parts[:i]), parts[i], ".".join(parts[i + 1 :]))
    return AdapterKey(".".join(parts[:-1]), "", parts[-1])


@dataclasses.dataclass
class AdapterKeys:
    """For one adapter: file key → the tensor in the model that holds it."""

    tensors: dict[str, torch.Tensor]


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _saved_module_tensors(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """A modules-to-save copy is stored under the plain module path."""
    return {_join(prefix, pname): t for pname, t in module.state_dict(keep_vars=True).items()}


def _wrapper_biases(prefix: str, original: nn.Module, copy: nn.Module) -> dict[str, torch.Tensor]:
    """With ``bias="all"`` PEFT also writes a modules-to-save wrapper's biases under its internal
    paths: ``<m>.original_module.<p>`` and ``<m>.modules_to_save.<p>`` (the adapter's copy)."""
    out = {
        _join(prefix, "original_module", k): t
        for k, t in original.state_dict(keep_vars=True).items()
        if "bias" in k
    }
    out.update(
        {
            _join(prefix, "modules_to_save", k): t
            for k, t in copy.state_dict(keep_vars=True).items()
            if "bias" in k
        }
    )
    return out


def adapter_keys(model: nn.Module, adapter_name: str, bias: str = "none") -> AdapterKeys:
    """Map every PEFT-format key of ``adapter_name`` to the live tensor it reads from / loads into."""
    tensors: dict[str, torch.Tensor] = {}
    adapted_prefixes: list[str] = []
    for prefix, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.has_adapter(adapter_name):
            adapted_prefixes.append(prefix)
            tensors.update({_join(prefix, k): t for k, t in module.adapter_tensors(adapter_name).items()})
        elif isinstance(module, ModulesToSaveWrapper) and module.has_adapter(adapter_name):
            tensors.update(_saved_module_tensors(prefix, module.modules_to_save[adapter_name]))
            if bias == "all":
                copy = module.modules_to_save[adapter_name]
                tensors.update(_wrapper_biases(prefix, module.original_module, copy))
        elif isinstance(module, TrainableTokensWrapper) and module.adapter_parameters(adapter_name):
            tensors[_join(prefix, TOKEN_ADAPTER, TOKEN_ROWS)] = module.rows(adapter_name)
    if bias != "none":
        for pname, param in model.named_parameters():
            owner = pname.rsplit(".", 1)[0]
            if not pname.endswith("bias") or _inside_adapter(pname):
                continue
            if bias == "all" or any(owner == _join(p, "base_layer") for p in adapted_prefixes):
                tensors[pname] = param
    return AdapterKeys(tensors)


def planned_shapes(model: nn.Module, plan: Plan, adapter_name: str) -> dict[str, tuple[int, ...]]:
    """File key → shape of every tensor that injecting ``plan`` as ``adapter_name`` would create,
    computed without changing ``model`` (each target is wrapped in a throwaway LoRA layer)."""
    cfg = plan.config
    shapes: dict[str, tuple[int, ...]] = {}
    target_names = set()
    # per kind (q/k/v of every block share one scratch): the adapter's tensors, and the biases that
    # bias="lora_only" / "all" save, relative to the target
    by_kind: dict[tuple, tuple[dict[str, tuple[int, ...]], ...]] = {}
    tied = {n for n, _ in plan.ties.targets}
    for name, module in [*plan.targets, *plan.ties.targets]:
        base = module.base_layer if isinstance(module, LoraLayer) else module
        layer_cls = lora_layer_for(base)
        if layer_cls is None:  # plan() refuses these; kept for type narrowing
            continue
        # a module tied to the embedding (ensure_weight_tying) takes the embedding's rank
        r, alpha = rank_and_alpha(cfg, str(plan.ties.embedding) if name in tied else name)
        kind = (layer_cls, type(base), r, _shape_signature(base))
        if kind not in by_kind:
            scratch = layer_cls.throwaway(base)
            scratch.add_adapter(
                adapter_name,
                r,
                alpha,
                use_rslora=cfg.use_rslora,
                dropout=0.0,
                init=False,
                lora_bias=cfg.lora_bias,
                variant=variant_for(cfg),
            )
            by_kind[kind] = (
                {  # the layer's tensors and those of a LoRA layer it nests (an attention's out_proj)
                    _join(prefix, k): tuple(t.shape)
                    for prefix, sub in scratch.named_modules()
                    if isinstance(sub, LoraLayer)
                    for k, t in sub.adapter_tensors(adapter_name).items()
                },
                *_bias_shapes(scratch),
            )
        tensors, lora_only_biases, all_biases = by_kind[kind]
        shapes.update({_join(name, k): shape for k, shape in tensors.items()})
        if cfg.bias != "none":
            biases = lora_only_biases if cfg.bias == "lora_only" else all_biases
            shapes.update({_join(name, k): shape for k, shape in biases.items()})
        target_names.add(name)
    for target in plan.tokens:
        if target.tied_to is None:
            weight = cast(torch.Tensor, target.module.weight)
            width = int(weight.shape[1])
            shapes[_join(target.name, TOKEN_ADAPTER, TOKEN_ROWS)] = (len(target.indices), width)
    shapes.update(_planned_parameter_shapes(plan, adapter_name))
    for name, module in [*plan.to_save, *plan.ties.saves]:
        original = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        shapes.update({k: tuple(t.shape) for k, t in _saved_module_tensors(name, original).items()})
        if cfg.bias == "all":
            shapes.update({k: tuple(t.shape) for k, t in _wrapper_biases(name, original, original).items()})
    if cfg.bias == "all":
        outside = [*target_names, *(n for n, _ in [*plan.to_save, *plan.ties.saves])]
        for pname, param in model.named_parameters():
            inside = _inside_adapter(pname) or any(pname.startswith(n + ".") for n in outside)
            if pname.endswith("bias") and not inside:
                shapes[pname] = tuple(param.shape)
    return shapes


def _bias_shapes(layer: LoraLayer) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """The base biases a LoRA layer's file holds, by key relative to the layer, as
    :func:`adapter_keys` finds them: with ``bias="lora_only"`` those held directly by the base of
    each LoRA layer inside it (itself, and one it nests, like an attention's out_proj), with
    ``bias="all"`` every bias of its base."""
    lora_only = {
        _join(prefix, "base_layer", pname): tuple(p.shape)
        for prefix, sub in layer.named_modules()
        if isinstance(sub, LoraLayer)
        for pname, p in sub.base_layer.named_parameters(recurse=False)
        if pname.endswith("bias")
    }
    every = {
        pname: tuple(p.shape)
        for pname, p in layer.named_parameters()
        if pname.endswith("bias") and not _inside_adapter(pname)
    }
    return lora_only, every


def _planned_parameter_shapes(plan: Plan, adapter_name: str) -> dict[str, tuple[int, ...]]:
    """File key → shape for the targeted parameters, at the paths their LoRA layers will have."""
    cfg = plan.config
    shapes: dict[str, tuple[int, ...]] = {}
    for t in plan.parameters:
        layer_cls = parameter_layer_for(t.owner, t.parameter)
        if layer_cls is None:  # plan() refuses these; kept for type narrowing
            continue
        r, alpha = rank_and_alpha(cfg, t.key)
        scratch = layer_cls(t.owner, t.parameter)  # holds the owner; does not change the model
        scratch.add_adapter(
            adapter_name, r, alpha, use_rslora=cfg.use_rslora, dropout=0.0, init=False, lora_bias=False
        )
        shapes.update(
            {_join(t.path, k): tuple(v.shape) for k, v in scratch.adapter_tensors(adapter_name).items()}
        )
    return shapes


def _shape_signature(base: nn.Module) -> tuple:
    """What an adapter's shapes can depend on: the base's own parameter shapes, its declared sizes
    (a quantized weight's stored shape does not tell them: bitsandbytes packs a 32 × 16 and a 16 × 32
    4-bit weight alike) and conv geometry."""
    params = tuple((n, tuple(p.shape)) for n, p in base.named_parameters(recurse=False))
    sizes = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size", "groups")
    conv = tuple(getattr(base, a, None) for a in sizes)
    return params, conv


def _embedding_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of a transformers model's input and output embeddings (none for other models)."""
    found: list[tuple[str, nn.Module]] = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        layer = get() if callable(get) else None
        if isinstance(layer, nn.Module):
            found.extend((n, m) for n, m in model.named_modules() if m is layer)
    return list(dict.fromkeys(found))


def saves_embedding_base(model: nn.Module, target_modules: list[str] | str | None) -> bool:
    """PEFT's rule for writing targeted embeddings' base weights: a target list naming
    ``embed_tokens`` / ``lm_head``, or a regex matching a module so named."""
    if isinstance(target_modules, str):
        return any(
            re.fullmatch(target_modules, n)
            for n, _ in model.named_modules()
            if n.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES
        )
    names = target_modules or []
    return any(e in names for e in EMBEDDING_LAYER_NAMES)


def embedding_base_tensors(
    model: nn.Module, *, wrapped_only: bool, adapter_name: str | None = None
) -> dict[str, torch.Tensor]:
    """The input / output embedding base weights under PEFT's keys: ``<m>.base_layer.<p>`` for a LoRA
    layer, ``<m>.<p>`` for a plain one (only LoRA layers with ``wrapped_only``, and with
    ``adapter_name`` only those holding that adapter). A layer with merged adapters gives its
    weights as they are without them (they are what a fresh base model has)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in _embedding_layers(model):
        if isinstance(layer, LoraLayer) and isinstance(layer.base_layer, (nn.Linear, nn.Embedding)):
            if adapter_name is not None and not layer.has_adapter(adapter_name):
                continue
            prefix = _join(name, "base_layer")
            saved = _saved_module_tensors(prefix, layer.base_layer)
            if layer.merged:
                saved[_join(prefix, "weight")] = layer.original_weight()
                bias = layer.original_bias()
                if bias is not None and _join(prefix, "bias") in saved:
                    saved[_join(prefix, "bias")] = bias
            tensors.update(saved)
        elif isinstance(layer, TrainableTokensWrapper):
            if not wrapped_only:  # PEFT writes these only for a resized vocabulary; read them
                prefix = _join(name, TOKEN_ADAPTER, "base_layer")
                tensors.update(_saved_module_tensors(prefix, layer.base_layer))
        elif not wrapped_only and isinstance(layer, (nn.Linear, nn.Embedding)):
            tensors.update(_saved_module_tensors(name, layer))
    return tensors


def loadable_embedding_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every key under which a file may carry an embedding's base weight, mapped to the live tensor
    it loads into: a plain layer also answers to the ``<m>.base_layer.<p>`` form (a file saved with
    another adapter wrapping it, as PEFT writes beside every adapter)."""
    tensors = embedding_base_tensors(model, wrapped_only=False)
    for name, layer in _embedding_layers(model):
        if not isinstance(layer, LoraLayer) and isinstance(layer, (nn.Linear, nn.Embedding)):
            tensors.update(_saved_module_tensors(_join(name, "base_layer"), layer))
    return tensors


def planned_embedding_shapes(model: nn.Module, plan: Plan) -> dict[str, tuple[int, ...]]:
    """Optional keys a file may hold for ``plan``: the embedding base weights, by PEFT's naming once
    the plan is injected (a plain embedding also under its ``base_layer`` form, see
    :func:`loadable_embedding_tensors`; one with trainable token rows under its
    ``token_adapter.base_layer`` form)."""
    tokens = {t.name for t in plan.tokens}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, layer in _embedding_layers(model):
        base = layer.base_layer if isinstance(layer, (LoraLayer, TrainableTokensWrapper)) else layer
        prefixes = [_join(name, "base_layer"), name]
        if isinstance(layer, TrainableTokensWrapper) or name in tokens:
            prefixes.append(_join(name, TOKEN_ADAPTER, "base_layer"))
        for prefix in prefixes:
            shapes.update({k: tuple(t.shape) for k, t in _saved_module_tensors(prefix, base).items()})
    return shapes


def to_file_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as a ``PeftModel`` file stores them: ``base_model.model.`` + the module path."""
    return {FILE_PREFIX + k: v for k, v in state.items()}


def from_file_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip ``base_model.model.`` (keys without it are kept as they are and checked as such)."""
    return {k[len(FILE_PREFIX) :] if k.startswith(FILE_PREFIX) else k: v for k, v in state.items()}


def _inside_adapter(pname: str) -> bool:
    parts = set(pname.split("."))
    return bool(parts & (set(LoraLayer.adapter_param_names) | {"modules_to_save", "original_module"}))


def saved_tensors(
    model: nn.Module,
    adapter_name: str,
    bias: str,
    target_modules: list[str] | str | None,
    *,
    save_embedding_layers: bool | str = "auto",
    trainable_tokens: bool = False,
) -> dict[str, torch.Tensor]:
    """Every tensor an adapter file holds for ``adapter_name``, by file key (without
    ``base_model.model.``): the adapter's tensors plus the embeddings' base weights by PEFT's
    ``save_embedding_layers`` rule: ``"auto"`` (with a warning, as PEFT) when an embedding is a
    target (not with ``trainable_tokens``, whose point is to save little; PEFT saves them then only
    for a resized vocabulary, which lorakit does not detect), ``True`` always (transformers-like
    models), ``False`` never. Targeted embeddings give their ``base_layer`` weight for this adapter
    only, as it is without merged adapters. Raises if the model holds no such adapter."""
    if save_embedding_layers not in ("auto", True, False):
        raise AdapterError(f"save_embedding_layers={save_embedding_layers!r}: must be 'auto', True or False")
    tensors = adapter_keys(model, adapter_name, bias).tensors
    if not tensors:
        raise AdapterError(f"the model holds no adapter named {adapter_name!r}")
    get_base = getattr(model, "get_base_model", None)
    user_model = get_base() if callable(get_base) else model  # target regexes see the user's names
    targeted = saves_embedding_base(user_model, target_modules) and not trainable_tokens
    if save_embedding_layers == "auto" and targeted:
        warnings.warn(
            "Setting `save_embedding_layers` to `True` as embedding layers found in `target_modules`.",
            UserWarning,
            stacklevel=4,
        )
        save_embedding_layers = True
    if save_embedding_layers is True:
        if not _embedding_layers(model) and not hasattr(user_model, "get_input_embeddings"):
            warnings.warn(
                "Could not identify embedding layer(s) because the model is not a 🤗 transformers model.",
                UserWarning,
                stacklevel=4,
            )
        tensors.update(embedding_base_tensors(model, wrapped_only=targeted, adapter_name=adapter_name))
    return tensors
