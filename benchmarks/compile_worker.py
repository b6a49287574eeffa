"""torch.compile against eager, for lorakit and PEFT, in one process: training steps interleaved.

    python -m benchmarks.compile_worker --steps 15 [--quick]

Each library's q/k/v/o model is trained eagerly and, as a second copy with the same weights, through
``torch.compile`` (inductor). Compilation happens in the warm-up steps, outside the timed region.
Prints JSON: per library the median over steps of compiled / eager step time, and the graph breaks
``torch._dynamo.explain`` finds in a training forward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.common import QUICK, Shape, batch, make, set_threads, train_step

LIBS = {"lorakit": "lorakit_qkvo", "peft": "peft_qkvo"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    set_threads()
    shape = QUICK if args.quick else Shape()
    ids = batch(shape)
    runs, breaks = {}, {}
    for lib, method in LIBS.items():
        eager, eager_opt = make(method, shape, torch.float32)
        compiled, compiled_opt = make(method, shape, torch.float32)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(compiled)(input_ids=ids, labels=ids)
        breaks[lib] = explanation.graph_break_count
        torch._dynamo.reset()
        runs[(lib, "eager")] = (eager, eager_opt)
        runs[(lib, "compiled")] = (torch.compile(compiled), compiled_opt)
    for model, optimizer in runs.values():  # compiles here, and warms the eager caches alike
        for _ in range(2):
            train_step(model, optimizer, ids)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for _ in range(args.steps):
        for key, (model, optimizer) in runs.items():
            start = time.perf_counter()
            train_step(model, optimizer, ids)
            times[key].append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "compiled_over_eager": {
                    lib: statistics.median(
                        c / e for c, e in zip(times[(lib, "compiled")], times[(lib, "eager")], strict=True)
                    )
                    for lib in LIBS
                },
                "graph_breaks": breaks,
            }
        )
    )


if __name__ == "__main__":
    main()
