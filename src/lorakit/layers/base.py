"""What every LoRA layer shares: the per-adapter containers, activation, merging and mixed batches.

A LoRA layer wraps its ``base_layer`` and keeps one entry per adapter name in PEFT's containers
(``lora_A``, ``lora_B``, ``lora_dropout``, ``lora_embedding_A``, ``lora_embedding_B``,
``lora_magnitude_vector``), so state-dict keys and ``print(model)`` read as PEFT's. A layer kind
(linear, embedding, conv) supplies three things: how to create an adapter's factors, its
``ΔW`` and its low-rank branch; the bookkeeping here is the same for all of them.

State is explicit: ``active_adapters`` (what forward applies), ``merged_adapters`` (what is inside
the base weight; ``merged`` is derived from it) and ``disable_adapters``. ``forward`` never changes
state.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lorakit.errors import AdapterError
from lorakit.functional import lora as LF
from lorakit.layers.variants import DORA, LoraVariant
from lorakit.model import engines

BASE_ROWS = "__base__"  # the adapter name that means "no adapter" in a mixed batch

# The per-row adapter names of the model call in progress (PeftModel.forward / generate with
# adapter_names=...). A context variable reaches every layer without walking the module tree.
_ROW_ADAPTERS: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "lorakit_row_adapters", default=None
)


# How many row_adapters blocks are open (in any thread): while 0, forward reads no context variable,
# which torch.compile could not trace (a plain int global it guards on).
_OPEN_ROW_BLOCKS = 0


@contextlib.contextmanager
def row_adapters(names: Sequence[str]) -> Iterator[None]:
    """Within the block, LoRA layers give row ``i`` of each batch adapter ``names[i]``."""
    global _OPEN_ROW_BLOCKS
    token = _ROW_ADAPTERS.set(tuple(names))
    _OPEN_ROW_BLOCKS += 1
    try:
        yield
    finally:
        _OPEN_ROW_BLOCKS -= 1
        _ROW_ADAPTERS.reset(token)


def rows_for(x: torch.Tensor, explicit: Sequence[str] | None) -> list[str] | None:
    """The adapter name of each row of ``x``: ``explicit``, else the model call's, where a batch
    that is a multiple of the names (generate() with beams or several samples) repeats each name."""
    if explicit is not None:
        return list(explicit)
    if not _OPEN_ROW_BLOCKS:
        return None
    names = _ROW_ADAPTERS.get()
    if names is None:
        return None
    rows = x.shape[0] if x.dim() else 0
    if names and rows != len(names) and rows % len(names) == 0:
        return [n for n in names for _ in range(rows // len(names))]
    return list(names)


class LoraLayer(nn.Module, abc.ABC):
    """A base layer plus any number of named low-rank adapters.

    ``forward(x) = base_layer(x) + Σ_{a ∈ active, a ∉ merged} update_a(x)``, where a LoRA
    adapter's update is its low-rank branch and a variant's (DoRA) is what its strategy in
    ``lora_variant`` computes (see :mod:`lorakit.layers.variants`).

    Unmerging restores the base weight bit for bit: on the first merge the layer keeps a copy of the
    original weight (and bias) as a non-persistent buffer, so a merged layer costs one extra copy
    of its weight until it is unmerged; ``merge_and_unload`` does not keep it.
    """

    adapter_param_names = (
        "lora_A",
        "lora_B",
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
    )

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.lora_magnitude_vector = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_bias: dict[str, bool] = {}
        self.lora_variant: dict[str, LoraVariant] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        # The unsharded shape, to recognise a weight an engine has sharded since (see merge_problem).
        self.base_weight_shape = tuple(base_layer.weight.shape)
        self.register_buffer("_original_weight", None, persistent=False)
        self.register_buffer("_original_bias", None, persistent=False)

    # -- what a layer kind provides --------------------------------------------------------------
    @abc.abstractmethod
    def create_adapter(self, name: str, r: int, *, init: bool | str, lora_bias: bool) -> None:
        """Create adapter ``name``'s factors in this kind's containers and initialise them."""

    @abc.abstractmethod
    def delta_weight(self, name: str) -> torch.Tensor:
        """``ΔW`` of adapter ``name`` in float32, shaped like ``base_layer.weight``."""

    @abc.abstractmethod
    def lora_branch(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The adapter's contribution to the output for input ``x``."""

    out_axis = 0  # the axis of base_layer.weight that indexes output channels

    def base_without_bias(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's output for ``x`` computed with ``weight`` and without bias."""
        raise NotImplementedError(f"{type(self).__name__} does not support adapter variants (DoRA)")

    def magnitude_shape(self) -> tuple[int, ...]:
        """The shape of a per-output-channel vector as PEFT stores it (DoRA's magnitude)."""
        weight: torch.Tensor = self.base_layer.weight  # type: ignore[assignment]
        return (int(weight.shape[self.out_axis]),)

    def channel_view(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector ``v`` (C,) shaped to broadcast over an output ``like``
        whose channels are its last dimension (kinds with channels elsewhere override this)."""
        return v.reshape(-1)

    def original_weight(self) -> torch.Tensor:
        """The base weight as it is without any merged adapter (after any init that changed it)."""
        return self._original_weight if self._original_weight is not None else self.base_layer.weight

    def original_bias(self) -> torch.Tensor | None:
        if self._original_bias is not None:
            return self._original_bias
        return getattr(self.base_layer, "bias", None)

    def adapter_delta(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The change adapter ``name`` makes to the unmerged ``weight``, in float32: ``ΔW`` for
        LoRA, the variant's own for a variant."""
        variant = self.lora_variant.get(name)
        return self.delta_weight(name) if variant is None else variant.delta(self, name, weight)

    def add_branch(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """``result`` plus adapter ``name``'s branch (the sum is taken in the promoted dtype, as PEFT
        does). Kinds with a fused path override this; it must agree with :meth:`lora_branch`."""
        return result + self.lora_branch(x, name)

    def has_adapter(self, name: str) -> bool:
        return name in self.r

    # -- adapters --------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.r)

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (transformers reads ``.weight`` of some layers, e.g. tied embeddings)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        *,
        use_rslora: bool,
        dropout: float,
        init: bool | str,
        lora_bias: bool,
        use_dora: bool = False,
    ) -> None:
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = LF.scaling(alpha, r, use_rslora)
        self.lora_bias[name] = lora_bias
        self.lora_dropout[name] = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.create_adapter(name, r, init=init, lora_bias=lora_bias)
        self.place_adapter(name)
        if use_dora:
            DORA.init(self, name)
            self.lora_variant[name] = DORA

    def place_adapter(self, name: str, *, autocast_dtype: bool = True) -> None:
        """Move adapter ``name``'s factors to the base weight's device and pick their dtype.

        ``autocast_dtype=True`` (PEFT's ``autocast_adapter_dtype``): a float16/bfloat16 base keeps
        float32 factors, so small updates are not lost to rounding. ``False``: the factors take the
        base weight's dtype (less memory, PEFT's behaviour with ``autocast_adapter_dtype=False``).
        """
        weight = self.base_layer.weight
        keep_base = not autocast_dtype or weight.dtype in (torch.float32, torch.float64)
        dtype = weight.dtype if keep_base and weight.is_floating_point() else torch.float32
        for container in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            if name in container:
                container[name].to(device=weight.device, dtype=dtype)
        for pdict in (self.lora_embedding_A, self.lora_embedding_B):
            if name in pdict:
                pdict[name].data = pdict[name].data.to(device=weight.device, dtype=dtype)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged into the base weights; unmerge it first")
        for attr in ("lora_dropout",) + self.adapter_param_names:
            container = getattr(self, attr)
            if name in container:
                del container[name]
        for table in (self.r, self.lora_alpha, self.scaling, self.lora_bias, self.lora_variant):
            table.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: Sequence[str]) -> None:
        """Record the model's whole active list (as PEFT does), even names this layer lacks, so that
        every layer reports the same list; forward and merge skip the adapters it does not hold."""
        self.active_adapters = list(names)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for attr in self.adapter_param_names:
            container = getattr(self, attr)
            if name in container:
                item = container[name]
                params.extend(item.parameters() if isinstance(item, nn.Module) else [item])
        return params

    # -- merging ---------------------------------------------------------------------------------
    def merge_result_names(self, names: Sequence[str] | None) -> list[str]:
        """The adapters a merge of ``names`` (default: the active ones) would add to this layer."""
        return [
            n
            for n in (self.active_adapters if names is None else names)
            if self.has_adapter(n) and n not in self.merged_adapters
        ]

    def merge_problem(self, names: Sequence[str] | None = None) -> str | None:
        """Why merging ``names`` here is impossible, or ``None`` (checked before any weight changes)."""
        weight = self.base_layer.weight
        if engines.is_dtensor(weight) or tuple(weight.shape) != self.base_weight_shape:
            what = "a DTensor shard" if engines.is_dtensor(weight) else f"of shape {tuple(weight.shape)}"
            return (
                f"the base weight is sharded by a distributed engine ({what}, unsharded "
                f"{self.base_weight_shape}); merging it here would change only this rank's piece, or "
                "nothing. Use lorakit.distributed.merge_adapter (gathers under ZeRO-3), or load the "
                "saved adapter into an unsharded model and merge there"
            )
        with_bias = [n for n in self.merge_result_names(names) if self.lora_bias.get(n)]
        if with_bias and getattr(self.base_layer, "bias", None) is None:
            return (
                f"adapter(s) {with_bias} have lora_bias=True but the base "
                f"{type(self.base_layer).__name__} has no bias to merge it into"
            )
        return None

    def merge_result(
        self, names: Sequence[str] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The (weight, bias) the layer would hold after merging ``names``; ``None`` if nothing to do.

        ``W + Σ s·B·A`` is summed in float32 from the *original* weight over every adapter that
        would then be merged, and rounded once into the weight's dtype.
        """
        pending = self.merge_result_names(names)
        if not pending:
            return None
        weight = self.base_layer.weight
        original = self._original_weight if self._original_weight is not None else weight.detach()
        all_merged = self.merged_adapters + pending
        total = self.adapter_delta(all_merged[0], original)
        for name in all_merged[1:]:
            total = total + self.adapter_delta(name, original)
        return LF.merged_weight(original, total), self._merged_bias(all_merged)

    def merge(
        self, names: Sequence[str] | None = None, *, safe_merge: bool = False, keep_original: bool = True
    ) -> None:
        """Merge ``names`` (default: the active adapters) into the base weight.

        With ``safe_merge`` a non-finite result raises and changes nothing. With ``keep_original``
        (the default) the pre-merge weight is kept so that :meth:`unmerge` is exact.
        """
        problem = self.merge_problem(names)
        if problem:
            raise AdapterError(f"cannot merge: {problem}; the weights were left unchanged")
        pending = self.merge_result_names(names)
        result = self.merge_result(pending)
        if result is None:
            return
        new_weight, new_bias = result
        if safe_merge and not all(torch.isfinite(t).all() for t in result if t is not None):
            raise AdapterError(
                f"safe_merge: merging adapter(s) {pending} gives non-finite weights in "
                f"{type(self.base_layer).__name__}; the weights were left unchanged"
            )
        weight = self.base_layer.weight
        if keep_original and self._original_weight is None:
            self._original_weight = weight.detach().clone()
        # The bias may first change on a later merge (the first adapter with lora_bias).
        if keep_original and new_bias is not None and self._original_bias is None:
            self._original_bias = self.base_layer.bias.detach().clone()
        with torch.no_grad():
            weight.copy_(new_weight)
            if new_bias is not None:
                self.base_layer.bias.copy_(new_bias)
        self.merged_adapters.extend(pending)

    def _merged_bias(self, names: Sequence[str]) -> torch.Tensor | None:
        with_bias = [n for n in names if self.lora_bias.get(n) and n in self.lora_B]
        base_bias = getattr(self.base_layer, "bias", None)
        if not with_bias or base_bias is None:
            return None
        original = self._original_bias if self._original_bias is not None else base_bias.detach()
        total = sum(self.lora_B[n].bias.float() * self.scaling[n] for n in with_bias)
        return (original.float() + total).to(base_bias.dtype)

    def unmerge(self) -> None:
        """Restore the base weight (and bias) exactly as they were before the first merge."""
        if not self.merged_adapters:
            return
        if self._original_weight is None:
            raise AdapterError("this layer was merged without keeping its original weight; cannot unmerge")
        with torch.no_grad():
            self.base_layer.weight.copy_(self._original_weight)
            if self._original_bias is not None:
                self.base_layer.bias.copy_(self._original_bias)
        self._original_weight = None
        self._original_bias = None
        self.merged_adapters = []

    # -- forward ---------------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any
    ) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        adapter_names = rows_for(x, adapter_names)
        if adapter_names is not None:
            self._check_mixed(x, adapter_names)
            return self.add_mixed_(result, x, adapter_names)
        out_dtype = result.dtype
        pending = [n for n in self.active_adapters if n not in self.merged_adapters and self.has_adapter(n)]
        variants = [n for n in pending if n in self.lora_variant]
        base = result
        for name in variants:  # first, while ``result`` is still the pure base output
            result = self.lora_variant[name].add_update(
                self, result, base, x, name, consume_base=len(variants) == 1
            )
        for name in pending:
            if name not in self.lora_variant:
                result = self.add_branch(result, x, name)
        return result.to(out_dtype)

    def _check_mixed(self, x: torch.Tensor, adapter_names: Sequence[str]) -> None:
        if len(adapter_names) != x.shape[0]:
            raise AdapterError(
                f"adapter_names has {len(adapter_names)} entries but the batch has {x.shape[0]} rows"
            )
        if self.merged_adapters:
            raise AdapterError("adapter_names cannot be used while adapters are merged; unmerge first")

    def add_mixed_(self, result: torch.Tensor, x: torch.Tensor, adapter_names: Sequence[str]) -> torch.Tensor:
        """Row ``i`` of the batch gets adapter ``adapter_names[i]`` (``"__base__"``: none): each
        adapter's update runs once on its rows, added into ``result`` in place. Variants (DoRA)
        go first, while ``result`` still holds the pure base output of their rows."""
        names = [n for n in dict.fromkeys(adapter_names) if n != BASE_ROWS and self.has_adapter(n)]
        names.sort(key=lambda n: n not in self.lora_variant)
        for name in names:
            rows = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=x.device)
            x_rows = x.index_select(0, rows)
            variant = self.lora_variant.get(name)
            if variant is None:
                sub = self.lora_branch(x_rows, name)
            else:
                sub = variant.rows_update(self, result.index_select(0, rows), x_rows, name)
            result.index_add_(0, rows, sub.to(result.dtype))
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
