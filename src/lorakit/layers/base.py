"""What every LoRA layer shares, and the contract a layer kind fulfils.

A LoRA layer wraps its ``base_layer`` and keeps one entry per adapter name in PEFT's containers
(:data:`CONTAINERS`), so state-dict keys and ``print(model)`` read as PEFT's. State is explicit:
``active_adapters`` (what forward applies), ``merged_adapters`` (what is inside the base weight;
``merged`` is derived from it) and ``disable_adapters``. ``forward`` never changes state.

**A layer kind** (linear, embedding, convolution, ...) is a subclass that provides:

=========================  =====================================================================
must                       ``create_adapter`` (A, B in ``factor_containers``, initialised),
                           ``delta_weight`` (ΔW, float32, shaped like the base weight),
                           ``lora_branch`` (the adapter's output for an input)
may                        ``option_problems`` / ``rank_problems`` (what it refuses, before
                           anything changes), ``merge_problem`` / ``combine_problem`` (merges and
                           adapter combinations it cannot form),
                           ``is_linear`` (counts for ``target_modules="all-linear"``),
                           ``stores_input_first`` (the weight is (k × d): ``fan_in_fan_out``),
                           ``to_matrix`` (ΔW as a (d × k) matrix, for SVDs),
                           ``rank_blocks`` (A's rank axis is split per group of B),
                           ``add_branch`` / ``add_mixed_`` / ``forward`` (faster equal paths)
for variants (DoRA)        ``out_axis``, ``base_without_bias``, ``magnitude_shape``,
                           ``channel_view``, ``norm_delta`` (see
                           :class:`lorakit.layers.variant.VariantHost`)
for weights that are not   ``dense_weight`` / ``write_base`` (read and write the weight as a
plain tensors              dense float tensor), ``keep_base`` / ``restore_base`` (what a merge
(quantized kinds)          keeps so that unmerging is exact), ``base_output`` (the base's output,
                           merged adapters included), ``unloaded`` (what replaces the layer on
                           unload), ``merge_problem``, ``is_quantized`` (the stored weight is not
                           the dense one: the base fingerprint leaves it out), ``base_summary``
                           (what ``lorakit.inspect`` lists)
for bases with children    ``bypassed_children`` (children the base never calls: not targets of
that hold weights          their own), ``throwaway`` (a layer that changes nothing the caller
                           holds, for planning)
=========================  =====================================================================

and is registered in :mod:`lorakit.layers.registry`. Nothing outside the kind's file tests its
type: model operations, persistence and hot-swapping go through this contract.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from lorakit.config import LOAD_ONLY_INITS, moves_base_weight, parse_init
from lorakit.errors import AdapterError, AdapterMergeError
from lorakit.functional import lora as LF
from lorakit.layers.rows import BASE_ROWS, rows_for
from lorakit.layers.tuner_layer import BaseTunerLayer
from lorakit.layers.variant import LoraVariant

__all__ = ["LoraLayer", "CONTAINERS", "RequantizeReport"]

# PEFT's per-adapter containers, in PEFT's attribute order (it shows in print(model)).
CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


@dataclasses.dataclass(frozen=True)
class RequantizeReport:
    """What re-quantizing one merged layer lost.

    ``relative_error = ‖q(W') − W'‖_F / ‖ΔW‖_F``: the weight error re-quantization caused, as a
    fraction of the update that was merged (1.0: as large as the fine-tune itself)."""

    name: str
    relative_error: float
    update_norm: float


class LoraLayer(nn.Module, BaseTunerLayer):
    """A base layer plus any number of named low-rank adapters.

    ``forward(x) = base_layer(x) + Σ_{a ∈ active, a ∉ merged} update_a(x)``, where a LoRA
    adapter's update is its low-rank branch and a variant's is what its strategy computes.

    Unmerging restores the base weight bit for bit: on the first merge the layer keeps a copy of the
    original weight (and bias) as a non-persistent buffer, so a merged layer costs one extra copy
    of its weight until it is unmerged; ``merge_and_unload`` does not keep it.
    """

    _original_weight: torch.Tensor | None  # buffers, registered in __init__
    _original_bias: torch.Tensor | None
    adapter_param_names: ClassVar[tuple[str, ...]] = CONTAINERS
    # PEFT's names for the per-adapter containers and the per-adapter tables (code that cleans up
    # or inspects adapters walks them)
    adapter_layer_names: ClassVar[tuple[str, ...]] = CONTAINERS
    other_param_names: ClassVar[tuple[str, ...]] = ("r", "lora_alpha", "scaling", "lora_dropout")
    factor_containers: ClassVar[tuple[str, str]] = ("lora_A", "lora_B")
    is_linear: ClassVar[bool] = False
    is_quantized: ClassVar[bool] = False
    out_axis: int = 0  # the axis of the base weight that indexes output channels
    # A's rank axis is split into this many equal blocks, block g feeding group g of B (B's rank
    # axis then holds r / rank_blocks): grouped convolutions. Rank padding keeps the blocks apart.
    rank_blocks: int = 1

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
        self.use_dora: dict[str, bool] = {}  # PEFT's table: adapter name → whether it is DoRA
        self.frozen_factors: dict[str, tuple[str, ...]] = {}  # containers that never train (MiCA's B)
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        # The unsharded shape, to recognise a weight an engine has sharded since (model.engines).
        self.base_weight_shape = tuple(self.dense_weight().shape)
        self.register_buffer("_original_weight", None, persistent=False)
        self.register_buffer("_original_bias", None, persistent=False)

    # -- what a layer kind provides --------------------------------------------------------------
    @abc.abstractmethod
    def create_adapter(self, name: str, r: int, *, init: bool | str, lora_bias: bool) -> None:
        """Create adapter ``name``'s factors in this kind's containers and initialise them."""

    @abc.abstractmethod
    def delta_weight(self, name: str) -> torch.Tensor:
        """``ΔW`` of adapter ``name`` in float32, shaped like the base weight (a kind whose update
        does not fit its base weight's shape refuses merging and documents the shape it returns)."""

    @abc.abstractmethod
    def lora_branch(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """The adapter's contribution to the output for input ``x``."""

    @classmethod
    def option_problems(
        cls, base: nn.Module, *, init: bool | str, lora_bias: bool, variant: LoraVariant | None
    ) -> list[str]:
        """Why this kind cannot wrap ``base`` with these options (empty: it can)."""
        return []

    @classmethod
    def rank_problems(cls, base: nn.Module, r: int) -> list[str]:
        """Why this kind cannot give ``base`` an adapter of rank ``r`` (empty: it can)."""
        return []

    @classmethod
    def bypassed_children(cls, base: nn.Module) -> list[str]:
        """Names of children of ``base`` whose forward ``base`` never calls (it reads their weights
        itself), so that an adapter on one of them alone would change nothing: targeting neither
        selects them for ``"all-linear"`` nor accepts them by name."""
        return []

    @classmethod
    def throwaway(cls, base: nn.Module) -> LoraLayer:
        """A layer around ``base`` that changes nothing the caller holds, to measure the shapes an
        adapter would have. Kinds that replace children of their base build it on a copy."""
        return cls(base)

    @classmethod
    def base_summary(cls, base: nn.Module) -> tuple[tuple[int, ...], int]:
        """(weight shape, parameter count) of ``base`` as ``lorakit.inspect`` lists it."""
        weight: torch.Tensor = base.weight  # type: ignore[assignment]
        return tuple(weight.shape), sum(p.numel() for p in base.parameters(recurse=False))

    @classmethod
    def stores_input_first(cls, base: nn.Module) -> bool | None:
        """Whether ``base`` stores its weight input-first (``None``: the notion does not apply)."""
        return None

    def to_matrix(self, weight_like: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like the base weight as the (d × k) matrix that ``B A`` is."""
        return weight_like

    def norm_delta(self, name: str) -> torch.Tensor:
        """The ΔW that DoRA adds to the base weight before taking channel norms, shaped like the base
        weight (ΔW itself, unless the kind's ΔW has another shape)."""
        return self.delta_weight(name)

    def combine_problem(self, combination_type: str) -> str | None:
        """Why adapter arithmetic cannot form a ``combination_type`` combination on this layer, or
        ``None``."""
        return None

    def base_without_bias(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The base layer's output for ``x`` computed with ``weight`` and without bias."""
        raise AdapterError(f"{type(self).__name__} does not support adapter variants (DoRA)")

    def magnitude_shape(self) -> tuple[int, ...]:
        """The shape of a per-output-channel vector as PEFT stores it (DoRA's magnitude)."""
        return (int(self.dense_weight().shape[self.out_axis]),)

    def channel_view(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A per-output-channel vector ``v`` (C,) shaped to broadcast over an output ``like``
        whose channels are its last dimension (kinds with channels elsewhere override this)."""
        return v.reshape(-1)

    def add_branch(self, result: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """``result`` plus adapter ``name``'s branch (the sum is taken in the promoted dtype, as PEFT
        does). Kinds with a faster path override this; it must agree with :meth:`lora_branch`."""
        return result + self.lora_branch(x, name)

    # -- the base weight (kinds whose weight is not a plain tensor override these) ---------------
    def dense_weight(self) -> torch.Tensor:
        """The base weight as a dense floating tensor (quantized kinds dequantize it)."""
        weight: torch.Tensor = self.base_layer.weight  # type: ignore[assignment]
        return weight

    def base_bias(self) -> torch.Tensor | None:
        bias = getattr(self.base_layer, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    def write_base(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Store ``weight`` (and ``bias``, if given) as the base layer's, in place."""
        with torch.no_grad():
            self.dense_weight().copy_(weight)
            base_bias = self.base_bias()
            if bias is not None and base_bias is not None:
                base_bias.copy_(bias)

    def keep_base(self, new_bias: torch.Tensor | None) -> None:
        """Before a merge writes: keep what :meth:`restore_base` needs to undo every merge exactly
        (a copy of the weight on the first merge, of the bias on the first merge that changes it)."""
        if self._original_weight is None:
            self._original_weight = self.dense_weight().detach().clone()
        base_bias = self.base_bias()
        if new_bias is not None and self._original_bias is None and base_bias is not None:
            self._original_bias = base_bias.detach().clone()

    def restore_base(self) -> None:
        """Put back the weight and bias :meth:`keep_base` kept, and drop the copies."""
        if self._original_weight is None:
            raise AdapterError("this layer was merged without keeping its original weight; cannot unmerge")
        self.write_base(self._original_weight, self._original_bias)
        self._original_weight = None
        self._original_bias = None

    def requantized(self, name: str = "") -> tuple[nn.Module, RequantizeReport]:
        """For quantized kinds (``is_quantized``): the lossy merge, asked for explicitly (a new
        quantized base storing the merged weight, and what that lost). Others have nothing to
        re-quantize."""
        raise AdapterError(f"{name or type(self).__name__}: its base weight is not quantized")

    def base_output(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer's output for ``x``, merged adapters included."""
        result: torch.Tensor = self.base_layer(x, *args, **kwargs)
        return result

    def unloaded(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The module that takes this layer's place when LoRA is removed (merged or not).

        ``dtype`` is the floating dtype of the model around the layer, for kinds that must build a
        new dense module (a merged quantized layer); the others ignore it."""
        return self.base_layer

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
        return self.dense_weight()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_bias()

    def has_adapter(self, name: str) -> bool:
        return name in self.r

    # -- PEFT's layer interface (BaseTunerLayer) ---------------------------------------------------
    def get_base_layer(self) -> nn.Module:
        base: nn.Module = self.base_layer
        while isinstance(base, LoraLayer):
            base = base.base_layer
        return base

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapters' names, as a list (PEFT's layers give the list once any adapter
        was set; the model-level ``active_adapter`` is the single name)."""
        return list(self.active_adapters)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """PEFT's name for ``ΔW`` of a LoRA adapter, in the base weight's dtype and shape."""
        return self.delta_weight(adapter).to(self.dense_weight().dtype)

    def enable_adapters(self, enabled: bool) -> None:
        """As PEFT: disabling freezes every adapter here; enabling re-applies :meth:`set_adapter`
        to the active adapters (they become trainable, the others frozen)."""
        if enabled:
            self.set_adapter(self.active_adapters)
            self.disable_adapters = False
        else:
            self.set_requires_grad(self.adapter_names, False)
            self.disable_adapters = True

    def set_adapter(self, adapter_names: str | Sequence[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.set_active(names)
        for name in self.adapter_names:
            self.set_requires_grad(name, name in names and not inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            for param in self.adapter_parameters(name):
                param.requires_grad_(False)
            if requires_grad:  # frozen factors (MiCA's B) never train
                for param in self.trainable_parameters(name):
                    param.requires_grad_(True)

    def container(self, name: str) -> nn.ModuleDict:
        """One of PEFT's per-adapter containers (:data:`CONTAINERS`) by attribute name."""
        holder = getattr(self, name)
        if not isinstance(holder, nn.ModuleDict):
            raise AdapterError(f"{name!r} is not a module container of {type(self).__name__}")
        return holder

    def original_weight(self) -> torch.Tensor:
        """The base weight as it is without any merged adapter (after any init that changed it)."""
        return self._original_weight if self._original_weight is not None else self.dense_weight()

    def original_bias(self) -> torch.Tensor | None:
        return self._original_bias if self._original_bias is not None else self.base_bias()

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
        variant: LoraVariant | None = None,
        meta: bool = False,
    ) -> None:
        """Create adapter ``name``. ``meta=True`` (``low_cpu_mem_usage``): its tensors (a variant's
        too) are created on the meta device, uninitialised, for a load to fill; an init that
        rewrites the base weight (PiSSA, OLoRA) runs for real instead."""
        self.r[name] = r
        self.lora_alpha[name] = alpha
        self.scaling[name] = LF.scaling(alpha, r, use_rslora)
        self.lora_bias[name] = lora_bias
        self.use_dora[name] = variant is not None and variant.name == "DoRA"
        self.lora_dropout[name] = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        kind = (parse_init(init) or ("default", None))[0]
        if kind in LOAD_ONLY_INITS:  # lorakit does not compute these: the factors come from a file
            init = True
        if kind == "mica":  # MiCA keeps B (the minor singular vectors) frozen and trains A, as PEFT
            self.frozen_factors[name] = (self.factor_containers[1],)
        if meta and not moves_base_weight(init):
            with torch.device("meta"):
                self.create_adapter(name, r, init=False, lora_bias=lora_bias)
            if variant is not None:
                variant.init(self, name, empty=True)
                self.lora_variant[name] = variant
            return
        self.create_adapter(name, r, init=init, lora_bias=lora_bias)
        self.place_adapter(name)
        if variant is not None:
            variant.init(self, name)
            self.lora_variant[name] = variant

    def place_adapter(self, name: str, *, autocast_dtype: bool = True) -> None:
        """Move adapter ``name``'s tensors to the base weight's device and pick their dtype.

        ``autocast_dtype=True`` (PEFT's ``autocast_adapter_dtype``): a float16/bfloat16 base keeps
        float32 factors, so small updates are not lost to rounding. ``False``: the factors take the
        base weight's dtype (less memory, PEFT's behaviour with ``autocast_adapter_dtype=False``).
        """
        weight = self.dense_weight()
        keep_base = not autocast_dtype or weight.dtype in (torch.float32, torch.float64)
        dtype = weight.dtype if keep_base and weight.is_floating_point() else torch.float32
        for attr in self.adapter_param_names:
            holder = getattr(self, attr)
            if name not in holder or any(p.is_meta for p in self._holder_params(holder, name)):
                continue  # a meta tensor has no data to move; loading gives it some
            if isinstance(holder, nn.ParameterDict):
                holder[name].data = holder[name].data.to(device=weight.device, dtype=dtype)
            else:
                holder[name].to(device=weight.device, dtype=dtype)

    @staticmethod
    def _holder_params(holder: nn.Module, name: str) -> list[torch.Tensor]:
        item = holder[name]  # type: ignore[index]
        return list(item.parameters()) if isinstance(item, nn.Module) else [item]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged into the base weights; unmerge it first")
        for attr in ("lora_dropout", *self.adapter_param_names):
            holder = getattr(self, attr)
            if name in holder:
                del holder[name]
        for table in (
            self.r,
            self.lora_alpha,
            self.scaling,
            self.lora_bias,
            self.lora_variant,
            self.use_dora,
        ):
            table.pop(name, None)
        self.frozen_factors.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: Sequence[str]) -> None:
        """Record the model's whole active list (as PEFT does), even names this layer lacks, so that
        every layer reports the same list; forward and merge skip the adapters it does not hold."""
        self.active_adapters = list(names)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params: list[nn.Parameter] = []
        for attr in self.adapter_param_names:
            holder = getattr(self, attr)
            if name in holder:
                item = holder[name]
                params.extend(item.parameters() if isinstance(item, nn.Module) else [item])
        return params

    def trainable_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters of adapter ``name`` that train when it is trainable (all but frozen
        factors, such as MiCA's B)."""
        frozen = self.frozen_factors.get(name, ())
        params: list[nn.Parameter] = []
        for attr in self.adapter_param_names:
            holder = getattr(self, attr)
            if name in holder and attr not in frozen:
                item = holder[name]
                params.extend(item.parameters() if isinstance(item, nn.Module) else [item])
        return params

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors under their PEFT file keys relative to this layer
        (``lora_A.weight``, ``lora_embedding_A``, ...; a variant names its own)."""
        variant = self.lora_variant.get(name)
        tensors: dict[str, torch.Tensor] = {}
        for attr in self.adapter_param_names:
            holder = getattr(self, attr)
            if name not in holder:
                continue
            if variant is not None and attr == variant.container:
                tensors.update(variant.tensors(self, name))
            elif isinstance(holder, nn.ParameterDict):
                tensors[attr] = holder[name]
            else:
                tensors.update({f"{attr}.{k}": t for k, t in holder[name].state_dict(keep_vars=True).items()})
        return tensors

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of adapter ``name`` as live parameters: A's rank is its axis 0, B's its axis 1."""
        a_attr, b_attr = self.factor_containers
        return self._factor(a_attr, name), self._factor(b_attr, name)

    def dropout_p(self, name: str) -> float:
        """Adapter ``name``'s dropout probability (0 when it has none)."""
        dropout = self.lora_dropout[name]
        return float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0

    def lora_b_bias(self, name: str) -> torch.Tensor | None:
        """Adapter ``name``'s LoRA bias (on B, ``lora_bias=True``), or ``None``."""
        bias = getattr(self.lora_B[name], "bias", None) if name in self.lora_B else None
        return bias if isinstance(bias, torch.Tensor) else None

    def _factor(self, attr: str, name: str) -> torch.Tensor:
        item = getattr(self, attr)[name]
        return item if isinstance(item, nn.Parameter) else item.weight

    def set_alpha(self, name: str, alpha: float, *, use_rslora: bool) -> None:
        """Give adapter ``name`` a new ``lora_alpha`` (and the scaling for its current rank)."""
        self.lora_alpha[name] = alpha
        self.scaling[name] = LF.scaling(alpha, self.r[name], use_rslora)

    def set_factors(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Replace adapter ``name``'s factors by new tensors (of any rank), as new parameters that
        keep ``requires_grad``; ``r`` is updated, the scaling is kept."""
        for attr, new in zip(self.factor_containers, (a, b), strict=True):
            holder = getattr(self, attr)
            param = nn.Parameter(new, requires_grad=self._factor(attr, name).requires_grad)
            if isinstance(holder, nn.ParameterDict):
                holder[name] = param
            else:
                holder[name].weight = param
                _sync_shape_attributes(holder[name])
        self.r[name] = int(a.shape[0])

    # -- merging ---------------------------------------------------------------------------------
    def adapter_delta(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """The change adapter ``name`` makes to the unmerged ``weight``, in float32: ``ΔW`` for
        LoRA, the variant's own for a variant."""
        variant = self.lora_variant.get(name)
        return self.delta_weight(name) if variant is None else variant.delta(self, name, weight)

    def merge_result_names(self, names: Sequence[str] | None) -> list[str]:
        """The adapters a merge of ``names`` (default: the active ones) would add to this layer."""
        wanted = self.active_adapters if names is None else names
        return [n for n in wanted if self.has_adapter(n) and n not in self.merged_adapters]

    def merge_problem(self, names: Sequence[str] | None = None) -> str | None:
        """Why merging ``names`` here is impossible, or ``None`` (checked before any weight changes)."""
        with_bias = [n for n in self.merge_result_names(names) if self.lora_bias.get(n)]
        if with_bias and self.base_bias() is None:
            return (
                "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias: "
                f"adapter(s) {with_bias} have lora_bias=True but the base {type(self.base_layer).__name__} "
                "has none"
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
        original = self.original_weight().detach()
        all_merged = self.merged_adapters + pending
        total = self.adapter_delta(all_merged[0], original)
        for name in all_merged[1:]:
            total = total + self.adapter_delta(name, original)
        return LF.merged_weight(original, total), self._merged_bias(all_merged)

    def merge(
        self,
        adapter_names: Sequence[str] | None = None,
        *,
        safe_merge: bool = False,
        keep_original: bool = True,
    ) -> None:
        """Merge ``adapter_names`` (default: the active adapters) into the base weight.

        With ``safe_merge`` a non-finite result raises and changes nothing. With ``keep_original``
        (the default) the pre-merge weight is kept so that :meth:`unmerge` is exact.
        """
        if isinstance(adapter_names, (str, bool)):
            raise TypeError(
                f"adapter_names={adapter_names!r}: expected a list of adapter names or None "
                "(safe_merge is a keyword argument)"
            )
        names = adapter_names
        problem = self.merge_problem(names)
        if problem:
            raise AdapterMergeError(f"cannot merge: {problem}; the weights were left unchanged")
        pending = self.merge_result_names(names)
        result = self.merge_result(pending)
        if result is None:
            return
        new_weight, new_bias = result
        if safe_merge and not all(torch.isfinite(t).all() for t in result if t is not None):
            raise AdapterError(
                f"NaNs detected in the merged weights. The adapter {', '.join(pending)} seems to be broken "
                f"(safe_merge: merging gives non-finite weights in {type(self.base_layer).__name__}; the "
                "weights were left unchanged)"
            )
        if keep_original:  # the bias may first change on a later merge (the first with lora_bias)
            self.keep_base(new_bias)
        self.write_base(new_weight, new_bias)
        self.merged_adapters.extend(pending)

    def follow_merge(self, leader: LoraLayer, names: Sequence[str]) -> None:
        """Record that ``leader``, which shares this layer's base weight and the factors of ``names``
        (an embedding and its tied output head), merged ``names`` into that weight: nothing is
        written, and unmerging restores the same original as the leader's."""
        self._original_weight = leader._original_weight
        self._original_bias = leader._original_bias
        self.merged_adapters.extend(n for n in names if n not in self.merged_adapters)

    def _merged_bias(self, names: Sequence[str]) -> torch.Tensor | None:
        with_bias = [n for n in names if self.lora_bias.get(n) and n in self.lora_B]
        base_bias = self.base_bias()
        if not with_bias or base_bias is None:
            return None
        original = self.original_bias()
        assert original is not None  # the base has a bias, so the original one exists
        total = original.detach().float()
        for n in with_bias:
            total = total + self.lora_b_bias(n).float() * self.scaling[n]  # type: ignore[union-attr]
        return total.to(base_bias.dtype)

    def unmerge(self) -> None:
        """Restore the base weight (and bias) exactly as they were before the first merge."""
        if not self.merged_adapters:
            return
        self.restore_base()
        self.merged_adapters = []

    # -- forward ---------------------------------------------------------------------------------
    def pending_adapters(self) -> list[str]:
        """The active adapters forward must still add (held here and not merged)."""
        return [n for n in self.active_adapters if n not in self.merged_adapters and self.has_adapter(n)]

    def forward(
        self, x: torch.Tensor, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any
    ) -> torch.Tensor:
        result = self.base_output(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        rows = rows_for(x, adapter_names)
        if rows is not None:
            self._check_mixed(x, rows)
            return self.add_mixed_(result, x, rows)
        out_dtype = result.dtype
        pending = self.pending_adapters()
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
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {x.shape[0]} respectively"
            )
        if self.merged_adapters:
            raise AdapterError(
                "Cannot pass `adapter_names` when there are merged adapters, please call "
                "`unmerge_adapter` first."
            )

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


def _sync_shape_attributes(module: nn.Module) -> None:
    """Keep a factor module's size attributes (``in_features``, ``out_channels``, ...) true to its
    new weight (``repr`` and ``state_dict`` users read them)."""
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = int(weight.shape[0]), int(weight.shape[1])
    elif isinstance(module, nn.modules.conv._ConvNd):
        module.out_channels, module.in_channels = int(weight.shape[0]), int(weight.shape[1]) * module.groups
