"""Tiny random transformers task models (built from configs, no downloads) and inputs for them.

``build(arch, head)`` returns e.g. ``build("bert", "SequenceClassification")`` →
``BertForSequenceClassification`` with hidden size 16, 2 layers, vocab 100, every dropout 0, seeded.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn

VOCAB = 100
BATCH = 2
SEQ = 6
CHOICES = 3
NUM_LABELS = 3
IMAGE = 8  # ViT image side (patch 4 → 4 patches)
MELS, FRAMES = 8, 16  # Whisper input_features (B, MELS, FRAMES)

_TEXT = dict(
    vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
)


def _config(arch: str) -> Any:
    """A tiny config per architecture name."""
    if arch == "bert":
        return transformers.BertConfig(
            **_TEXT,
            max_position_embeddings=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            classifier_dropout=0.0,
        )
    if arch == "roberta":
        return transformers.RobertaConfig(
            **_TEXT,
            max_position_embeddings=40,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
        )
    if arch == "gpt2":
        return transformers.GPT2Config(
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
            pad_token_id=2,
        )
    if arch == "llama":
        return transformers.LlamaConfig(
            **_TEXT,
            num_key_value_heads=1,
            max_position_embeddings=32,
            tie_word_embeddings=False,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    if arch == "mistral":
        return transformers.MistralConfig(
            **_TEXT,
            num_key_value_heads=1,
            max_position_embeddings=32,
            sliding_window=16,
            tie_word_embeddings=False,
        )
    if arch == "t5":
        return transformers.T5Config(
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
            eos_token_id=1,
        )
    if arch == "bart":
        return transformers.BartConfig(
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
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            decoder_start_token_id=2,
            forced_eos_token_id=None,
        )
    if arch == "whisper":
        return transformers.WhisperConfig(
            vocab_size=VOCAB,
            num_mel_bins=MELS,
            d_model=16,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_source_positions=FRAMES // 2,
            max_target_positions=32,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            decoder_start_token_id=1,
            suppress_tokens=None,
            begin_suppress_tokens=None,
        )
    if arch == "vit":
        return transformers.ViTConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=IMAGE,
            patch_size=4,
            num_channels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    raise KeyError(f"unknown arch {arch!r}")


_CLASSES = {
    "bert": "Bert",
    "roberta": "Roberta",
    "gpt2": "GPT2",
    "llama": "Llama",
    "mistral": "Mistral",
    "t5": "T5",
    "bart": "Bart",
    "whisper": "Whisper",
    "vit": "ViT",
}


def build(arch: str, head: str, seed: int = 0) -> nn.Module:
    """``<Arch><head>`` (e.g. ``head="ForCausalLM"``, ``"Model"``) with seeded random weights, eval mode."""
    config = _config(arch)
    config.num_labels = 2 if head == "ForQuestionAnswering" else NUM_LABELS  # QA: start, end
    cls = getattr(transformers, _CLASSES[arch] + head)
    torch.manual_seed(seed)
    return cls._from_config(config, attn_implementation="eager").eval()


def _ids(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, shape, generator=gen)


def text_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    return {"input_ids": _ids(seed, (BATCH, SEQ)), "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long)}


def choice_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    return {
        "input_ids": _ids(seed, (BATCH, CHOICES, SEQ)),
        "attention_mask": torch.ones(BATCH, CHOICES, SEQ, dtype=torch.long),
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
        high = CHOICES if task == "MULTIPLE_CHOICE" else NUM_LABELS
        return {"labels": torch.randint(0, high, (BATCH,), generator=gen)}
    if task == "TOKEN_CLS":
        return {"labels": torch.randint(0, NUM_LABELS, (BATCH, SEQ), generator=gen)}
    if task == "QUESTION_ANS":
        return {
            "start_positions": torch.randint(0, SEQ, (BATCH,), generator=gen),
            "end_positions": torch.randint(0, SEQ, (BATCH,), generator=gen),
        }
    return {"labels": _ids(seed, (BATCH, SEQ))}
