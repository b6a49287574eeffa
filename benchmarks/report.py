"""Turn benchmark results into results.json, a Markdown table (also placed in README.md between
``<!-- bench:start -->`` and ``<!-- bench:end -->``) and results.png."""

from __future__ import annotations

import json
from pathlib import Path

START, END = "<!-- bench:start -->", "<!-- bench:end -->"
INFERENCE_ROWS = [
    ("noise control: an identical base model vs base", "base_twin"),
    ("merged q/k/v/o vs base", "merged_qkvo"),
    ("unmerged q/k/v/o vs base", "unmerged_qkvo"),
    ("unmerged all-linear vs base", "unmerged_all_linear"),
    ("4 adapters mixed in a 4×256 batch vs one adapter", "mixed_4x256"),
    ("4 adapters mixed in a 4×16 batch vs one adapter", "mixed_4x16"),
]

OPS_ROWS = [
    ("load an adapter (`PeftModel.from_pretrained`), q/k/v/o", "load_qkvo"),
    ("load an adapter, all-linear", "load_all_linear"),
    ("load a second adapter (`load_adapter`), q/k/v/o", "load_second_qkvo"),
    ("load a second adapter, all-linear", "load_second_all_linear"),
    ("`merge_and_unload`, q/k/v/o", "merge_and_unload_qkvo"),
    ("`merge_and_unload`, all-linear", "merge_and_unload_all_linear"),
]


def _train_table(results: dict, pairs: list) -> list[str]:
    """Step time from the one-process interleaved runs (separate-process timings swing by more than
    the effects measured, down to ratios below the floor, so they stay in results.json only), and
    the saved-for-backward memory, which is exact."""
    lines = [
        "| base dtype | configuration | step time / floor (one process, interleaved) | saved for backward "
        "over floor (MiB, exact) | lorakit / PEFT: time · saved over floor |",
        "|---|---|---|---|---|",
    ]
    for dtype, rows in results["train"].items():
        inproc = results["train_inprocess"][dtype]["ratio_to_floor"]
        floor = rows["floor"]
        floor_saved = f"0 ({floor['saved_mib']:.0f} in all)"
        lines.append(f"| {dtype} | floor (all frozen, gradients flowing) | 1.00 | {floor_saved} | |")
        lines.append(
            f"| {dtype} | full fine-tuning | {inproc['full']:.2f} | "
            f"{rows['full']['saved_mib'] - floor['saved_mib']:+.1f} | |"
        )
        for label, ours, theirs in pairs:
            t_ratio = inproc[ours] / inproc[theirs]
            peft_over = rows[theirs]["saved_mib"] - floor["saved_mib"]
            ours_over = rows[ours]["saved_mib"] - floor["saved_mib"]
            m_ratio = f"{ours_over / peft_over:.2f}" if peft_over > 0.01 else "n/a"
            lines.append(
                f"| {dtype} | **lorakit**, {label} | {inproc[ours]:.2f} | {ours_over:+.1f} | "
                f"{t_ratio:.2f} · {m_ratio} |"
            )
            lines.append(f"| {dtype} | PEFT, {label} | {inproc[theirs]:.2f} | {peft_over:+.1f} | |")
    return lines


def _inference_table(results: dict) -> list[str]:
    lk, pf = results["inference"]["lorakit"]["ratios"], results["inference"]["peft"]["ratios"]
    lines = ["| inference (no grad, float32) | lorakit | PEFT |", "|---|---|---|"]
    for label, key in INFERENCE_ROWS:
        lines.append(f"| {label} | {lk[key]:.3f} | {pf[key]:.3f} |")
    return lines


def _ops_table(results: dict) -> list[str]:
    ratios = results["ops"]["lorakit_over_peft"]
    lines = ["| adapter operation (float32, one process, interleaved) | lorakit / PEFT time |", "|---|---|"]
    for label, key in OPS_ROWS:
        lines.append(f"| {label} | {ratios[key]:.2f} |")
    compiled = results["compile"]
    lines += [
        "",
        "| torch.compile (inductor), q/k/v/o training step, float32 | lorakit | PEFT |",
        "|---|---|---|",
        "| compiled / eager step time | "
        + " | ".join(f"{compiled['compiled_over_eager'][lib]:.2f}" for lib in ("lorakit", "peft"))
        + " |",
        "| graph breaks in a training forward | "
        + " | ".join(str(compiled["graph_breaks"][lib]) for lib in ("lorakit", "peft"))
        + " |",
    ]
    return lines


def _moe_table(results: dict) -> list[str]:
    """LoRA on the experts of a Qwen3-MoE (``moe_worker``): step time over the frozen floor and
    saved-for-backward memory over it, per experts implementation."""
    moe = results.get("moe")
    if not moe:
        return []
    s = moe["shape"]
    lines = [
        f"Mixture of experts: Qwen3-MoE (hidden {s['hidden']}, {s['layers']} layers, {s['experts']} experts "
        f"of width {s['expert_width']}, {s['top_k']} per token), batch {s['batch']} × {s['seq']}, float32, "
        "LoRA r=16 on every expert's `gate_up_proj` and `down_proj` (`target_parameters`).",
        "",
        "| experts implementation | library | step time / floor (one process, interleaved) | "
        "saved for backward over floor (MiB, exact) | lorakit / PEFT: time · saved over floor |",
        "|---|---|---|---|---|",
    ]
    for implementation, row in moe["implementations"].items():
        ratio, saved = row["ratio_to_floor"], row["saved_mib"]
        ours, theirs = saved["lorakit"] - saved["floor"], saved["peft"] - saved["floor"]
        m_ratio = f"{ours / theirs:.2f}" if theirs > 0.01 else "n/a"
        lines.append(
            f"| {implementation} | **lorakit** | {ratio['lorakit']:.2f} | {ours:+.1f} | "
            f"{row['lorakit_over_peft']:.2f} · {m_ratio} |"
        )
        lines.append(f"| {implementation} | PEFT | {ratio['peft']:.2f} | {theirs:+.1f} | |")
    return lines


def markdown(results: dict, pairs: list) -> str:
    m = results["machine"]
    s = results["shape"]
    head = [
        f"Measured with `{results['command']}` on {m['cores']} cores ({m['cpu']}), "
        f"Python {m['python']}. Llama (hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads, "
        f"intermediate {s['intermediate']}, vocab {s['vocab']}), batch {s['batch']} × {s['seq']}, "
        "LoRA r=16 α=32, AdamW; ratios are medians of interleaved runs.",
        "",
    ]
    body = _train_table(results, pairs) + [""] + _inference_table(results) + [""] + _ops_table(results)
    moe = _moe_table(results)
    body += [""] + moe if moe else []
    return "\n".join(head + body) + "\n"


def plot(results: dict, pairs: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5), gridspec_kw={"width_ratios": [3, 3, 2, 2]})
    for ax, key, title in (
        (axes[0], "time", "training step time / floor (one process)"),
        (axes[1], "saved_mib", "saved for backward over the floor (MiB)"),
    ):
        labels, ours, theirs = [], [], []
        for dtype, rows in results["train"].items():
            inproc = results["train_inprocess"][dtype]["ratio_to_floor"]
            for label, a, b in pairs:
                labels.append(f"{label}\n{dtype}")
                if key == "time":
                    ours.append(inproc[a])
                    theirs.append(inproc[b])
                else:
                    ours.append(rows[a][key] - rows["floor"][key])
                    theirs.append(rows[b][key] - rows["floor"][key])
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], ours, 0.4, label="lorakit")
        ax.bar([x + 0.2 for x in xs], theirs, 0.4, label="PEFT")
        if key == "time":
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_ylim(bottom=0.8)
        ax.set_xticks(list(xs), labels, fontsize=7, rotation=35, ha="right")
        ax.set_title(title)
        ax.legend()
    _plot_ops(axes[2], results)
    _plot_moe(axes[3], results)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_ops(ax, results: dict) -> None:  # type: ignore[no-untyped-def]
    """lorakit / PEFT time of the adapter operations (below 1: lorakit is faster)."""
    ratios = results["ops"]["lorakit_over_peft"]
    labels = [key.replace("_all_linear", "\nall-linear").replace("_qkvo", "\nq/k/v/o") for _, key in OPS_ROWS]
    ax.bar(range(len(OPS_ROWS)), [ratios[key] for _, key in OPS_ROWS], 0.6, color="tab:blue")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(list(range(len(OPS_ROWS))), labels, fontsize=7, rotation=35, ha="right")
    ax.set_title("adapter operations: lorakit / PEFT time")


def _plot_moe(ax, results: dict) -> None:  # type: ignore[no-untyped-def]
    """LoRA on MoE experts: step time / floor per implementation, saved MiB over the floor on top."""
    moe = results.get("moe")
    if not moe:
        ax.set_axis_off()
        return
    impls = list(moe["implementations"])
    for offset, lib in ((-0.2, "lorakit"), (0.2, "peft")):
        rows = [moe["implementations"][i] for i in impls]
        heights = [r["ratio_to_floor"][lib] for r in rows]
        bars = ax.bar(
            [x + offset for x in range(len(impls))], heights, 0.4, label="PEFT" if lib == "peft" else lib
        )
        for bar, r in zip(bars, rows, strict=True):
            over = r["saved_mib"][lib] - r["saved_mib"]["floor"]
            ax.annotate(
                f"+{over:.0f} MiB",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(list(range(len(impls))), impls, fontsize=8)
    ax.set_title("LoRA on MoE experts: step / floor\n(saved for backward over floor on top)")
    ax.legend()


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
