"""Trainable token rows (PEFT's ``trainable_token_indices``): train chosen rows of an embedding, the
new special tokens of a chat template say, and keep every other row frozen.

For adapter ``a`` with token indices ``I = (i₁ … iₙ)`` and rows ``Δ`` (n × D, initialised to
``E[I]``), the layer computes with ``E'`` = E with row ``iⱼ`` replaced by ``Δⱼ``:

* an embedding (V × D table): ``y = E'[x]`` (times the embedding's ``embed_scale``, as Gemma's);
* a linear layer (an output head tied to the embedding, weight V × D): ``y = h E'ᵀ + b``.

Neither builds ``E'`` (PEFT copies the whole V × D table on every call): the base output is computed
as usual and only the affected entries are overwritten, the looked-up rows of ``x`` that are in
``I`` (``Δ[j]``), or the output columns ``I`` of the head (``h Δᵀ + b[I]``). Values equal PEFT's;
gradients reach ``Δ`` only (a padding row gets none, as ``F.embedding`` gives it none).

Layout is PEFT's, so state-dict and file keys match: the wrapper sits where the module was and holds
``token_adapter`` with ``base_layer`` (the module) and ``trainable_tokens_delta.<adapter>`` (Δ); a
file stores ``<module>.token_adapter.trainable_tokens_delta``.

**Tied weights.** When an output head shares the embedding's weight, its wrapper is *tied*: it
shares the embedding wrapper's rows, indices and merge record (the same objects), so both always
compute with the same ``E'``; it owns no parameter, writes nothing to files, and merging is done
once, by the embedding's wrapper, into the shared weight.

Merging writes ``Δ`` into the rows ``I`` of the base weight (copies, no arithmetic, so merged and
unmerged outputs are identical); the replaced rows are kept until unmerging writes them back, bit
for bit. Adapters active together must use disjoint rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from lorakit.errors import AdapterError
from lorakit.layers.rows import BASE_ROWS, rows_for
from lorakit.layers.switching import AdapterSwitching

__all__ = ["TrainableTokensWrapper", "TrainableTokensLayer", "token_layer_problem"]


def token_layer_problem(module: nn.Module) -> str | None:
    """Why trainable token rows cannot be put on ``module`` (``None``: they can)."""
    if isinstance(module, nn.Embedding):
        options = [o for o in ("max_norm", "scale_grad_by_freq", "sparse") if getattr(module, o)]
        if options:
            return f"an embedding with {', '.join(options)} set is not supported for trainable tokens"
        return None
    if isinstance(module, nn.Linear):
        return None
    return f"{type(module).__name__} is not an nn.Embedding or nn.Linear (an output head)"


class TrainableTokensLayer(nn.Module):
    """PEFT's ``token_adapter``: the wrapped module and the trained rows, for PEFT's key layout."""

    def __init__(self, base_layer: nn.Module, delta: nn.ParameterDict) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.trainable_tokens_delta = delta


class TrainableTokensWrapper(nn.Module, AdapterSwitching):
    """An embedding (or tied output head) whose rows ``token_indices[a]`` adapter ``a`` replaces.

    ``tied_to``: the wrapper of the embedding whose weight this module shares; the new wrapper then
    shares its rows, indices and merge record.
    """

    _original_rows: torch.Tensor | None  # a buffer, registered in __init__

    def __init__(self, module: nn.Module, tied_to: TrainableTokensWrapper | None = None) -> None:
        super().__init__()
        if tied_to is None:
            self.token_adapter = TrainableTokensLayer(module, nn.ParameterDict())
            self.token_indices: dict[str, list[int]] = {}
            self.merged_adapters: list[str] = []  # changed in place only: tied wrappers share it
        else:
            self.token_adapter = TrainableTokensLayer(module, tied_to.token_adapter.trainable_tokens_delta)
            self.token_indices = tied_to.token_indices
            self.merged_adapters = tied_to.merged_adapters
        self.tied = tied_to is not None
        self.active_adapters: list[str] = []
        self.disable_adapters = False
        # the rows a merge replaced (rows _original_index of the weight), to unmerge bit for bit
        self.register_buffer("_original_rows", None, persistent=False)
        self._original_index: list[int] = []

    # -- what the wrapped module is -------------------------------------------------------------
    @property
    def base_layer(self) -> nn.Module:
        return self.token_adapter.base_layer

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (merged rows included when merged), for code that reads ``.weight``."""
        weight: torch.Tensor = self.base_layer.weight  # type: ignore[assignment]
        return weight

    @property
    def bias(self) -> torch.Tensor | None:
        bias = getattr(self.base_layer, "bias", None)
        return bias if isinstance(bias, torch.Tensor) else None

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    # -- adapters -------------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        return list(self.token_indices)

    def has_adapter(self, name: str) -> bool:
        return name in self.token_indices

    def add_adapter(self, name: str, indices: Sequence[int]) -> None:
        """Start adapter ``name``'s rows as copies of the base rows ``indices`` (float32 on a
        half-precision base, as every adapter tensor)."""
        if self.tied:
            raise AdapterError("a tied trainable-tokens layer gets its rows from the embedding it is tied to")
        weight = self.weight
        rows = weight.detach()[torch.tensor(list(indices), dtype=torch.long, device=weight.device)]
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        self.token_adapter.trainable_tokens_delta[name] = nn.Parameter(rows.to(dtype).clone())
        self.token_indices[name] = list(indices)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise AdapterError(f"adapter {name!r} is merged into the base weights; unmerge it first")
        if not self.tied and name in self.token_indices:
            del self.token_adapter.trainable_tokens_delta[name]
            del self.token_indices[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def overlap_problem(self, names: Sequence[str]) -> str | None:
        """Why adapters ``names`` cannot replace rows together (they share a row), or ``None``."""
        seen: dict[int, str] = {}
        for name in dict.fromkeys(n for n in names if self.has_adapter(n)):
            for index in self.token_indices[name]:
                if index in seen:
                    return (
                        f"adapters {seen[index]!r} and {name!r} both train token row {index}; "
                        "adapters used together must train disjoint rows"
                    )
                seen[index] = name
        return None

    def set_active(self, names: Sequence[str]) -> None:
        problem = self.overlap_problem(names)
        if problem:
            raise AdapterError(problem)
        self.active_adapters = list(names)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """Adapter ``name``'s rows, owned by the untied wrapper only (a tied one shares them)."""
        if self.tied or name not in self.token_indices:
            return []
        return [self.token_adapter.trainable_tokens_delta[name]]

    def rows(self, name: str) -> torch.Tensor:
        """Adapter ``name``'s rows Δ (n × D)."""
        return self.token_adapter.trainable_tokens_delta[name]

    # -- merging --------------------------------------------------------------------------------
    def merge_names(self, names: Sequence[str] | None) -> list[str]:
        """The adapters a merge of ``names`` (default: the active ones) would write here."""
        wanted = self.active_adapters if names is None else names
        return [n for n in dict.fromkeys(wanted) if self.has_adapter(n) and n not in self.merged_adapters]

    def merge_problem(self, names: Sequence[str] | None) -> str | None:
        pending = self.merge_names(names)
        if not pending:
            return None
        return self.overlap_problem(self.merged_adapters + pending)

    def merge(self, names: Sequence[str] | None = None, *, safe_merge: bool = False) -> None:
        """Write the rows of ``names`` (default: the active adapters) into the base weight. A tied
        wrapper does nothing: the embedding's wrapper writes the shared weight for both."""
        if self.tied:
            return
        problem = self.merge_problem(names)
        if problem:
            raise AdapterError(f"cannot merge: {problem}; the weights were left unchanged")
        pending = self.merge_names(names)
        if safe_merge:
            bad = [n for n in pending if not torch.isfinite(self.rows(n)).all()]
            if bad:
                raise AdapterError(
                    f"safe_merge: adapter(s) {bad} have non-finite token rows; nothing was merged"
                )
        weight = self.weight
        with torch.no_grad():
            for name in pending:
                index = torch.tensor(self.token_indices[name], dtype=torch.long, device=weight.device)
                original = weight[index].clone()
                self._original_rows = (
                    original if self._original_rows is None else torch.cat([self._original_rows, original])
                )
                self._original_index.extend(self.token_indices[name])
                weight.index_copy_(0, index, self.rows(name).to(weight.dtype))
        self.merged_adapters.extend(pending)

    def unmerge(self) -> None:
        """Write the replaced rows back (bit for bit)."""
        if self.tied or not self.merged_adapters:
            return
        weight = self.weight
        if self._original_rows is not None:
            index = torch.tensor(self._original_index, dtype=torch.long, device=weight.device)
            with torch.no_grad():
                weight.index_copy_(0, index, self._original_rows.to(weight.device))
        self._original_rows = None
        self._original_index = []
        self.merged_adapters.clear()

    def unloaded(self, dtype: torch.dtype | None = None) -> nn.Module:
        return self.base_layer

    # -- forward --------------------------------------------------------------------------------
    def forward(
        self, x: torch.Tensor, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any
    ) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        rows = rows_for(x, adapter_names)
        if rows is None:
            for name in self.active_adapters:
                if self.has_adapter(name) and name not in self.merged_adapters:
                    result = self._replace(result, x, name, None)
            return result
        if len(rows) != x.shape[0]:
            raise AdapterError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(rows)} and {x.shape[0]} respectively"
            )
        if self.merged_adapters:
            raise AdapterError(
                "Cannot pass `adapter_names` when there are merged adapters, please call "
                "`unmerge_adapter` first."
            )
        for name in dict.fromkeys(rows):
            if name != BASE_ROWS and self.has_adapter(name):
                batch = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)
                result = self._replace(result, x, name, batch)
        return result

    def _replace(
        self, result: torch.Tensor, x: torch.Tensor, name: str, batch: torch.Tensor | None
    ) -> torch.Tensor:
        """``result`` with adapter ``name``'s rows in place of the base rows (only for the batch
        rows ``batch`` when given). In place on a plain module's output, whose backward does not
        read it; out of place after any other forward, which might."""
        base = self.base_layer
        in_place = type(base) in (nn.Embedding, nn.Linear)
        if isinstance(base, nn.Embedding):
            return self._replace_looked_up(result, x, name, batch, in_place)
        return self._replace_columns(result, x, name, batch, in_place)

    def _replace_looked_up(
        self, result: torch.Tensor, x: torch.Tensor, name: str, batch: torch.Tensor | None, in_place: bool
    ) -> torch.Tensor:
        weight = self.weight
        indices = torch.tensor(self.token_indices[name], dtype=torch.long, device=x.device)
        lookup = torch.full((weight.shape[0],), -1, dtype=torch.long, device=x.device)
        lookup[indices] = torch.arange(len(indices), device=x.device)
        position = lookup[x]  # same shape as x: the row of Δ for each id, or -1
        if batch is not None:
            keep = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
            keep[batch] = True
            position = position.masked_fill(~keep.view(-1, *([1] * (x.dim() - 1))), -1)
        hit = position >= 0
        values = self.rows(name).index_select(0, position[hit]).to(result.dtype)  # (hits, D)
        padding = self.base_layer.padding_idx  # type: ignore[union-attr]
        if padding is not None and padding in self.token_indices[name]:
            # F.embedding gives the padding row no gradient; neither does this.
            is_pad = (x[hit] == padding).unsqueeze(-1)
            values = torch.where(is_pad, values.detach(), values)
        scale = getattr(self.base_layer, "embed_scale", None)
        if scale is not None:  # e.g. Gemma's scaled word embedding
            values = values * (scale.to(values.dtype) if isinstance(scale, torch.Tensor) else scale)
        if in_place:
            result[hit] = values
            return result
        return result.index_put((hit,), values)

    def _replace_columns(
        self, result: torch.Tensor, x: torch.Tensor, name: str, batch: torch.Tensor | None, in_place: bool
    ) -> torch.Tensor:
        weight = self.weight
        indices = torch.tensor(self.token_indices[name], dtype=torch.long, device=x.device)
        columns = nn.functional.linear(x, self.rows(name).to(weight.dtype))  # (…, n)
        if self.bias is not None:
            columns = columns + self.bias[indices]
        columns = columns.to(result.dtype)
        if batch is None:
            return (
                result.index_copy_(-1, indices, columns)
                if in_place
                else result.index_copy(-1, indices, columns)
            )
        updated = result.index_select(0, batch).index_copy(-1, indices, columns.index_select(0, batch))
        return result.index_copy_(0, batch, updated) if in_place else result.index_copy(0, batch, updated)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
