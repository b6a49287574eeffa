"""Several adapters active at once (their updates add up) and ``lora_bias=True``, against PEFT
0.21.2 on several architectures: outputs, merged outputs, saved keys; merge/unmerge invariants."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from zoo import ZOO, main_output

import lorakit

pytestmark = pytest.mark.parity

ARCHS = {
    "llama": (["q_proj", "v_proj"], ["v_proj", "o_proj", "embed_tokens"]),
    "gpt2": (["c_attn"], ["c_attn", "c_fc"]),
    "bert": (["query", "value"], ["value", "dense"]),
    "t5": (["q", "v"], ["v", "wo"]),
    "mlp": (["lin0", "conv"], ["lin0", "lin1", "emb"]),
}


def _copy_adapters(pm, lk, names):
    for name in names:
        sd = peft.get_peft_model_state_dict(pm, adapter_name=name)
        lorakit.set_peft_model_state_dict(lk, {k: v for k, v in sd.items() if ".base_layer." not in k}, name)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_two_active_adapters_sum_like_peft_and_merge_to_the_same(arch):
    entry = ZOO[arch]
    base, inputs = entry.build(), entry.inputs()
    first, second = ARCHS[arch]
    kw_a = {"r": 4, "lora_alpha": 8, "target_modules": first, "init_lora_weights": False}
    kw_b = {"r": 2, "lora_alpha": 3, "target_modules": second, "init_lora_weights": False}
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw_a), "a")
    pm.add_adapter("b", peft.LoraConfig(**kw_b))
    lk = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw_a), "a")
    lk.add_adapter("b", lorakit.LoraConfig(**kw_b))
    _copy_adapters(pm, lk, ["a", "b"])
    pm.base_model.set_adapter(["a", "b"])
    lk.base_model.set_adapter(["a", "b"])  # PEFT's spelling; lk.set_adapter([...]) does the same
    assert lk.active_adapters == ["a", "b"] and lk.active_adapter == ["a", "b"]
    with torch.no_grad():
        want, got = main_output(pm(**inputs)), main_output(lk(**inputs))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        lk.set_adapter("a")
        only_a = main_output(lk(**inputs))
        assert (only_a - got).abs().max() > 1e-4  # the second adapter matters
        lk.set_adapter(["a", "b"])
        pm.merge_adapter()
        lk.merge_adapter()
        torch.testing.assert_close(main_output(lk(**inputs)), main_output(pm(**inputs)), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(main_output(lk(**inputs)), got, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "bert", "mlp"])
def test_lora_bias_matches_peft_and_merges_into_the_base_bias(arch):
    entry = ZOO[arch]
    base, inputs = entry.build(), entry.inputs()
    targets = {"gpt2": ["c_attn", "c_fc"], "bert": ["query", "dense"], "mlp": ["lin0", "conv"]}[arch]
    kw = {"r": 4, "lora_alpha": 8, "target_modules": targets, "lora_bias": True, "init_lora_weights": False}
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    lk = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name and name.endswith("bias"):
                p.normal_()
    theirs = peft.get_peft_model_state_dict(pm)
    assert sorted(lorakit.get_peft_model_state_dict(lk)) == sorted(theirs)
    assert any(k.endswith("lora_B.bias") for k in theirs)
    lorakit.set_peft_model_state_dict(lk, theirs)
    before = {k: v.clone() for k, v in lk.state_dict().items()}
    with torch.no_grad():
        want = main_output(pm(**inputs))
        torch.testing.assert_close(main_output(lk(**inputs)), want, atol=1e-5, rtol=1e-4)
        merged_p = pm.merge_and_unload()
        lk.merge_adapter()
        torch.testing.assert_close(main_output(lk(**inputs)), want, atol=1e-5, rtol=1e-4)
        lk.unmerge_adapter()
        assert all(torch.equal(v, lk.state_dict()[k]) for k, v in before.items())
        merged_l = lk.merge_and_unload()
    for (name, p), (name_l, q) in zip(merged_p.named_parameters(), merged_l.named_parameters(), strict=True):
        assert name == name_l
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=name)
