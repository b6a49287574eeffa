"""Every tiny transformers model of the test suite, built from one config table (no hub access).

``config(arch)`` is the zoo's tiny config of an architecture: hidden size 16, 2 layers, 2 heads, vocab
:data:`VOCAB`, every dropout 0. ``build(arch, head)`` is ``<Arch><head>`` on that config (``head``
"Model", "ForCausalLM", "LMHeadModel", ...) with seeded weights, eager attention and in eval mode.
Keyword overrides change single config fields; the named builders below are the variants tests
depend on, each with the exact config and seed the tests were written against (changing one would
change parity numbers and hand-checked values).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn

VOCAB = 100  # the zoo's vocabulary (the parity and task models)
SMALL_VOCAB = 64  # the unit-test models': llama(), gpt2(), bert_cls()
NUM_LABELS = 3
MELS, FRAMES = 8, 16  # Whisper input_features (B, MELS, FRAMES)
IMAGE = 8  # ViT image side (patch 4 → 4 patches)

_TEXT = dict(
    vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
)

# the MoE models: Llama-like attention, routers picking 2 of 4 experts of width 4, so that no expert
# matrix is square (gate_up (4, 8, 16), down (4, 16, 4)) and a transposed layout cannot pass unseen
_MOE = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=4,
    num_experts_per_tok=2,
    max_position_embeddings=32,
)
MOE_ARCHS = ["qwen3_moe", "mixtral", "olmoe", "gpt_oss"]

# architecture → (transformers class prefix, config class, config kwargs)
_ARCHS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "bert": (
        "Bert",
        "BertConfig",
        dict(**_TEXT, max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
    ),
    "roberta": (
        "Roberta",
        "RobertaConfig",
        dict(
            **_TEXT,
            max_position_embeddings=40,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
        ),
    ),
    "gpt2": (
        "GPT2",
        "GPT2Config",
        dict(
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
        ),
    ),
    "llama": ("Llama", "LlamaConfig", dict(**_TEXT, num_key_value_heads=1, max_position_embeddings=32)),
    "mistral": (
        "Mistral",
        "MistralConfig",
        dict(**_TEXT, num_key_value_heads=1, max_position_embeddings=32, sliding_window=16),
    ),
    "t5": (
        "T5",
        "T5Config",
        dict(
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
        ),
    ),
    "bart": (
        "Bart",
        "BartConfig",
        dict(
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
        ),
    ),
    "whisper": (
        "Whisper",
        "WhisperConfig",
        dict(
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
        ),
    ),
    "vit": (
        "ViT",
        "ViTConfig",
        dict(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=IMAGE,
            patch_size=4,
            num_channels=3,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
    ),
    # mixture-of-experts: experts as 3-D parameters of one module (issue 16); 4 experts, 2 per token
    "qwen3_moe": (
        "Qwen3Moe",
        "Qwen3MoeConfig",
        dict(**_MOE, moe_intermediate_size=4, num_experts=4, head_dim=8),
    ),
    "mixtral": ("Mixtral", "MixtralConfig", dict(**_MOE, num_local_experts=4)),
    "olmoe": ("Olmoe", "OlmoeConfig", dict(**_MOE, num_experts=4, pad_token_id=0, eos_token_id=2)),
    # experts stored (experts, in, out), gate and up interleaved, expert biases
    "gpt_oss": (
        "GptOss",
        "GptOssConfig",
        dict(
            **_MOE,
            num_local_experts=4,
            head_dim=8,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    # no default target modules in PEFT (nor in lorakit): the "what can I target?" errors
    "xlnet": ("XLNet", "XLNetConfig", dict(vocab_size=VOCAB, d_model=16, n_layer=2, n_head=2, d_inner=32)),
}
ARCHS = sorted(_ARCHS)


def config(arch: str, **overrides: Any) -> Any:
    """The zoo's tiny config of ``arch`` with ``overrides`` applied."""
    if arch not in _ARCHS:
        raise KeyError(f"unknown arch {arch!r}; the zoo has {ARCHS}")
    _, config_class, kwargs = _ARCHS[arch]
    return getattr(transformers, config_class)(**{**kwargs, **overrides})


def model_class(arch: str, head: str) -> type[nn.Module]:
    """``<Arch><head>``, e.g. ``model_class("bert", "ForSequenceClassification")``."""
    return getattr(transformers, _ARCHS[arch][0] + head)


def build(arch: str, head: str = "Model", *, seed: int = 0, **overrides: Any) -> nn.Module:
    """``<Arch><head>`` on :func:`config` with seeded random weights, eager attention, eval mode."""
    cfg = config(arch, **overrides)
    torch.manual_seed(seed)
    return model_class(arch, head)._from_config(cfg, attn_implementation="eager").eval()


# -- the unit-test models (vocab 64): crossed with every state change ---------------------------------
def moe(arch: str, seed: int = 0, experts_implementation: str = "grouped_mm", **overrides: Any) -> nn.Module:
    """``<Arch>ForCausalLM`` of a mixture-of-experts architecture (``MOE_ARCHS``), eval mode, with
    its experts run by ``experts_implementation`` ("grouped_mm": transformers' default, "eager",
    "batched_mm")."""
    model = build(arch, "ForCausalLM", seed=seed, **overrides)
    model.set_experts_implementation(experts_implementation)
    return model


def llama(seed: int = 0, *, vocab: int = SMALL_VOCAB) -> nn.Module:
    """A 2-layer Llama with hidden size 16 (q/k/v/o, gate/up/down projections, untied head).

    ``vocab=96`` is the distributed tests' model (tests/distributed/scenario.py)."""
    return build("llama", "ForCausalLM", seed=seed, vocab_size=vocab)


def gpt2(seed: int = 0) -> nn.Module:
    """A 2-layer GPT-2 (transformers ``Conv1D`` layers, tied embeddings, MLP width 64)."""
    return build("gpt2", "LMHeadModel", seed=seed, vocab_size=SMALL_VOCAB, n_inner=None)


def bert_cls(seed: int = 0) -> nn.Module:
    """A 2-layer BERT for sequence classification (``classifier`` head, 3 labels)."""
    return build(
        "bert",
        "ForSequenceClassification",
        seed=seed,
        vocab_size=SMALL_VOCAB,
        num_labels=NUM_LABELS,
        classifier_dropout=None,
    )


MODELS = {"llama": llama, "gpt2": gpt2}


# -- the task models: every head of every architecture ------------------------------------------------
# What the task models add to the table: pad tokens (sequence classification finds each row's last
# token by them) and a head-less classifier dropout.
_TASK_OVERRIDES: dict[str, dict[str, Any]] = {
    "bert": {"classifier_dropout": 0.0},
    "gpt2": {"pad_token_id": 2},
    "llama": {"tie_word_embeddings": False, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "t5": {"eos_token_id": 1},
    "bart": {"forced_eos_token_id": None},
}


def task_model(arch: str, head: str, seed: int = 0) -> nn.Module:
    """``<Arch><head>`` for the task tests, e.g. ``task_model("bert", "ForSequenceClassification")``:
    3 labels (2, start and end, for question answering)."""
    num_labels = 2 if head == "ForQuestionAnswering" else NUM_LABELS
    return build(arch, head, seed=seed, num_labels=num_labels, **_TASK_OVERRIDES.get(arch, {}))


# -- models built with the class constructor (default attention, train mode) --------------------------
def llama_wide(seed: int = 0, layers: int = 2) -> nn.Module:
    """A Llama with hidden size 32, 4 heads (2 key/value heads), vocab 100 and 2048 positions, built by
    ``LlamaForCausalLM(config)`` (default attention, train mode): the rank and compile tests' model."""
    cfg = config(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


# The CLI tests' models, saved beside a word-level tokenizer (tests/cli_fixtures.py): 64 positions, and
# the tokenizer's special tokens.
_SAVED = {
    "bert": ("Model", {"max_position_embeddings": 64}),
    "llama": (
        "ForCausalLM",
        {"max_position_embeddings": 64, "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 1},
    ),
    "t5": ("ForConditionalGeneration", {"relative_attention_num_buckets": 32, "eos_token_id": 1}),
}


def saved_model(arch: str, vocab_size: int, seed: int = 0) -> nn.Module:
    """The CLI tests' ``bert`` (``BertModel``), ``llama`` (causal LM) or ``t5`` (seq2seq) for a
    tokenizer of ``vocab_size`` words, built by the class constructor as ``from_pretrained`` loads it."""
    head, overrides = _SAVED[arch]
    cfg = config(arch, vocab_size=vocab_size, **overrides)
    torch.manual_seed(seed)
    return model_class(arch, head)(cfg)
