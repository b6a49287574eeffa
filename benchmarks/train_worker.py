"""One training configuration in a fresh process: step times and peak memory, as JSON on stdout.

python -m benchmarks.train_worker METHOD --dtype float32 --steps 8 [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.common import (
    QUICK,
    Shape,
    batch,
    make,
    reset_peak_rss,
    rss_kib,
    saved_activation_bytes,
    set_threads,
    train_step,
)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("method")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    set_threads()
    shape = QUICK if args.quick else Shape()
    model, optimizer = make(args.method, shape, getattr(torch, args.dtype))
    ids = batch(shape)
    saved = saved_activation_bytes(model, ids)
    loaded = rss_kib("VmRSS")
    reset_peak_rss()
    train_step(model, optimizer, ids)  # warm-up (inside the peak: the first step allocates the most)
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        train_step(model, optimizer, ids)
        times.append(time.perf_counter() - start)
    peak = rss_kib("VmHWM")
    print(
        json.dumps(
            {
                "method": args.method,
                "dtype": args.dtype,
                "median_s": statistics.median(times),
                "times_s": times,
                "peak_over_loaded_mib": (peak - loaded) / 1024,
                "saved_mib": saved / 2**20,
            }
        )
    )


if __name__ == "__main__":
    main()
