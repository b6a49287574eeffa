"""EVA's pass over the data: forward hooks feed each targeted layer's inputs to an incremental SVD
(:mod:`lorakit.functional.eva`) until the components the rank allocation needs have converged.

The order of work is PEFT's, so that the same data and seed give PEFT's result:

1. one forward pass on the first batch fingerprints every layer's prepared input; layers whose inputs
   are identical (q/k/v projections) share one SVD, computed for the first of them;
2. batches are then cycled (the data is iterated again when it runs out): each batch updates every
   SVD that has not converged; after each batch the rank budget ``Σ r`` is redistributed over the
   layers by explained variance (each capped at ``round(r · rho)``);
3. a layer stops when the cosine similarity between consecutive batches of each of the components
   its current rank needs is ≥ ``tau``, and resumes if a redistribution later gives it more; the pass
   ends when every layer has stopped.

Only the running decomposition of each layer is kept, never the activations of earlier batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lorakit.errors import AdapterError
from lorakit.functional import eva as EF

__all__ = ["Target", "PrepareLayerFn", "flat_inputs", "first_tensor", "run", "move_to"]

# (layer input, the prepared model input, layer name) → the rows (n × k) the SVD takes
PrepareLayerFn = Callable[[Any, Any, str], torch.Tensor]


def first_tensor(layer_input: Any, layer_name: str) -> torch.Tensor:
    """The tensor a layer was called with (its first positional argument)."""
    if isinstance(layer_input, torch.Tensor):
        return layer_input
    if isinstance(layer_input, (tuple, list)) and layer_input and isinstance(layer_input[0], torch.Tensor):
        return layer_input[0]
    raise AdapterError(
        f"{layer_name}: EVA cannot read a layer input of type {type(layer_input).__name__}; pass "
        "prepare_layer_inputs_fn(layer_input, model_input, layer_name) returning a 2-D tensor"
    )


def flat_inputs(layer_input: Any, model_input: Any, layer_name: str) -> torch.Tensor:
    """Every position of the layer's input as a row: (…, k) → (n, k)."""
    x = first_tensor(layer_input, layer_name)
    return x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x


@dataclasses.dataclass
class Target:
    """A layer EVA initialises: its name in the model, the module to hook, its input size, its
    configured rank and the largest rank redistribution may give it."""

    name: str
    module: nn.Module
    in_features: int
    rank: int
    max_rank: int
    prepare: PrepareLayerFn


def _gathered(x: torch.Tensor, enabled: bool) -> torch.Tensor:
    """``x`` with the rows of every rank appended (in rank order) when a process group is running."""
    if not (enabled and dist.is_available() and dist.is_initialized()):
        return x
    sizes_local = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(sizes_local) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, sizes_local)
    counts = [int(s.item()) for s in sizes]
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)])


def _fingerprint(x: torch.Tensor) -> str:
    """A digest of the exact values and shape (equal inputs, equal digests)."""
    data = x.detach().contiguous().cpu()
    digest = hashlib.sha256(str((tuple(data.shape), data.dtype)).encode())
    digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class _Hook:
    """A forward hook that prepares a layer's input and hands the rows to ``sink``."""

    def __init__(
        self, target: Target, sink: Callable[[torch.Tensor], None], model_input: dict[str, Any], gather: bool
    ):
        self.target, self.sink, self.model_input, self.gather = target, sink, model_input, gather

    @torch.no_grad()
    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        x = self.target.prepare(args, self.model_input["value"], self.target.name)
        self.sink(_gathered(x, self.gather))


class _LayerSvd:
    """The incremental SVD of one layer (shared by the layers with the same inputs)."""

    def __init__(self, target: Target, tau: float) -> None:
        self.target, self.tau = target, tau
        self.state: EF.SvdState | None = None
        self.converged = torch.zeros(target.max_rank, dtype=torch.bool)
        self.handle: Any = None

    def update(self, x: torch.Tensor) -> None:
        if x.shape[0] < self.target.max_rank:
            warnings.warn(
                f"EVA skips a batch for {self.target.name}: {x.shape[0]} rows are fewer than the "
                f"{self.target.max_rank} components it computes",
                stacklevel=2,
            )
            return
        previous = self.state
        self.state = EF.svd_update(previous, x.float(), self.target.max_rank)
        self.converged = EF.converged(previous, self.state, self.tau)


def _batches(dataloader: Iterable[Any]) -> Iterator[Any]:
    """The batches of ``dataloader`` again and again (a new pass over it each time it ends)."""
    while True:
        empty = True
        for batch in dataloader:
            empty = False
            yield batch
        if empty:
            raise AdapterError("EVA: the dataloader yields no batch")


def _groups(
    model: nn.Module,
    targets: list[Target],
    first: Any,
    forward_fn: Callable[[nn.Module, Any], Any],
    model_input: dict[str, Any],
    gather: bool,
) -> dict[str, list[str]]:
    """First layer → every layer whose prepared input on the first batch is identical to its own."""
    digests: dict[str, str] = {}
    handles = []
    for t in targets:

        def sink(x: torch.Tensor, name: str = t.name) -> None:
            digests.setdefault(name, _fingerprint(x))

        handles.append(t.module.register_forward_hook(_Hook(t, sink, model_input, gather)))
    try:
        forward_fn(model, first)
    finally:
        for handle in handles:
            handle.remove()
    missing = [t.name for t in targets if t.name not in digests]
    if missing:
        raise AdapterError(f"EVA: forward_fn did not run the targeted layer(s) {missing[:5]}")
    groups: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for t in targets:
        head = owner.setdefault(digests[t.name], t.name)
        groups.setdefault(head, []).append(t.name)
    return groups


def run(
    model: nn.Module,
    dataloader: Iterable[Any],
    targets: list[Target],
    *,
    tau: float,
    forward_fn: Callable[[nn.Module, Any], Any],
    prepare_batch: Callable[[Any], tuple[Any, Any]],
    gather: bool,
    progress: Callable[[Iterator[Any]], Any] | None,
) -> tuple[dict[str, EF.SvdState], dict[str, int], dict[str, str]]:
    """Run the pass. ``prepare_batch(batch) → (batch on the model's device, model input for the
    hooks)``. Returns the SVD state of every group's first layer, the final rank of every layer and
    the layer → first layer of its group map."""
    batches = _batches(dataloader)
    model_input: dict[str, Any] = {}
    first, model_input["value"] = prepare_batch(next(batches))
    groups = _groups(model, targets, first, forward_fn, model_input, gather)
    by_name = {t.name: t for t in targets}
    head_of = {member: head for head, members in groups.items() for member in members}
    for members in groups.values():  # identical inputs: every member may grow as far as any
        widest = max(by_name[m].max_rank for m in members)
        for m in members:
            by_name[m].max_rank = widest
    svds = {head: _LayerSvd(by_name[head], tau) for head in groups}
    for head, svd in svds.items():
        svd.handle = by_name[head].module.register_forward_hook(
            _Hook(by_name[head], svd.update, model_input, gather)
        )
    budget = sum(t.rank for t in targets)
    # PEFT's pooling order (first layers of groups, then the others), so that ties break as in PEFT
    twins = {name: head for name, head in head_of.items() if name != head}
    pool_order = [*groups, *twins]
    ranks = {t.name: t.max_rank for t in targets}
    done = dict.fromkeys(svds, False)
    stream = _batches(dataloader)  # a new pass from the start, as PEFT's does
    try:
        for batch in progress(stream) if progress else stream:
            inputs, model_input["value"] = prepare_batch(batch)
            for head, svd in svds.items():
                need = max(ranks[m] for m in groups[head])
                ready = bool(svd.converged[:need].all())
                if ready and not done[head]:
                    svd.handle.remove()
                    svd.handle, done[head] = None, True
                elif done[head] and not ready:
                    svd.handle = by_name[head].module.register_forward_hook(
                        _Hook(by_name[head], svd.update, model_input, gather)
                    )
                    done[head] = False
            if all(done.values()):
                break
            forward_fn(model, inputs)
            if all(svd.state is not None for svd in svds.values()):
                ratios = {
                    n: svds[head_of[n]].state.explained_variance_ratio[: by_name[n].max_rank]  # type: ignore[union-attr]
                    for n in pool_order
                }
                ranks = EF.redistribute_ranks(ratios, budget, twins)
    finally:
        for svd in svds.values():
            if svd.handle is not None:
                svd.handle.remove()
    states = {head: svd.state for head, svd in svds.items() if svd.state is not None}
    return states, ranks, head_of


def move_to(inputs: Any, device: torch.device | None) -> Any:
    """``inputs`` (a tensor, a mapping or sequence of them, a BatchEncoding) on ``device``."""
    if device is None:
        return inputs
    if hasattr(inputs, "to") and not isinstance(inputs, nn.Module):
        return inputs.to(device)
    if isinstance(inputs, Mapping):
        return type(inputs)({k: move_to(v, device) for k, v in inputs.items()})  # type: ignore[call-arg]
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(move_to(v, device) for v in inputs)
    return inputs
