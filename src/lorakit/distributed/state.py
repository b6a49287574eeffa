"""Adapter tensors across ranks: gather them whole, broadcast them in, check that ranks agree.

Each function here is a **collective**: call it on every rank, in the same order. It looks at every
adapter tensor of the model and handles it by what the engine made of it:

==========================  ==============================  ======================================
engine                      a parameter is                  gathered by
==========================  ==============================  ======================================
none, DDP, ZeRO-1/2         the whole tensor, every rank    nothing to gather (copied)
FSDP2 ``fully_shard``       a ``DTensor`` shard             ``DTensor.full_tensor()``
FSDP1 ``use_orig_params``   a 1-D view of this rank's       all-gather of the pieces, in rank
                            piece of a flat buffer          order, reshaped to the recorded shape
DeepSpeed ZeRO-3            empty; the piece in ds_tensor   ``deepspeed.zero.GatheredParameters``
==========================  ==============================  ======================================

Only adapter tensors travel, never the base model's weights. Shapes come from the record injection
left on the model (:mod:`lorakit.sharding`), keys are PEFT's (as :func:`get_peft_model_state_dict`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lorakit.distributed import group
from lorakit.errors import AdapterError, DistributedError
from lorakit.model import engines
from lorakit.persistence.keys import adapter_keys

__all__ = [
    "adapter_root",
    "adapter_parameter_names",
    "live_adapter_tensors",
    "gather_adapter_state_dict",
    "broadcast_adapters",
    "check_adapters_in_sync",
    "load_adapter_state_dict",
]


def adapter_root(model: nn.Module) -> nn.Module:
    """The module LoRA was injected into, found inside any wrapper (DDP, FSDP, DeepSpeed, PeftModel)."""
    return _root_and_prefix(model)[0]


def _root_and_prefix(model: nn.Module) -> tuple[nn.Module, str]:
    """The injected module and its path from ``model`` without wrapper segments (``base_model.model``
    for a wrapped PeftModel, as in PEFT's state-dict keys)."""
    for name, module in model.named_modules():
        if engines.recorded(module) is not None:
            return module, engines.canonical_name(name, outer=True) if name != "module" else ""
    raise AdapterError(
        f"{type(model).__name__} holds no LoRA adapter injected by lorakit "
        "(get_peft_model / inject_adapter_in_model)"
    )


def adapter_parameter_names(model: nn.Module, adapter_name: str = "default") -> dict[str, str]:
    """Each of ``model``'s parameter names that belongs to ``adapter_name``, as the wrappers show it
    (``module.``, ``_fsdp_wrapped_module.``, ``_checkpoint_wrapped_module.``, ``_orig_mod.``), mapped
    to the name recorded at injection (relative to the module LoRA was injected into). Raises if
    the wrapped model no longer shows some of them."""
    root, prefix = _root_and_prefix(model)
    record = engines.recorded(root) or {"adapters": {}}
    recorded = set(record["adapters"].get(adapter_name, []))
    out: dict[str, str] = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        canon = engines.canonical_name(name, outer=True)
        relative = canon[len(prefix) + 1 :] if prefix and canon.startswith(prefix + ".") else canon
        if relative in recorded:
            out[name] = relative
    missing = sorted(recorded - set(out.values()))
    if missing or not recorded:
        raise DistributedError(
            f"adapter {adapter_name!r}: {len(missing)} of {len(recorded)} recorded "
            f"parameters are not visible through the wrappers (e.g. {missing[:3]})"
        )
    return out


def _bias_mode(model: nn.Module, adapter_name: str) -> str:
    for _, module in model.named_modules():
        configs = module.__dict__.get("peft_config")
        if isinstance(configs, Mapping) and adapter_name in configs:
            return str(configs[adapter_name].bias)
    return "none"


def live_adapter_tensors(
    model: nn.Module, adapter_name: str = "default"
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, ...]]]:
    """(PEFT key → live tensor, PEFT key → whole shape) of ``adapter_name``: keys as
    :func:`get_peft_model_state_dict` gives them for the unwrapped model (``base_model.model.…`` for
    a PeftModel), free of wrapper segments. Raises if the engine hides adapter parameters (FSDP1
    without ``use_orig_params``)."""
    root, prefix = _root_and_prefix(model)
    hidden = engines.hidden_adapter_params(root, adapter_name)
    if hidden:
        raise DistributedError(
            f"{len(hidden)} parameter(s) of adapter {adapter_name!r} are not visible in the wrapped model "
            f"(e.g. {hidden[:3]}): FSDP1 with use_orig_params=False folds them into flat parameters. "
            "Wrap with FullyShardedDataParallel(..., use_orig_params=True) or use fully_shard (FSDP2)"
        )
    tensors = adapter_keys(root, adapter_name, _bias_mode(model, adapter_name)).tensors
    if not tensors:
        raise AdapterError(f"the model holds no adapter named {adapter_name!r}")
    shapes = engines.expected_shapes(root, tensors)

    def key(k: str) -> str:
        return ".".join(p for p in (prefix, engines.canonical_name(k)) if p)

    return {key(k): t for k, t in tensors.items()}, {key(k): s for k, s in shapes.items()}


@contextlib.contextmanager
def _zero3_gathered(tensors: Sequence[torch.Tensor], modifier_rank: int | None = None) -> Iterator[None]:
    """Collective: the whole ZeRO-3 parameters ``tensors`` within the block (no-op without any)."""
    if not tensors:
        yield
        return
    import deepspeed  # only reached when DeepSpeed already partitioned these parameters

    with deepspeed.zero.GatheredParameters(tensors, modifier_rank=modifier_rank):
        yield


def _piece_sizes(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Collective: (world_size, len(tensors)) numbers of elements each rank holds of each tensor."""
    local = torch.tensor([t.numel() for t in tensors], dtype=torch.int64)
    if not group.is_active():
        return local.unsqueeze(0)
    device = tensors[0].device if tensors and tensors[0].device.type != "meta" else torch.device("cpu")
    if dist.get_backend() != "gloo":
        local = local.to(device)
    out = [torch.empty_like(local) for _ in range(group.world_size())]
    dist.all_gather(out, local)
    return torch.stack(out).cpu()


def _whole_from_pieces(key: str, t: torch.Tensor, sizes: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """Collective for sharded ``t`` (an FSDP1 flat-buffer view): the whole tensor on every rank."""
    numel = int(torch.Size(shape).numel())
    if all(s == numel for s in sizes):  # replicated (DDP, ZeRO-1/2, FSDP1 NO_SHARD)
        return t.detach().reshape(shape).clone()
    if sum(sizes) != numel:
        raise DistributedError(
            f"{key}: ranks hold {sizes} elements, which neither replicate nor split "
            f"the recorded shape {shape} ({numel} elements)"
        )
    padded = t.new_zeros(max(sizes))
    padded[: t.numel()] = t.detach().reshape(-1)
    pieces = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(pieces, padded)
    return torch.cat([p[:s] for p, s in zip(pieces, sizes, strict=True)]).reshape(shape)


def _agreement(tensors: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]) -> list:
    return [(k, shapes[k], str(t.dtype)) for k, t in tensors.items()]


def gather_adapter_state_dict(
    model: nn.Module, adapter_name: str = "default", *, rank0_only: bool = True, timeout: float | None = None
) -> dict[str, torch.Tensor]:
    """**Collective.** The whole tensors of adapter ``adapter_name`` under PEFT's keys, gathered
    from whatever the engine made of them (see the module table); only adapter tensors travel.

    Returns the tensors on rank 0 (on every rank with ``rank0_only=False``) and ``{}`` on the other
    ranks. Without a process group it is :func:`get_peft_model_state_dict` with checks. Every
    result is validated: the expected number of tensors, each with its recorded shape, none empty.
    """
    tensors, shapes = live_adapter_tensors(model, adapter_name)
    group.meet(
        f"gather_adapter_state_dict(adapter_name={adapter_name!r})", _agreement(tensors, shapes), timeout
    )
    keys = list(tensors)
    plain = [k for k in keys if not engines.is_dtensor(tensors[k]) and not engines.is_zero3(tensors[k])]
    sizes = _piece_sizes([tensors[k] for k in plain]) if group.is_active() else None
    out: dict[str, torch.Tensor] = {}
    with _zero3_gathered([t for t in tensors.values() if engines.is_zero3(t)]):
        for key in keys:
            t = tensors[key]
            if engines.is_dtensor(t):
                out[key] = t.detach().full_tensor().clone()  # type: ignore[attr-defined]
            elif sizes is not None and key in plain:
                column = sizes[:, plain.index(key)].tolist()
                out[key] = _whole_from_pieces(key, t, column, shapes[key])
            else:
                out[key] = t.detach().clone()
    problems = engines.shard_problems(out, shapes)
    if problems:
        raise DistributedError(
            f"gathering adapter {adapter_name!r} gave incomplete tensors:\n  - "
            + "\n  - ".join(problems[:20])
        )
    return out if (group.is_main_process() or not rank0_only) else {}


def _broadcast(
    t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    buf = (
        t.detach().to(device=device, dtype=dtype).contiguous()
        if t is not None
        else torch.empty(shape, dtype=dtype, device=device)
    )
    if group.is_active():
        dist.broadcast(buf, src=0)
    return buf


def _write_whole(t: torch.Tensor, whole: torch.Tensor, sizes: list[int] | None) -> None:
    """Store the whole tensor ``whole`` into this rank's part of live tensor ``t``."""
    with torch.no_grad():
        if engines.is_dtensor(t):
            dt: Any = t
            local = _distribute(whole.to(t.dtype), dt.device_mesh, dt.placements)
            dt.to_local().copy_(local.to_local())
        elif sizes is None or all(s == whole.numel() for s in sizes):
            t.copy_(whole.reshape(t.shape))
        else:
            start = sum(sizes[: group.rank()])
            t.copy_(whole.reshape(-1)[start : start + t.numel()])


def _load_problems(
    state_dict: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]]
) -> list[str]:
    lines = [f"{k}: matches no adapter tensor of the model" for k in sorted(set(state_dict) - set(shapes))]
    lines += [f"{k}: missing (expected shape {shapes[k]})" for k in sorted(set(shapes) - set(state_dict))]
    lines += [
        f"{k}: shape {tuple(v.shape)}, the model expects {shapes[k]}"
        for k, v in state_dict.items()
        if k in shapes and tuple(v.shape) != tuple(shapes[k])
    ]
    return lines


def load_adapter_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor] | None,
    adapter_name: str = "default",
    *,
    timeout: float | None = None,
) -> None:
    """**Collective.** Load PEFT-keyed ``state_dict`` (read on rank 0; other ranks may pass ``None``)
    into adapter ``adapter_name`` of a model that may be wrapped or sharded: rank 0 checks every key
    and shape, then broadcasts each tensor and every rank stores its own part. Nothing is changed
    on any rank if rank 0 finds a problem."""
    tensors, shapes = live_adapter_tensors(model, adapter_name)
    group.meet(
        f"load_adapter_state_dict(adapter_name={adapter_name!r})", _agreement(tensors, shapes), timeout
    )
    problems = (
        []
        if not group.is_main_process()
        else (["rank 0 passed no state dict"] if state_dict is None else _load_problems(state_dict, shapes))
    )
    verdict: list = [problems]
    if group.is_active():
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise AdapterError(
            f"cannot load adapter {adapter_name!r}; nothing was changed:\n  - "
            + "\n  - ".join(verdict[0][:20])
        )
    keys = list(tensors)
    plain = [k for k in keys if not engines.is_dtensor(tensors[k]) and not engines.is_zero3(tensors[k])]
    sizes = _piece_sizes([tensors[k] for k in plain]) if group.is_active() else None
    with _zero3_gathered([t for t in tensors.values() if engines.is_zero3(t)], modifier_rank=0):
        for key in keys:
            t = tensors[key]
            source = state_dict[key] if group.is_main_process() and state_dict is not None else None
            device = t.device if group.is_active() and dist.get_backend() != "gloo" else torch.device("cpu")
            whole = _broadcast(source, shapes[key], t.dtype, device)
            column = sizes[:, plain.index(key)].tolist() if sizes is not None and key in plain else None
            _write_whole(t, whole.to(t.device), column)


def broadcast_adapters(
    model: nn.Module, adapter_names: list[str] | None = None, *, src: int = 0, timeout: float | None = None
) -> None:
    """**Collective.** Copy rank ``src``'s adapter tensors to every rank, so all ranks start from the
    same initial adapter. Call it after injection and **before** wrapping (DDP also broadcasts at
    construction, FSDP and DeepSpeed do not). Default: every adapter of the model."""
    root = adapter_root(model)
    record = engines.recorded(root) or {"adapters": {}}
    names = adapter_names if adapter_names is not None else list(record["adapters"])
    for name in names:
        tensors, shapes = live_adapter_tensors(model, name)
        sharded = engines.shard_problems(tensors, shapes)
        if sharded:
            raise DistributedError(
                "broadcast_adapters runs after injection and before wrapping, but the "
                "model is already sharded:\n  - " + "\n  - ".join(sharded[:5])
            )
        group.meet(f"broadcast_adapters({name!r})", _agreement(tensors, shapes), timeout)
        if not group.is_active():
            continue
        with torch.no_grad():
            for t in tensors.values():
                if dist.get_backend() == "gloo" and t.device.type != "cpu":
                    raise DistributedError(f"gloo broadcasts CPU tensors; the adapter is on {t.device}")
                dist.broadcast(t.data, src=src)


def _digest(t: torch.Tensor) -> str:
    import hashlib

    data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]


def check_adapters_in_sync(
    model: nn.Module, adapter_name: str = "default", *, timeout: float | None = None
) -> None:
    """**Collective.** Raise :class:`DistributedError`, naming the tensors and ranks, unless every
    rank holds bit-identical whole tensors of ``adapter_name`` (each rank's own copy where the
    engine replicates them, as DDP and ZeRO-1/2 do and as a fresh injection should)."""
    tensors, shapes = live_adapter_tensors(model, adapter_name)
    if engines.shard_problems(tensors, shapes):  # sharded: the gather itself makes ranks agree
        tensors = gather_adapter_state_dict(model, adapter_name, rank0_only=False, timeout=timeout)
    group.meet(f"check_adapters_in_sync({adapter_name!r})", _agreement(tensors, shapes), timeout)
    digests = {k: _digest(t) for k, t in tensors.items()}
    every: list = [None] * group.world_size()
    if group.is_active():
        dist.all_gather_object(every, digests)
    else:
        every = [digests]
    differing = {k: [r for r, d in enumerate(every) if d[k] != every[0][k]] for k in digests}
    differing = {k: ranks for k, ranks in differing.items() if ranks}
    if differing:
        shown = "; ".join(f"{k} (ranks {v} differ from rank 0)" for k, v in list(differing.items())[:5])
        raise DistributedError(
            f"adapter {adapter_name!r} differs across ranks in {len(differing)} of {len(digests)} tensors: "
            f"{shown}. Seed every rank alike (torch.manual_seed(seed) before get_peft_model) or call "
            "lorakit.distributed.broadcast_adapters(model) after injection and before wrapping"
        )


def _distribute(whole: torch.Tensor, mesh: Any, placements: Any) -> Any:
    """``distribute_tensor`` of a tensor every rank already holds. torch ≥ 2.7 can skip the scatter
    from rank 0 (``src_data_rank=None``); older releases scatter it, which gives the same shards
    because every rank holds the same ``whole`` (one collective more). Before 2.5 the function
    lives in ``torch.distributed._tensor``."""
    import inspect

    try:
        from torch.distributed.tensor import distribute_tensor
    except ImportError:  # torch 2.4
        from torch.distributed._tensor import distribute_tensor  # type: ignore[no-redef]
    if "src_data_rank" in inspect.signature(distribute_tensor).parameters:
        return distribute_tensor(whole, mesh, placements, src_data_rank=None)
    return distribute_tensor(whole, mesh, placements)
