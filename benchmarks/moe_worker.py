"""LoRA on the experts of a mixture-of-experts model (``target_parameters``): lorakit and PEFT in one
process, stepped round-robin with the frozen floor, for each experts implementation transformers
offers on a CPU ("grouped_mm", its default, and "eager"). JSON on stdout: median step time / floor,
lorakit / PEFT, and the exact bytes kept for backward (``common.saved_activation_bytes``).

    python -m benchmarks.moe_worker --steps 20 [--quick]

The model: a Qwen3-MoE (hidden 256, 2 layers, 8 experts of width 256, 2 per token, vocab 4000) on
batches of 4 × 64 tokens; LoRA r=16 α=32 on every expert's gate_up_proj and down_proj, AdamW.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from benchmarks.common import library, saved_activation_bytes, set_threads, train_step

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
IMPLEMENTATIONS = ("grouped_mm", "eager")
METHODS = ("floor", "lorakit", "peft")


@dataclass(frozen=True)
class MoeShape:
    hidden: int = 256
    layers: int = 2
    heads: int = 8
    experts: int = 8
    top_k: int = 2
    expert_width: int = 256
    vocab: int = 4000
    batch: int = 4
    seq: int = 64


QUICK = MoeShape(hidden=32, layers=2, heads=4, experts=4, expert_width=32, vocab=300, batch=2, seq=16)


def build_base(shape: MoeShape, implementation: str) -> nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        head_dim=shape.hidden // shape.heads,
        intermediate_size=2 * shape.expert_width,
        moe_intermediate_size=shape.expert_width,
        num_experts=shape.experts,
        num_experts_per_tok=shape.top_k,
        vocab_size=shape.vocab,
        max_position_embeddings=max(shape.seq, 64),
    )
    model = Qwen3MoeForCausalLM(config)
    model.set_experts_implementation(implementation)
    return model


def make(method: str, shape: MoeShape, implementation: str) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    model = build_base(shape, implementation)
    if method == "floor":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()  # gradients flow through every layer, as in LoRA training
    else:
        lib = library(method)
        config = lib.LoraConfig(r=16, lora_alpha=32, target_modules=[], target_parameters=EXPERTS)
        model = lib.get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, (torch.optim.AdamW(params, lr=1e-4) if params else None)


def batch(shape: MoeShape) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen)


def measure(shape: MoeShape, implementation: str, steps: int) -> dict:
    runs = {m: make(m, shape, implementation) for m in METHODS}
    ids = batch(shape)
    saved = {m: saved_activation_bytes(model, ids) / 2**20 for m, (model, _) in runs.items()}
    for model, optimizer in runs.values():
        train_step(model, optimizer, ids)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(steps):
        for method, (model, optimizer) in runs.items():
            start = time.perf_counter()
            train_step(model, optimizer, ids)
            times[method].append(time.perf_counter() - start)
    floor = times["floor"]
    return {
        "median_s": {m: statistics.median(t) for m, t in times.items()},
        "ratio_to_floor": {
            m: statistics.median(a / b for a, b in zip(t, floor, strict=True)) for m, t in times.items()
        },
        "lorakit_over_peft": statistics.median(
            a / b for a, b in zip(times["lorakit"], times["peft"], strict=True)
        ),
        "saved_mib": saved,
        "expert_weights_mib": sum(
            p.numel() * p.element_size() for n, p in runs["floor"][0].named_parameters() if ".experts." in n
        )
        / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    set_threads()
    shape = QUICK if args.quick else MoeShape()
    results = {impl: measure(shape, impl, args.steps) for impl in IMPLEMENTATIONS}
    print(json.dumps({"shape": asdict(shape), "implementations": results}))


if __name__ == "__main__":
    main()
