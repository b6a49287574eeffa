"""Saving, loading and merging adapters of a model inside a process group.

``PeftModel.save_pretrained`` lands here when a process group of more than one rank is active:

* adapters that are whole on every rank (no engine, DDP, ZeRO-1/2): no communication; every rank
  validates and only rank 0 writes, so a save called on rank 0 alone (as transformers' Trainer
  does) works too;
* adapters sharded by FSDP1/FSDP2/ZeRO-3: a **collective** gather (every rank must call it, which
  fails after the timeout with a message otherwise); rank 0 validates and writes, then tells the
  other ranks whether it succeeded, so every rank returns or raises together.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lorakit.config import LoraConfig
from lorakit.distributed import group
from lorakit.distributed.state import (
    _root_and_prefix,
    _zero3_gathered,
    gather_adapter_state_dict,
    live_adapter_tensors,
    load_adapter_state_dict,
)
from lorakit.errors import DistributedError
from lorakit.layers import LoraLayer
from lorakit.model import engines, state
from lorakit.model.injection import lora_modules
from lorakit.persistence import adapter_dir

__all__ = ["save_pretrained", "load_pretrained", "merge_adapter", "unmerge_adapter", "adapter_is_sharded"]


def adapter_is_sharded(model: nn.Module, adapter_name: str = "default") -> bool:
    """Whether any tensor of the adapter is managed by a sharding engine (FSDP1, FSDP2, ZeRO-3)."""
    tensors, _ = live_adapter_tensors(model, adapter_name)
    return any(engines.is_engine_sharded(t) for t in tensors.values())


def _share_outcome(error: BaseException | None) -> None:
    """Collective: rank 0 tells every rank whether its part (writing a file) failed."""
    verdict: list[Any] = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(verdict, src=0)
    if error is not None:
        raise error
    if verdict[0] is not None:
        raise DistributedError(f"rank 0 failed, so no rank succeeded: {verdict[0]}")


def save_pretrained(
    model: nn.Module,
    configs: Mapping[str, LoraConfig],
    directory: str | os.PathLike[str],
    selected_adapters: Sequence[str] | None = None,
    *,
    is_main_process: bool | None = None,
    safe_serialization: bool = True,
    timeout: float | None = None,
    **save_options: Any,
) -> None:
    """Save adapters of ``model`` (the module holding the LoRA layers, possibly inside wrappers)
    from a process group: validated, written by rank 0 only. **Collective** when the adapter is
    sharded (see the module docstring). ``is_main_process`` defaults to ``rank == 0``; for a
    sharded adapter only rank 0 can write (it alone holds the gathered tensors), and passing
    ``is_main_process=False`` there makes it validate without writing. ``save_options``: the other
    keywords of :func:`lorakit.persistence.adapter_dir.save_adapters`."""
    names = list(configs) if selected_adapters is None else list(selected_adapters)
    writer = group.is_main_process() if is_main_process is None else is_main_process
    sharded = any(adapter_is_sharded(model, n) for n in names if n in configs)
    if not sharded:
        adapter_dir.save_adapters(
            model,
            configs,
            directory,
            names,
            is_main_process=writer,
            safe_serialization=safe_serialization,
            **save_options,
        )
        return
    whole = {n: gather_adapter_state_dict(model, n, timeout=timeout) for n in names}
    error: BaseException | None = None
    if group.is_main_process():  # the gathered tensors are on rank 0 only
        try:
            adapter_dir.save_adapters(
                model,
                configs,
                directory,
                names,
                safe_serialization=safe_serialization,
                whole=whole,
                is_main_process=is_main_process is not False,
                **save_options,
            )
        except (OSError, ValueError) as exc:
            error = exc
    _share_outcome(error)


def load_pretrained(
    model: nn.Module,
    path: str | os.PathLike[str],
    adapter_name: str = "default",
    *,
    subfolder: str | None = None,
    timeout: float | None = None,
) -> None:
    """**Collective.** Load the weights saved in ``path`` into the existing adapter ``adapter_name``
    of a wrapped or sharded model: rank 0 reads the files, checks them and broadcasts the tensors;
    every rank stores its part. (Inject the adapter with the same config before wrapping.)"""
    state: dict[str, torch.Tensor] | None = None
    error: BaseException | None = None
    if group.is_main_process():
        try:
            files = adapter_dir.read_adapter(path, subfolder=subfolder).tensors  # keys from the root
            prefix = _root_and_prefix(model)[1]
            state = {".".join(p for p in (prefix, k) if p): v for k, v in files.items()}
        except (OSError, ValueError) as exc:
            error = exc
    if group.is_active():
        _share_outcome(error)
    elif error is not None:
        raise error
    load_adapter_state_dict(model, state, adapter_name, timeout=timeout)


def _layers(model: nn.Module) -> list[tuple[str, LoraLayer]]:
    return [(n, m) for n, m in lora_modules(model) if isinstance(m, LoraLayer)]


def _refuse_fsdp(model: nn.Module, what: str) -> list[tuple[str, LoraLayer]]:
    layers = _layers(model)
    for name, layer in layers:
        weight = layer.weight
        if engines.is_engine_sharded(weight) and not engines.is_zero3(weight):
            raise DistributedError(
                f"{what}: {name}'s weight is sharded by FSDP; merging would change only each rank's piece. "
                "Save the adapter (save_pretrained on every rank), load it into an unsharded model and "
                "merge there (merge_and_unload)"
            )
    return layers


def merge_adapter(
    model: nn.Module,
    adapter_names: Sequence[str] | None = None,
    *,
    safe_merge: bool = False,
    timeout: float | None = None,
) -> None:
    """**Collective.** Merge adapters into the base weights of a model in a process group. Under
    ZeRO-3 the targeted layers' weights are gathered (together: the merge is validated as a whole
    before any weight changes), merged on every rank and re-partitioned from rank 0;
    plain and replicated models (DDP, ZeRO-1/2) merge locally on each rank; FSDP is refused."""
    layers = _refuse_fsdp(model, "merge_adapter")
    names = None if adapter_names is None else list(adapter_names)
    group.meet("merge_adapter", [n for n, _ in layers], timeout)
    if not any(engines.is_zero3(layer.weight) for _, layer in layers):
        state.merge(model, names, safe_merge=safe_merge)
        return
    # All targeted layers at once, so that the core merge validates everything (tied weights, biases,
    # safe_merge) before it writes anything; the base model's other weights stay partitioned.
    params = [p for _, layer in layers for p in layer.parameters() if engines.is_zero3(p)]
    with _zero3_gathered(params, modifier_rank=0):
        state.merge(model, names, safe_merge=safe_merge)


def unmerge_adapter(model: nn.Module, *, timeout: float | None = None) -> None:
    """**Collective.** Undo :func:`merge_adapter` (bit for bit), gathering under ZeRO-3 likewise."""
    layers = _refuse_fsdp(model, "unmerge_adapter")
    group.meet("unmerge_adapter", [n for n, _ in layers], timeout)
    for _, layer in layers:
        with _zero3_gathered([p for p in layer.parameters() if engines.is_zero3(p)], modifier_rank=0):
            layer.unmerge()
