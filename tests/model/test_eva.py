"""EVA on whole models: the components and redistributed ranks equal PEFT 0.21.2's on the same data,
the initialised model and its files are PEFT's (loadable both ways), and the documented differences
(state dicts of the plain model, whitening of shared inputs, rank 0) hold exactly."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from zoo import gpt2, llama, perturb_trainable

import lorakit
from lorakit.config.init_configs import EvaConfig
from lorakit.model.eva import get_eva_state_dict, initialize_lora_eva_weights

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "embed_tokens"]
# Components are unit vectors; the two libraries centre the batches in a different order (float32
# vs float64 subtraction, ≈ 1e-7 relative), which the SVDs pass on scaled by 1/(gap of the singular
# values) — far below this bound on these data.
ATOL = 1e-5


def _batches(n: int = 12, batch: int = 6, seq: int = 12, vocab: int = 64) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[0, -3:] = 0  # padding the SVD must skip
        labels = ids.clone()
        labels[:, :2] = -100  # a prompt the label mask skips
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _pair(base, eva, targets=TARGETS, r=4):
    kw = dict(r=r, lora_alpha=8, target_modules=targets, init_lora_weights="eva")
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw, eva_config=peft.EvaConfig(**eva)))
    lk = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw, eva_config=EvaConfig(**eva)))
    return pm, lk


def _assert_same_components(theirs, ours):
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].shape == value.shape, key  # the redistributed rank
        torch.testing.assert_close(ours[key], value.float(), atol=ATOL, rtol=0, msg=key)


@pytest.mark.parity
@pytest.mark.slow
def test_components_ranks_config_and_files_equal_peft_and_load_both_ways(tmp_path):
    """Redistributed ranks with the default label and padding masks: the state dict, the initialised
    adapter, rank_pattern and alpha_pattern are PEFT's; each library's file loads in the other."""
    base = llama()
    pm, lk = _pair(base, dict(tau=0.9))
    data = _batches()
    their_eva = peft.get_eva_state_dict(pm, data, show_progress_bar=False)
    our_eva = get_eva_state_dict(lk, data, show_progress_bar=False)
    _assert_same_components(their_eva, our_eva)
    assert len({v.shape[0] for v in our_eva.values()}) > 1  # ranks did move
    peft.initialize_lora_eva_weights(pm, eva_state_dict=their_eva)
    with pytest.warns(UserWarning, match="embed_tokens"):
        assert initialize_lora_eva_weights(lk, eva_state_dict=our_eva) is lk
    theirs, ours = pm.peft_config["default"], lk.peft_config["default"]
    assert (ours.rank_pattern, ours.alpha_pattern) == (theirs.rank_pattern, theirs.alpha_pattern)
    their_sd, our_sd = peft.get_peft_model_state_dict(pm), lorakit.get_peft_model_state_dict(lk)
    factors = [k for k in their_sd if ".lora_A." in k or ".lora_B." in k]  # embed_tokens: drawn again by PEFT
    assert {k: our_sd[k].shape for k in factors} == {k: their_sd[k].shape for k in factors}
    for key in factors:
        torch.testing.assert_close(our_sd[key], their_sd[key], atol=ATOL, rtol=0, msg=key)
    x = data[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(lk(input_ids=x).logits, base(input_ids=x).logits)  # B = 0

    perturb_trainable(lk)
    lk.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["rank_pattern"] == theirs.rank_pattern
    assert saved["eva_config"]["tau"] == 0.9
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, lk(input_ids=x).logits, atol=1e-6, rtol=1e-5)

    perturb_trainable(pm)
    pm.save_pretrained(tmp_path / "theirs")
    back = lorakit.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "theirs")
    assert back.peft_config["default"].rank_pattern == theirs.rank_pattern
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=x).logits, pm(input_ids=x).logits, atol=1e-6, rtol=1e-5)


@pytest.mark.parity
@pytest.mark.slow
def test_whitening_divides_once_where_peft_divides_once_per_sharing_layer():
    """Without redistribution or label mask, with whitening: o_proj (an input of its own) equals
    PEFT's. PEFT whitens in place through views of one SVD, so q/k/v (one shared input) end up
    divided by √S three times: theirs = ours / S = ours · ‖ours_row‖² (a whitened row has norm 1/√S)."""
    eva = dict(tau=0.95, rho=1.0, use_label_mask=False, whiten=True)
    pm, lk = _pair(llama(), eva, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    data = _batches()
    theirs = peft.get_eva_state_dict(pm, data, show_progress_bar=False)
    ours = get_eva_state_dict(lk, data, show_progress_bar=False)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    for key, value in theirs.items():
        if key.endswith("o_proj"):
            torch.testing.assert_close(ours[key], value.float(), atol=ATOL, rtol=0)
        else:
            norms = ours[key].norm(dim=1, keepdim=True) ** 2
            torch.testing.assert_close(ours[key] * norms, value.float(), atol=ATOL, rtol=1e-5)


@pytest.mark.slow
def test_a_state_dict_of_the_plain_model_loads_and_rank_zero_drops_the_adapter(tmp_path):
    """Keys without the wrapper's prefix load (PEFT ignores them); a layer given rank 0 gets its base
    layer back, and the saved config targets the remaining layers in both libraries."""
    base = gpt2()
    config = lorakit.LoraConfig(r=2, target_modules=["c_attn", "c_fc"], init_lora_weights="eva")
    plain = get_eva_state_dict(base, _batches(n=4), peft_config=config, show_progress_bar=False)
    assert sorted(plain) == [f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")]
    plain["transformer.h.1.mlp.c_fc"] = plain["transformer.h.1.mlp.c_fc"][:0]  # rank 0
    model = lorakit.get_peft_model(copy.deepcopy(base), config)
    initialize_lora_eva_weights(model, eva_state_dict=plain)
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    torch.testing.assert_close(layer.lora_A["default"].weight, plain["transformer.h.0.attn.c_attn"])
    assert type(model.base_model.model.transformer.h[1].mlp.c_fc).__name__ == "Conv1D"
    saved = model.peft_config["default"]
    assert "transformer.h.1.mlp.c_fc" not in saved.target_modules and len(saved.target_modules) == 3
    perturb_trainable(model)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    x = _batches(n=1)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(input_ids=x).logits, model(input_ids=x).logits, atol=1e-6, rtol=1e-5
        )


def test_get_peft_model_leaves_a_valid_placeholder():
    """Before EVA runs, A is nn.Linear's init and B = 0 (PEFT's): the model computes the base."""
    base = llama()
    with pytest.warns(UserWarning, match="`eva_config` is not specified"):
        config = lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="eva")
    model = lorakit.get_peft_model(copy.deepcopy(base), config)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.abs().sum() > 0
    assert not layer.lora_B["default"].weight.any()
    x = _batches(n=1)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, base(input_ids=x).logits)


def _eva_model():
    config = lorakit.LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], init_lora_weights="eva")
    return lorakit.get_peft_model(llama(), config)


@pytest.mark.parametrize(
    ("call", "error", "shown"),
    [
        (
            lambda m: initialize_lora_eva_weights(m),
            lorakit.ConfigError,
            "needs a dataloader or an eva_state_dict",
        ),
        (
            lambda m: initialize_lora_eva_weights(
                m, eva_state_dict={"model.layers.9.q_proj": torch.zeros(2, 16)}
            ),
            lorakit.AdapterError,
            "'model.layers.9.q_proj' names no layer",
        ),
        (
            lambda m: initialize_lora_eva_weights(
                m, eva_state_dict={"model.layers.0.self_attn.q_proj": torch.zeros(2, 15)}
            ),
            lorakit.AdapterError,
            "expected a (rank, 16) tensor, got (2, 15)",
        ),
        (
            lambda m: initialize_lora_eva_weights(
                m, eva_state_dict={"model.embed_tokens": torch.zeros(2, 16)}
            ),
            lorakit.AdapterError,
            "wraps Embedding",
        ),
        (
            lambda m: initialize_lora_eva_weights(m, [torch.zeros(2, 3, dtype=torch.long)]),
            lorakit.ConfigError,
            "prepare_model_inputs_fn=None",
        ),
        (lambda m: initialize_lora_eva_weights(m, []), lorakit.AdapterError, "yields no batch"),
        (
            # (the user's model inside also holds peft_config, as in PEFT, so it is accepted too)
            lambda m: initialize_lora_eva_weights(m, [], adapter_name="other"),
            lorakit.AdapterError,
            "holding adapter 'other'",
        ),
    ],
    ids=["nothing", "unknown-key", "width", "embedding", "tensor-batches", "empty", "no-config"],
)
@pytest.mark.filterwarnings("ignore:`init_lora_weights` is 'eva' but")
def test_refusals_name_the_problem_and_change_nothing(call, error, shown):
    model = _eva_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error) as info:
        call(model)
    assert shown in str(info.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_an_adapter_without_eva_is_refused():
    model = lorakit.get_peft_model(llama(), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(lorakit.ConfigError, match="init_lora_weights='eva'"):
        initialize_lora_eva_weights(model, _batches(n=1))


@pytest.mark.filterwarnings("ignore:`init_lora_weights` is 'eva' but")
def test_tensor_batches_with_a_custom_forward():
    """Batches of any kind work with forward_fn and prepare_*_fn=None (every position is a row)."""
    model = lorakit.get_peft_model(
        llama(),
        lorakit.LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights="eva", eva_config={"tau": 0.5}),
    )
    data = [b["input_ids"] for b in _batches(n=4)]
    out = get_eva_state_dict(
        model,
        data,
        forward_fn=lambda m, x: m(input_ids=x),
        prepare_model_inputs_fn=None,
        prepare_layer_inputs_fn=None,
        show_progress_bar=False,
    )
    assert sum(v.shape[0] for v in out.values()) == 4  # the budget: 2 layers × r = 2
