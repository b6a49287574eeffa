"""``lorakit train --rank-sweep 1,2,4,8,16,32``: the same run at several ranks, to choose one.

Each rank trains from the same seed with ``alpha`` scaled to keep ``alpha / r`` (so the update's
scale does not change with the rank), in ``<out>/r<rank>``. The sweep writes ``sweep.json`` and
``sweep.png`` (held-out metric and trainable parameters against the rank) and marks the suggested
rank: the smallest whose metric is within ``TOLERANCE`` of the best one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.cli import report

__all__ = ["run_sweep", "suggest"]

TOLERANCE = {"accuracy": 0.01, "exact_match": 0.01}  # absolute; perplexity: within 2 %


def suggest(rows: list[dict[str, Any]], metric: str) -> int:
    """The smallest rank within tolerance of the best held-out metric."""
    values = [r["after"] for r in rows]
    if metric == "perplexity":
        best = min(values)
        good = [r for r in rows if r["after"] <= best * 1.02]
    else:
        best = max(values)
        good = [r for r in rows if r["after"] >= best - TOLERANCE.get(metric, 0.01)]
    return min(r["r"] for r in good)


def run_sweep(plan: Any, out: str, fit: Callable[..., dict[str, Any] | None]) -> dict[str, Any] | None:
    """Train ``plan`` once per rank of ``--rank-sweep``; the sweep's record (None off rank 0)."""
    s = plan.settings
    ranks = sorted(set(s.rank_sweep))
    metric = plan.task.metric
    rows: list[dict[str, Any]] = []
    before = None
    for r in ranks:
        settings = dataclasses.replace(s, r=r, alpha=s.alpha * r / s.r, rank_sweep=None)
        sub_out = os.path.join(out, f"r{r}")
        print(f"\n== rank {r} (alpha {settings.alpha:g}) -> {sub_out}", flush=True)
        record = fit(dataclasses.replace(plan, settings=settings), sub_out, None, time.perf_counter(), before)
        if record is None:
            continue
        before = record["before"]
        report.write_metrics(sub_out, record)
        rows.append(
            {
                "r": r,
                "alpha": settings.alpha,
                "before": before[metric],
                "after": record["after"][metric],
                "trainable": record["parameters"]["trainable"],
                "adapter_bytes": record["adapter_bytes"],
                "train_s": record["timings"].get("train_s"),
            }
        )
    if not rows:
        return None
    sweep = {"metric": metric, "runs": rows, "suggested_rank": suggest(rows, metric)}
    Path(out, "sweep.json").write_text(json.dumps(sweep, indent=2) + "\n", encoding="utf-8")
    plot_sweep(sweep, Path(out, "sweep.png"))
    print(table(sweep))
    return sweep


def table(sweep: dict[str, Any]) -> str:
    metric = sweep["metric"]
    lines = [f"{'rank':>4}  {metric:>12}  {'trainable':>10}  {'train s':>7}", "-" * 40]
    for row in sweep["runs"]:
        mark = "  <- suggested" if row["r"] == sweep["suggested_rank"] else ""
        lines.append(
            f"{row['r']:>4}  {row['after']:>12.4f}  {row['trainable']:>10,}  "
            f"{row['train_s'] or 0:>7.0f}{mark}"
        )
    lines.append(f"before training: {metric} {sweep['runs'][0]['before']:.4f}")
    return "\n".join(lines)


def plot_sweep(sweep: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sweep["runs"]
    ranks = [r["r"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(ranks, [r["after"] for r in rows], marker="o", color="C0", label=f"held-out {sweep['metric']}")
    ax.axhline(rows[0]["before"], color="C0", ls=":", lw=1, label="before training")
    ax.axvline(
        sweep["suggested_rank"],
        color="gray",
        ls="--",
        lw=1,
        label=f"suggested rank {sweep['suggested_rank']}",
    )
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel(sweep["metric"])
    other = ax.twinx()
    other.plot(ranks, [r["trainable"] for r in rows], marker="s", color="C1", label="trainable parameters")
    other.set_ylabel("trainable parameters")
    lines = ax.get_legend_handles_labels()
    more = other.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
