"""``make gpu-check``: the quantized-base checks and the QLoRA benchmark on a CUDA GPU, in one script.

It first runs the quantized test files (they compute on CPU, as in CI), then repeats on the GPU the
checks whose kernels differ there (bitsandbytes' CUDA 4-bit and int8 kernels, bfloat16
compute) and times QLoRA there. It writes ``benchmarks/gpu_check.json`` and exits non-zero if a
check fails. Tolerances as in ``tests/parity/test_quantized.py`` (bfloat16 compute: ``n · 4 · 2⁻⁸``
relative over ``n`` adapted layers).

    python -m benchmarks.gpu_check
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
R = 16


def _load(folder: Path, scheme: str) -> torch.nn.Module:
    import transformers

    import lorakit

    config = lorakit.quantization_config(scheme, compute_dtype=torch.bfloat16)
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, dtype=torch.bfloat16, device_map="cuda"
    ).eval()


def parity(folder: Path, scheme: str, ids: torch.Tensor) -> dict:
    """lorakit vs PEFT on the same quantized base: outputs, gradients, exact unmerge, dense merge."""
    import peft

    import lorakit
    from lorakit.layers import LoraLayer

    kwargs = {"r": R, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    torch.manual_seed(0)
    ours = lorakit.get_peft_model(_load(folder, scheme), lorakit.LoraConfig(**kwargs))
    theirs = peft.get_peft_model(_load(folder, scheme), peft.LoraConfig(**kwargs))
    peft.set_peft_model_state_dict(theirs, lorakit.get_peft_model_state_dict(ours))
    n = sum(1 for m in ours.modules() if isinstance(m, LoraLayer))
    with torch.no_grad():
        got, want = ours(input_ids=ids).logits.float(), theirs(input_ids=ids).logits.float()
    tol = n * 4 * 2**-8 * want.abs().max().item()
    out = {"max_diff": (got - want).abs().max().item(), "tolerance": tol}
    ours.train(), theirs.train()
    for model in (ours, theirs):
        model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.float() for n, p in ours.named_parameters() if p.requires_grad}
    ref = {n: p.grad.float() for n, p in theirs.named_parameters() if p.requires_grad}
    out["grad_rel_diff"] = max(((grads[k] - ref[k]).norm() / ref[k].norm()).item() for k in grads)
    layer = next(m for m in ours.modules() if isinstance(m, LoraLayer))
    before = [t.clone() for t in layer.base_layer.state_dict().values()]
    ours.merge_adapter()
    ours.unmerge_adapter()
    after = list(layer.base_layer.state_dict().values())
    out["unmerge_bit_exact"] = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    ours.eval()
    with torch.no_grad():
        expected = ours(input_ids=ids).logits.float()
        merged = ours.merge_and_unload()(input_ids=ids).logits.float()
    out["merge_and_unload_diff"] = (merged - expected).abs().max().item()
    out["ok"] = out["max_diff"] <= tol and out["grad_rel_diff"] <= n * 4 * 2**-8 and out["unmerge_bit_exact"]
    return out


def step_times(folder: Path, ids: torch.Tensor, steps: int = 20) -> dict:
    """QLoRA step time lorakit / PEFT on NF4 and int8, interleaved, and peak CUDA memory per step."""
    import peft

    import lorakit

    runs = {}
    for scheme in ("nf4", "int8"):
        for name, lib in (("lorakit", lorakit), ("peft", peft)):
            config = lib.LoraConfig(
                r=R, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
            )
            model = lib.get_peft_model(_load(folder, scheme), config).train()
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            runs[f"{name}_{scheme}"] = (model, optimizer)
    times: dict[str, list[float]] = {k: [] for k in runs}
    peaks = {}
    for i in range(steps + 1):
        for key, (model, optimizer) in runs.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i:  # the first step warms up
                times[key].append(time.perf_counter() - start)
            peaks[key] = (torch.cuda.max_memory_allocated() - base) / 2**20
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    return {
        "lorakit_over_peft": {s: median[f"lorakit_{s}"] / median[f"peft_{s}"] for s in ("nf4", "int8")},
        "peak_step_mib": peaks,
    }


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU; none is visible (torch.cuda.is_available() is False)")
        return 2
    from benchmarks.common import Shape, batch, build_base

    tests = ["tests/parity/test_quantized.py", "tests/layers/test_quantized.py", "tests/layers/test_bnb.py"]
    tests += [
        "tests/layers/test_loftq.py",
        "tests/integrations/test_kbit.py",
        "tests/distributed/test_quantized.py",
    ]
    pytest_exit = subprocess.run([sys.executable, "-m", "pytest", "-q", *tests], cwd=HERE.parent).returncode
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "llama"
        build_base(Shape()).save_pretrained(folder)
        ids = batch(Shape()).cuda()
        results["parity"] = {s: parity(folder, s, ids) for s in ("nf4", "int8")}
        results["timing"] = step_times(folder, ids)
    (HERE / "gpu_check.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    failed = [s for s, r in results["parity"].items() if not r["ok"]] + (["pytest"] if pytest_exit else [])
    if failed:
        print(f"gpu-check FAILED for: {', '.join(failed)}")
        return 1
    print("gpu-check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
