"""Hot-swapping: in place, without recompiling a ``torch.compile``d model (counted across three
swaps), outputs equal to the swapped-in adapter loaded normally (ranks, alphas, patterns, rsLoRA,
DoRA, embeddings, convolutions), from a state dict and from lorakit's and PEFT's directories, and
refusals that leave the model unchanged."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
import torch._dynamo.testing
from zoo import TOY_TARGETS, assert_same_state, ids, llama, snapshot, toy

import lorakit
from lorakit import hotswap_adapter, hotswap_adapter_from_state_dict, prepare_model_for_compiled_hotswap

TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def _adapter(base, seed: int, **kw):
    torch.manual_seed(seed)
    kw = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **kw}
    config = lorakit.LoraConfig(**kw)
    return lorakit.get_peft_model(copy.deepcopy(base), config)


def _logits(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


def _swap(target, source):
    hotswap_adapter_from_state_dict(
        target, lorakit.get_peft_model_state_dict(source), "default", source.peft_config["default"]
    )


@pytest.mark.slow
def test_three_hot_swaps_do_not_recompile():
    base = llama()
    sources = [
        _adapter(base, 1),
        _adapter(base, 2, r=2, lora_alpha=3),
        _adapter(base, 3, r=6, lora_alpha=12),
        _adapter(base, 4, rank_pattern={"v_proj": 8}, alpha_pattern={"q_proj": 2}),
    ]
    x = ids()
    wanted = [_logits(m, x) for m in sources]
    model = _adapter(base, 1)
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter)
    torch.testing.assert_close(_logits(compiled, x), wanted[0], atol=1e-6, rtol=1e-5)
    assert counter.frame_count == 1
    for source, want in zip(sources[1:], wanted[1:], strict=True):
        _swap(compiled, source)
        torch.testing.assert_close(_logits(compiled, x), want, atol=1e-5, rtol=1e-5)
    assert counter.frame_count == 1  # zero recompilations after the first compile


@pytest.mark.parametrize("kw", [{"use_dora": True}, {"use_rslora": True}, {"lora_dropout": 0.1}])
def test_variants_swap_to_the_source_outputs(kw):
    base = llama()
    model, source = _adapter(base, 1, **kw), _adapter(base, 2, r=2, lora_alpha=5, **kw)
    prepare_model_for_compiled_hotswap(model)
    _swap(model, source)
    torch.testing.assert_close(_logits(model, ids()), _logits(source, ids()), atol=1e-5, rtol=1e-5)


def test_convolutions_and_a_subset_of_targets():
    base = toy()
    model = _adapter(base, 1, target_modules=TOY_TARGETS)
    source = _adapter(base, 2, target_modules=["lin", "conv2"], r=3)
    _swap(model, source)  # a smaller rank needs no preparation; the layers source lacks are zeroed
    torch.testing.assert_close(_logits(model, ids()), _logits(source, ids()), atol=1e-5, rtol=1e-5)


@pytest.mark.parity
def test_from_lorakit_and_peft_directories_like_peft(tmp_path):
    base = llama()
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    torch.manual_seed(5)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**{**kw, "r": 2, "lora_alpha": 6}))
    theirs.save_pretrained(tmp_path / "peft")
    ours_source = _adapter(base, 6, target_modules=["q_proj", "v_proj"])
    ours_source.save_pretrained(tmp_path / "ours")
    model = _adapter(base, 1, target_modules=["q_proj", "v_proj"])
    hotswap_adapter(model, tmp_path / "peft")
    torch.testing.assert_close(_logits(model, ids()), _logits(theirs, ids()), atol=1e-5, rtol=1e-5)
    torch.manual_seed(7)
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    from peft.utils.hotswap import hotswap_adapter as peft_hotswap

    peft_hotswap(reference, str(tmp_path / "ours"), adapter_name="default")
    hotswap_adapter(model, tmp_path / "ours")
    torch.testing.assert_close(_logits(model, ids()), _logits(reference, ids()), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(model, ids()), _logits(ours_source, ids()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("source_kw", "parts"),
    [
        (
            {"target_modules": ["q_proj", "k_proj"]},
            ["k_proj.lora_A.weight", "cannot add targets", "load_adapter"],
        ),
        ({"r": 6}, ["(4, 16)", "(6, 16)", "prepare_model_for_compiled_hotswap"]),
        ({"use_dora": True}, ["lora_magnitude_vector", "uses DoRA"]),
    ],
)
def test_impossible_swaps_explain_and_change_nothing(source_kw, parts):
    """A larger rank is impossible only in a compiled model (compiled in place here: parameter
    shapes are then part of the graph); every refusal is also a RuntimeError, as PEFT's."""
    base = llama()
    model = _adapter(base, 1, target_modules=["q_proj", "v_proj"])
    model.compile()  # sets the compiled call; nothing is compiled until the first forward
    source = _adapter(base, 2, **{"target_modules": ["q_proj", "v_proj"], **source_kw})
    before = snapshot(model)
    with pytest.raises(lorakit.AdapterStateDictError) as err:
        _swap(model, source)
    assert isinstance(err.value, RuntimeError)
    for part in parts:
        assert part in str(err.value)
    assert_same_state(before, model)


@pytest.mark.parametrize("ranks", [(4, 7), (7, 4)])
def test_uncompiled_model_takes_a_larger_or_smaller_rank(ranks):
    """As PEFT: without compiling, an adapter of larger rank is swapped in (the factors grow); the
    model then computes exactly what the source adapter computes, and swapping back restores it."""
    base = llama()
    model = _adapter(base, 1, r=ranks[0], lora_alpha=ranks[0], target_modules=["q_proj", "v_proj"])
    source = _adapter(base, 2, r=ranks[1], lora_alpha=3, target_modules=["q_proj"])
    first = _adapter(base, 1, r=ranks[0], lora_alpha=ranks[0], target_modules=["q_proj", "v_proj"])
    x = ids()
    _swap(model, source)
    torch.testing.assert_close(_logits(model, x), _logits(source, x), atol=1e-5, rtol=1e-5)
    _swap(model, first)
    torch.testing.assert_close(_logits(model, x), _logits(first, x), atol=1e-5, rtol=1e-5)


def test_prepare_with_config_describes_the_padded_adapter(tmp_path):
    """prepare_model_for_compiled_hotswap(config=...) sets r and rank_pattern to the target rank (as
    PEFT) and rescales alpha so that a save of the padded adapter reloads to the same outputs."""
    base = llama()
    model = _adapter(base, 1, r=3, lora_alpha=5, rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 7})
    x = ids()
    want = _logits(model, x)
    prepare_model_for_compiled_hotswap(model, target_rank=6, config=model.peft_config)
    config = model.peft_config["default"]
    assert (config.r, config.rank_pattern) == (6, {"v_proj": 6})
    model.save_pretrained(tmp_path)
    reloaded = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(_logits(reloaded, x), want, atol=1e-5, rtol=1e-5)


def test_merged_adapter_and_mismatched_directory_are_refused(tmp_path):
    base = llama()
    model = _adapter(base, 1, target_modules=["q_proj"])
    _adapter(base, 2, target_modules=["q_proj"], use_dora=True).save_pretrained(tmp_path)
    with pytest.raises(lorakit.AdapterError, match="use_dora: loaded False, new True"):
        hotswap_adapter(model, tmp_path)
    model.merge_adapter()
    with pytest.raises(lorakit.AdapterError, match="unmerge before hot-swapping"):
        _swap(model, _adapter(base, 3, target_modules=["q_proj"]))
    with pytest.raises(lorakit.AdapterError, match="target_rank=2"):
        prepare_model_for_compiled_hotswap(model, target_rank=2)


def test_adapters_on_experts_are_not_hot_swapped(tmp_path):
    """Their experts' factors interleave in one tensor: padding to another rank would mix experts."""
    from zoo import moe

    config = lorakit.LoraConfig(target_modules=[], target_parameters=["experts.down_proj"])
    model = lorakit.get_peft_model(moe("qwen3_moe"), config)
    model.save_pretrained(tmp_path)
    with pytest.raises(lorakit.AdapterError, match="target_parameters .*not supported"):
        prepare_model_for_compiled_hotswap(model)
    with pytest.raises(lorakit.AdapterError, match="target_parameters .*not supported"):
        hotswap_adapter(model, tmp_path)
