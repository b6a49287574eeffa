"""QLoRA benchmark: lorakit and PEFT on the same quantized bases, side by side in one process.

    python -m benchmarks.quantized            # benchmark Llama + SmolLM2-135M (if installed), README table
    python -m benchmarks.quantized --quick    # toy shape, temp dir (the test suite's smoke test)

Reported, all as ratios measured within one run:

* base-model memory (``lorakit.base_model_bytes``: weights as stored) NF4 / bf16 / fp32, for the
  whole model and for the linear weights alone, on the benchmark Llama and SmolLM2-135M;
* training-step time lorakit / PEFT on NF4, int8 (bitsandbytes) and int8 (torchao) bases (bf16
  activations, r=16 on q/k/v/o, AdamW), the QLoRA step over LoRA on a bf16 base, all stepped
  round-robin so they share the machine's noise;
* memory autograd keeps for backward over the quantized floor (the frozen quantized model with
  gradients flowing), exact, with and without dropout;
* peak resident memory of one training step over the loaded model, each method in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import (
    QKVO,
    QUICK,
    Shape,
    batch,
    build_base,
    library,
    reset_peak_rss,
    rss_kib,
    set_threads,
)

HERE = Path(__file__).resolve().parent
START, END = "<!-- qbench:start -->", "<!-- qbench:end -->"
# method → (library or None for the floor, base: "nf4" | "int8" | "int8-ao" | "bf16", dropout)
METHODS: dict[str, tuple[str | None, str, float]] = {
    "floor_nf4": (None, "nf4", 0.0),
    "lorakit_nf4": ("lorakit", "nf4", 0.0),
    "peft_nf4": ("peft", "nf4", 0.0),
    "lorakit_nf4_dropout": ("lorakit", "nf4", 0.05),
    "peft_nf4_dropout": ("peft", "nf4", 0.05),
    "floor_int8": (None, "int8", 0.0),
    "lorakit_int8": ("lorakit", "int8", 0.0),
    "peft_int8": ("peft", "int8", 0.0),
    "floor_int8-ao": (None, "int8-ao", 0.0),
    "lorakit_int8-ao": ("lorakit", "int8-ao", 0.0),
    "peft_int8-ao": ("peft", "int8-ao", 0.0),
    "lorakit_bf16": ("lorakit", "bf16", 0.0),
}
PAIRS = [
    ("NF4", "nf4"),
    ("NF4, dropout 0.05", "nf4_dropout"),
    ("int8", "int8"),
    ("int8 (torchao)", "int8-ao"),
]


def load(folder: Path, base: str, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The saved model loaded as ``base`` ("fp32", "bf16" or a name of ``lorakit.QUANTIZATIONS``)."""
    import transformers

    import lorakit

    kwargs = {}
    if base in lorakit.QUANTIZATIONS:
        kwargs["quantization_config"] = lorakit.quantization_config(base, compute_dtype=dtype)
    else:
        dtype = torch.float32 if base == "fp32" else torch.bfloat16
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)


def _no_cpu_repacking(model: nn.Module) -> nn.Module:
    # bitsandbytes' AVX512-BF16 repacking stops gradients (see lorakit.layers.bnb); PEFT's models get
    # it switched off too, so both sides run the same kernels
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def make(method: str, folder: Path) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    lib, base, dropout = METHODS[method]
    model = _no_cpu_repacking(load(folder, base))
    if lib is None:
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()
        return model.train(), None
    mod = library(lib)
    config = mod.LoraConfig(r=16, lora_alpha=32, target_modules=QKVO, lora_dropout=dropout)
    model = mod.get_peft_model(model, config).train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def step(model: nn.Module, optimizer: torch.optim.Optimizer | None, ids: torch.Tensor) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def linear_bytes(model: nn.Module) -> int:
    """Bytes of the linear layers' weights as stored (quantized or not), output head excluded."""
    import lorakit

    head = model.get_output_embeddings()
    layers = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head]
    return sum(lorakit.base_model_bytes(nn.ModuleList([m])) for m in layers)


def memory(folder: Path) -> dict[str, dict[str, float]]:
    import lorakit

    out = {}
    for base in ("fp32", "bf16", "nf4", "int8", "int8-ao"):
        model = load(folder, base)
        out[base] = {
            "model_mib": lorakit.base_model_bytes(model) / 2**20,
            "linear_mib": linear_bytes(model) / 2**20,
        }
        del model
    return out


def _storages(t: torch.Tensor) -> list[tuple[int, int]]:
    """(data pointer, bytes) of the storages behind ``t``: its parts' for a tensor subclass (torchao)."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        return [s for name in t.__tensor_flatten__()[0] for s in _storages(getattr(t, name))]
    storage = t.untyped_storage()
    return [(storage.data_ptr(), storage.nbytes())]


def saved_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of one training forward (distinct storages, model
    weights excluded): exact, without allocator noise."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages.update(_storages(t))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    weights = {ptr for p in [*model.parameters(), *model.buffers()] for ptr, _ in _storages(p)}
    return sum(n for ptr, n in storages.items() if ptr not in weights)


def timings(folder: Path, shape: Shape, steps: int) -> dict:
    runs = {m: make(m, folder) for m in METHODS}
    ids = batch(shape)
    saved = {m: saved_bytes(model, ids) / 2**20 for m, (model, _) in runs.items()}
    times: dict[str, list[float]] = {m: [] for m in runs}
    for model, optimizer in runs.values():
        step(model, optimizer, ids)
    for _ in range(steps):
        for method, (model, optimizer) in runs.items():
            start = time.perf_counter()
            step(model, optimizer, ids)
            times[method].append(time.perf_counter() - start)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

    floors = {m: f"floor_{METHODS[m][1]}" for m in runs if METHODS[m][1] != "bf16"}
    return {
        "median_s": {m: statistics.median(t) for m, t in times.items()},
        "lorakit_over_peft": {key: ratio(f"lorakit_{key}", f"peft_{key}") for _, key in PAIRS},
        "qlora_over_bf16_lora": ratio("lorakit_nf4", "lorakit_bf16"),
        "saved_mib": saved,
        "saved_over_floor_mib": {m: saved[m] - saved[f] for m, f in floors.items()},
    }


def peak_one(method: str, folder: Path, shape: Shape) -> float:
    """In this (fresh) process: MiB of resident memory one training step adds to the loaded model."""
    model, optimizer = make(method, folder)
    ids = batch(shape)
    loaded = rss_kib("VmRSS")
    reset_peak_rss()
    step(model, optimizer, ids)
    return (rss_kib("VmHWM") - loaded) / 1024


def peaks(folder: Path, quick: bool) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), str(HERE.parent)])}
    out = {}
    for method in METHODS:
        args = [sys.executable, "-m", "benchmarks.quantized", "--peak", method, "--folder", str(folder)]
        done = subprocess.run(args + (["--quick"] if quick else []), capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"peak worker {method} failed:\n{done.stderr[-2000:]}")
        out[method] = float(done.stdout.strip().splitlines()[-1])
    return out


def table(results: dict) -> str:
    t = results["timing"]
    lines = [
        "| quantized base | lorakit / PEFT step time | saved for backward over the quantized floor, "
        "lorakit · PEFT (MiB, exact) | peak step memory over loaded, lorakit · PEFT (MiB) |",
        "|---|---|---|---|",
    ]
    for label, key in PAIRS:
        over = t["saved_over_floor_mib"]
        peak = results.get("peak_mib")
        peaks_cell = f"{peak[f'lorakit_{key}']:.0f} · {peak[f'peft_{key}']:.0f}" if peak else "not run"
        lines.append(
            f"| {label} | {t['lorakit_over_peft'][key]:.2f} | {over[f'lorakit_{key}']:.1f} · "
            f"{over[f'peft_{key}']:.1f} | {peaks_cell} |"
        )
    lines += [
        "",
        f"QLoRA (NF4) step / LoRA step on a bf16 base (lorakit): {t['qlora_over_bf16_lora']:.2f}",
        "",
    ]
    lines += [
        "| base model memory (weights as stored) | fp32 | bf16 | NF4 | int8 | int8 (torchao) | NF4 / bf16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, mem in results["memory"].items():
        for part, label in (("model_mib", "whole model"), ("linear_mib", "linear weights")):
            cells = " | ".join(f"{mem[b][part]:.1f} MiB" for b in ("fp32", "bf16", "nf4", "int8", "int8-ao"))
            lines.append(f"| {name}, {label} | {cells} | {mem['nf4'][part] / mem['bf16'][part]:.2f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = results["timing"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = [label for label, _ in PAIRS]
    a.bar(labels, [t["lorakit_over_peft"][k] for _, k in PAIRS], color="#4477aa")
    a.axhline(1.0, color="k", lw=0.8)
    a.set_title("QLoRA step time, lorakit / PEFT")
    a.tick_params(axis="x", labelrotation=20)
    over = t["saved_over_floor_mib"]
    x = range(len(PAIRS))
    b.bar([i - 0.2 for i in x], [over[f"lorakit_{k}"] for _, k in PAIRS], width=0.4, label="lorakit")
    b.bar([i + 0.2 for i in x], [over[f"peft_{k}"] for _, k in PAIRS], width=0.4, label="PEFT")
    b.set_xticks(list(x), labels, rotation=20)
    b.set_title("saved for backward over the quantized floor (MiB)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _smollm_folder() -> Path | None:
    try:
        from lorakit.cli.presets import smollm_path

        return Path(smollm_path())
    except Exception:  # the preset's package is not installed: the benchmark Llama only
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-peak", action="store_true", help="skip the per-process peak memory runs")
    parser.add_argument("--peak", default=None, help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--folder", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_threads()
    shape = QUICK if args.quick else Shape()
    if args.peak:
        print(peak_one(args.peak, args.folder, shape))
        return
    out_dir = args.out or (HERE if not args.quick else Path(tempfile.gettempdir()) / "lorakit-qbench")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        build_base(shape).save_pretrained(folder)
        results: dict = {"shape": shape.__dict__, "quick": args.quick, "memory": {}}
        results["memory"]["benchmark Llama"] = memory(folder)
        smollm = None if args.quick else _smollm_folder()
        if smollm is not None:
            results["memory"]["SmolLM2-135M"] = memory(smollm)
        print("  [quantized] training steps, interleaved", flush=True)
        results["timing"] = timings(folder, shape, args.steps or (2 if args.quick else 12))
        if not args.no_peak:
            print("  [quantized] peak memory, one process per method", flush=True)
            results["peak_mib"] = peaks(folder, args.quick)
    (out_dir / "quantized.json").write_text(json.dumps(results, indent=2))
    markdown = table(results)
    (out_dir / "quantized.md").write_text(markdown + "\n")
    plot(results, out_dir / "quantized.png")
    if not args.quick:
        readme = HERE.parent / "README.md"
        text = readme.read_text()
        if START in text and END in text:
            head, rest = text.split(START, 1)
            readme.write_text(head + START + "\n" + markdown + "\n" + END + rest.split(END, 1)[1])
    print(markdown)


if __name__ == "__main__":
    main()
