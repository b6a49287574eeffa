"""The process group as lorakit's collectives see it: who we are, and a checked meeting point.

Every public collective of :mod:`lorakit.distributed` starts with :func:`meet`: all ranks must arrive
within the timeout (default 300 s, or ``LORAKIT_COLLECTIVE_TIMEOUT`` seconds), and they must agree on
what they are about to exchange. A rank that never calls the function, or calls it with a different
adapter, makes every rank raise :class:`~lorakit.errors.DistributedError` instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from lorakit.errors import DistributedError

__all__ = [
    "is_active",
    "rank",
    "world_size",
    "is_main_process",
    "default_timeout",
    "meet",
    "process_group_scope",
]

TIMEOUT_ENV = "LORAKIT_COLLECTIVE_TIMEOUT"
_DEFAULT_TIMEOUT_S = 300.0


def is_active() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_active() else 0


def world_size() -> int:
    return dist.get_world_size() if is_active() else 1


def is_main_process() -> bool:
    """Rank 0 (or no process group): the one process that writes files and prints progress."""
    return rank() == 0


def default_timeout() -> float:
    """Seconds a collective waits for every rank: ``LORAKIT_COLLECTIVE_TIMEOUT`` or 300."""
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return _DEFAULT_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        raise DistributedError(f"{TIMEOUT_ENV}={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise DistributedError(f"{TIMEOUT_ENV}={value!r} must be a positive number of seconds")
    return seconds


def _barrier(timeout: float) -> None:
    if dist.get_backend() == "gloo":
        # Rank 0 waits for each rank in turn and names the ones that did not come.
        dist.monitored_barrier(timeout=timedelta(seconds=timeout), wait_all_ranks=True)
    else:  # device backends have no monitored barrier: the process group's own timeout applies
        dist.barrier()


def meet(what: str, agreement: Any = None, timeout: float | None = None) -> None:
    """Collective: wait until every rank has called ``what``, then check that all ranks passed the
    same ``agreement`` (e.g. the adapter's keys and shapes). Raises the same
    :class:`DistributedError` on every rank when a rank is missing or the ranks disagree."""
    if not is_active():
        return
    seconds = default_timeout() if timeout is None else timeout
    try:
        _barrier(seconds)
    except RuntimeError as exc:
        raise DistributedError(
            f"{what} is a collective: every rank of the process group must call it, in the same order. "
            f"Not every rank arrived within {seconds:.0f} s (rank {rank()} of {world_size()} "
            f"waited; {exc}). Call it on all ranks, not only under `if rank == 0`; raise the limit with "
            f"{TIMEOUT_ENV}=<seconds> if a rank is merely slow"
        ) from exc
    if agreement is None:
        return
    values: list[Any] = [None] * world_size()
    dist.all_gather_object(values, agreement)
    differing = [r for r, v in enumerate(values) if v != values[0]]
    if differing:
        raise DistributedError(
            f"{what}: the ranks disagree on what to exchange; rank 0 has {_short(values[0])}, "
            + "; ".join(f"rank {r} has {_short(values[r])}" for r in differing[:3])
            + ". Every rank must hold the same adapters, injected with the same config, before wrapping"
        )


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def process_group_scope(what: str, timeout: float | None = None) -> Iterator[None]:
    """Destroy, when the block ends normally, a default process group that was created inside it
    (by transformers' Trainer / accelerate under ``torchrun`` or ``accelerate launch``): every rank
    first meets (:func:`meet`), then ``torch.distributed.destroy_process_group()``.

    Why: a group left to the interpreter's exit keeps gloo's worker threads running into
    finalisation. A worker that drops the last reference to a finished collective (the final
    evaluation's all-gather, whose tensors are Python objects) must take the GIL to free it; once
    the interpreter is finalising, CPython ends that thread with ``pthread_exit``, whose unwinding
    through the work's ``noexcept`` destructor calls ``std::terminate``: "terminate called without an
    active exception", SIGABRT, and the launcher kills the other ranks. Waiting at the meeting
    releases the GIL, so the workers finish freeing their work, and lets every rank finish its
    collectives and files before any rank tears its end down; the workers then sit idle even where
    a model wrapper (DDP) still references the destroyed group and keeps them alive.

    Not after an exception: another rank may be stuck in a collective that will never complete, and
    waiting for it (at the meeting, or in the group's destructor, which drains its queued work) would
    turn a quick failure into a hang until the timeout. A group that existed before the block belongs
    to the caller and is left alone.
    """
    existed = _initialized()
    yield
    if existed or not _initialized():
        return
    meet(what, timeout=timeout)
    dist.destroy_process_group()


def _short(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
