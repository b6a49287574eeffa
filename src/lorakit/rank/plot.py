"""The rank report as a picture: a heatmap of the share of rank used per layer and module kind,
and the normalised spectra of the most and least used modules."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from lorakit.rank.factors import layer_and_kind
from lorakit.rank.spectra import Spectrum


class _Module(Protocol):
    """What the picture needs of a module's row of the report (``ModuleRank`` has it)."""

    name: str
    rank: int
    spectrum: Spectrum

    @property
    def used(self) -> float: ...


class _Report(Protocol):
    @property
    def modules(self) -> Sequence[_Module]: ...


def plot_report(report: _Report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = {layer_and_kind(m.name): m for m in report.modules}
    kinds = sorted({k for _, k in cells})
    layers = sorted({layer for layer, _ in cells}, key=lambda x: (x is None, x))
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), m in cells.items():
        grid[layers.index(layer), kinds.index(kind)] = m.used
    fig, (ax_map, ax_spec) = plt.subplots(1, 2, figsize=(12, max(3.5, 0.3 * len(layers) + 1.5)))
    image = ax_map.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax_map.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax_map.set_yticks(range(len(layers)), ["-" if x is None else str(x) for x in layers])
    ax_map.set_xlabel("module")
    ax_map.set_ylabel("layer")
    ax_map.set_title("effective rank / r")
    fig.colorbar(image, ax=ax_map)
    ranked = sorted(report.modules, key=lambda m: m.used)
    for m, style in ((ranked[-1], "-"), (ranked[0], "--")):
        sigma = np.array(m.spectrum.singular_values)
        if sigma.size and sigma[0] > 0:
            ax_spec.plot(
                range(1, sigma.size + 1),
                sigma / sigma[0],
                style,
                marker="o",
                label=f"{m.name} (eff. rank {m.spectrum.effective_rank:.1f}/{m.rank})",
            )
    ax_spec.set_xlabel("index")
    ax_spec.set_ylabel("σ_i / σ_1")
    ax_spec.set_title("spectra: most and least used modules")
    ax_spec.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
