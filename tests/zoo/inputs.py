"""Inputs for the zoo's models (deterministic: seeded generators, never the global one), and readers of
their outputs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from zoo.transformers_models import FRAMES, IMAGE, MELS, NUM_LABELS, SMALL_VOCAB, VOCAB

BATCH = 2  # the task models' batch
_TASK_SEQ = 6
_CHOICES = 3


def _randint(low: int, high: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, shape, generator=gen)


# -- the unit-test models (llama(), gpt2(), toy(): vocab 64) ------------------------------------------
def ids(batch: int = 3, seq: int = 5, seed: int = 1) -> torch.Tensor:
    return _randint(1, SMALL_VOCAB, (batch, seq), seed)


def tiny_inputs() -> torch.Tensor:
    """Token ids for :func:`zoo.tiny` (vocab 20)."""
    return torch.arange(12).reshape(2, 6) % 20


# -- ZOO's entries --------------------------------------------------------------------------------------
def zoo_ids(seed: int, shape: tuple[int, ...] = (2, 7)) -> torch.Tensor:
    # avoid 0 (commonly the pad token) so no position is masked implicitly
    return _randint(1, VOCAB, shape, seed)


# -- the task models (task_model()) --------------------------------------------------------------------
def _task_ids(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return _randint(3, VOCAB, shape, seed)  # no pad, bos or eos token


def text_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    return {
        "input_ids": _task_ids(seed, (BATCH, _TASK_SEQ)),
        "attention_mask": torch.ones(BATCH, _TASK_SEQ, dtype=torch.long),
    }


def choice_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    return {
        "input_ids": _task_ids(seed, (BATCH, _CHOICES, _TASK_SEQ)),
        "attention_mask": torch.ones(BATCH, _CHOICES, _TASK_SEQ, dtype=torch.long),
    }


def image_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=gen)}


def speech_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_features": torch.randn(BATCH, MELS, FRAMES, generator=gen)}


def labels_for(task: str, seed: int = 2) -> dict[str, torch.Tensor]:
    """Training labels for a task type name."""
    gen = torch.Generator().manual_seed(seed)
    if task in ("SEQ_CLS", "MULTIPLE_CHOICE", "IMAGE_CLASSIFICATION"):
        high = _CHOICES if task == "MULTIPLE_CHOICE" else NUM_LABELS
        return {"labels": torch.randint(0, high, (BATCH,), generator=gen)}
    if task == "TOKEN_CLS":
        return {"labels": torch.randint(0, NUM_LABELS, (BATCH, _TASK_SEQ), generator=gen)}
    if task == "QUESTION_ANS":
        return {
            "start_positions": torch.randint(0, _TASK_SEQ, (BATCH,), generator=gen),
            "end_positions": torch.randint(0, _TASK_SEQ, (BATCH,), generator=gen),
        }
    return {"labels": _task_ids(seed, (BATCH, _TASK_SEQ))}


# -- outputs --------------------------------------------------------------------------------------------
def logits(model: nn.Module, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """``model(x).logits`` (or the output itself) without autograd."""
    with torch.no_grad():
        out = model(x, **kwargs)
    return out.logits if hasattr(out, "logits") else out


def main_output(out: Any) -> torch.Tensor:
    """Return the primary tensor of a forward result (logits or last hidden state)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if value is not None:
            return value
    raise TypeError(f"don't know how to extract the main output from {type(out)!r}")


def output_tensors(out: Any) -> dict[str, torch.Tensor]:
    """All comparable tensors of a forward result, by name.

    Besides the main output this includes the pooler output and the last
    (encoder / decoder) hidden states when present, i.e. when the model was
    called with ``output_hidden_states=True``.
    """
    if isinstance(out, torch.Tensor):
        return {"output": out}
    tensors = {"main": main_output(out)}
    for key in ("pooler_output", "encoder_last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            tensors[key] = value
    for key in ("hidden_states", "encoder_hidden_states", "decoder_hidden_states"):
        value = getattr(out, key, None)
        if isinstance(value, (tuple, list)) and value:
            tensors[f"{key}[-1]"] = value[-1]
    return tensors
