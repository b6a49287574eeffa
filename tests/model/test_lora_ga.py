"""LoRA-GA on whole models: with the same gradients and seed the adapters and residual base weights
are PEFT 0.21.2's (bit for bit), the model starts as the base model, gradients estimated by either
library's ``preprocess_loraga`` work in the other, the cache round-trips, and the state of the model
is restored after the estimate."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
from zoo import gpt2, ids, llama

import lorakit
from lorakit.model.lora_ga import GRAD_ATTR, preprocess_loraga


def _step(model):
    x = ids(batch=3, seq=8)

    def train_step():
        for _ in range(2):
            model(input_ids=x, labels=x).loss.backward()

    return train_step


def _build(lib, preprocess, base, targets, ga=None, seed=0, **extra):
    model = copy.deepcopy(base)
    config = lib.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        init_lora_weights="lora_ga",
        lora_ga_config=lib.LoraGAConfig(**(ga or {})),
        **extra,
    )
    preprocess(model, config, _step(model))
    torch.manual_seed(seed)
    return lib.get_peft_model(model, config)


CASES = {
    "llama-stable": (llama, ["q_proj", "v_proj", "down_proj"], {}, {}),
    "llama-ArBr-weight_svd-dora": (
        llama,
        ["q_proj", "o_proj"],
        dict(direction="ArBr", scale="weight_svd"),
        dict(use_dora=True),
    ),
    "llama-random-gd_scale": (llama, ["q_proj", "up_proj"], dict(direction="random", scale="gd_scale"), {}),
    "gpt2-A2rBr-unit": (gpt2, ["c_attn", "c_fc"], dict(direction="A2rBr", scale="unit"), {}),
}


@pytest.mark.parity
@pytest.mark.parametrize("case", sorted(CASES))
def test_adapters_and_residual_weights_equal_peft(case):
    build, targets, ga, extra = CASES[case]
    base = build()
    theirs = _build(peft, peft.preprocess_loraga, base, targets, ga, **extra).state_dict()
    model = _build(lorakit, preprocess_loraga, base, targets, ga, **extra)
    ours = model.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():  # the same arithmetic in the same order: equal bits
        torch.testing.assert_close(ours[key], value, atol=0, rtol=0, msg=key)
    x = ids()
    with torch.no_grad():  # W_res + s·B A = W up to one float32 rounding of W's entries
        torch.testing.assert_close(model(input_ids=x).logits, base(input_ids=x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parity
def test_stable_scale_on_conv1d_uses_the_output_width():
    """PEFT's "stable" scale reads d_out as weight.shape[0], which for a Conv1D (stored k × d) is
    k; lorakit uses d, so B differs by exactly (d / k)^¼ and A is the same."""
    base = gpt2()
    theirs = _build(peft, peft.preprocess_loraga, base, ["c_attn"]).state_dict()
    ours = _build(lorakit, preprocess_loraga, base, ["c_attn"]).state_dict()
    for key, value in theirs.items():
        if ".lora_B." in key:
            torch.testing.assert_close(ours[key], value * (48 / 16) ** 0.25, atol=1e-7, rtol=1e-6)
        elif ".lora_A." in key:
            torch.testing.assert_close(ours[key], value, atol=0, rtol=0)


@pytest.mark.parity
def test_gradients_from_either_library_and_the_cache(tmp_path):
    base = llama()
    targets = ["q_proj", "v_proj"]
    want = _build(lorakit, preprocess_loraga, base, targets).state_dict()
    from_peft = _build(lorakit, peft.preprocess_loraga, base, targets).state_dict()
    assert all(torch.equal(from_peft[k], v) for k, v in want.items())
    cache = tmp_path / "cache" / "grads.safetensors"
    _build(lorakit, lambda m, c, s: preprocess_loraga(m, c, s, cache_file=cache), base, targets)
    again = _build(
        lorakit,
        lambda m, c, s: preprocess_loraga(m, c, lambda: pytest.fail("not cached"), cache),
        base,
        targets,
    )
    assert all(torch.equal(again.state_dict()[k], v) for k, v in want.items())
    peft_cache = tmp_path / "peft.pt"  # PEFT's torch.save cache is read too (weights_only)
    _build(peft, lambda m, c, s: peft.preprocess_loraga(m, c, s, cache_file=str(peft_cache)), base, targets)
    read = _build(
        lorakit,
        lambda m, c, s: preprocess_loraga(m, c, lambda: pytest.fail("not cached"), peft_cache),
        base,
        targets,
    )
    assert all(torch.equal(read.state_dict()[k], v) for k, v in want.items())


def test_the_estimate_restores_flags_and_mode_and_averages_per_backward():
    model = llama()
    model.lm_head.weight.requires_grad_(False)
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="lora_ga")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    x = ids(batch=2, seq=6)
    calls = []

    def train_step():
        calls.append(model.training)
        for _ in range(3):
            model(input_ids=x, labels=x).loss.backward()

    preprocess_loraga(model, config, train_step)
    assert calls == [True] and not model.training
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    q = model.model.layers[0].self_attn.q_proj
    reference = copy.deepcopy(model)
    reference.zero_grad()
    reference(input_ids=x, labels=x).loss.backward()
    torch.testing.assert_close(getattr(q, GRAD_ATTR), reference.model.layers[0].self_attn.q_proj.weight.grad)


def test_without_an_estimate_the_default_init_is_used_and_a_saved_adapter_loads(tmp_path):
    """Loading a LoRA-GA adapter needs no gradient (PEFT's fallback); the converted save is a plain
    rank-2r LoRA for the untouched base."""
    base = llama()
    model = _build(lorakit, preprocess_loraga, base, ["q_proj"])
    model.save_pretrained(tmp_path / "init")
    with torch.no_grad():
        model.base_model.model.model.layers[0].self_attn.q_proj.lora_B["default"].weight.add_(0.1)
    x = ids()
    with torch.no_grad():
        trained = model(input_ids=x).logits
    model.save_pretrained(tmp_path / "plain", path_initial_model_for_weight_conversion=tmp_path / "init")
    plain = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "plain")
    assert plain.peft_config["default"].r == 8 and plain.peft_config["default"].init_lora_weights is True
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=x).logits, trained, atol=1e-5, rtol=1e-5)
    fresh = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig.from_pretrained(tmp_path / "init"))
    layer = fresh.base_model.model.model.layers[0].self_attn.q_proj
    assert not layer.lora_B["default"].weight.any()  # default init: B = 0, base untouched
    assert layer.lora_A["default"].weight.abs().max() <= 1 / math.sqrt(16)


@pytest.mark.parametrize(
    ("config", "error", "shown"),
    [
        (dict(init_lora_weights=True), lorakit.ConfigError, "init_lora_weights='lora_ga'"),
        (
            dict(init_lora_weights="lora_ga", target_modules=["embed_tokens"]),
            lorakit.TargetingError,
            "no nn.Linear",
        ),
    ],
)
def test_preprocess_refusals(config, error, shown):
    kw = {"r": 2, "target_modules": ["q_proj"], **config}
    with pytest.raises(error, match=shown):
        preprocess_loraga(llama(), lorakit.LoraConfig(**kw), lambda: None)


def test_a_gradient_of_the_wrong_shape_is_refused_before_any_change():
    model = llama()
    q = model.model.layers[0].self_attn.q_proj
    setattr(q, GRAD_ATTR, torch.zeros(3, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorakit.TargetingError, match=r"gradient has shape \(3, 3\)"):
        lorakit.get_peft_model(
            model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="lora_ga")
        )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
