"""LoftQ's error reduction on SmolLM2-135M (the ``smollm2-trec`` preset's model), per layer and on
outputs, against NF4 alone and against PEFT's fit (which ignores the scaling). One process, CPU.

    python -m benchmarks.loftq [--iters 1 5] [--targets all-linear] [--r 8] [--alpha 16]

Per layer: ``‖W − (Q + s·B A)‖_F / ‖W − q(W)‖_F`` (< 1: LoftQ removes part of the quantization
error). On outputs: the same ratio for the logits of 32 TREC prompts at their real tokens (not the
padding), ``‖f_LoftQ − f_W‖ / ‖f_q(W) − f_W‖``, where ``f_q(W)`` is the model with every adapted
weight quantized alone (not the LoftQ model with its adapter disabled: after more than one round its
base holds ``q(W − s·B A)``, not ``q(W)``). PEFT's fit, ``B A = SVD_r(W − q(W))`` added as
``s·B A``, is computed here with lorakit's quantizer (PEFT's LoftQ runs only on CUDA/XPU); with
``s ≠ 1`` it overshoots.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from typing import Any

import torch
from torch import nn

import lorakit
from lorakit.layers import LoraLayer
from lorakit.layers.loftq import quantizer


def _quantized_alone(original: nn.Module, names: set[str]) -> nn.Module:
    """A copy of ``original`` whose ``names`` linear weights are replaced by ``q(W)`` (NF4)."""
    q4 = quantizer(4)
    model = copy.deepcopy(original)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name in names:
                module.weight.copy_(q4(module.weight))
    return model.eval()


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits at the prompts' real tokens (padding left out: its logits are no one's output)."""
    with torch.no_grad():
        logits = model(**inputs).logits.float()
    mask = inputs.get("attention_mask")
    return logits if mask is None else logits[mask.bool()]


def _spread(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "range": [min(values), max(values)]}


def measure(
    original: nn.Module,
    inputs: dict[str, torch.Tensor],
    *,
    iters: list[int],
    r: int = 8,
    alpha: float = 16.0,
    targets: str | list[str] = "all-linear",
) -> dict[str, Any]:
    """The ratios for each ``loftq_iter`` in ``iters`` (NF4, ``loftq_bits=4``); ``original`` is left
    as it is."""
    original = original.eval()
    q4 = quantizer(4)
    s = alpha / r
    reference = _logits(original, inputs)
    weights = {n: m.weight.detach().float() for n, m in original.named_modules() if isinstance(m, nn.Linear)}
    results: dict[str, Any] = {"r": r, "alpha": alpha, "targets": targets}
    alone: torch.Tensor | None = None
    for n_iter in iters:
        config = lorakit.LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=targets,
            init_lora_weights="loftq",
            loftq_config={"loftq_bits": 4, "loftq_iter": n_iter},
        )
        model = lorakit.get_peft_model(copy.deepcopy(original), config).eval()
        layers = {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
        ratios, peft_ratios = [], []
        for name, layer in layers.items():
            w, q = weights[name], layer.base_layer.weight.detach().float()
            error = w - q4(w)
            plain = float(error.norm())
            ratios.append(float((w - q - layer.delta_weight("default").detach().float()).norm()) / plain)
            u, sv, vh = torch.linalg.svd(error, full_matrices=False)
            fit = (u[:, :r] * sv[:r]) @ vh[:r]  # PEFT: B A ≈ W − q(W), then scaled by s in forward
            peft_ratios.append(float((error - s * fit).norm()) / plain)
        if alone is None:
            alone = _logits(_quantized_alone(original, set(layers)), inputs)
        adapted = _logits(model, inputs)
        entry = {
            "layers": len(ratios),
            "per_layer": _spread(ratios),
            "outputs": float((adapted - reference).norm() / (alone - reference).norm()),
        }
        if n_iter == iters[0]:  # PEFT's one-shot fit does not depend on the rounds
            results["peft_fit_per_layer"] = _spread(peft_ratios)
        results[f"loftq_iter_{n_iter}"] = entry
        print(json.dumps({f"loftq_iter_{n_iter}": entry}), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--targets", default="all-linear")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    args = parser.parse_args()
    import transformers

    from lorakit.cli.presets import smollm_path, trec_rows

    path = smollm_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = [row["text"] for row in trec_rows()[:32]]  # already "<question>\nAnswer type:"
    inputs = dict(tokenizer(prompts, return_tensors="pt", padding=True))
    original = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    results = measure(original, inputs, iters=args.iters, r=args.r, alpha=args.alpha, targets=args.targets)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
