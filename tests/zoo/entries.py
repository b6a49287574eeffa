"""``ZOO``: one entry per architecture of the PEFT-comparison tests, each a model and its inputs.

Every entry's ``build()`` returns the same weights on every call (fixed seed, eval mode); all dropout
probabilities of the base models are zero so that forward passes are deterministic even in train mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from zoo.inputs import zoo_ids
from zoo.torch_models import MLP
from zoo.transformers_models import NUM_LABELS, build

SEED = 0
BATCH = 2
SEQ = 7


@dataclass(frozen=True)
class ZooEntry:
    name: str
    _factory: Callable[[int], nn.Module]
    _inputs: Callable[[], dict[str, torch.Tensor]]
    is_transformers: bool = True

    def build(self, seed: int = SEED) -> nn.Module:
        """Return a freshly initialised model (in eval mode)."""
        return self._factory(seed).eval()

    def inputs(self) -> dict[str, torch.Tensor]:
        """Return forward kwargs; deterministic across calls."""
        return self._inputs()


def _decoder_only_inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": zoo_ids(1), "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}


def _encoder_inputs() -> dict[str, torch.Tensor]:
    return {
        "input_ids": zoo_ids(2),
        "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
        "token_type_ids": torch.zeros(BATCH, SEQ, dtype=torch.long),
    }


def _roberta_inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": zoo_ids(3), "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}


def _seq2seq_inputs() -> dict[str, torch.Tensor]:
    return {
        "input_ids": zoo_ids(4),
        "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
        "decoder_input_ids": zoo_ids(5, (BATCH, 5)),
    }


def _mlp_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(6)
    return {"input_ids": zoo_ids(7), "pixel_values": torch.randn(BATCH, 3, 6, 6, generator=gen)}


def _model(arch: str, head: str, **overrides: object) -> Callable[[int], nn.Module]:
    return lambda seed: build(arch, head, seed=seed, **overrides)


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return MLP()


_BERT = {"num_labels": NUM_LABELS, "classifier_dropout": 0.0}

ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("bert", _model("bert", "Model", **_BERT), _encoder_inputs),
        ZooEntry("bert_cls", _model("bert", "ForSequenceClassification", **_BERT), _encoder_inputs),
        ZooEntry("roberta", _model("roberta", "Model"), _roberta_inputs),
        ZooEntry("gpt2", _model("gpt2", "LMHeadModel"), _decoder_only_inputs),
        ZooEntry("llama", _model("llama", "ForCausalLM"), _decoder_only_inputs),
        # lm_head shares the input embedding's weight (tie_word_embeddings=True, as Gemma, Qwen2-0.5B)
        ZooEntry(
            "llama_tied", _model("llama", "ForCausalLM", tie_word_embeddings=True), _decoder_only_inputs
        ),
        ZooEntry("mistral", _model("mistral", "ForCausalLM"), _decoder_only_inputs),
        ZooEntry("t5", _model("t5", "ForConditionalGeneration"), _seq2seq_inputs),
        ZooEntry("bart", _model("bart", "ForConditionalGeneration", classifier_dropout=0.0), _seq2seq_inputs),
        ZooEntry("mlp", _mlp, _mlp_inputs, is_transformers=False),
    ]
}
