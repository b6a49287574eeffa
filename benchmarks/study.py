"""What to choose: LoRA's initialisations and variants, targets and learning rates, on both presets.

``make study`` (or ``python -m benchmarks.study``) runs ``lorakit.cli.train`` (the Python entry of
``lorakit train``) for every setting below x 3 seeds on ``minilm-vader`` (held-out accuracy) and
``smollm2-trec`` (exact match and answer perplexity) at a fixed step budget (``BUDGET``), and writes
``benchmarks/study.json`` (every run), ``benchmarks/study.md`` (mean, std and min-max per setting)
and ``benchmarks/study.png`` (the held-out metric against the steps).

Runs are independent processes' work (``--workers``, each run with ``threads=1``); each finished run
is saved at once, so an interrupted study keeps its table and a rerun skips the runs it already has
(``--fresh`` starts over). The queue goes seed by seed (all settings at seed 0, then seed 1, ...),
so a study cut short still compares every setting. A seed changes the held-out split, the adapter's
initialisation and the data order.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import statistics
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PRESETS = ("minilm-vader", "smollm2-trec")
SEEDS = (0, 1, 2)

# The step budget and held-out size per preset, chosen from measured runs on a shared 2-core machine
# (about 0.25 core per run while other work ran) so that the study fits in about 1.5 hours; see the
# README's study section. The presets' own budgets are 200 and 100 steps on the whole held-out split.
BUDGET: dict[str, dict[str, Any]] = {
    "minilm-vader": {"max_steps": 60, "eval_steps": 20, "max_eval_samples": 300, "save_steps": 1000},
    "smollm2-trec": {"max_steps": 24, "eval_steps": 12, "max_eval_samples": 60, "save_steps": 1000},
}
# The baseline every setting changes, pinned (the presets' settings when the study was made), so that
# the study means the same after the presets' defaults move.
BASE: dict[str, dict[str, Any]] = {
    "minilm-vader": {"r": 8, "alpha": 16.0, "lr": 2e-3, "target_modules": ["query", "value"]},
    "smollm2-trec": {"r": 8, "alpha": 16.0, "lr": 2e-3, "target_modules": ["q_proj", "v_proj"]},
}

# setting -> the changes on top of the preset (the preset's own: r=8, alpha=16, attention q/v, lr 2e-3)
SETTINGS: dict[str, dict[str, Any]] = {
    "plain LoRA": {},
    "rsLoRA": {"use_rslora": True},
    "LoRA+ (ratio 16)": {"loraplus_ratio": 16.0},
    "PiSSA": {"init": "pissa"},
    "OLoRA": {"init": "olora"},
    "EVA": {"init": "eva"},
    "LoRA-GA": {"init": "lora-ga"},
    "DoRA": {"use_dora": True},
    "all-linear": {"target_modules": "all-linear"},
    "lr 5e-4": {"lr": 5e-4},
    "lr 1e-3": {"lr": 1e-3},
    "lr 5e-3": {"lr": 5e-3},
    # the same sweep at r=32 with alpha kept at 16 (the 1/r scaling under which "LoRA without regret"
    # finds the best learning rate about independent of the rank)
    "r32 lr 5e-4": {"r": 32, "lr": 5e-4},
    "r32 lr 1e-3": {"r": 32, "lr": 1e-3},
    "r32 lr 2e-3": {"r": 32},
    "r32 lr 5e-3": {"r": 32, "lr": 5e-3},
}
# plotted against the steps (the learning-rate sweep has its own table rows)
# smollm2-trec costs about 4x a minilm-vader run: its first tier is these settings, the rest come
# after every first-tier run (seed by seed again), so that a study cut short still has a table
TREC_FIRST = ["plain LoRA", "LoRA+ (ratio 16)", "all-linear", "lr 5e-4", "lr 5e-3"]
MAIN = ["plain LoRA", "rsLoRA", "LoRA+ (ratio 16)", "PiSSA", "OLoRA", "EVA", "LoRA-GA", "DoRA", "all-linear"]
METRICS = {"minilm-vader": ["accuracy"], "smollm2-trec": ["exact_match", "perplexity"]}


def key(run: dict[str, Any]) -> str:
    return f"{run['preset']}|{run['setting']}|{run['seed']}"


def queue(presets: list[str], settings: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    """Every run, in two tiers (minilm-vader's settings and smollm2-trec's ``TREC_FIRST``, then
    smollm2-trec's others), each seed-major: a cut leaves a tier's settings with equal seeds."""

    def first(preset: str, name: str) -> bool:
        return preset != "smollm2-trec" or name in TREC_FIRST

    jobs = [{"preset": p, "setting": n, "seed": seed} for seed in seeds for p in presets for n in settings]
    return [j for j in jobs if first(j["preset"], j["setting"])] + [
        j for j in jobs if not first(j["preset"], j["setting"])
    ]


def run_one(job: dict[str, Any], out_root: str, budget: dict[str, Any]) -> dict[str, Any]:
    """One ``lorakit train`` run in this (worker) process; its output goes to ``<out>/train.log``."""
    from lorakit.cli import train
    from lorakit.cli.settings import TrainSettings

    out = Path(out_root, job["preset"], slug(job["setting"]), f"seed{job['seed']}")
    out.mkdir(parents=True, exist_ok=True)
    changes = {**BASE[job["preset"]], **budget, **SETTINGS[job["setting"]], "seed": job["seed"], "threads": 1}
    settings = TrainSettings.from_preset(job["preset"], **changes, out=str(out), overwrite=True)
    began = time.perf_counter()
    with open(out / "train.log", "w", encoding="utf-8") as log, _redirected(log):
        record = train(settings)
    wall = time.perf_counter() - began
    assert record is not None
    return {
        **job,
        "changes": SETTINGS[job["setting"]],
        "budget": budget,
        "before": record["before"],
        "after": record["after"],
        "eval_curve": record["eval_curve"],
        "steps": record["steps"],
        "held_out": record["examples"]["held_out"],
        "trainable": record["parameters"]["trainable"],
        "train_s": record["timings"]["train_s"],
        "wall_s": wall,
        "out": str(out),
    }


@contextlib.contextmanager
def _redirected(log: Any) -> Any:
    """File descriptors 1 and 2 (progress bars, warnings) into ``log`` while a run trains."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-")


# -- summary -------------------------------------------------------------------------------------


def stats(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """preset -> setting -> {metric: stats, "wall_s": stats, "seeds": [...]}."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for preset in PRESETS:
        for name in SETTINGS:
            mine = [r for r in runs if r["preset"] == preset and r["setting"] == name]
            if not mine:
                continue
            row: dict[str, Any] = {m: stats([r["after"][m] for r in mine]) for m in METRICS[preset]}
            row["wall_s"] = stats([r["wall_s"] for r in mine])
            row["seeds"] = sorted(r["seed"] for r in mine)
            out.setdefault(preset, {})[name] = row
    return out


def _cell(s: dict[str, float], digits: int) -> str:
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f} (1 seed)"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def markdown(runs: list[dict[str, Any]]) -> str:
    summary = summarise(runs)
    lines = [
        "<!-- written by `make study` (benchmarks/study.py); do not edit by hand -->",
        "Cells: mean ± standard deviation over seeds (min–max). Δ: mean minus plain LoRA's mean. "
        "Wall time: mean seconds per run (load, evaluation before and after, training), one thread.",
        "",
    ]
    for preset, rows in summary.items():
        budget = BUDGET[preset]
        metrics = METRICS[preset]
        mine = [r for r in runs if r["preset"] == preset]
        untrained = ", ".join(
            f"{m} {statistics.fmean(r['before'][m] for r in mine):.{2 if m == 'perplexity' else 3}f}"
            for m in metrics
        )
        lines.append(
            f"**{preset}**: {budget['max_steps']} steps, held-out metric on "
            f"{budget['max_eval_samples']} examples (before training: {untrained})"
        )
        lines.append("")
        head = ["setting", "changes"]
        for m in metrics:
            head += [m, "Δ"]
        head += ["seeds", "wall s"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        plain = rows.get("plain LoRA")
        for name, row in rows.items():
            changes = ", ".join(f"{k}={v}" for k, v in SETTINGS[name].items()) or "(the preset)"
            cells = [name, changes]
            for m in metrics:
                digits = 2 if m == "perplexity" else 3
                cells.append(_cell(row[m], digits))
                delta = row[m]["mean"] - plain[m]["mean"] if plain else math.nan
                cells.append("" if name == "plain LoRA" else f"{delta:+.{digits}f}")
            cells += [str(len(row["seeds"])), f"{row['wall_s']['mean']:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Held-out metric (mean over seeds) against steps, one panel per preset, the main settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = [p for p in PRESETS if any(r["preset"] == p for r in runs)]
    if not presets:
        return
    fig, axes = plt.subplots(1, len(presets), figsize=(6.5 * len(presets), 4.5), squeeze=False)
    for ax, preset in zip(axes[0], presets, strict=True):
        metric = "accuracy" if preset == "minilm-vader" else "perplexity"
        for i, name in enumerate(MAIN):
            mine = [r for r in runs if r["preset"] == preset and r["setting"] == name and r["eval_curve"]]
            if not mine:
                continue
            steps = sorted({p["step"] for r in mine for p in r["eval_curve"]})
            means = [statistics.fmean(r["before"][metric] for r in mine)]  # step 0: before training
            for step in steps:
                values = [p[metric] for r in mine for p in r["eval_curve"] if p["step"] == step]
                means.append(statistics.fmean(values))
            seeds = f"{len(mine)} seed{'s' if len(mine) > 1 else ''}"
            ax.plot([0, *steps], means, marker="o", ms=3, color=f"C{i % 10}", label=f"{name} ({seeds})")
        sample = min(256, BUDGET[preset]["max_eval_samples"])
        ax.set_xlabel("step")
        ax.set_ylabel(f"held-out {metric}, mean over seeds")
        ax.set_title(f"{preset}: {sample} held-out examples every {BUDGET[preset]['eval_steps']} steps")
        if metric == "perplexity":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(runs: list[dict[str, Any]], out: Path) -> None:
    order = list(SETTINGS)
    runs = sorted(runs, key=lambda r: (PRESETS.index(r["preset"]), order.index(r["setting"]), r["seed"]))
    data = {"budget": BUDGET, "settings": SETTINGS, "summary": summarise(runs), "runs": runs}
    (out / "study.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    (out / "study.md").write_text(markdown(runs), encoding="utf-8")
    plot(runs, out / "study.png")


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from tqdm import tqdm

    ap = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets")
    ap.add_argument("--settings", default=None, help="comma-separated setting names (default: all)")
    ap.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds 0..N-1")
    ap.add_argument("--workers", type=int, default=2, help="runs in parallel (each with one thread)")
    ap.add_argument("--runs", default="runs/study", help="where the runs' folders go")
    ap.add_argument("--out", default=str(HERE), help="where study.json / .md / .png go")
    ap.add_argument("--fresh", action="store_true", help="ignore the runs already in study.json")
    ap.add_argument("--max-steps", type=int, default=None, help="override the budget (a smoke test)")
    ap.add_argument("--report", action="store_true", help="only rewrite study.md / .png from study.json")
    args = ap.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        write(json.loads((out / "study.json").read_text())["runs"], out)
        print(markdown(json.loads((out / "study.json").read_text())["runs"]))
        return 0
    presets = [p for p in args.presets.split(",") if p]
    names = args.settings.split(",") if args.settings else list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS] + [p for p in presets if p not in PRESETS]
    if unknown:
        ap.error(f"unknown: {unknown}; settings: {list(SETTINGS)}")
    budget = {p: dict(BUDGET[p]) for p in presets}
    if args.max_steps:
        for b in budget.values():
            b.update(max_steps=args.max_steps, eval_steps=max(1, args.max_steps // 2))
    done: list[dict[str, Any]] = []
    if not args.fresh and (out / "study.json").is_file():
        done = json.loads((out / "study.json").read_text())["runs"]
    have = {key(r) for r in done}
    todo = [j for j in queue(presets, names, list(range(args.seeds))) if key(j) not in have]
    print(f"{len(todo)} runs to do ({len(have)} already in {out / 'study.json'}), {args.workers} at a time")
    bar = tqdm(total=len(todo), unit="run", dynamic_ncols=True)
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        pending = {pool.submit(run_one, j, args.runs, budget[j["preset"]]): j for j in todo}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                job = pending.pop(future)
                try:
                    result = future.result()
                except Exception as exc:  # noqa: BLE001 - one failed run must not end the study
                    bar.write(f"FAILED {key(job)}: {type(exc).__name__}: {exc}")
                    bar.update(1)
                    continue
                done.append(result)
                write(done, out)
                metric = METRICS[job["preset"]][0]
                bar.write(f"{key(job)}: {metric} {result['after'][metric]:.4f} in {result['wall_s']:.0f} s")
                bar.set_postfix_str(f"last {job['setting']}")
                bar.update(1)
    bar.close()
    write(done, out)
    print(markdown(done))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
