"""A zoo of tiny, randomly initialised models used by the lorakit test-suite.

Every entry is built from a transformers config class (no hub access) with a
fixed seed, so two calls of ``build()`` return models with identical weights.
All dropout probabilities of the base models are set to zero so that forward
passes are deterministic even in train mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SEED = 0
VOCAB = 100
BATCH = 2
SEQ = 7


@dataclass(frozen=True)
class ZooEntry:
    name: str
    _factory: Callable[[], nn.Module]
    _inputs: Callable[[], dict[str, torch.Tensor]]
    is_transformers: bool = True

    def build(self, seed: int = SEED) -> nn.Module:
        """Return a freshly initialised model (in eval mode)."""
        torch.manual_seed(seed)
        model = self._factory()
        return model.eval()

    def inputs(self) -> dict[str, torch.Tensor]:
        """Return forward kwargs; deterministic across calls."""
        return self._inputs()


def _ids(seed: int, shape: tuple[int, ...] = (BATCH, SEQ)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # avoid 0 (commonly the pad token) so no position is masked implicitly
    return torch.randint(1, VOCAB, shape, generator=gen)


def _decoder_only_inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(1), "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}


def _encoder_inputs() -> dict[str, torch.Tensor]:
    return {
        "input_ids": _ids(2),
        "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
        "token_type_ids": torch.zeros(BATCH, SEQ, dtype=torch.long),
    }


def _roberta_inputs() -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(3), "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}


def _seq2seq_inputs() -> dict[str, torch.Tensor]:
    return {
        "input_ids": _ids(4),
        "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
        "decoder_input_ids": _ids(5, (BATCH, 5)),
    }


def _from_config(cls: Any, config: Any) -> nn.Module:
    return cls._from_config(config, attn_implementation="eager")


# ---------------------------------------------------------------------------
# transformers models
# ---------------------------------------------------------------------------


def _bert_config():
    from transformers import BertConfig

    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
        classifier_dropout=0.0,
    )


def _bert() -> nn.Module:
    from transformers import BertModel

    return _from_config(BertModel, _bert_config())


def _bert_cls() -> nn.Module:
    from transformers import BertForSequenceClassification

    return _from_config(BertForSequenceClassification, _bert_config())


def _roberta() -> nn.Module:
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=0,
    )
    return _from_config(RobertaModel, config)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=32,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_inner=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _from_config(GPT2LMHeadModel, config)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )
    return _from_config(LlamaForCausalLM, config)


def _mistral() -> nn.Module:
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        sliding_window=16,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )
    return _from_config(MistralForCausalLM, config)


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    return _from_config(T5ForConditionalGeneration, config)


def _bart() -> nn.Module:
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=VOCAB,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        classifier_dropout=0.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
    )
    return _from_config(BartForConditionalGeneration, config)


# ---------------------------------------------------------------------------
# plain torch model
# ---------------------------------------------------------------------------


class MLP(nn.Module):
    """Small custom model with Embedding, Conv2d and Linear layers.

    forward(input_ids: (B, S) long, pixel_values: (B, 3, 6, 6) float) -> (B, 8)
    """

    def __init__(self, vocab: int = VOCAB, emb_dim: int = 16, conv_out: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb_dim)
        self.conv = nn.Conv2d(3, conv_out, kernel_size=3, padding=1)
        self.lin0 = nn.Linear(emb_dim + conv_out, hidden)
        self.act = nn.ReLU()
        self.lin1 = nn.Linear(hidden, 8)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        tok = self.emb(input_ids).mean(dim=1)
        img = self.conv(pixel_values).mean(dim=(2, 3))
        h = self.act(self.lin0(torch.cat([tok, img], dim=-1)))
        return self.lin1(h)


def _mlp_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(6)
    return {"input_ids": _ids(7), "pixel_values": torch.randn(BATCH, 3, 6, 6, generator=gen)}


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("bert", _bert, _encoder_inputs),
        ZooEntry("bert_cls", _bert_cls, _encoder_inputs),
        ZooEntry("roberta", _roberta, _roberta_inputs),
        ZooEntry("gpt2", _gpt2, _decoder_only_inputs),
        ZooEntry("llama", _llama, _decoder_only_inputs),
        ZooEntry("mistral", _mistral, _decoder_only_inputs),
        ZooEntry("t5", _t5, _seq2seq_inputs),
        ZooEntry("bart", _bart, _seq2seq_inputs),
        ZooEntry("mlp", MLP, _mlp_inputs, is_transformers=False),
    ]
}


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
