"""Run the benchmark suite and write results.json, results.md, results.png and the README table.

    python -m benchmarks.run            # full suite (tens of minutes on 2 cores)
    python -m benchmarks.run --quick    # smoke test on a toy model (CI), writes to a temp dir

Every number reported is a ratio measured within one run: training step time to the "floor"
(every weight frozen, gradients flowing), peak memory over the floor's, lorakit to PEFT, and
inference to the base model. Never a lone absolute time: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.common import QUICK, Shape
from benchmarks.report import write_outputs

HERE = Path(__file__).resolve().parent
PAIRS = [
    ("qkvo", "lorakit_qkvo", "peft_qkvo"),
    ("qkvo, dropout 0.05", "lorakit_qkvo_dropout", "peft_qkvo_dropout"),
    ("all-linear", "lorakit_all_linear", "peft_all_linear"),
    ("DoRA qkvo", "lorakit_dora", "peft_dora"),
]
TRAIN_METHODS = ["floor", "full"] + [m for _, a, b in PAIRS for m in (a, b)]


def _run(args: list[str]) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(HERE.parent / "src"), str(HERE.parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_separate(dtype: str, rounds: int, steps: int, quick: bool) -> dict:
    """Each method in a fresh process, methods interleaved within each round."""
    per_round: list[dict[str, dict]] = []
    for r in range(rounds):
        order = TRAIN_METHODS if r % 2 == 0 else TRAIN_METHODS[::-1]
        row = {}
        for method in order:
            print(f"  [train {dtype}] round {r + 1}/{rounds}: {method}", flush=True)
            row[method] = _run(
                ["benchmarks.train_worker", method, "--dtype", dtype, "--steps", str(steps)]
                + (["--quick"] if quick else [])
            )
        per_round.append(row)
    result = {}
    for method in TRAIN_METHODS:
        ratios = [row[method]["median_s"] / row["floor"]["median_s"] for row in per_round]
        mems = [row[method]["peak_over_loaded_mib"] for row in per_round]
        saved = per_round[0][method]["saved_mib"]  # deterministic: the same in every round
        result[method] = {
            "time_vs_floor": statistics.median(ratios),
            "time_spread": [min(ratios), max(ratios)],
            "peak_mib": statistics.median(mems),
            "saved_mib": saved,
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    quick = args.quick
    rounds = args.rounds or (1 if quick else 3)
    steps = 2 if quick else 6
    out_dir = args.out or (HERE if not quick else Path(os.environ.get("TMPDIR", "/tmp")) / "lorakit-bench")
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "make bench" if rounds == 3 else f"python -m benchmarks.run --rounds {rounds}"
    results: dict = {
        "machine": {"cores": os.cpu_count(), "cpu": _cpu_name(), "python": platform.python_version()},
        "command": command if not quick else "python -m benchmarks.run --quick",
        "quick": quick,
        "shape": dataclasses.asdict(QUICK if quick else Shape()),
        "train": {},
        "train_inprocess": {},
        "inference": {},
        "ops": {},
        "compile": {},
        "moe": {},
    }
    for dtype in ("float32", "bfloat16"):
        results["train"][dtype] = train_separate(dtype, rounds, steps, quick)
        print(f"  [train {dtype}] one process, interleaved", flush=True)
        results["train_inprocess"][dtype] = _run(
            [
                "benchmarks.train_inprocess",
                "--dtype",
                dtype,
                "--steps",
                "3" if quick else "30",
                "--methods",
                ",".join(TRAIN_METHODS),
            ]
            + (["--quick"] if quick else [])
        )
    for lib in ("lorakit", "peft"):
        print(f"  [inference] {lib}", flush=True)
        results["inference"][lib] = _run(
            ["benchmarks.infer_worker", "--lib", lib, "--rounds", "1" if quick else "11"]
            + (["--quick"] if quick else [])
        )
    print("  [adapter operations] lorakit and PEFT, interleaved", flush=True)
    results["ops"] = _run(
        ["benchmarks.ops_worker", "--rounds", "1" if quick else "7"] + (["--quick"] if quick else [])
    )
    print("  [torch.compile] lorakit and PEFT, compiled and eager, interleaved", flush=True)
    results["compile"] = _run(
        ["benchmarks.compile_worker", "--steps", "3" if quick else "15"] + (["--quick"] if quick else [])
    )
    print("  [mixture of experts] LoRA on the experts: floor, lorakit, PEFT, interleaved", flush=True)
    results["moe"] = _run(
        ["benchmarks.moe_worker", "--steps", "2" if quick else "10"] + (["--quick"] if quick else [])
    )
    write_outputs(results, out_dir, PAIRS, update_readme=not quick)
    print(f"wrote {out_dir}/results.json, results.md, results.png")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
