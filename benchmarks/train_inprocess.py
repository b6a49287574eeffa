"""All training configurations in one process, stepped round-robin so that they share the
machine's noise: JSON with each method's median step time and its ratio to the floor.

    python -m benchmarks.train_inprocess --steps 30 --dtype float32 [--quick] [--methods a,b,...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.common import METHODS, QUICK, Shape, batch, make, set_threads, train_step


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    set_threads()
    shape = QUICK if args.quick else Shape()
    methods = args.methods.split(",")
    runs = {m: make(m, shape, getattr(torch, args.dtype)) for m in methods}
    ids = batch(shape)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for model, optimizer in runs.values():
        train_step(model, optimizer, ids)
    for _ in range(args.steps):
        for method, (model, optimizer) in runs.items():
            start = time.perf_counter()
            train_step(model, optimizer, ids)
            times[method].append(time.perf_counter() - start)
    floor = times["floor"]
    print(
        json.dumps(
            {
                "dtype": args.dtype,
                "median_s": {m: statistics.median(t) for m, t in times.items()},
                "ratio_to_floor": {
                    m: statistics.median(a / b for a, b in zip(t, floor, strict=True))
                    for m, t in times.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
