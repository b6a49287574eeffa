"""LoRA on the experts of a mixture-of-experts layer: PEFT's factor layout, ΔW, and the low-rank
term for rows grouped by expert, computed without ever forming a per-expert ΔW.

A parameter holding E experts stacks one matrix per expert, W (E, d, k) with W_e mapping k inputs
to d outputs. PEFT (``lora.ParamWrapper``) keeps one pair of ``nn.Linear`` factors for all experts:

====================  ===========  =============================================================
``lora_A.weight``     (E·r, k)     row ``e·r + j`` is row j of A_e (r, k): expert-major
``lora_B.weight``     (d, r·E)     column ``j·E + e`` is column j of B_e (d, r): rank-major
====================  ===========  =============================================================

and ``ΔW_e = s · B_e A_e`` (d × k). A 2-D parameter is one expert (E = 1, the plain LoRA layout).

The low-rank term of a token routed to expert e is ``s · B_e (A_e · dropout(x))``: two rank-r
products per token, where adding ΔW_e to the weight would cost a (d × k) matrix per expert in the
forward and another kept for backward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lorakit.functional.dropout import apply_dropout, dropout_keep_mask, mask_values, pack_mask, unpack_mask
from lorakit.functional.fused import compute_dtype

__all__ = ["expert_factors", "expert_delta", "grouped_lora", "group_counts"]


def expert_factors(
    lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's stacked factors as per-expert views (no copy): A (E·r, k) → (E, r, k) and
    B (d, r·E) → (E, d, r)."""
    a = lora_a.reshape(num_experts, -1, lora_a.shape[-1])  # (E, r, k)
    b = lora_b.reshape(lora_b.shape[0], -1, num_experts).permute(2, 0, 1)  # (E, d, r)
    return a, b


def expert_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int, s: float) -> torch.Tensor:
    """``ΔW_e = s · B_e A_e`` for every expert, in float32: (E, d, k)."""
    a, b = expert_factors(lora_a.float(), lora_b.float(), num_experts)
    return torch.bmm(b, a) * s


def group_counts(offsets: torch.Tensor) -> list[int]:
    """Rows per group from the cumulative row ends ``offsets`` (E,) that grouped matrix products
    take (``torch._grouped_mm``'s ``offs``); one host synchronisation."""
    ends = [int(v) for v in offsets.tolist()]
    return [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)]


def _groups(counts: Sequence[int], order: torch.Tensor | None) -> list[tuple[int, slice | torch.Tensor]]:
    """(expert, rows) of every non-empty group: consecutive rows, or ``order``'s entries."""
    out: list[tuple[int, slice | torch.Tensor]] = []
    start = 0
    for expert, n in enumerate(counts):
        if n:
            rows = slice(start, start + n)
            out.append((expert, rows if order is None else order[rows]))
        start += n
    return out


def _rows(t: torch.Tensor, rows: slice | torch.Tensor) -> torch.Tensor:
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def _add_rows_(out: torch.Tensor, rows: slice | torch.Tensor, value: torch.Tensor) -> None:
    if isinstance(rows, slice):
        out[rows] += value.to(out.dtype)
    else:
        out.index_add_(0, rows, value.to(out.dtype))


def _grouped_term(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    s: float,
    p: float,
    counts: Sequence[int],
    order: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(term (N, d), h = dropout(x) A_eᵀ per row (N, r), the keep-mask or ``None``), computed one
    expert group at a time in x's compute dtype."""
    dtype = compute_dtype(x)
    xc = x.to(dtype)
    keep = dropout_keep_mask(xc, p) if p > 0 else None
    ac, bc = a.to(dtype), b.to(dtype)
    h = xc.new_zeros(x.shape[0], a.shape[1])  # (N, r)
    term = xc.new_zeros(x.shape[0], b.shape[1])  # (N, d)
    for expert, rows in _groups(counts, order):
        xe = _rows(xc, rows)
        if keep is not None:
            xe = apply_dropout(xe, _rows(keep, rows), p)
        he = xe @ ac[expert].T  # (n_e, r)
        h[rows] = he
        _add_rows_(term, rows, (he @ bc[expert].T).mul_(s))
    return term, h, keep


class _GroupedLora(torch.autograd.Function):
    """``term[rows_e] = s · (dropout(x[rows_e]) A_eᵀ) B_eᵀ`` for every expert e.

    Shapes: x (N, k), A (E, r, k), B (E, d, r) → term (N, d). Saved for backward: x (which the
    caller's base product holds anyway), the rank-r intermediate h (N, r) and, with dropout, the
    keep-mask packed 8 elements a byte. Rows that no group covers (expert-parallel sentinels past
    the last offset) get a zero term.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        s: float,
        p: float,
        counts: tuple[int, ...],
        order: torch.Tensor | None,
    ) -> torch.Tensor:
        term, h, keep = _grouped_term(x, a, b, s, p, counts, order)
        bits = pack_mask(keep) if keep is not None else torch.empty(0, dtype=torch.uint8)
        ctx.save_for_backward(x, a, b, h, bits, order if order is not None else torch.empty(0))
        ctx.s, ctx.p, ctx.counts, ctx.ordered = s, p, counts, order is not None
        return term

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, a, b, h, bits, order = ctx.saved_tensors
        s, p, dtype = ctx.s, ctx.p, h.dtype
        g = grad.to(dtype)
        ac, bc = a.to(dtype), b.to(dtype)
        mask = mask_values(unpack_mask(bits, x.shape), dtype) if p > 0 else None
        grad_a = torch.zeros_like(ac) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bc) if ctx.needs_input_grad[2] else None
        grad_x = torch.zeros(x.shape, dtype=dtype, device=x.device) if ctx.needs_input_grad[0] else None
        for expert, rows in _groups(ctx.counts, order if ctx.ordered else None):
            ge, he = _rows(g, rows), _rows(h, rows)  # (n_e, d), (n_e, r)
            if grad_b is not None:
                grad_b[expert] = (ge.T @ he).mul_(s)
            gh = (ge @ bc[expert]).mul_(s)  # (n_e, r)
            if grad_a is not None:
                xe = _rows(x, rows).to(dtype)
                if mask is not None:
                    xe = apply_dropout(xe, _rows(mask, rows), p)
                grad_a[expert] = gh.T @ xe
            if grad_x is not None:
                gx = gh @ ac[expert]  # (n_e, k)
                if mask is not None:
                    gx = gx.div_(1.0 - p).mul_(_rows(mask, rows))
                _add_rows_(grad_x, rows, gx)
        return (
            None if grad_x is None else grad_x.to(x.dtype),
            None if grad_a is None else grad_a.to(a.dtype),
            None if grad_b is None else grad_b.to(b.dtype),
            None,
            None,
            None,
            None,
        )


def grouped_lora(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: float,
    counts: Sequence[int],
    *,
    order: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """The expert term of every row: (N, d) in x's compute dtype (autocast's if active).

    Rows are grouped by expert: expert e owns ``counts[e]`` rows, the next ones of ``x`` (as
    ``torch._grouped_mm`` takes them) or, with ``order`` (N,), the rows ``order`` lists next.
    x (N, k), A (E, r, k), B (E, d, r): row i of expert e gets ``s · B_e (A_e · dropout(x_i))``.
    """
    counts_t = tuple(int(c) for c in counts)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, lora_a, lora_b)):
        term: torch.Tensor = _GroupedLora.apply(x, lora_a, lora_b, s, dropout_p, counts_t, order)
        return term
    with torch.no_grad():  # inference: nothing is kept
        return _grouped_term(x, lora_a, lora_b, s, dropout_p, counts_t, order)[0]
