"""Tied embeddings: which modules count as tied, which modules trainable token rows go to (PEFT's
rules), what ensure_weight_tying does to a config, and the errors, raised before the model changes."""

from __future__ import annotations

import warnings

import pytest
import torch
from zoo import assert_same_state, build, llama, snapshot, structure

import lorakit
from lorakit import ConfigError, LoraConfig, TargetingError
from lorakit.model.tying import input_embedding_name, tie_adapters, tied_names, token_targets


def tied_llama():
    return build("llama", "ForCausalLM", vocab_size=64, tie_word_embeddings=True)


def _targets(model, **kwargs):
    return [(t.name, t.indices, t.tied_to) for t in token_targets(LoraConfig(**kwargs), model, [])]


def test_tied_modules_are_the_ones_sharing_the_embedding_weight():
    assert input_embedding_name(tied_llama()) == "model.embed_tokens"
    assert tied_names(tied_llama()) == ["lm_head"]
    assert tied_names(llama()) == []
    model = tied_llama()
    model.config.tie_word_embeddings = False  # the config's word wins, as in PEFT
    assert tied_names(model) == []


def test_token_rows_go_to_the_input_embedding_and_tied_heads_share_them():
    assert _targets(llama(), trainable_token_indices=[1, 2]) == [("model.embed_tokens", [1, 2], None)]
    assert _targets(tied_llama(), trainable_token_indices=[1, 2]) == [
        ("model.embed_tokens", [1, 2], None),
        ("lm_head", [1, 2], "model.embed_tokens"),
    ]
    same = {"lm_head": [1, 2], "embed_tokens": [1, 2]}
    assert _targets(tied_llama(), trainable_token_indices=same)[1] == (
        "lm_head",
        [1, 2],
        "model.embed_tokens",
    )
    other = {"lm_head": [3], "embed_tokens": [1, 2]}  # PEFT: then each keeps its own rows
    assert _targets(tied_llama(), trainable_token_indices=other) == [
        ("lm_head", [3], None),
        ("model.embed_tokens", [1, 2], None),
    ]


# (model, config kwargs, error type, parts of the message)
FAILING = [
    (
        tied_llama,
        {"trainable_token_indices": {"embeddings": [1]}},
        TargetingError,
        ["'embeddings'", "no module"],
    ),
    (llama, {"trainable_token_indices": [1, 64]}, TargetingError, ["[64]", "out of range", "64 rows"]),
    (
        llama,
        {"target_modules": ["q_proj", "embed_tokens"], "trainable_token_indices": [1]},
        TargetingError,
        ["LoRA target", "target_modules"],
    ),
    (
        llama,
        {"modules_to_save": ["embed_tokens"], "trainable_token_indices": [1]},
        TargetingError,
        ["modules_to_save", "not both"],
    ),
    (
        tied_llama,
        {"trainable_token_indices": {"lm_head": [3], "embed_tokens": [1]}, "ensure_weight_tying": True},
        TargetingError,
        ["different token indices", "lm_head: [3]"],
    ),
    (llama, {"trainable_token_indices": [1, 1]}, ConfigError, ["repeats token ids [1]"]),
    (llama, {"trainable_token_indices": {"embed_tokens": [-1]}}, ConfigError, ["non-negative"]),
    (
        tied_llama,
        {"target_modules": ["q_proj", "embed_tokens"], "ensure_weight_tying": True, "use_dora": True},
        ConfigError,
        ["DoRA"],
    ),
]


@pytest.mark.parametrize(("make", "kwargs", "error", "parts"), FAILING)
def test_refused_before_anything_changes(make, kwargs, error, parts):
    model = make()
    state, shape = snapshot(model), structure(model)
    with pytest.raises(error) as info:
        lorakit.get_peft_model(model, LoraConfig(**{"target_modules": ["q_proj"], **kwargs}))
    for part in parts:
        assert part in str(info.value), part
    assert structure(model) == shape
    assert_same_state(state, model)


def test_ensure_weight_tying_says_when_there_is_nothing_to_tie():
    with pytest.warns(UserWarning, match="no tied modules were found"):
        tie_adapters(LoraConfig(target_modules=["embed_tokens"], ensure_weight_tying=True), llama())
    with pytest.warns(UserWarning, match="no tied modules are added"):
        tie_adapters(LoraConfig(target_modules=["q_proj"], ensure_weight_tying=True), tied_llama())
    with pytest.warns(UserWarning, match="set ensure_weight_tying=True"):
        tie_adapters(LoraConfig(target_modules=["lm_head"]), tied_llama())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config, ties = tie_adapters(LoraConfig(target_modules=["q_proj"]), tied_llama())
    assert config.target_modules == ["q_proj"] and not list(ties)


@pytest.mark.parametrize(
    ("kwargs", "targets", "saves"),
    [
        ({"target_modules": ["q_proj", "lm_head"]}, ["model.embed_tokens", "q_proj"], None),
        (
            {"target_modules": ["q_proj", "embed_tokens"]},
            ["embed_tokens", "model.embed_tokens", "q_proj"],
            None,
        ),
        ({"target_modules": ".*lm_head"}, r"(?:.*lm_head|^model\.embed_tokens$)", None),
        ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, ["q_proj"], ["model.embed_tokens"]),
    ],
)
def test_ensure_weight_tying_moves_the_adapter_to_the_embedding(kwargs, targets, saves):
    """PEFT's rewriting: the embedding is adapted, the tied head shares its adapter."""
    config, ties = tie_adapters(LoraConfig(**kwargs, ensure_weight_tying=True), tied_llama())
    assert config.target_modules == targets and config.modules_to_save == saves
    assert [n for n, _ in ties] == ["lm_head"] and ties.embedding == "model.embed_tokens"


def test_tied_factors_stay_shared_when_the_adapter_takes_the_base_dtype():
    model = tied_llama().to(torch.bfloat16)
    config = LoraConfig(target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True)
    peft_model = lorakit.get_peft_model(model, config, autocast_adapter_dtype=False)
    embedding, head = peft_model.base_model.model.model.embed_tokens, peft_model.base_model.model.lm_head
    assert head.lora_A["default"].weight.dtype == torch.bfloat16
    assert head.lora_A["default"].weight.data_ptr() == embedding.lora_embedding_B["default"].data_ptr()
    assert head.lora_B["default"].weight.data_ptr() == embedding.lora_embedding_A["default"].data_ptr()


def test_overlapping_rows_are_refused_together_and_nothing_changes():
    model = lorakit.get_peft_model(
        tied_llama(), LoraConfig(target_modules=["q_proj"], trainable_token_indices=[1, 2]), adapter_name="a"
    )
    model.add_adapter("b", LoraConfig(target_modules=["v_proj"], trainable_token_indices=[2, 3]))
    with pytest.raises(lorakit.AdapterError, match="both train token row 2"):
        model.set_adapter(["a", "b"])
    assert model.active_adapters == ["a"]


def test_a_merge_that_would_change_a_module_without_the_rows_is_refused():
    """The head keeps rows of its own (other indices), so writing the embedding's rows into the
    shared weight would change the head's outputs: refused, nothing merged."""
    rows = {"lm_head": [3], "embed_tokens": [1, 2]}
    model = lorakit.get_peft_model(
        tied_llama(), LoraConfig(target_modules=["q_proj"], trainable_token_indices=rows)
    )
    weight = model.base_model.model.model.embed_tokens.weight.clone()
    with pytest.raises(lorakit.AdapterError, match="also used by lm_head"):
        model.merge_adapter()
    assert torch.equal(model.base_model.model.model.embed_tokens.weight, weight)
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))
