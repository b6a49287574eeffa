"""A weight that computes as ``W + Σ s·B A`` without ever forming ``B A``: how LoRA reaches a
parameter that is read inside another module's forward (the experts of mixture-of-experts layers).

transformers keeps the experts of an MoE layer as 3-D parameters of one module and reads them in
its forward through whichever implementation the model uses: a loop over experts
(``F.linear(x, W[e])`` or ``x @ W[e]``), one batched product over gathered weights
(``bmm(W[ids], x)``), one grouped product (``grouped_mm(x, W.transpose(-2, -1), offs)``), or a
model's own (``bmm(x, W)``). While the forward runs, :class:`~lorakit.layers.parameter.ParamWrapper`
hands it a :class:`LowRankWeight` in the parameter's place: a tensor with the parameter's value that
carries the adapters' factors and, through ``__torch_function__``, follows what is done to it.
Selecting experts, transposing and casting give another ``LowRankWeight``; a matrix product with it
returns the plain product plus the low-rank term of exactly the rows involved:

    F.linear(x, W_e)               → F.linear(x, W_e) + s · (dropout(x) A_eᵀ) B_eᵀ
    x @ W_e, bmm, grouped_mm, ...  → the same, per row, for the expert that row goes to

so neither the forward nor backward ever holds a per-expert ΔW (:mod:`lorakit.functional.experts`).
Reading metadata (shape, dtype, device) is free. Any other use that would make a tensor out of the
weight raises :class:`~lorakit.errors.AdapterError`: computing with the bare weight would silently
drop the adapter.

Notation: the weight's last two axes are (m, n); each adapter is a :class:`Term` with ``a`` (…, r, n)
and ``b`` (…, m, r), ``ΔW = s · b a``, whose leading axes are the weight's (one factor per expert)
or absent (shared).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lorakit.errors import AdapterError
from lorakit.functional import fused
from lorakit.functional.experts import group_counts, grouped_lora

__all__ = ["Term", "LowRankWeight"]


@dataclasses.dataclass(frozen=True)
class Term:
    """One adapter's change ``ΔW = s · b a`` and the dropout ``p`` on the inputs it multiplies."""

    a: torch.Tensor  # (…, r, n)
    b: torch.Tensor  # (…, m, r)
    s: float
    p: float

    def transposed(self) -> Term:
        """The term of ``Wᵀ``: ``(s · b a)ᵀ = s · aᵀ bᵀ``."""
        return Term(self.b.transpose(-2, -1), self.a.transpose(-2, -1), self.s, self.p)


class LowRankWeight(torch.Tensor):
    """The value of a parameter, plus adapters that every matrix product with it applies.

    ``experts`` is set on a weight gathered by expert id (``W[ids]``, (S, m, n)): the factors stay
    stacked by expert and row i of a product uses expert ``ids[i]``.
    """

    plain: torch.Tensor
    terms: tuple[Term, ...]
    experts: torch.Tensor | None
    label: str

    @staticmethod
    def __new__(
        cls, plain: torch.Tensor, terms: Sequence[Term], label: str, experts: torch.Tensor | None = None
    ) -> LowRankWeight:
        obj = torch.Tensor._make_subclass(cls, plain.detach(), False)
        obj.plain, obj.terms, obj.experts, obj.label = plain, tuple(terms), experts, label
        return obj

    def derived(
        self, plain: torch.Tensor, terms: Sequence[Term], experts: torch.Tensor | None
    ) -> LowRankWeight:
        return LowRankWeight(plain, terms, self.label, experts)

    @classmethod
    def __torch_function__(
        cls, func: Callable[..., Any], types: Any, args: Sequence[Any] = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is None and str(func).startswith(_FALLBACK_GROUPED_MM):
            handler = _grouped_mm
        if handler is not None:
            return handler(func, *args, **kwargs)
        return _metadata(func, args, kwargs)


# -- what is refused ---------------------------------------------------------------------------------
_SUPPORTED = (
    "selecting experts (W[e], W[ids]), transposes, dtype casts, and the products F.linear, "
    "matmul / @, mm, bmm and grouped_mm"
)


def _refuse(func: Any, w: LowRankWeight, why: str = "") -> AdapterError:
    name = getattr(func, "__name__", str(func))
    return AdapterError(
        f"the LoRA-adapted parameter {w.label} was used in {name}{why}, where lorakit cannot add the "
        f"adapter's term (the result would silently ignore the adapter). Supported uses: {_SUPPORTED}. "
        "If an experts implementation does this, switch the model to another one, e.g. "
        "model.set_experts_implementation('grouped_mm')"
    )


def _weight_in(func: Any, args: Sequence[Any], kwargs: dict) -> LowRankWeight:
    """The adapted weight among the arguments (inside a list or tuple too)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, LowRankWeight):
            return value
        if isinstance(value, (list, tuple)) and (inner := [v for v in value if isinstance(v, LowRankWeight)]):
            return inner[0]
    raise AssertionError("__torch_function__ of LowRankWeight called without one")


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    return False


def _metadata(func: Any, args: Sequence[Any], kwargs: dict) -> Any:
    """Reads that give no tensor (shape, dtype, device, ``size()``, ...) answer from the plain
    weight; anything else would compute with the weight without its adapters, and is refused."""
    plain_args = [a.plain if isinstance(a, LowRankWeight) else a for a in args]
    plain_kwargs = {k: v.plain if isinstance(v, LowRankWeight) else v for k, v in kwargs.items()}
    with torch._C.DisableTorchFunctionSubclass():  # a weight nested in a list is plain here
        out = func(*plain_args, **plain_kwargs)
    if _has_tensor(out):
        raise _refuse(func, _weight_in(func, args, kwargs))
    return out


# -- what gives another LowRankWeight --------------------------------------------------------------
def _is_index(idx: Any) -> bool:
    if isinstance(idx, int) and not isinstance(idx, bool):
        return True
    return isinstance(idx, torch.Tensor) and not idx.is_floating_point() and idx.dtype != torch.bool


def _getitem(func: Any, w: Any, idx: Any) -> LowRankWeight:
    """``W[e]`` (one expert: its factors) or ``W[ids]`` (a gather: factors stay stacked)."""
    if isinstance(idx, tuple):
        rest = idx[1:]
        if not idx or any(not (r is Ellipsis or r == slice(None)) for r in rest):
            raise _refuse(func, w, " with an index other than expert numbers")
        idx = idx[0]
    if w.plain.dim() < 3 or w.experts is not None or not _is_index(idx) or getattr(idx, "ndim", 0) > 1:
        raise _refuse(func, w, " with an index other than expert numbers")
    plain = w.plain[idx]
    if isinstance(idx, int) or idx.ndim == 0:

        def pick(f: torch.Tensor) -> torch.Tensor:
            return f[idx] if f.dim() == w.plain.dim() else f

        return w.derived(plain, [Term(pick(t.a), pick(t.b), t.s, t.p) for t in w.terms], None)
    return w.derived(plain, w.terms, idx)


def _transpose(func: Any, w: Any, *dims: Any) -> LowRankWeight:
    """Swapping the last two axes (``transpose(-2, -1)``, ``.mT``; ``.T`` / ``.t()`` of a matrix)."""
    nd = w.plain.dim()
    # compared with == (not ``is``): each access to a property's __get__ makes a new method wrapper
    if func in (torch.Tensor.T.__get__, torch.Tensor.t, torch.t):  # type: ignore[attr-defined]
        ok = nd == 2
    elif func == torch.Tensor.mT.__get__:  # type: ignore[attr-defined]
        ok = True
    else:
        ok = len(dims) == 2 and sorted(int(d) % nd for d in dims) == [nd - 2, nd - 1]
    if not ok:
        raise _refuse(func, w, " on axes other than the last two")
    return w.derived(w.plain.transpose(-2, -1), [t.transposed() for t in w.terms], w.experts)


def _cast(func: Any, w: Any, *args: Any, **kwargs: Any) -> Any:
    """``.to(dtype)``, ``.float()``, ``.contiguous()``, ...: the plain weight changes, the factors
    follow it to its device and keep their own dtype (the term is computed in the input's)."""
    plain = func(w.plain, *args, **kwargs)
    if not isinstance(plain, torch.Tensor):  # ``w.type()`` gives the type's name
        return plain
    if not plain.is_floating_point():
        raise _refuse(func, w, f" to {plain.dtype}")
    device = plain.device
    terms = [Term(t.a.to(device), t.b.to(device), t.s, t.p) for t in w.terms]
    experts = None if w.experts is None else w.experts.to(device)
    return w.derived(plain, terms, experts)


# -- the products ---------------------------------------------------------------------------------
def _linear(func: Any, x: Any, w: Any, bias: Any = None) -> torch.Tensor:
    """``F.linear(x, W) = x Wᵀ (+ bias)`` with W (m, n): the term ``s · b (a · dropout(x))``."""
    if isinstance(x, LowRankWeight) or not isinstance(w, LowRankWeight) or isinstance(bias, LowRankWeight):
        raise _refuse(func, _weight_in(func, (x, w, bias), {}), " other than as the weight")
    if w.plain.dim() != 2 or any(t.a.dim() != 2 or t.b.dim() != 2 for t in w.terms):
        raise _refuse(func, w, " as a stack of matrices")
    out = F.linear(x, w.plain, bias)
    for t in w.terms:
        out = fused.lora_linear_accumulate_(out, x, t.a, t.b, t.s, t.p, t.p > 0)
    return out


def _matmul(func: Any, first: Any, second: Any, **kwargs: Any) -> torch.Tensor:
    """``x @ W`` / ``W @ x`` (``matmul``, ``mm``, ``bmm`` and their methods and operators);
    ``W @ x`` is computed as ``(xᵀ Wᵀ)ᵀ``."""
    if kwargs:
        raise _refuse(func, _weight_in(func, (first, second), kwargs), f" with {sorted(kwargs)}")
    if func is torch.Tensor.__rmatmul__:
        first, second = second, first
    product = torch.bmm if func in (torch.bmm, torch.Tensor.bmm) else torch.matmul
    if isinstance(first, LowRankWeight) and isinstance(second, LowRankWeight):
        raise _refuse(func, first, " with another adapted parameter")
    if isinstance(second, LowRankWeight):
        return _right_product(func, product, first, second)
    if second.dim() < 2:
        raise _refuse(func, first, " times a vector")
    left = _transpose(torch.Tensor.transpose, first, -2, -1)
    return _right_product(func, product, second.transpose(-2, -1), left).transpose(-2, -1)


def _right_product(
    func: Any, product: Callable[..., torch.Tensor], x: torch.Tensor, w: LowRankWeight
) -> torch.Tensor:
    """``x @ W`` with W (…, m, n): the term of row i is ``s · (dropout(x_i) b) a`` for its expert,
    i.e. the F.linear form with A' = bᵀ (r, m) and B' = aᵀ (n, r)."""
    out = product(x, w.plain)
    if w.plain.dim() == 2 and w.experts is None and all(t.a.dim() == 2 and t.b.dim() == 2 for t in w.terms):
        for t in w.terms:
            out = fused.lora_linear_accumulate_(out, x, t.b.T, t.a.T, t.s, t.p, t.p > 0)
        return out
    if w.plain.dim() != 3 or x.dim() != 3 or x.shape[0] != w.plain.shape[0]:
        raise _refuse(func, w, f" with operands of shapes {tuple(x.shape)} and {tuple(w.plain.shape)}")
    rows, per, m = x.shape  # (S, T, m) @ (S, m, n): batch entry i is expert i, or experts[i]
    flat = x.reshape(rows * per, m)
    if w.experts is None:
        counts: list[int] = [per] * rows
        order = None
    else:
        row_expert = w.experts.repeat_interleave(per)
        order = torch.argsort(row_expert, stable=True)
        counts = torch.bincount(row_expert, minlength=_num_experts(w)).tolist()
    for t in w.terms:
        a, b = _stacked(t.a, rows, w), _stacked(t.b, rows, w)
        term = grouped_lora(
            flat, b.transpose(-2, -1), a.transpose(-2, -1), t.s, counts, order=order, dropout_p=t.p
        )
        out = out + term.view(out.shape).to(out.dtype)
    return out


def _num_experts(w: LowRankWeight) -> int:
    stacked = [f.shape[0] for t in w.terms for f in (t.a, t.b) if f.dim() == 3]
    return stacked[0] if stacked else 1


def _stacked(f: torch.Tensor, rows: int, w: LowRankWeight) -> torch.Tensor:
    """A factor as a stack by expert: shared factors are expanded (a view)."""
    if f.dim() == 3:
        return f
    return f.expand(rows if w.experts is None else _num_experts(w), *f.shape)


def _grouped_mm(func: Any, x: Any, w: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``grouped_mm(x, W, offs)``: x (N, m) with rows grouped by expert (``offs``: cumulative
    ends), W (E, m, n); each group gets its expert's term."""
    offs = kwargs.get("offs", args[0] if args else None)
    if isinstance(x, LowRankWeight) or not isinstance(w, LowRankWeight) or offs is None:
        raise _refuse(func, _weight_in(func, (x, w, *args), kwargs), " other than as grouped experts")
    if x.dim() != 2 or w.plain.dim() != 3 or w.experts is not None:
        raise _refuse(func, w, f" with operands of shapes {tuple(x.shape)} and {tuple(w.plain.shape)}")
    out = func(x, w.plain, *args, **kwargs)
    counts = group_counts(offs)
    for t in w.terms:
        a, b = _stacked(t.a, w.plain.shape[0], w), _stacked(t.b, w.plain.shape[0], w)
        term = grouped_lora(x, b.transpose(-2, -1), a.transpose(-2, -1), t.s, counts, dropout_p=t.p)
        out = out + term.to(out.dtype)
    return out


# transformers' grouped product when torch's kernel cannot run (a custom op, named without importing it)
_FALLBACK_GROUPED_MM = "transformers.grouped_mm_fallback"

_HANDLERS: dict[Any, Callable[..., Any]] = {
    torch.Tensor.__getitem__: _getitem,
    torch.Tensor.transpose: _transpose,
    torch.transpose: _transpose,
    torch.Tensor.t: _transpose,
    torch.t: _transpose,
    torch.Tensor.T.__get__: _transpose,  # type: ignore[attr-defined]
    torch.Tensor.mT.__get__: _transpose,  # type: ignore[attr-defined]
    torch.Tensor.to: _cast,
    torch.Tensor.type: _cast,
    torch.Tensor.float: _cast,
    torch.Tensor.double: _cast,
    torch.Tensor.half: _cast,
    torch.Tensor.bfloat16: _cast,
    torch.Tensor.contiguous: _cast,
    F.linear: _linear,
    torch.matmul: _matmul,
    torch.Tensor.matmul: _matmul,
    torch.Tensor.__matmul__: _matmul,
    torch.Tensor.__rmatmul__: _matmul,
    torch.mm: _matmul,
    torch.Tensor.mm: _matmul,
    torch.bmm: _matmul,
    torch.Tensor.bmm: _matmul,
    torch._grouped_mm: _grouped_mm,
}
if hasattr(F, "grouped_mm"):
    _HANDLERS[F.grouped_mm] = _grouped_mm
