"""``rank_report``: how much of each module's rank an adapter really uses, read from its files.

Per module: the singular values of ΔW = s·B·A (for DoRA, of the directional update s·B·A), the
energy captured at each rank, the effective rank (Roy & Vetterli 2007) and the stable rank, and
the smallest ranks keeping 90 / 95 / 99 % of the energy. Modules are grouped by layer index and
module kind (``q_proj``, ``v_proj``, ...), and a rank is suggested for the whole adapter (the
largest per-kind median of the 95 %-energy rank) and per kind.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

from lorakit.errors import AdapterFileError
from lorakit.persistence.adapter_dir import read_adapter
from lorakit.rank.factors import layer_and_kind, module_name, split_factors
from lorakit.rank.plot import plot_report
from lorakit.rank.spectra import Spectrum, spectrum

__all__ = ["ModuleRank", "RankReport", "rank_report", "layer_and_kind"]

SUGGEST_AT = 0.95


@dataclasses.dataclass
class ModuleRank:
    name: str
    rank: int
    spectrum: Spectrum
    relative_update: float | None = None  # ‖ΔW‖_F / ‖W‖_F when the base weights are given

    @property
    def used(self) -> float:
        """Effective rank over allotted rank: the share of the rank the update really uses."""
        return self.spectrum.effective_rank / self.rank if self.rank else 0.0


@dataclasses.dataclass
class RankReport:
    path: str
    dora: bool
    modules: list[ModuleRank]

    def suggested(self) -> tuple[int, dict[str, int]]:
        """(one rank for every module, a rank per module kind) keeping 95 % of each update's energy
        for the median module of each kind."""
        per_kind: dict[str, list[int]] = {}
        for m in self.modules:
            per_kind.setdefault(layer_and_kind(m.name)[1], []).append(m.spectrum.ranks_for_energy[SUGGEST_AT])
        kinds = {k: max(1, int(statistics.median_high(v))) for k, v in per_kind.items()}
        return (max(kinds.values()) if kinds else 0), kinds

    def to_dict(self) -> dict[str, Any]:
        overall, kinds = self.suggested()
        return {
            "adapter": self.path,
            "dora": self.dora,
            "suggested_rank": overall,
            "suggested_rank_per_kind": kinds,
            "modules": [
                {"name": m.name, "rank": m.rank, "relative_update": m.relative_update, **m.spectrum.to_dict()}
                for m in self.modules
            ],
        }

    def table(self) -> str:
        """Rows by layer, columns by module kind: ``effective rank / r (95 % rank)``."""
        kinds = sorted({layer_and_kind(m.name)[1] for m in self.modules})
        by_cell = {layer_and_kind(m.name): m for m in self.modules}
        layers = sorted({layer for layer, _ in by_cell}, key=lambda x: (x is None, x))
        head = ["layer"] + kinds
        rows = [
            [("-" if layer is None else str(layer))] + [_cell(by_cell.get((layer, kind))) for kind in kinds]
            for layer in layers
        ]
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        overall, per_kind = self.suggested()
        lines = [
            f"adapter: {self.path}"
            + (" (DoRA: spectra of the directional update s·B·A)" if self.dora else ""),
            "cells: effective rank / allotted r (rank keeping 95% of the update's energy)",
            "",
            fmt.format(*head),
            fmt.format(*("-" * w for w in widths)),
        ]
        lines += [fmt.format(*r) for r in rows]
        lines += [
            "",
            f"suggested rank: {overall} (per kind: "
            + ", ".join(f"{k}={v}" for k, v in per_kind.items())
            + ")",
        ]
        return "\n".join(lines)

    def plot(self, path: str | Path) -> None:
        plot_report(self, Path(path))


def _cell(m: ModuleRank | None) -> str:
    if m is None:
        return ""
    return f"{m.spectrum.effective_rank:.1f}/{m.rank} ({m.spectrum.ranks_for_energy[SUGGEST_AT]})"


def rank_report(adapter: str | Path, base: str | Path | None = None) -> RankReport:
    """The rank report of the adapter folder (or Hub id) ``adapter`` (PEFT format). With ``base`` (a
    model folder with safetensors weights, or its Hub id) each module also gets ‖ΔW‖_F / ‖W‖_F."""
    files = read_adapter(adapter)
    modules, _ = split_factors(files.config, files.tensors)
    if not modules:
        raise AdapterFileError(f"{adapter} holds no LoRA factors (lora_A / lora_embedding_A tensors)")
    weights = _base_norms(base, [module_name(m.prefix) for m in modules]) if base is not None else {}
    out = []
    for m in modules:
        sp = spectrum(m.a, m.dense_b(), m.scaling)
        name = module_name(m.prefix)
        norm = weights.get(name)
        update = (sum(v * v for v in sp.singular_values) ** 0.5) / norm if norm else None
        out.append(ModuleRank(name, m.rank, sp, update))
    return RankReport(str(adapter), files.config.use_dora, out)


def _base_norms(base: str | Path, names: list[str]) -> dict[str, float]:
    from lorakit.rank.extract import Checkpoint

    ckpt = Checkpoint(base)
    norms = {}
    for name in names:
        weight = ckpt.get(f"{name}.weight")
        if weight is None:  # checkpoints of a bare backbone drop the head's prefix (bert.)
            weight = next(
                (
                    ckpt.get(k)
                    for k in sorted(ckpt.keys())
                    if f".{k}".endswith(f".{name}.weight") or f"{name}.weight".endswith(f".{k}")
                ),
                None,
            )
        if weight is not None:
            norms[name] = float(weight.double().norm())
    return norms
