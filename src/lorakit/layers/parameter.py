"""LoRA on a parameter (``target_parameters``): the experts of mixture-of-experts layers, or any
matrix that a module reads inside its own forward.

transformers keeps the experts of an MoE layer as 3-D parameters of one experts module (e.g.
``mlp.experts.gate_up_proj``), which ``target_modules`` cannot reach. A :class:`ParamWrapper`
replaces the module and adapts one of its parameters; a second targeted parameter of the same module
gets a second wrapper around the first, as in PEFT, so that state-dict keys are PEFT's:
``experts.lora_A.weight`` for the outer (last registered) parameter, ``experts.base_layer.lora_A.weight``
for the inner one.

Each expert e of a weight W (E, d, k) gets ``ΔW_e = s · B_e A_e`` in PEFT's stacked layout
(:mod:`lorakit.functional.experts`). Orientation follows PEFT's rule: the stack is (experts, out, in)
unless the experts module says ``is_transposed = True`` (GPT-OSS, Aria: (experts, in, out)); a 2-D
parameter is one (out, in) matrix. The update is applied while the module's forward runs, through a
:class:`~lorakit.layers.lowrank_weight.LowRankWeight` standing in for the parameter: each matrix
product the forward makes adds ``s · B_e (A_e · dropout(x))`` for the rows of each expert, whatever
experts implementation the model uses (eager loop, batched or grouped products), and never forms ΔW.

Beyond PEFT (which refuses both on parameters): dropout (on the input of each product with the
weight, as ``lora_dropout`` does for a linear layer) and mixed-adapter batches (the experts run once
per adapter on that adapter's tokens).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lorakit.config import parse_init
from lorakit.errors import AdapterError
from lorakit.functional import experts as FE
from lorakit.functional import lora as LF
from lorakit.layers.base import LoraLayer
from lorakit.layers.lowrank_weight import LowRankWeight, Term
from lorakit.layers.rows import BASE_ROWS, row_adapters, rows_for
from lorakit.layers.variant import LoraVariant

__all__ = ["ParamWrapper", "is_adaptable_parameter", "wrapper_chain", "EXPERTS_IMPLEMENTATIONS"]

# transformers' experts implementations (``config._experts_implementation``) whose products lorakit
# follows; the others ("deepgemm", "sonicmoe") hand the raw weight to a kernel, which would not
# apply the adapter.
EXPERTS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")

# Experts modules whose parameters are read outside their own forward (by the parent module), where
# no wrapper can act: LoRA on them is refused at injection.
_READ_BY_PARENT = {
    "DbrxExpertGLU": "DbrxExperts reads w1/v1/w2 of its child DbrxExpertGLU before calling it",
}


def is_adaptable_parameter(owner: nn.Module, name: str) -> bool:
    """A floating 2-D matrix or 3-D stack of expert matrices registered directly on ``owner``
    (not a stack of biases such as GPT-OSS's ``gate_up_proj_bias``: a low-rank change to a bias
    is not LoRA)."""
    param = owner._parameters.get(name)
    return (
        isinstance(param, torch.Tensor)
        and param.dim() in (2, 3)
        and param.is_floating_point()
        and not name.endswith("bias")
    )


class ParamWrapper(LoraLayer):
    """LoRA on parameter ``parameter_name`` of the module under ``base_layer`` (directly, or under
    wrappers of its other parameters). ``lora_A`` is ``Linear(in, r·E)`` and ``lora_B``
    ``Linear(r·E, out)``, E the number of experts (1 for a 2-D parameter)."""

    def __init__(self, base_layer: nn.Module, parameter_name: str) -> None:
        self.parameter_name = parameter_name  # before LoraLayer.__init__, which reads the weight
        super().__init__(base_layer)
        shape = tuple(self.dense_weight().shape)
        self.num_experts = shape[0] if len(shape) == 3 else 1
        self.is_transposed = len(shape) == 3 and bool(getattr(self.owner(), "is_transposed", False))
        if len(shape) == 2:
            self.out_features, self.in_features = shape
        elif self.is_transposed:
            self.in_features, self.out_features = shape[1], shape[2]
        else:
            self.out_features, self.in_features = shape[1], shape[2]

    @classmethod
    def parameter_problems(
        cls,
        owner: nn.Module,
        name: str,
        *,
        init: bool | str,
        lora_bias: bool,
        variant: LoraVariant | None,
    ) -> list[str]:
        """Why parameter ``name`` of ``owner`` cannot be adapted with these options (empty: it can)."""
        problems = []
        param = owner._parameters.get(name)
        if not is_adaptable_parameter(owner, name):
            shape = None if param is None else tuple(param.shape)
            problems.append(
                f"a parameter needs to be a floating 2-D matrix or 3-D stack of experts (not a bias), "
                f"got shape {shape}"
            )
        if lora_bias:
            problems.append("lora_bias=True is not supported on parameters (as in PEFT)")
        if variant is not None:
            problems.append(f"{variant.name} is not supported on parameters (as in PEFT)")
        kind = (parse_init(init) or ("?", None))[0]
        if kind not in ("default", "none", "gaussian"):
            problems.append(
                f"init_lora_weights={init!r} is not supported on parameters (True, False or 'gaussian')"
            )
        if getattr(owner, "_is_expert_parallel", False):
            problems.append("expert-parallel experts (each rank holding some experts) are not supported")
        reason = _READ_BY_PARENT.get(type(owner).__name__)
        if reason:
            problems.append(f"{reason}: LoRA on these parameters cannot be applied (nor can PEFT's)")
        return problems

    def owner(self) -> nn.Module:
        """The module that holds the parameter (under any wrappers of its other parameters)."""
        return wrapper_chain(self.base_layer)[1]

    # -- the base weight -------------------------------------------------------------------------
    def dense_weight(self) -> torch.Tensor:
        value = self.owner()._parameters[self.parameter_name]
        assert value is not None  # checked by parameter_problems before wrapping
        return value.plain if isinstance(value, LowRankWeight) else value

    def base_bias(self) -> torch.Tensor | None:
        return None  # expert biases (GPT-OSS) are parameters of their own, not this weight's

    def unloaded(self, dtype: torch.dtype | None = None) -> nn.Module:
        return (
            self.base_layer.unloaded(dtype) if isinstance(self.base_layer, ParamWrapper) else self.base_layer
        )

    def to_matrix(self, weight_like: torch.Tensor) -> torch.Tensor:
        if weight_like.dim() != 2:
            raise AdapterError(
                f"the change to {self.parameter_name} is a stack of {self.num_experts} expert matrices, "
                "not one matrix"
            )
        return weight_like

    # -- adapters --------------------------------------------------------------------------------
    def create_adapter(self, name: str, r: int, *, init: bool | str, lora_bias: bool) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r * self.num_experts, bias=False)
        self.lora_B[name] = nn.Linear(r * self.num_experts, self.out_features, bias=False)
        a, b = self.factors(name)
        LF.init_lora_linear_(a, b, init, r)

    def set_factors(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Replace the factors, at the same shapes when there are several experts: their ranks
        interleave in one tensor (PEFT's layout), so a new rank would mix experts."""
        if self.num_experts == 1:
            super().set_factors(name, a, b)
            return
        old_a, old_b = self.factors(name)
        old = (tuple(old_a.shape), tuple(old_b.shape))
        if (tuple(a.shape), tuple(b.shape)) != old:
            raise AdapterError(
                f"cannot give adapter {name!r} on {self.parameter_name} factors of shapes "
                f"{tuple(a.shape)}, {tuple(b.shape)}: its {self.num_experts} experts' factors are stacked "
                f"in tensors of shapes {old[0]}, {old[1]}"
            )
        r = self.r[name]
        super().set_factors(name, a, b)
        self.r[name] = r

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW in the parameter's own layout, float32: (d, k), (E, out, in) or (E, in, out)."""
        a, b = self.factors(name)
        s = self.scaling[name]
        if self.dense_weight().dim() == 2:
            return LF.linear_delta(a, b, s)
        delta = FE.expert_delta(a, b, self.num_experts, s)  # (E, out, in)
        return delta.transpose(-2, -1) if self.is_transposed else delta

    def lora_branch(self, x: torch.Tensor, name: str) -> torch.Tensor:
        raise AdapterError(
            f"LoRA on the parameter {self.parameter_name} acts inside {type(self.owner()).__name__}'s "
            "forward; it has no output of its own to add"
        )

    def term(self, name: str) -> Term:
        """Adapter ``name``'s change to the weight, as factors in the weight's own layout."""
        a, b = self.factors(name)
        p = self.dropout_p(name) if self.training else 0.0
        if self.dense_weight().dim() == 2:
            return Term(a, b, self.scaling[name], p)
        a_e, b_e = FE.expert_factors(a, b, self.num_experts)  # (E, r, in), (E, out, r)
        term = Term(a_e, b_e, self.scaling[name], p)  # ΔW_e = s · B_e A_e: (out, in)
        return term.transposed() if self.is_transposed else term

    # -- forward ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def adapted(self, names: Sequence[str]) -> Iterator[None]:
        """Within the block the owner's forward sees the parameter with adapters ``names`` applied."""
        if not names:
            yield
            return
        owner = self.owner()
        _check_implementation(owner)
        param = owner._parameters[self.parameter_name]
        assert param is not None  # checked by parameter_problems before wrapping
        label = f"{type(owner).__name__}.{self.parameter_name}"
        # The stand-in is a tensor, not a Parameter: it exists only while the forward runs.
        stand_in = LowRankWeight(param, [self.term(n) for n in names], label)
        owner._parameters[self.parameter_name] = stand_in  # type: ignore[assignment]
        try:
            yield
        finally:
            owner._parameters[self.parameter_name] = param

    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        if self.disable_adapters:
            return self.base_layer(*args, **kwargs)
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        rows = None if x is None else rows_for(x, adapter_names)
        if rows is not None:
            assert x is not None
            return self._forward_mixed(rows, x, args, kwargs)
        with self.adapted(self.pending_adapters()):
            return self.base_layer(*args, **kwargs)

    def _forward_mixed(self, rows: Sequence[str], x: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        """Row i gets adapter ``rows[i]``: the module runs once per adapter on that adapter's rows
        (the arguments whose first axis has one entry per row are split alike)."""
        n = x.shape[0]
        if len(rows) != n:
            raise AdapterError(f"adapter_names has {len(rows)} entries but the batch has {n} rows")
        if self.merged_adapters:
            raise AdapterError("adapter_names cannot be used while adapters are merged; unmerge first")
        owner = self.owner()
        if not _rows_are_tokens(owner):
            raise AdapterError(
                f"adapter_names needs a module whose rows are tokens, called as (hidden_states, "
                f"top_k_index, top_k_weights); {type(owner).__name__} is not"
            )
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(rows):
            groups.setdefault(name, []).append(i)
        if len(groups) == 1:
            return self._call_for(next(iter(groups)), n, args, kwargs)
        out: torch.Tensor | None = None
        for name, members in groups.items():
            index = torch.tensor(members, device=x.device)
            sub_args = [_take(a, index, n) for a in args]
            sub_kwargs = {k: _take(v, index, n) for k, v in kwargs.items()}
            y = self._call_for(name, len(members), sub_args, sub_kwargs)
            if not isinstance(y, torch.Tensor) or y.shape[:1] != (len(members),):
                raise AdapterError(
                    f"adapter_names needs {type(owner).__name__} to return one row per input row"
                )
            out = y.new_zeros((n, *y.shape[1:])) if out is None else out
            out = out.index_copy(0, index, y)
        return out

    def _call_for(self, name: str, n: int, args: Sequence[Any], kwargs: dict) -> Any:
        names = [name] if name != BASE_ROWS and self.has_adapter(name) else []
        with row_adapters([name] * n), self.adapted(names):  # wrappers inside see one adapter
            return self.base_layer(*args, **kwargs)

    def __repr__(self) -> str:
        rep = super().__repr__()  # "lora.ParamWrapper(" + children
        head, _, rest = rep.partition("(")
        return f"{head}(\n  parameter_name='{self.parameter_name}',{rest}"


def wrapper_chain(module: nn.Module) -> tuple[list[ParamWrapper], nn.Module]:
    """The parameter wrappers around a module, outermost first, and the module they wrap."""
    chain = []
    while isinstance(module, ParamWrapper):
        chain.append(module)
        module = module.base_layer
    return chain, module


def _take(value: Any, index: torch.Tensor, n: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n:
        return value.index_select(0, index)
    return value


def _rows_are_tokens(owner: nn.Module) -> bool:
    """transformers' experts interface: ``forward(hidden_states (T, H), top_k_index (T, k),
    top_k_weights (T, k))``, every row a token (Llama4's experts take rows grouped by expert)."""
    try:
        params = inspect.signature(owner.forward).parameters
    except (TypeError, ValueError):
        return False
    return len(params) >= 3


def _check_implementation(owner: nn.Module) -> None:
    """An experts module using transformers' experts interface must run an implementation whose
    products lorakit follows (others hand the raw weight to a kernel and would drop the adapter)."""
    uses_interface = hasattr(owner, "has_gate") and hasattr(owner, "is_concatenated")
    config = getattr(owner, "config", None)
    implementation = getattr(config, "_experts_implementation", None)
    if uses_interface and implementation not in (None, *EXPERTS_IMPLEMENTATIONS):
        raise AdapterError(
            f"{type(owner).__name__} runs experts_implementation={implementation!r}, which hands the "
            "expert weights to a kernel that would ignore LoRA; use one of "
            f"{', '.join(EXPERTS_IMPLEMENTATIONS)} (model.set_experts_implementation('grouped_mm'))"
        )
