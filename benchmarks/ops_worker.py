"""Adapter operations, lorakit next to PEFT in one process: loading an adapter and merge_and_unload.

    python -m benchmarks.ops_worker --rounds 7 [--quick]

One adapter file per target set (written once by lorakit; PEFT reads the same file) and, per round,
in alternating library order:

- ``load``: ``PeftModel.from_pretrained(base, dir)`` on a fresh copy of the base model;
- ``load_second``: ``model.load_adapter(dir, "second")`` into an already wrapped model;
- ``merge_and_unload``: on a freshly loaded model.

Copying the base and wrapping it for ``merge_and_unload`` are outside the timed region. Prints JSON:
each library's median time per operation and the median over rounds of lorakit / PEFT.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import QKVO, QUICK, Shape, build_base, library, set_threads, timed

LIBS = ("lorakit", "peft")


def _save_adapter(template: nn.Module, targets: list[str] | str, path: Path) -> None:
    import lorakit

    torch.manual_seed(0)
    cfg = lorakit.LoraConfig(r=16, lora_alpha=32, target_modules=targets, init_lora_weights=False)
    lorakit.get_peft_model(copy.deepcopy(template), cfg).save_pretrained(path)


def _one_round(lib_name: str, template: nn.Module, path: Path) -> dict[str, float]:
    lib = library(lib_name)
    base = copy.deepcopy(template)
    out = {"load": timed(lambda: lib.PeftModel.from_pretrained(base, path))}
    model = lib.PeftModel.from_pretrained(copy.deepcopy(template), path)
    out["load_second"] = timed(lambda: model.load_adapter(path, "second"))
    model = lib.PeftModel.from_pretrained(copy.deepcopy(template), path)
    out["merge_and_unload"] = timed(model.merge_and_unload)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    set_threads()
    shape = QUICK if args.quick else Shape()
    template = build_base(shape).eval()
    samples: dict[str, dict[str, list[float]]] = {lib: {} for lib in LIBS}
    with tempfile.TemporaryDirectory() as tmp:
        for label, targets in (("qkvo", QKVO), ("all_linear", "all-linear")):
            path = Path(tmp) / label
            _save_adapter(template, targets, path)
            for lib in LIBS:  # warm-up: imports, first-call caches and the page cache
                _one_round(lib, template, path)
            for r in range(args.rounds):
                for lib in LIBS if r % 2 == 0 else LIBS[::-1]:
                    for op, seconds in _one_round(lib, template, path).items():
                        samples[lib].setdefault(f"{op}_{label}", []).append(seconds)
    ours, theirs = samples["lorakit"], samples["peft"]
    print(
        json.dumps(
            {
                "median_s": {lib: {k: statistics.median(v) for k, v in samples[lib].items()} for lib in LIBS},
                "lorakit_over_peft": {
                    k: statistics.median(a / b for a, b in zip(ours[k], theirs[k], strict=True)) for k in ours
                },
            }
        )
    )


if __name__ == "__main__":
    main()
