"""Initialisations (gaussian, PiSSA, fast PiSSA, OLoRA, orthogonal) applied to a model's layers:
parity with PEFT 0.21.2 (whole state dicts, residual base weights included, for a given seed), the
invariants (output unchanged at init, merge/unmerge exact relative to the residual) and the
refusals. (The math: functional/test_init.py; the config values: config/test_inits.py.)"""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn
from zoo import assert_same_state, bert_cls, gpt2, ids, llama, snapshot, toy

import lorakit

# (model builder, targets incl. an embedding where there is one); OLoRA on Conv1D is left out of
# PEFT parity: PEFT factors the (k × d) Conv1D weight without transposing it (see test below)
CASES = [
    ("llama", llama, ["q_proj", "v_proj", "down_proj", "embed_tokens"], "pissa"),
    ("llama", llama, ["q_proj", "v_proj", "down_proj", "embed_tokens"], "pissa_niter_3"),
    ("llama", llama, ["q_proj", "v_proj", "down_proj"], "olora"),
    ("llama", llama, ["q_proj", "v_proj", "down_proj"], "orthogonal"),
    ("llama", llama, ["q_proj", "v_proj"], "gaussian"),
    ("gpt2", gpt2, ["c_attn", "c_fc"], "pissa"),
    ("gpt2", gpt2, ["c_attn", "c_fc"], "pissa_niter_2"),
    ("gpt2", gpt2, ["c_attn", "c_fc"], "orthogonal"),
    ("bert", bert_cls, ["query", "value", "dense"], "pissa"),
    ("bert", bert_cls, ["query", "value", "dense"], "olora"),
]


def _both(build, targets, init, seed=0, **extra):
    base = build()
    kw = {"r": 4, "lora_alpha": 8, "target_modules": targets, "init_lora_weights": init, **extra}
    torch.manual_seed(seed)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    torch.manual_seed(seed)
    lk = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw))
    return base, pm, lk


@pytest.mark.parity
@pytest.mark.parametrize(("arch", "build", "targets", "init"), CASES, ids=[f"{c[0]}-{c[3]}" for c in CASES])
def test_state_dict_and_outputs_match_peft(arch, build, targets, init):
    base, pm, lk = _both(build, targets, init)
    theirs, ours = pm.state_dict(), lk.state_dict()
    assert sorted(theirs) == sorted(ours)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=1e-5, msg=key)
    x = ids()
    with torch.no_grad():
        out, want = lk(x).logits, base(x).logits
        torch.testing.assert_close(out, pm(x).logits, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-4)  # the adapter starts as the identity


@pytest.mark.parity
def test_dora_on_top_of_pissa_matches_peft():
    base, pm, lk = _both(llama, ["q_proj", "v_proj"], "pissa", use_dora=True)
    theirs, ours = peft.get_peft_model_state_dict(pm), lorakit.get_peft_model_state_dict(lk)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=1e-5, msg=key)


def test_olora_on_conv1d_uses_the_transposed_weight():
    """PEFT's OLoRA factors a Conv1D's stored (k × d) weight and breaks on non-square ones; lorakit
    factors W (d × k) as for nn.Linear, so the adapter starts as the identity."""
    base = gpt2()
    lk = lorakit.get_peft_model(
        copy.deepcopy(base),
        lorakit.LoraConfig(r=4, target_modules=["c_attn", "c_fc"], init_lora_weights="olora"),
    )
    x = ids()
    torch.testing.assert_close(lk(x).logits, base(x).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_unmerge_exact_relative_to_the_residual_and_unload_returns_it(init, dtype):
    base = llama().to(dtype)
    lk = lorakit.get_peft_model(
        base,
        lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init, use_dora=True),
    )
    with torch.no_grad():
        for p in lk.parameters():
            if p.requires_grad:
                p.add_(0.01)
    residual = snapshot(lk)
    x = ids()
    with torch.no_grad():
        out = lk(x).logits
        lk.merge_adapter()
        merged = lk(x).logits
        lk.unmerge_adapter()
    assert_same_state(residual, lk)
    tol = 1e-5 if dtype == torch.float32 else 0.1
    torch.testing.assert_close(merged.float(), out.float(), atol=tol, rtol=tol)
    q = lk.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    plain = lk.unload()
    assert torch.equal(plain.model.layers[0].self_attn.q_proj.weight, q)  # the residual, as PEFT


def test_weight_inits_on_a_convolution_are_refused_before_any_change():
    model = toy()
    before = snapshot(model)
    with pytest.raises(lorakit.TargetingError, match=r"conv2 .*'pissa'.* True, False or 'gaussian'"):
        lorakit.get_peft_model(
            model, lorakit.LoraConfig(target_modules=["lin", "conv2"], init_lora_weights="pissa")
        )
    assert_same_state(before, model)
    assert not any(isinstance(m, lorakit.layers.LoraLayer) for m in model.modules())


def test_embedding_keeps_its_default_init_like_peft():
    config = lorakit.LoraConfig(r=2, target_modules=["emb"], init_lora_weights="pissa")
    lk = lorakit.get_peft_model(toy(), config)
    emb = lk.get_base_model().emb
    assert isinstance(emb.base_layer, nn.Embedding) and not emb.lora_embedding_A["default"].any()
