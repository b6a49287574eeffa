"""Inference costs in one process, interleaved: base, merged, unmerged, and mixed-adapter batches.

    python -m benchmarks.infer_worker --lib lorakit|peft --rounds 5 [--quick]

Prints JSON: median forward time per case and its ratio to the base model (or, for mixed batches,
to a single-adapter batch of the same shape), measured in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch

from benchmarks.common import QKVO, QUICK, Shape, batch, build_base, library, set_threads, timed


def build_cases(lib_name: str, shape: Shape) -> dict[str, Callable[[], object]]:
    lib = library(lib_name)
    long_ids, short_ids = batch(shape), batch(Shape(**{**shape.__dict__, "seq": 16}))
    base = build_base(shape).eval()
    twin = build_base(shape).eval()  # the noise control: an identical model timed like the others
    cases: dict[str, Callable[[], object]] = {
        "base": lambda: base(input_ids=long_ids),
        "base_twin": lambda: twin(input_ids=long_ids),
    }
    for label, targets in (("qkvo", QKVO), ("all_linear", "all-linear")):
        cfg = lib.LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)
        model = lib.get_peft_model(build_base(shape).eval(), cfg).eval()
        cases[f"unmerged_{label}"] = (lambda m: lambda: m(input_ids=long_ids))(model)
    merged = lib.get_peft_model(
        build_base(shape).eval(),
        lib.LoraConfig(r=16, lora_alpha=32, target_modules=QKVO, init_lora_weights=False),
    ).eval()
    merged.merge_adapter()
    cases["merged_qkvo"] = lambda: merged(input_ids=long_ids)
    multi = lib.get_peft_model(
        build_base(shape).eval(),
        lib.LoraConfig(r=16, lora_alpha=32, target_modules=QKVO, init_lora_weights=False),
    ).eval()
    for i in range(1, 4):
        multi.add_adapter(
            f"a{i}", lib.LoraConfig(r=16, lora_alpha=32, target_modules=QKVO, init_lora_weights=False)
        )
    names = ["default", "a1", "a2", "a3"]
    for label, ids in (("4x256", long_ids), ("4x16", short_ids)):
        rows = [names[i % 4] for i in range(ids.shape[0])]
        cases[f"single_{label}"] = (lambda x: lambda: multi(input_ids=x))(ids)
        cases[f"mixed_{label}"] = (lambda x, r: lambda: multi(input_ids=x, adapter_names=r))(ids, rows)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lib", choices=["lorakit", "peft"], required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    set_threads()
    shape = QUICK if args.quick else Shape()
    cases = build_cases(args.lib, shape)
    samples: dict[str, list[float]] = {k: [] for k in cases}
    with torch.no_grad():
        for fn in cases.values():
            fn()
        for _ in range(args.rounds):
            # one call of every case per repeat: a case and its reference run seconds apart at most
            round_times: dict[str, list[float]] = {k: [] for k in cases}
            for _ in range(args.repeat):
                for name, fn in cases.items():
                    round_times[name].append(timed(fn))
            for name, values in round_times.items():
                samples[name].append(statistics.median(values))
    ratios = {}
    for name, values in samples.items():
        ref = samples["single_" + name.split("_", 1)[1]] if name.startswith("mixed_") else samples["base"]
        ratios[name] = statistics.median(v / r for v, r in zip(values, ref, strict=True))
    print(
        json.dumps(
            {
                "lib": args.lib,
                "ratios": ratios,
                "median_s": {k: statistics.median(v) for k, v in samples.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
