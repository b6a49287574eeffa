"""The benchmark model and the ways of training it, shared by the workers.

A tiny-but-real Llama (hidden 512, 4 layers, 8 heads, intermediate 1376, vocab 8000) on batches of
4 × 256 tokens, LoRA r=16 α=32, AdamW. Each *method* turns a fresh base model into the model to
train; "floor" freezes every weight but lets gradients flow through every layer (the least any
adapter method can cost).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]


@dataclass(frozen=True)
class Shape:
    hidden: int = 512
    layers: int = 4
    heads: int = 8
    intermediate: int = 1376
    vocab: int = 8000
    batch: int = 4
    seq: int = 256


QUICK = Shape(hidden=64, layers=2, heads=4, intermediate=128, vocab=500, batch=2, seq=32)


def build_base(shape: Shape, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        intermediate_size=shape.intermediate,
        vocab_size=shape.vocab,
        max_position_embeddings=max(shape.seq, 64),
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(dtype)


def batch(shape: Shape, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen)


def _floor(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()  # gradients flow through every layer, as in LoRA training
    return model


def _full(model: nn.Module) -> nn.Module:
    return model


def library(name: str):  # type: ignore[no-untyped-def]
    """The ``lorakit`` or ``peft`` module: both expose LoraConfig, get_peft_model and PeftModel."""
    if name == "peft":
        import peft

        return peft
    import lorakit

    return lorakit


def timed(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _lora(
    lib: str, targets: list[str] | str, dropout: float = 0.0, dora: bool = False
) -> Callable[[nn.Module], nn.Module]:
    def apply(model: nn.Module) -> nn.Module:
        mod = library(lib)
        kwargs = {"use_dora": True} if dora else {}
        config = mod.LoraConfig(r=16, lora_alpha=32, target_modules=targets, lora_dropout=dropout, **kwargs)
        return mod.get_peft_model(model, config)

    return apply


METHODS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "floor": _floor,
    "full": _full,
    "peft_qkvo": _lora("peft", QKVO),
    "lorakit_qkvo": _lora("lorakit", QKVO),
    "peft_qkvo_dropout": _lora("peft", QKVO, dropout=0.05),
    "lorakit_qkvo_dropout": _lora("lorakit", QKVO, dropout=0.05),
    "peft_all_linear": _lora("peft", "all-linear"),
    "lorakit_all_linear": _lora("lorakit", "all-linear"),
    "peft_dora": _lora("peft", QKVO, dora=True),
    "lorakit_dora": _lora("lorakit", QKVO, dora=True),
}


def make(method: str, shape: Shape, dtype: torch.dtype) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    model = METHODS[method](build_base(shape, dtype))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    return model, optimizer


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer | None, ids: torch.Tensor) -> None:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def saved_activation_bytes(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes autograd keeps for the backward of one training forward (distinct storages): the
    activation memory a method costs, exactly and without allocator noise."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of this process's resident memory (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(re.findall(r"\d+", line)[0])
    raise RuntimeError(f"{field} not in /proc/self/status")


def set_threads() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
