"""The serving tests' model: a tiny Llama saved like a real checkpoint (word-level tokenizer with a chat
template) and three adapters on it with different targets, plus a reference copy to run ``generate``.

The weights are drawn with a wide init (std 0.3, not transformers' 0.02) so that the logits of this
random model have clear winners: greedy decoding then compares tokens, not rounding noise.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

WORDS = ["system", "user", "assistant", "hello", "world"] + [f"w{i}" for i in range(55)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant{% endif %}"
)
CONTEXT = 64
# name → (target modules, rank): different layers per adapter, so a mixed batch mixes structures too
ADAPTERS = {
    "alpha": (["q_proj", "v_proj"], 4),
    "beta": (["o_proj", "down_proj"], 2),
    "gamma": ("all-linear", 2),
}


def tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def base_model() -> Any:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=len(WORDS) + 4,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=CONTEXT,
        initializer_range=0.3,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def served_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``base/`` (model + tokenizer) and one folder per adapter of :data:`ADAPTERS` (read-only)."""
    from lorakit import LoraConfig, TaskType, get_peft_model

    root = tmp_path_factory.mktemp("served")
    base = base_model()
    base.save_pretrained(root / "base")
    tokenizer().save_pretrained(root / "base")
    for seed, (name, (targets, r)) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + seed)
        config = LoraConfig(
            r=r,
            lora_alpha=2 * r,
            target_modules=targets,
            init_lora_weights=False,
            task_type=TaskType.CAUSAL_LM,
        )
        get_peft_model(copy.deepcopy(base), config).save_pretrained(root / name)
    return root


@pytest.fixture(scope="session")
def reference(served_files: Path) -> Any:
    """A separate model with every adapter loaded, for ``generate`` one request at a time."""
    from transformers import AutoModelForCausalLM

    from lorakit import PeftModel

    model = AutoModelForCausalLM.from_pretrained(served_files / "base").eval()
    names = list(ADAPTERS)
    peft = PeftModel.from_pretrained(model, served_files / names[0], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(served_files / name, adapter_name=name)
    return peft.eval()


@pytest.fixture(scope="session")
def alone(reference: Any) -> Any:
    """``alone(prompt, adapter, max_tokens)``: greedy ``generate`` for one prompt with one adapter
    (``None``: the base), until EOS (included) or the limit: what the server must reproduce."""
    return lambda prompt, adapter, max_tokens: _generate_alone(reference, prompt, adapter, max_tokens)


def _generate_alone(reference: Any, prompt: list[int], adapter: str | None, max_tokens: int) -> list[int]:
    ids = torch.tensor([prompt])
    kwargs = dict(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False
    )
    with torch.no_grad():
        if adapter is None:
            with reference.disable_adapter():
                out = reference.generate(**kwargs, pad_token_id=1)
        else:
            reference.set_adapter(adapter)
            out = reference.generate(**kwargs, pad_token_id=1)
    tokens = out[0, len(prompt) :].tolist()
    return tokens[: tokens.index(3) + 1] if 3 in tokens else tokens
