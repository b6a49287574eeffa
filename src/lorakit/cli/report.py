"""What a training run leaves behind: ``metrics.json``, ``training.png``, a README model card, and
the summary table printed at the end."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from lorakit.cli.tasks import perplexity

__all__ = ["curves", "versions", "write_metrics", "plot", "model_card", "summary_table", "folder_bytes"]

METRICS_FILE = "metrics.json"
PLOT_FILE = "training.png"
CARD_FILE = "README.md"


def curves(log_history: list[dict[str, Any]], metric: str) -> tuple[list[dict], list[dict]]:
    """(loss per logged step, eval metric per evaluated step) from ``trainer.state.log_history``."""
    loss = [{"step": e["step"], "loss": e["loss"]} for e in log_history if "loss" in e]
    key = "eval_accuracy" if metric == "accuracy" else "eval_loss"
    evals = []
    for entry in log_history:
        if key in entry:
            value = entry[key]
            if metric == "perplexity":
                value = perplexity(value)
            evals.append({"step": entry["step"], metric: value})
    return loss, evals


def versions() -> dict[str, str]:
    import torch
    import transformers

    import lorakit

    return {
        "lorakit": lorakit.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def folder_bytes(folder: str, names: tuple[str, ...] = ("adapter_model.safetensors",)) -> int:
    """Total size of the named files in ``folder`` (default: the adapter weights)."""
    return sum((Path(folder) / n).stat().st_size for n in names if (Path(folder) / n).is_file())


def write_metrics(out: str, record: dict[str, Any]) -> None:
    (Path(out) / METRICS_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def plot(out: str, record: dict[str, Any]) -> None:
    """Training loss and the held-out metric per step, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = record["metric"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    loss = record["loss_curve"]
    left.plot([p["step"] for p in loss], [p["loss"] for p in loss], color="tab:blue")
    left.set(title="training loss", xlabel="step", ylabel="loss")
    evals = record["eval_curve"]
    if evals:
        right.plot(
            [p["step"] for p in evals],
            [p[metric] for p in evals],
            "o-",
            color="tab:orange",
            label=f"held-out sample ({record['examples']['eval_sample']})",
        )
    ends = [(0, record["before"][metric]), (record["steps"], record["after"][metric])]
    right.plot(
        *zip(*ends, strict=True),
        "s",
        color="black",
        label=f"whole held-out split ({record['examples']['held_out']})",
    )
    right.set(title=f"held-out {metric}", xlabel="step", ylabel=metric)
    if metric == "perplexity":
        right.set_yscale("log")
    right.legend(fontsize="small")
    fig.suptitle(record["title"], fontsize="medium")
    fig.tight_layout()
    fig.savefig(Path(out) / PLOT_FILE, dpi=110)
    plt.close(fig)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"
    return str(value)


def summary_rows(record: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = [
        (name, _fmt(record["before"][name]), _fmt(record["after"].get(name)))
        for name in record["before"]
        if name != "loss"
    ]
    trainable, total = record["parameters"]["trainable"], record["parameters"]["total"]
    rows += [
        ("trainable parameters", f"{trainable:,}", f"{100 * trainable / total:.2f}% of {total:,}"),
        (
            "wall time",
            f"{record['timings']['total_s']:.0f} s",
            f"training {record['timings']['train_s']:.0f} s",
        ),
        ("adapter size", f"{record['adapter_bytes'] / 1e6:.2f} MB", record["out"]),
    ]
    return rows


def summary_table(record: dict[str, Any]) -> str:
    """A small aligned table: before/after metrics, trainable parameters, wall time, adapter size."""
    rows = [("", "before", "after")] + summary_rows(record)
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def model_card(out: str, record: dict[str, Any]) -> None:
    """A short README: what was trained on what, the numbers, and how to load it."""
    cfg = record["config"]
    auto = record["auto_class"]
    lines = [
        f"# LoRA adapter: {record['title']}",
        "",
        f"- base model: `{record['model']}`",
        f"- task: `{cfg['task']}`; LoRA r={cfg['r']}, alpha={cfg['alpha']}, dropout={cfg['dropout']}, "
        f"targets: {', '.join(record['target_modules'])}",
        f"- data: {record['data']} ({record['examples']['train']} training / "
        f"{record['examples']['held_out']} held-out examples, seed {cfg['seed']})",
        f"- trained {record['steps']} steps of batch {cfg['batch_size']} in "
        f"{record['timings']['train_s']:.0f} s with lorakit {record['versions']['lorakit']}",
    ]
    if record.get("citation"):
        lines.append(f"- dataset citation: {record['citation']}")
    lines += ["", "| metric | before | after |", "|---|---|---|"]
    lines += [f"| {name} | {b} | {a} |" for name, b, a in summary_rows(record)[: len(record["before"]) - 1]]
    lines += [
        "",
        "Load it (lorakit or PEFT):",
        "",
        "```python",
        f"from transformers import {auto}",
        "from lorakit import PeftModel",
        "",
        f"base = {auto}.from_pretrained({record['model']!r}"
        + (f", num_labels={len(record['labels'])})" if record.get("labels") else ")"),
        'model = PeftModel.from_pretrained(base, "path/to/this/folder")',
        "```",
        "",
        "Files: `adapter_config.json`, `adapter_model.safetensors` (PEFT format), "
        "`metrics.json`, `training.png`.",
        "",
    ]
    (Path(out) / CARD_FILE).write_text("\n".join(lines), encoding="utf-8")
