"""Invariants of every adapter state change on whole models (tiny Llama, GPT-2, and a toy model with
one layer of each kind): merge, unmerge, disable, add, set, delete, trainability, safe_merge."""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zoo import MODELS, TOY_TARGETS, assert_same_state, bert_cls, ids, logits, snapshot, structure, toy

import lorakit
from lorakit import AdapterError, LoraConfig
from lorakit.layers import LoraLayer

BUILDS = {**MODELS, "toy": toy}
# GPT-2 ties wte to lm_head: merging into wte would change the head too (as in PEFT), see the xfail below.
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]
TARGETS = {"llama": LLAMA_ALL, "gpt2": ["c_attn", "c_proj", "c_fc"], "toy": TOY_TARGETS}
ATOL = 1e-5


def setup(model_name: str, seed: int = 0, **kwargs):
    """(peft_model, input, logits of the plain base model) with a non-zero adapter 'default'."""
    model = BUILDS[model_name](seed)
    x = ids(seq=4) if model_name == "toy" else ids()
    base_out = logits(model, x)
    config = LoraConfig(**{"target_modules": TARGETS[model_name], "init_lora_weights": False, **kwargs})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2's fan_in_fan_out notice
        peft_model = lorakit.get_peft_model(model, config)
    return peft_model, x, base_out


def add_second(peft_model, model_name: str, name: str = "other", **kwargs):
    torch.manual_seed(123)
    config = LoraConfig(
        **{
            "target_modules": TARGETS[model_name],
            "init_lora_weights": False,
            "r": 4,
            "lora_alpha": 3,
            **kwargs,
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.add_adapter(name, config)


def lora_free_state(peft_model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in peft_model.state_dict().items() if ".lora_" not in k}


MODEL_NAMES = ["llama", "gpt2", "toy"]


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_adapter_changes_output(model_name):
    peft_model, x, base_out = setup(model_name)
    assert not torch.allclose(logits(peft_model, x), base_out, atol=1e-3)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_unmerged_equals_merged_equals_merge_and_unload(model_name):
    peft_model, x, _ = setup(model_name)
    unmerged = logits(peft_model, x)
    peft_model.merge_adapter()
    assert lorakit.model.state.merged_adapters(peft_model) == ["default"]
    assert torch.allclose(logits(peft_model, x), unmerged, atol=ATOL)
    assert torch.allclose(logits(peft_model.merge_and_unload(), x), unmerged, atol=ATOL)


def test_merge_into_tied_embedding_is_refused_and_changes_nothing():
    # PEFT 0.21 merges into GPT-2's wte and so silently changes the tied lm_head as well.
    model = BUILDS["gpt2"]()
    peft_model = lorakit.get_peft_model(
        model, LoraConfig(target_modules=["wte", "c_attn"], init_lora_weights=False)
    )
    x = ids()
    unmerged = logits(peft_model, x)
    before = snapshot(peft_model)
    for merge in (peft_model.merge_adapter, peft_model.merge_and_unload):
        with pytest.raises(lorakit.AdapterError, match=r"wte: its weight is tied to .*lm_head"):
            merge()
        assert_same_state(before, peft_model)
    assert torch.equal(logits(peft_model, x), unmerged)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_merge_is_idempotent(model_name):
    peft_model, x, _ = setup(model_name)
    peft_model.merge_adapter()
    once = snapshot(peft_model)
    peft_model.merge_adapter()
    peft_model.merge_adapter(["default"])
    assert_same_state(once, peft_model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_unmerge_restores_every_weight_bit_for_bit(model_name, dtype):
    model = BUILDS[model_name]().to(dtype)
    original = snapshot(model)
    config = LoraConfig(target_modules=TARGETS[model_name], init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = lorakit.get_peft_model(model, config)
    add_second(peft_model, model_name)
    peft_model.set_adapter(["default", "other"])
    peft_model.merge_adapter()
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    assert all(not torch.equal(m.base_layer.weight, m._original_weight) for m in layers)  # merged
    peft_model.unmerge_adapter()
    assert lorakit.model.state.merged_adapters(peft_model) == []
    base = peft_model.unload()
    assert_same_state(original, base)
    assert all(v.dtype == original[k].dtype for k, v in base.state_dict().items())


@pytest.mark.parametrize("model_name", MODEL_NAMES)
@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapter_is_base_exactly_and_restores(model_name, merged):
    peft_model, x, base_out = setup(model_name)
    if merged:
        peft_model.merge_adapter()
    before_out, before_state = logits(peft_model, x), snapshot(peft_model)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, x), base_out)
    assert torch.equal(logits(peft_model, x), before_out)
    assert_same_state(before_state, peft_model)
    assert lorakit.model.state.merged_adapters(peft_model) == (["default"] if merged else [])
    with pytest.raises(RuntimeError, match="boom"), peft_model.disable_adapter():
        raise RuntimeError("boom")
    assert torch.equal(logits(peft_model, x), before_out)
    assert_same_state(before_state, peft_model)
    assert not any(m.disable_adapters for m in peft_model.modules() if isinstance(m, LoraLayer))


def test_disable_adapter_with_modules_to_save():
    peft_model, x, base_out = setup("llama", modules_to_save=["lm_head"])
    with torch.no_grad():
        peft_model.get_base_model().lm_head.modules_to_save["default"].weight.mul_(2)
    with peft_model.disable_adapter():
        assert torch.equal(logits(peft_model, x), base_out)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_second_adapter_does_not_change_first(model_name):
    peft_model, x, _ = setup(model_name)
    first = logits(peft_model, x)
    add_second(peft_model, model_name)
    assert peft_model.active_adapter == "default"
    assert torch.equal(logits(peft_model, x), first)
    peft_model.set_adapter("other")
    second = logits(peft_model, x)
    assert not torch.allclose(second, first, atol=1e-3)
    peft_model.set_adapter("default")
    assert torch.equal(logits(peft_model, x), first)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_set_adapter_trains_the_activated_adapter_unless_inference_mode(model_name):
    """PEFT's rule: the activated adapter becomes trainable and the others frozen; with
    inference_mode=True every adapter is frozen. Base parameters are never touched."""
    peft_model, x, _ = setup(model_name)
    add_second(peft_model, model_name)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("default" in n.split(".") for n in trainable)
    peft_model.set_adapter("other")
    now = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert now and all("other" in n.split(".") for n in now)
    assert len(now) == len(trainable)
    peft_model.set_adapter("default", inference_mode=True)
    assert not any(p.requires_grad for p in peft_model.parameters())
    assert peft_model.active_adapters == ["default"]


TRAINABLE_CASES = {
    "llama": {"target_modules": ["q_proj", "v_proj", "embed_tokens"], "modules_to_save": ["lm_head"]},
    "gpt2": {"target_modules": ["c_attn", "wte"], "fan_in_fan_out": True},
}


def _trainable_names(model_name: str, bias: str) -> tuple[set[str], set[str]]:
    """The names of the trainable parameters in lorakit's and in PEFT's model for the same config."""
    kwargs = {**TRAINABLE_CASES[model_name], "bias": bias}
    peft_model, _, _ = setup(model_name, **kwargs)
    reference = peft.get_peft_model(BUILDS[model_name](), peft.LoraConfig(**kwargs))
    ours = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    theirs = {n for n, p in reference.named_parameters() if p.requires_grad}
    return ours, theirs


@pytest.mark.parity
@pytest.mark.parametrize("model_name", ["llama", "gpt2"])
def test_trainable_parameters_match_peft_and_hold_no_bias_with_bias_none(model_name):
    ours, theirs = _trainable_names(model_name, "none")
    assert ours == theirs
    assert not any(n.endswith("bias") for n in ours)


@pytest.mark.parity
@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trainable_parameters_of_a_bias_free_llama_match_peft(bias):
    ours, theirs = _trainable_names("llama", bias)
    assert ours == theirs


@pytest.mark.parity
@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trainable_parameters_of_gpt2_match_peft_and_hold_its_base_biases(bias):
    ours, theirs = _trainable_names("gpt2", bias)
    assert ours == theirs
    assert any(n.endswith("base_layer.bias") for n in ours)


def test_requires_grad_is_only_active_adapter_and_saved_copies():
    peft_model, _, _ = setup("llama", modules_to_save=["lm_head"])
    add_second(peft_model, "llama", modules_to_save=["lm_head"])
    for active in ("default", "other", "default"):
        peft_model.set_adapter(active)
        for name, param in peft_model.named_parameters():
            expected = active in name.split(".") and (".lora_" in name or ".modules_to_save." in name)
            assert param.requires_grad == expected, name


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_delete_adapter_leaves_no_trace(model_name):
    peft_model, x, _ = setup(model_name)
    keys, params = set(peft_model.state_dict()), {n for n, _ in peft_model.named_parameters()}
    buffers = {n for n, _ in peft_model.named_buffers()}
    first = logits(peft_model, x)
    add_second(peft_model, model_name, lora_dropout=0.1)
    peft_model.delete_adapter("other")
    assert set(peft_model.state_dict()) == keys
    assert {n for n, _ in peft_model.named_parameters()} == params
    assert {n for n, _ in peft_model.named_buffers()} == buffers
    assert not any("other" in n for n, _ in peft_model.named_modules())
    assert "other" not in peft_model.peft_config
    assert torch.equal(logits(peft_model, x), first)


def test_delete_active_adapter_activates_first_remaining_by_name():
    """As PEFT: the first remaining adapter in sorted order, not in creation order."""
    peft_model, _, _ = setup("llama")
    add_second(peft_model, "llama", name="zeta")
    add_second(peft_model, "llama", name="beta")
    peft_model.set_adapter("default")
    with pytest.warns(UserWarning, match="Setting active adapter to beta"):
        peft_model.delete_adapter("default")
    assert peft_model.active_adapter == "beta"
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == {
        n for n, _ in peft_model.named_parameters() if "beta" in n.split(".")
    }


def test_delete_one_of_several_active_adapters_keeps_the_others_active():
    peft_model, _, _ = setup("llama")
    add_second(peft_model, "llama")
    peft_model.set_adapter(["default", "other"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no new adapter is chosen, so nothing to warn about
        peft_model.delete_adapter("default")
    assert peft_model.active_adapters == ["other"]


def test_delete_last_adapter_leaves_the_base_model_computing():
    """As PEFT: the LoRA layers stay (without adapters) and the model computes as its base."""
    peft_model, x, base_out = setup("llama")
    peft_model.delete_adapter("default")
    assert peft_model.peft_config == {}
    assert peft_model.active_adapters == []
    assert any(isinstance(m, LoraLayer) for m in peft_model.modules())
    assert not any(".lora_" in n for n, _ in peft_model.named_parameters())
    assert torch.equal(logits(peft_model, x), base_out)
    assert torch.equal(logits(peft_model.unload(), x), base_out)


@pytest.mark.parametrize("call", ["set_adapter", "delete_adapter", "merge_adapter"])
def test_unknown_adapter_name_changes_nothing(call):
    peft_model, x, _ = setup("llama")
    add_second(peft_model, "llama")
    state, shape = snapshot(peft_model), structure(peft_model)
    grads = [p.requires_grad for p in peft_model.parameters()]
    active = peft_model.active_adapters
    arg = ["nope"] if call == "merge_adapter" else "nope"
    with pytest.raises(AdapterError) as info:
        getattr(peft_model, call)(arg)
    assert "nope" in str(info.value)
    assert "['default', 'other']" in str(info.value)
    assert_same_state(state, peft_model)
    assert structure(peft_model) == shape
    assert [p.requires_grad for p in peft_model.parameters()] == grads
    assert peft_model.active_adapters == active


def _poison(peft_model, layer_name_part: str, value: float) -> None:
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and name.endswith(layer_name_part):
            with torch.no_grad():
                if "default" in module.lora_B:
                    module.lora_B["default"].weight.fill_(value)
                else:
                    module.lora_embedding_B["default"].fill_(value)
            return
    raise AssertionError(layer_name_part)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_safe_merge_refuses_non_finite_and_changes_nothing(model_name, value):
    peft_model, x, _ = setup(model_name)
    _poison(
        peft_model,
        {"llama": "layers.1.mlp.down_proj", "gpt2": "h.1.attn.c_attn", "toy": "conv2"}[model_name],
        value,
    )
    state = snapshot(peft_model)
    with pytest.raises(AdapterError, match="non-finite"):
        peft_model.merge_adapter(safe_merge=True)
    assert_same_state(state, peft_model)
    assert lorakit.model.state.merged_adapters(peft_model) == []
    shape = structure(peft_model)
    with pytest.raises(AdapterError, match="non-finite"):
        peft_model.merge_and_unload(safe_merge=True)
    assert structure(peft_model) == shape
    assert_same_state(state, peft_model)


def test_safe_merge_finite_merges():
    peft_model, x, _ = setup("llama")
    unmerged = logits(peft_model, x)
    peft_model.merge_adapter(safe_merge=True)
    assert torch.allclose(logits(peft_model, x), unmerged, atol=ATOL)


def test_merge_named_inactive_adapter():
    peft_model, x, _ = setup("toy")
    add_second(peft_model, "toy")
    peft_model.set_adapter(["default", "other"])
    both = logits(peft_model, x)
    peft_model.set_adapter("default")
    peft_model.merge_adapter(["other"])
    assert torch.allclose(logits(peft_model, x), both, atol=ATOL)
    peft_model.unmerge_adapter()
    peft_model.set_adapter("other")
    alone = logits(peft_model, x)
    peft_model.set_adapter("default")
    peft_model.merge_adapter(["other"])
    assert torch.allclose(logits(peft_model, x), both, atol=ATOL)
    assert not torch.allclose(alone, both, atol=1e-3)


def test_lora_free_state_unchanged_by_set_and_add():
    peft_model, _, _ = setup("gpt2")
    before = lora_free_state(peft_model)
    add_second(peft_model, "gpt2")
    peft_model.set_adapter("other")
    after = lora_free_state(peft_model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_active_adapters_on_disjoint_modules():
    model = lorakit.get_peft_model(
        BUILDS["llama"](), LoraConfig(target_modules=["q_proj"], init_lora_weights=False)
    )
    model.add_adapter(
        "other", LoraConfig(target_modules=["v_proj"], init_lora_weights=False, modules_to_save=["lm_head"])
    )
    x = ids()
    only_default = logits(model, x)
    for names in (["default", "other"], ["other", "default"], ["other"]):
        model.set_adapter(names)
        assert model.active_adapters == names
    model.set_adapter(["default", "other"])
    both = logits(model, x)
    model.set_adapter("other")
    assert not torch.allclose(logits(model, x), both, atol=1e-4)
    model.set_adapter(["default", "other"])
    model.delete_adapter("other")
    assert model.active_adapter == "default"
    assert torch.equal(logits(model, x), only_default)
    assert not torch.equal(both, only_default)


@pytest.mark.parametrize("call", ["merge_adapter", "merge_and_unload"])
def test_lora_bias_without_base_bias_refuses_to_merge_and_changes_nothing(call):
    """Llama's projections have no bias: merging a lora_bias adapter would silently drop its bias."""
    peft_model, x, _ = setup("llama", target_modules=["q_proj"], lora_bias=True)
    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            torch.nn.init.normal_(module.lora_B["default"].bias)
    state, shape, before = snapshot(peft_model), structure(peft_model), logits(peft_model, x)
    with pytest.raises(AdapterError) as info:
        getattr(peft_model, call)()
    assert "model.layers.0.self_attn.q_proj" in str(info.value) and "no bias" in str(info.value)
    assert_same_state(state, peft_model)
    assert structure(peft_model) == shape
    assert lorakit.model.state.merged_adapters(peft_model) == []
    assert torch.equal(logits(peft_model, x), before)


def test_nested_disable_adapter():
    peft_model, x, base_out = setup("toy")
    peft_model.merge_adapter()
    adapted = logits(peft_model, x)
    with peft_model.disable_adapter():
        with peft_model.disable_adapter():
            assert torch.equal(logits(peft_model, x), base_out)
        assert torch.equal(logits(peft_model, x), base_out)
    assert torch.equal(logits(peft_model, x), adapted)
    assert lorakit.model.state.merged_adapters(peft_model) == ["default"]


# -- random sequences of state changes ------------------------------------------------------------
OPS = st.lists(
    st.sampled_from(
        ["merge", "merge_a", "merge_b", "unmerge", "set_a", "set_b", "set_ab", "disable", "mixed"]
    ),
    min_size=1,
    max_size=8,
)


# variants of the two adapters: plain LoRA, DoRA + LoRA, DoRA + DoRA (state changes must not care)
DORA = {"use_dora": True}
VARIANTS = {"lora": ({}, {}), "dora": (DORA, {}), "dora+dora": (DORA, DORA)}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def toy_two_adapters(request):
    first, second = VARIANTS[request.param]
    peft_model, x, base_out = setup("toy", **first)
    add_second(peft_model, "toy", name="b", **second)
    reference = {frozenset(): base_out}
    for names in (["default"], ["b"], ["default", "b"]):
        peft_model.set_adapter(names)
        reference[frozenset(names)] = logits(peft_model, x)
    original = snapshot(peft_model)
    return peft_model, x, reference, original


def _apply_state_op(peft_model, op: str) -> bool:
    """Run one merge / unmerge / set_adapter step of the generated sequences on adapters
    "default" and "b"; False for the ops each test handles itself."""
    if op == "merge":
        peft_model.merge_adapter()
    elif op in ("merge_a", "merge_b"):
        peft_model.merge_adapter(["default" if op == "merge_a" else "b"])
    elif op == "unmerge":
        peft_model.unmerge_adapter()
    elif op.startswith("set_"):
        peft_model.set_adapter({"set_a": "default", "set_b": "b", "set_ab": ["default", "b"]}[op])
    else:
        return False
    return True


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_any_sequence_of_state_changes(toy_two_adapters, ops):
    """After any sequence, the output is base + every merged or active adapter; unmerge is exact."""
    peft_model, x, reference, original = toy_two_adapters
    peft_model.unmerge_adapter()
    peft_model.set_adapter("default")
    for op in ops:
        if _apply_state_op(peft_model, op):
            pass
        elif op == "disable":
            with peft_model.disable_adapter():
                assert torch.equal(logits(peft_model, x), reference[frozenset()])
        elif op == "mixed" and not lorakit.model.state.merged_adapters(peft_model):
            out = logits(peft_model, x, adapter_names=["b", "__base__", "default"])
            for row, key in enumerate([["b"], [], ["default"]]):
                assert torch.allclose(out[row], reference[frozenset(key)][row], atol=ATOL)
        merged = lorakit.model.state.merged_adapters(peft_model)
        in_effect = frozenset(peft_model.active_adapters) | frozenset(merged)
        assert torch.allclose(logits(peft_model, x), reference[in_effect], atol=ATOL), (op, in_effect)
    peft_model.unmerge_adapter()
    assert_same_state(original, peft_model)


def test_delete_merged_adapter_refused_and_changes_nothing():
    peft_model, _, _ = setup("llama")
    add_second(peft_model, "llama")
    peft_model.merge_adapter(["other"])
    state, shape = snapshot(peft_model), structure(peft_model)
    with pytest.raises(AdapterError, match="unmerge"):
        peft_model.delete_adapter("other")
    assert_same_state(state, peft_model)
    assert structure(peft_model) == shape
    assert set(peft_model.peft_config) == {"default", "other"}


def test_two_adapters_with_modules_to_save_cannot_both_be_active():
    peft_model, x, _ = setup("llama", modules_to_save=["lm_head"])
    add_second(peft_model, "llama", modules_to_save=["lm_head"])
    before = logits(peft_model, x)
    with pytest.raises(AdapterError, match="only one"):
        peft_model.set_adapter(["default", "other"])
    assert peft_model.active_adapters == ["default"]
    assert torch.equal(logits(peft_model, x), before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_base_keeps_float32_adapters(dtype):
    model = BUILDS["llama"]().to(dtype)
    peft_model = lorakit.get_peft_model(model, LoraConfig(target_modules=LLAMA_ALL, init_lora_weights=False))
    lora = [p for n, p in peft_model.named_parameters() if ".lora_" in n]
    assert lora and all(p.dtype == torch.float32 for p in lora)
    assert all(p.dtype == dtype for n, p in peft_model.named_parameters() if ".lora_" not in n)
    out = logits(peft_model, ids())
    assert out.dtype == dtype and torch.isfinite(out).all()
    peft_model.add_adapter("other", LoraConfig(target_modules=["q_proj"]))
    assert all(p.dtype == torch.float32 for n, p in peft_model.named_parameters() if ".lora_" in n)


@settings(max_examples=10, deadline=None)
@given(
    ops=st.lists(
        st.sampled_from(["merge", "merge_a", "merge_b", "unmerge", "set_b", "set_ab", "disable"]),
        min_size=1,
        max_size=6,
    ),
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
)
def test_any_sequence_then_unmerge_is_bit_exact_in_low_precision(ops, dtype):
    model = toy().to(dtype)
    original = snapshot(model)
    config = LoraConfig(target_modules=TOY_TARGETS, init_lora_weights=False)
    peft_model = lorakit.get_peft_model(model, config)
    add_second(peft_model, "toy", name="b")
    for op in ops:
        if not _apply_state_op(peft_model, op):  # "disable": entered and left, changing nothing
            with peft_model.disable_adapter():
                pass
    assert_same_state(original, peft_model.unload())


@pytest.mark.parity
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_trainable_parameters_with_biased_modules_to_save_match_peft(bias):
    kwargs = {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], "bias": bias}
    ours = lorakit.get_peft_model(bert_cls(), LoraConfig(**kwargs))
    theirs = peft.get_peft_model(bert_cls(), peft.LoraConfig(**kwargs))
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_set_adapter_on_a_merged_model_unmerges_first_with_a_warning():
    """As PEFT (issue 14): merged weights must not stay in effect beside the newly active adapter."""
    peft_model, x, _ = setup("llama")
    add_second(peft_model, "llama")
    peft_model.set_adapter("other")
    other_alone = logits(peft_model, x)
    peft_model.set_adapter("default")
    peft_model.merge_adapter()
    with pytest.warns(UserWarning, match="Unmerging the model first"):
        peft_model.set_adapter("other")
    assert not any(m.merged for m in peft_model.modules() if isinstance(m, LoraLayer))
    assert torch.equal(logits(peft_model, x), other_alone)


def test_adding_an_adapter_to_a_merged_model_unmerges_it_with_a_warning():
    peft_model, x, _ = setup("toy")
    merged = logits(peft_model, x)
    peft_model.merge_adapter()
    with pytest.warns(UserWarning, match="Unmerging the model first"):
        peft_model.add_adapter("other", LoraConfig(target_modules=["lin"]))
    assert not any(m.merged for m in peft_model.modules() if isinstance(m, LoraLayer))
    assert torch.allclose(logits(peft_model, x), merged, atol=ATOL)
    peft_model.delete_adapter("default")  # unmerged, so it can go (as in PEFT)
