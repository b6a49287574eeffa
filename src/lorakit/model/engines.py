"""Read-only facts about models that a distributed engine has wrapped or sharded (no collectives).

Engines change a model in three ways lorakit must see through:

* **wrapper modules** whose names appear in parameter paths: DDP and DeepSpeed add a leading
  ``module.``; FSDP1 adds ``_fsdp_wrapped_module.`` around every wrapped unit; activation
  checkpointing adds ``_checkpoint_wrapped_module.``; ``torch.compile`` adds ``_orig_mod.``;
* **sharded tensors**: FSDP2 (``fully_shard``) turns parameters into ``DTensor`` shards; FSDP1 with
  ``use_orig_params=True`` turns each parameter into a 1-D view of this rank's piece of a flat
  buffer (often 0 elements); DeepSpeed ZeRO-3 empties ``param.data`` (0 elements) and keeps the
  piece in ``param.ds_tensor``;
* **new parameter objects** (FSDP2 replaces them), so identity cannot link a tensor to its name.

So injection records the name and shape of every parameter and buffer of the model it changed
(:func:`record`), and everything else maps wrapped names back with :func:`canonical_name`. Engines
are recognised by class name, so neither torch.distributed nor deepspeed is imported here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

__all__ = [
    "WRAPPER_SEGMENTS",
    "canonical_name",
    "record",
    "recorded_shapes",
    "wrapping_problems",
    "is_dtensor",
    "sharded_weight_problem",
    "is_zero3",
    "is_engine_sharded",
    "shard_problems",
    "expected_shapes",
    "hidden_adapter_params",
]

# Path segments that wrappers insert anywhere in a name; DDP's and DeepSpeed's ``module.`` is only
# ever the outermost segment (see canonical_name).
WRAPPER_SEGMENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
OUTER_WRAPPER_SEGMENT = "module"
RECORD_ATTR = "_lorakit_recorded"
_ENGINE_CLASSES = {
    "DistributedDataParallel": "PyTorch DDP",
    "FullyShardedDataParallel": "FSDP1 (FullyShardedDataParallel)",
    "FSDPModule": "FSDP2 (fully_shard)",
    "DeepSpeedEngine": "DeepSpeed (deepspeed.initialize)",
}


def canonical_name(name: str, *, outer: bool = False) -> str:
    """``name`` without the segments that wrappers insert.

    ``outer=True`` also drops leading ``module.`` segments (DDP, DeepSpeed); only pass it for names
    taken from the outermost wrapper, since a model may own a child really called ``module``.
    """
    parts = [p for p in name.split(".") if p not in WRAPPER_SEGMENTS]
    while outer and len(parts) > 1 and parts[0] == OUTER_WRAPPER_SEGMENT:
        parts = parts[1:]
    return ".".join(parts)


_TYPE_NAMES: dict[type, frozenset[str]] = {}


def _class_names(obj: object) -> frozenset[str]:
    """The names of ``obj``'s class and its bases (cached per class: every module and parameter of
    a model is asked)."""
    cls = type(obj)
    names = _TYPE_NAMES.get(cls)
    if names is None:
        names = _TYPE_NAMES[cls] = frozenset(c.__name__ for c in cls.__mro__)
    return names


def is_dtensor(tensor: torch.Tensor) -> bool:
    """A ``torch.distributed.tensor.DTensor`` (FSDP2 and tensor-parallel parameters)."""
    return "DTensor" in _class_names(tensor)


def is_zero3(tensor: torch.Tensor) -> bool:
    """A parameter DeepSpeed ZeRO-3 manages (gathered or not)."""
    return hasattr(tensor, "ds_id") and hasattr(tensor, "ds_tensor")


def is_engine_sharded(tensor: torch.Tensor) -> bool:
    """Managed by a sharding engine: a DTensor, a ZeRO-3 parameter, or an FSDP1 flattened one
    (whole or not at this moment)."""
    return is_dtensor(tensor) or is_zero3(tensor) or bool(getattr(tensor, "_fsdp_flattened", False))


def sharded_weight_problem(weight: torch.Tensor, unsharded_shape: tuple[int, ...]) -> str | None:
    """Why a layer's base ``weight`` cannot be merged into here: it is a DTensor shard, or has
    another shape than the one it had when the adapter was added (an FSDP1 flat view, a ZeRO-3
    partition); ``None`` when it is whole."""
    if not (is_dtensor(weight) or tuple(weight.shape) != tuple(unsharded_shape)):
        return None
    what = "a DTensor shard" if is_dtensor(weight) else f"of shape {tuple(weight.shape)}"
    return (
        f"the base weight is sharded by a distributed engine ({what}, unsharded "
        f"{tuple(unsharded_shape)}); merging it here would change only this rank's piece, or "
        "nothing. Use lorakit.distributed.merge_adapter (gathers under ZeRO-3), or load the "
        "saved adapter into an unsharded model and merge there"
    )


def wrapping_problems(model: nn.Module) -> list[str]:
    """Why ``model`` is already wrapped or sharded by an engine, one line per engine (empty: plain)."""
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        names = _class_names(module)
        for cls, engine in _ENGINE_CLASSES.items():
            if cls in names and engine not in found:
                found[engine] = f"module {name or '<root>'!r} is a {type(module).__name__}"
    for name, param in model.named_parameters():
        if is_dtensor(param):
            found.setdefault("FSDP2 / DTensor", f"parameter {name!r} is a DTensor shard")
        elif is_zero3(param):
            found.setdefault("DeepSpeed ZeRO-3", f"parameter {name!r} is partitioned by ZeRO-3")
        elif "FlatParameter" in _class_names(param):
            found.setdefault("FSDP1 (flat parameters)", f"parameter {name!r} is a FlatParameter")
    return [f"{engine}: {where}" for engine, where in found.items()]


def record(model: nn.Module, adapter_name: str, adapter_params: Iterable[nn.Parameter]) -> None:
    """Remember, on ``model``, the name and shape of each of its parameters and buffers as they are
    now (unsharded), and which parameter names belong to ``adapter_name``. Called by injection."""
    ids = {id(p) for p in adapter_params}
    shapes: dict[str, tuple[int, ...]] = {}
    names: list[str] = []
    for name, tensor in [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]:
        shapes[canonical_name(name)] = tuple(int(s) for s in tensor.shape)
        if id(tensor) in ids:
            names.append(canonical_name(name))
    previous = getattr(model, RECORD_ATTR, None)
    adapters = dict(previous["adapters"]) if previous else {}
    adapters[adapter_name] = names
    model.__dict__[RECORD_ATTR] = {"shapes": shapes, "adapters": adapters}


def recorded(model: nn.Module) -> dict | None:
    """The record :func:`record` left on ``model`` (``None`` if LoRA was never injected into it)."""
    return model.__dict__.get(RECORD_ATTR)


def recorded_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    rec = recorded(model)
    return dict(rec["shapes"]) if rec else {}


def shard_problems(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> list[str]:
    """Tensors that are not whole: DTensor shards, ZeRO-3 partitions, empty tensors, or a shape
    other than the one recorded at injection (an FSDP1 flat-buffer view). One line each."""
    lines = []
    for key, t in tensors.items():
        expected = shapes.get(key)
        shape = tuple(t.shape)
        if is_dtensor(t):
            lines.append(f"{key}: a DTensor shard (local shape {tuple(t.to_local().shape)})")  # type: ignore[attr-defined]
        elif t.numel() == 0:
            lines.append(f"{key}: has 0 elements (shape {shape}); expected {expected}")
        elif expected is not None and shape != expected:
            lines.append(f"{key}: shape {shape}, but the adapter was created with {expected}")
    return lines


def _named_tensors(root: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]


def expected_shapes(root: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """For each of ``tensors`` (live tensors of ``root``, any keys): its shape as recorded at
    injection, found through the tensor's current (canonical) parameter or buffer name. A tensor
    that was never recorded keeps its current shape."""
    shapes = recorded_shapes(root)
    names = {id(t): canonical_name(n) for n, t in _named_tensors(root)}
    return {k: shapes.get(names.get(id(t), ""), tuple(int(s) for s in t.shape)) for k, t in tensors.items()}


def hidden_adapter_params(root: nn.Module, adapter_name: str) -> list[str]:
    """Parameters recorded for ``adapter_name`` at injection that ``root`` no longer shows (FSDP1
    with ``use_orig_params=False`` folds them into flat parameters)."""
    rec = recorded(root)
    if not rec:
        return []
    present = {canonical_name(n) for n, _ in _named_tensors(root)}
    return [n for n in rec["adapters"].get(adapter_name, []) if n not in present]
