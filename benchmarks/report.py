"""Turn benchmark results into results.json, a Markdown table (also placed in README.md between
``<!-- bench:start -->`` and ``<!-- bench:end -->``) and results.png."""

from __future__ import annotations

import json
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
INFERENCE_ROWS = [
    ("merged q/k/v/o vs base", "merged_qkvo"),
    ("unmerged q/k/v/o vs base", "unmerged_qkvo"),
    ("unmerged all-linear vs base", "unmerged_all_linear"),
    ("4 adapters mixed in a 4×256 batch vs one adapter", "mixed_4x256"),
    ("4 adapters mixed in a 4×16 batch vs one adapter", "mixed_4x16"),
]


def _train_table(results: dict, pairs: list) -> list[str]:
    lines = ["| base dtype | configuration | step / floor (separate · one process) | "
             "memory over floor (MiB) | lorakit / PEFT: time · memory over floor |",
             "|---|---|---|---|---|"]
    for dtype, rows in results["train"].items():
        inproc = results["train_inprocess"][dtype]["ratio_to_floor"]
        floor_mem = rows["floor"]["peak_mib"]

        def cells(method: str, rows: dict = rows, inproc: dict = inproc, floor_mem: float = floor_mem
                  ) -> str:
            row = rows[method]
            return (f"{row['time_vs_floor']:.2f} · {inproc[method]:.2f} | "
                    f"{row['peak_mib'] - floor_mem:+.0f}")

        lines.append(f"| {dtype} | floor (all frozen, gradients flowing) | 1.00 · 1.00 | "
                     f"0 ({floor_mem:.0f} over the loaded model) | |")
        lines.append(f"| {dtype} | full fine-tuning | {cells('full')} | |")
        for label, ours, theirs in pairs:
            t_ratio = rows[ours]["time_vs_floor"] / rows[theirs]["time_vs_floor"]
            peft_over = rows[theirs]["peak_mib"] - floor_mem
            ours_over = rows[ours]["peak_mib"] - floor_mem
            m_ratio = f"{ours_over / peft_over:.2f}" if peft_over > 1 else "n/a"
            lines.append(f"| {dtype} | **lorakit**, {label} | {cells(ours)} | {t_ratio:.2f} · {m_ratio} |")
            lines.append(f"| {dtype} | PEFT, {label} | {cells(theirs)} | |")
    return lines


def _inference_table(results: dict) -> list[str]:
    lk, pf = results["inference"]["lorakit"]["ratios"], results["inference"]["peft"]["ratios"]
    lines = ["| inference (no grad, float32) | lorakit | PEFT |", "|---|---|---|"]
    for label, key in INFERENCE_ROWS:
        lines.append(f"| {label} | {lk[key]:.3f} | {pf[key]:.3f} |")
    return lines


def markdown(results: dict, pairs: list) -> str:
    m = results["machine"]
    s = results["shape"]
    head = [f"Measured with `{results['command']}` on {m['cores']} cores ({m['cpu']}), "
            f"Python {m['python']}. Llama (hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads, "
            f"intermediate {s['intermediate']}, vocab {s['vocab']}), batch {s['batch']} × {s['seq']}, "
            "LoRA r=16 α=32, AdamW; ratios are medians of interleaved runs.", ""]
    return "\n".join(head + _train_table(results, pairs) + [""] + _inference_table(results)) + "\n"


def plot(results: dict, pairs: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "time_vs_floor", "training step time / floor"),
                           (axes[1], "peak_mib", "peak memory over the floor (MiB)")):
        labels, ours, theirs = [], [], []
        for dtype, rows in results["train"].items():
            floor = 0.0 if key == "time_vs_floor" else rows["floor"]["peak_mib"]
            for label, a, b in pairs:
                labels.append(f"{label}\n{dtype}")
                ours.append(rows[a][key] - floor)
                theirs.append(rows[b][key] - floor)
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], ours, 0.4, label="lorakit")
        ax.bar([x + 0.2 for x in xs], theirs, 0.4, label="PEFT")
        if key == "time_vs_floor":
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_ylim(bottom=0.8)
        ax.set_xticks(list(xs), labels, fontsize=7)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict, out_dir: Path, pairs: list, update_readme: bool) -> None:
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    table = markdown(results, pairs)
    (out_dir / "results.md").write_text(table)
    plot(results, pairs, out_dir / "results.png")
    readme = Path(__file__).resolve().parent.parent / "README.md"
    if update_readme and readme.exists():
        text = readme.read_text()
        if START in text and END in text:
            before, rest = text.split(START, 1)
            after = rest.split(END, 1)[1]
            readme.write_text(f"{before}{START}\n{table}{END}{after}")
