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
from lorakit.model import engines
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
    "saves_embedding_base",
    "to_file_keys",
    "from_file_keys",
    "get_peft_model_state_dict",
    "set_peft_model_state_dict",
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


def embedding_base_tensors(model: nn.Module, *, wrapped_only: bool) -> dict[str, torch.Tensor]:
    """The input / output embedding base weights under PEFT's keys: ``<m>.base_layer.<p>`` for a LoRA
    layer, ``<m>.<p>`` for a plain one (only LoRA layers with ``wrapped_only``)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in _embedding_layers(model):
        if isinstance(layer, LoraLayer) and isinstance(layer.base_layer, (nn.Linear, nn.Embedding)):
            prefix = _join(name, "base_layer")
            tensors.update(_saved_module_tensors(prefix, layer.base_layer))
        elif isinstance(layer, TrainableTokensWrapper):
            if not wrapped_only:  # PEFT writes these only for a resized vocabulary; read them
                prefix = _join(name, TOKEN_ADAPTER, "base_layer")
                tensors.update(_saved_module_tensors(prefix, layer.base_layer))
        elif not wrapped_only and isinstance(layer, (nn.Linear, nn.Embedding)):
            tensors.update(_saved_module_tensors(name, layer))
    return tensors


def planned_embedding_shapes(model: nn.Module, plan: Plan) -> dict[str, tuple[int, ...]]:
    """Optional keys a file may hold for ``plan``: the embedding base weights, by PEFT's naming once
    the plan is injected."""
    targeted = {n for n, _ in [*plan.targets, *plan.ties.targets]}
    tokens = {t.name for t in plan.tokens}
    shapes: dict[str, tuple[int, ...]] = {}
    for name, layer in _embedding_layers(model):
        wrapped = isinstance(layer, LoraLayer) or name in targeted
        rows = isinstance(layer, TrainableTokensWrapper) or name in tokens
        base = layer.base_layer if isinstance(layer, (LoraLayer, TrainableTokensWrapper)) else layer
        prefix = (
            _join(name, TOKEN_ADAPTER, "base_layer")
            if rows
            else _join(name, "base_layer")
            if wrapped
            else name
        )
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


def _bias_mode(model: nn.Module, adapter_name: str) -> str:
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, Mapping) and adapter_name in configs:
        return str(getattr(configs[adapter_name], "bias", "none"))
    return "none"


def _refuse_shards(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """A sharded engine's pieces are not the adapter: say how to get the whole tensors."""
    root = next((m for _, m in model.named_modules() if engines.recorded(m) is not None), model)
    problems = engines.shard_problems(tensors, engines.expected_shapes(root, tensors))
    if problems:
        raise AdapterError(
            f"{len(problems)} adapter tensor(s) are shards of a distributed engine, not whole tensors:\n  - "
            + "\n  - ".join(problems[:10])
            + "\nCall lorakit.distributed.gather_adapter_state_dict(model) "
            "on every rank, or pass a gathered full state_dict"
        )


def get_peft_model_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's keys (adapter name removed), detached, on their device.

    If ``state_dict`` is given (e.g. a gathered full state dict), values are read from it by their
    in-memory key instead of from the live model.
    """
    configs = getattr(model, "peft_config", None)
    config = configs.get(adapter_name) if isinstance(configs, Mapping) else None
    tensors = saved_tensors(
        model,
        adapter_name,
        _bias_mode(model, adapter_name),
        getattr(config, "target_modules", None),
        trainable_tokens=getattr(config, "trainable_token_indices", None) is not None,
    )
    if state_dict is None:
        _refuse_shards(model, tensors)
        return {k: t.detach() for k, t in tensors.items()}
    live = {id(t): k for k, t in model.state_dict(keep_vars=True).items()}
    return {k: state_dict[live[id(t)]] for k, t in tensors.items()}


def saved_tensors(
    model: nn.Module,
    adapter_name: str,
    bias: str,
    target_modules: list[str] | str | None,
    *,
    trainable_tokens: bool = False,
) -> dict[str, torch.Tensor]:
    """Every tensor an adapter file holds for ``adapter_name``, by file key (without
    ``base_model.model.``): the adapter's tensors plus, by PEFT's rule, targeted embeddings' base
    weights (not with ``trainable_tokens``, whose point is to save little; PEFT saves them then only
    for a resized vocabulary, which lorakit does not detect). Raises if the model holds no such
    adapter."""
    tensors = adapter_keys(model, adapter_name, bias).tensors
    if not tensors:
        raise AdapterError(f"the model holds no adapter named {adapter_name!r}")
    get_base = getattr(model, "get_base_model", None)
    user_model = get_base() if callable(get_base) else model  # target regexes see the user's names
    if saves_embedding_base(user_model, target_modules) and not trainable_tokens:
        tensors.update(embedding_base_tensors(model, wrapped_only=True))
    return tensors


def set_peft_model_state_dict(
    model: nn.Module, peft_model_state_dict: Mapping[str, torch.Tensor], adapter_name: str = "default"
) -> list[str]:
    """Load PEFT-format tensors into adapter ``adapter_name``; every key must fit.

    All problems (keys that match nothing, expected keys that are missing, shape mismatches) are
    collected and raised together before any tensor is copied. Returns the loaded keys.
    """
    keys = adapter_keys(model, adapter_name, "all")
    keys.tensors.update(embedding_base_tensors(model, wrapped_only=False))  # optional, as in PEFT
    expected = adapter_keys(model, adapter_name, _bias_mode(model, adapter_name)).tensors
    unknown = sorted(k for k in peft_model_state_dict if k not in keys.tensors)
    missing = sorted(k for k in expected if k not in peft_model_state_dict)
    mismatched = [
        f"{k}: model expects {tuple(keys.tensors[k].shape)}, got {tuple(v.shape)}"
        for k, v in peft_model_state_dict.items()
        if k in keys.tensors and tuple(v.shape) != tuple(keys.tensors[k].shape)
    ]
    if unknown or missing or mismatched:
        lines = []
        if unknown:
            lines.append(f"{len(unknown)} key(s) match no adapter tensor of the model: {unknown[:20]}")
        if missing:
            lines.append(f"{len(missing)} adapter tensor(s) missing from the state dict: {missing[:20]}")
        if mismatched:
            lines.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched[:20]))
        raise AdapterError(
            f"cannot load adapter {adapter_name!r}; nothing was changed:\n  - " + "\n  - ".join(lines)
        )
    with torch.no_grad():
        for k, v in peft_model_state_dict.items():
            target = keys.tensors[k]
            target.copy_(v.to(device=target.device, dtype=target.dtype))
    return sorted(peft_model_state_dict)
