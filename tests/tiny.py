"""Tiny models and helpers shared by the unit and invariant tests (no hub access, fixed seeds).

``zoo.py`` holds the broad model zoo of the parity tests; this module keeps the two small
transformers models and the plain-torch toy model that the unit tests cross with every state change.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 64


def llama(seed: int = 0) -> nn.Module:
    """A 2-layer Llama with hidden size 16 (q/k/v/o, gate/up/down projections, tied nothing)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation="eager").eval()


def gpt2(seed: int = 0) -> nn.Module:
    """A 2-layer GPT-2 (transformers ``Conv1D`` layers, tied embeddings)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=32,
        bos_token_id=1,
        eos_token_id=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel._from_config(config, attn_implementation="eager").eval()


def bert_cls(seed: int = 0) -> nn.Module:
    """A 2-layer BERT for sequence classification (``classifier`` head)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification._from_config(config, attn_implementation="eager").eval()


MODELS = {"llama": llama, "gpt2": gpt2}


def ids(batch: int = 3, seq: int = 5, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, seq), generator=gen)


class Toy(nn.Module):
    """One module of every kind lorakit adapts: Embedding → Linear → Conv1D → Conv1d → Conv2d → head."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(VOCAB, 8)
        self.lin = nn.Linear(8, 8)
        self.c1d = Conv1D(8, 8)  # (nf=out, nx=in)
        self.conv1 = nn.Conv1d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T) token ids
        h = self.emb(x)  # (B, T, 8)
        h = torch.tanh(self.lin(h))
        h = self.c1d(h)  # (B, T, 8)
        h = self.conv1(h.transpose(1, 2)).transpose(1, 2)  # (B, T, 8)
        b, t, _ = h.shape
        h = self.conv2(h.reshape(b, 2, t, 4)).reshape(b, t, 8)  # (B, 2, T, 4) → (B, T, 8)
        return self.head(h)


TOY_TARGETS = ["emb", "lin", "c1d", "conv1", "conv2"]


def toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy().eval()


def logits(model: nn.Module, x: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        out = model(x, **kwargs)
    return out.logits if hasattr(out, "logits") else out


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every state-dict tensor."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def structure(model: nn.Module) -> list[tuple[str, str]]:
    return [(n, type(m).__name__) for n, m in model.named_modules()]


def assert_same_state(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert list(after) == list(before)
    changed = [k for k, v in before.items() if not _identical(v, after[k])]
    assert not changed, f"tensors changed: {changed}"


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal element for element, NaN equal to NaN in the same place."""
    if a.is_floating_point() and b.is_floating_point():
        return a.dtype == b.dtype and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
    return torch.equal(a, b)
