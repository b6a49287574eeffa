"""Adapter arithmetic (``add_weighted_adapter``): PEFT 0.21.2's delta weights for every combination
type on three architectures (the random DARE types with the same seed give PEFT's tensors), the
exact cases on every layer kind, and the refusals. (The combination math: functional/test_combine.py.)"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from zoo import assert_same_state, gpt2, ids, llama, snapshot, toy

import lorakit
from lorakit.layers import LoraLayer

TYPES = [
    "cat",
    "linear",
    "svd",
    "ties",
    "ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
]
ARCHS = {
    "llama": (llama, ["q_proj", "v_proj", "embed_tokens"]),
    "gpt2": (gpt2, ["c_attn", "c_fc"]),
    "toy": (toy, ["lin", "c1d", "emb"]),
}


def _pair(arch: str, **extra):
    build, targets = ARCHS[arch]
    base = build()
    kw = {"r": 4, "lora_alpha": 8, "target_modules": targets, "init_lora_weights": False, **extra}
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw), "a")
    pm.add_adapter("b", peft.LoraConfig(**{**kw, "lora_alpha": 4}))
    lk = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw), "a")
    lk.add_adapter("b", lorakit.LoraConfig(**{**kw, "lora_alpha": 4}))
    for name in "ab":
        sd = peft.get_peft_model_state_dict(pm, adapter_name=name)
        lorakit.set_peft_model_state_dict(lk, {k: v for k, v in sd.items() if ".base_layer." not in k}, name)
    return pm, lk


def _layers(model, cls):
    return [m for m in model.modules() if isinstance(m, cls)]


@pytest.mark.parity
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_delta_weights_and_outputs_match_peft(arch):
    pm, lk = _pair(arch)
    x = ids()
    for ct in TYPES:
        kw = {} if ct in ("cat", "linear", "svd") else {"density": 0.5}
        for model in (pm, lk):
            torch.manual_seed(1)
            model.add_weighted_adapter(["a", "b"], [0.7, -0.4], ct, combination_type=ct, **kw)
        assert lk.peft_config[ct].r == pm.peft_config[ct].r
        for theirs, ours in zip(_layers(pm, peft.tuners.lora.LoraLayer), _layers(lk, LoraLayer), strict=True):
            torch.testing.assert_close(
                ours.delta_weight(ct), theirs.get_delta_weight(ct), atol=1e-6, rtol=1e-5
            )
        pm.set_adapter(ct)
        lk.set_adapter(ct)
        with torch.no_grad():
            out_p, out_l = pm(x), lk(x)
        out_p, out_l = getattr(out_p, "logits", out_p), getattr(out_l, "logits", out_l)
        torch.testing.assert_close(out_l, out_p, atol=1e-5, rtol=1e-4)


@pytest.mark.parity
def test_svd_clamp_and_rank_match_peft():
    pm, lk = _pair("llama")
    for model in (pm, lk):
        model.add_weighted_adapter(
            ["a", "b"], [1.0, 0.5], "s", combination_type="svd", svd_rank=3, svd_clamp=0.9
        )
    assert lk.peft_config["s"].r == 3
    for theirs, ours in zip(_layers(pm, peft.tuners.lora.LoraLayer), _layers(lk, LoraLayer), strict=True):
        torch.testing.assert_close(ours.delta_weight("s"), theirs.get_delta_weight("s"), atol=1e-6, rtol=1e-5)


def test_cat_and_full_rank_svd_are_exact_on_every_layer_kind():
    """Σ w_i ΔW_i, also on Conv1d/Conv2d (where PEFT's SVD types fail) and with a rank above the
    update's: the SVD is padded with zeros."""
    targets = ["lin", "c1d", "conv1", "conv2", "emb"]
    config = lorakit.LoraConfig(r=2, target_modules=targets, init_lora_weights=False)
    lk = lorakit.get_peft_model(toy(), config, "a")
    lk.add_adapter(
        "b",
        lorakit.LoraConfig(
            r=3, lora_alpha=6, target_modules=["lin", "conv1", "conv2"], init_lora_weights=False
        ),
    )
    lk.add_weighted_adapter(["a", "b"], [0.5, 2.0], "cat", combination_type="cat")
    lk.add_weighted_adapter(["a", "b"], [0.5, 2.0], "svd", combination_type="svd", svd_rank=5)
    for layer in _layers(lk, LoraLayer):
        want = sum(w * layer.delta_weight(n) for n, w in (("a", 0.5), ("b", 2.0)) if layer.has_adapter(n))
        torch.testing.assert_close(layer.delta_weight("cat"), want, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(layer.delta_weight("svd"), want, atol=1e-5, rtol=1e-4)
    assert lk.active_adapters == ["a"] and not any(
        p.requires_grad for n, p in lk.named_parameters() if ".cat." in n or ".svd." in n
    )


@pytest.mark.parametrize(
    ("kwargs", "parts"),
    [
        ({"adapters": ["a", "zzz"]}, ["'zzz'", "existing adapters"]),
        ({"weights": [1.0]}, ["1 entries for 2 adapters"]),
        ({"combination_type": "avg"}, ["'avg'", "cat", "dare_ties_svd"]),
        ({"combination_type": "ties"}, ["density=None", "(0, 1]"]),
        ({"combination_type": "ties", "density": 1.5}, ["density=1.5"]),
        ({"majority_sign_method": "vote"}, ["'vote'", "total"]),
        ({"adapter_name": "a"}, ["'a' already exists"]),
        ({"adapters": ["a", "r2"], "combination_type": "linear"}, ["one rank", "'r2': 2", "'cat'"]),
        ({"adapters": ["a", "dora"]}, ["['dora']", "DoRA"]),
    ],
)
def test_errors_name_the_problem_and_change_nothing(kwargs, parts):
    lk = lorakit.get_peft_model(llama(), lorakit.LoraConfig(r=4, target_modules=["q_proj"]), "a")
    lk.add_adapter("r2", lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lk.add_adapter("dora", lorakit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    lk.add_adapter("b", lorakit.LoraConfig(r=4, target_modules=["v_proj"]))
    before, configs = snapshot(lk), dict(lk.peft_config)
    call = {"adapters": ["a", "b"], "weights": [1.0, 1.0], "adapter_name": "new", **kwargs}
    with pytest.raises(lorakit.AdapterError) as err:
        lk.add_weighted_adapter(**call)
    for part in parts:
        assert part in str(err.value)
    assert_same_state(before, lk)
    assert lk.peft_config == configs


def test_pissa_source_does_not_rewrite_the_base_again():
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa")
    lk = lorakit.get_peft_model(llama(), config)
    residual = lk.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    lk.add_weighted_adapter(["default"], [1.0], "copy", combination_type="linear")
    assert torch.equal(lk.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight, residual)
    assert lk.peft_config["copy"].init_lora_weights is True


def test_rslora_sources_combine_to_the_exact_sum():
    """With rsLoRA the combined adapter's scaling is still 1 (α = √r), so ``cat`` stays exact."""
    kw = {"r": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False, "use_rslora": True}
    lk = lorakit.get_peft_model(llama(), lorakit.LoraConfig(**kw), "a")
    lk.add_adapter("b", lorakit.LoraConfig(**{**kw, "r": 2, "lora_alpha": 5}))
    lk.add_weighted_adapter(["a", "b"], [1.0, -2.0], "cat", combination_type="cat")
    for layer in _layers(lk, LoraLayer):
        assert layer.scaling["cat"] == 1.0
        want = layer.delta_weight("a") - 2.0 * layer.delta_weight("b")
        torch.testing.assert_close(layer.delta_weight("cat"), want, atol=1e-6, rtol=1e-5)


def test_base_model_spelling_like_peft():
    lk = lorakit.get_peft_model(llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]), "a")
    lk.add_adapter("b", lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lk.base_model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "ab", combination_type="linear")
    assert "ab" in lk.peft_config
    assert not any(p.requires_grad for n, p in lk.named_parameters() if ".ab." in n)


def test_adapters_on_experts_are_not_combined():
    from zoo import moe

    config = lorakit.LoraConfig(target_modules=["q_proj"], target_parameters=["experts.down_proj"])
    model = lorakit.get_peft_model(moe("qwen3_moe"), config)
    model.add_adapter("other", config)
    with pytest.raises(lorakit.AdapterError, match=r"\['default', 'other'\] use target_parameters"):
        model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "sum", combination_type="linear")
