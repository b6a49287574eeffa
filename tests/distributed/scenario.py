"""The shared pieces of every distributed scenario: the model, the batch, the single-process
reference, and the checks that run on a trained wrapped model (imported by ``worker.py``).

A seeded random tiny Llama (hidden 16, 2 layers, vocab 96), LoRA r=8 on ``q_proj, v_proj``, 5 SGD
steps on a fixed global batch of 8 sequences that the ranks split evenly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import zoo
from torch import nn

import lorakit
from lorakit import distributed as ld

VOCAB, SEQ, GLOBAL_BATCH, STEPS, LR, SEED = 96, 6, 8, 5, 0.5, 0
TOL_REFERENCE, TOL_RELOAD, TOL_MERGE, MIN_MOVE = 1e-5, 1e-6, 1e-5, 1e-3


def base_model(seed: int = SEED) -> nn.Module:
    """The zoo's unit-test Llama with a vocabulary of 96, in train mode."""
    return zoo.llama(seed, vocab=VOCAB).train()


def lora_config() -> lorakit.LoraConfig:
    return lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


def peft_model(seed: int = SEED, adapter_seed: int | None = None) -> lorakit.PeftModel:
    """The same base on every rank; the adapter drawn from ``adapter_seed`` (default: ``seed``)."""
    model = base_model(seed)
    torch.manual_seed(seed if adapter_seed is None else adapter_seed)
    return lorakit.get_peft_model(model, lora_config())


def global_batch() -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    return torch.randint(1, VOCAB, (GLOBAL_BATCH, SEQ), generator=gen)


def eval_batch() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(1, VOCAB, (2, SEQ), generator=gen)


def local_batch(rank: int, world: int) -> torch.Tensor:
    return global_batch().chunk(world)[rank]


def reference(steps: int = STEPS) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(initial, trained) adapter state of one process training on the whole global batch."""
    model = peft_model()
    model.train()
    initial = {k: v.clone() for k, v in lorakit.get_peft_model_state_dict(model).items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    batch = global_batch()
    for _ in range(steps):
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    return initial, {k: v.clone() for k, v in lorakit.get_peft_model_state_dict(model).items()}


def digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def all_ranks(value: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if set(a) != set(b):
        return float("inf")
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def raises(fn: Callable[[], Any], error: type[BaseException], needle: str = "") -> str:
    """'ok: <message>' if ``fn`` raises ``error`` whose text contains ``needle``, else why not."""
    try:
        fn()
    except error as exc:
        return f"ok: {str(exc)[:160]}" if needle in str(exc) else f"wrong message: {exc}"
    except Exception as exc:  # noqa: BLE001 - reported as the check's outcome
        return f"wrong error {type(exc).__name__}: {exc}"
    return "did not raise"


def passes(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - reported as the check's outcome
        return f"raised {type(exc).__name__}: {exc}"
    return "ok"


def trained_checks(
    model: nn.Module,
    forward: Callable[[torch.Tensor], torch.Tensor],
    base_before: dict[str, torch.Tensor],
    base_after: dict[str, torch.Tensor],
    save_dir: Path,
    ref: tuple[dict, dict],
) -> dict[str, Any]:
    """Checks 1-3 on a trained model in every rank (collective); results are filled on rank 0.

    ``model``: what holds the PeftModel (wrapped or not); ``forward``: logits of the engine's model
    for an input (a collective under sharding); ``base_before/after``: whole frozen base weights.
    """
    initial, trained_ref = ref
    gathered = ld.gather_adapter_state_dict(model, rank0_only=False)
    names = ld.adapter_parameter_names(model)  # wrapped names → names recorded at injection
    digests = all_ranks(digest(gathered))
    peft = _find_peft(model)
    peft.save_pretrained(str(save_dir))  # every rank: gathers if sharded, rank 0 writes
    logits = forward(eval_batch())
    load_ok = _load_back(model, save_dir, gathered)
    if dist.get_rank() != 0:
        return {}
    results: dict[str, Any] = {
        "identical_on_ranks": len(set(digests)) == 1,
        "matches_reference": max_diff(gathered, trained_ref),
        "adapter_moved": max_diff(gathered, initial),
        "base_unchanged": max_diff(base_before, base_after),
        "load_broadcast": load_ok,
        "names_map_back": len(names) == len(gathered) and all(".default." in v for v in names.values()),
    }
    results.update(_reload_checks(save_dir, gathered, logits))
    return results


def _load_back(model: nn.Module, save_dir: Path, gathered: dict[str, torch.Tensor]) -> bool:
    """Collective: zero the (sharded) adapter through a broadcast load, then load the saved files
    back (rank 0 reads, broadcasts); both must arrive whole on every rank."""
    zeros = {k: torch.zeros_like(v) for k, v in gathered.items()} if dist.get_rank() == 0 else None
    ld.load_adapter_state_dict(model, zeros)
    zeroed = ld.gather_adapter_state_dict(model, rank0_only=False)
    ld.load_pretrained(model, save_dir)
    back = ld.gather_adapter_state_dict(model, rank0_only=False)
    ok = all(float(v.abs().max()) == 0.0 for v in zeroed.values()) and max_diff(back, gathered) == 0.0
    return all(all_ranks(ok))


def _find_peft(model: nn.Module) -> lorakit.PeftModel:
    for module in model.modules():
        if isinstance(module, lorakit.PeftModel):
            return module
    raise AssertionError("no PeftModel inside")


def _reload_checks(save_dir: Path, gathered: dict[str, torch.Tensor], logits: torch.Tensor) -> dict[str, Any]:
    from safetensors.torch import load_file

    saved = load_file(str(save_dir / "adapter_model.safetensors"))
    expected = {k: tuple(v.shape) for k, v in gathered.items()}
    fresh = lorakit.get_peft_model(base_model(), lora_config())
    plain_keys = {k: tuple(v.shape) for k, v in lorakit.get_peft_model_state_dict(fresh).items()}
    reloaded = lorakit.PeftModel.from_pretrained(base_model(), str(save_dir))
    same_weights = max_diff(lorakit.get_peft_model_state_dict(reloaded), gathered)
    with torch.no_grad():
        reloaded_logits = reloaded(input_ids=eval_batch()).logits
        merged = reloaded.merge_and_unload()
        merged_logits = merged(input_ids=eval_batch()).logits
    return {
        "saved_keys_and_shapes": {k: tuple(v.shape) for k, v in saved.items()} == expected == plain_keys,
        "saved_tensor_count": len(saved),
        "reload_weights": same_weights,
        "reload_logits": float((reloaded_logits - logits).abs().max()),
        "merge_logits": float((merged_logits - reloaded_logits).abs().max()),
    }
