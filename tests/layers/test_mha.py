"""The ``nn.MultiheadAttention`` LoRA layer (lorakit.layers.mha): outputs and gradients against
torch's attention written out with ``W + s·B A``, exact unmerge, disable, delete, pickling, what it
refuses (before anything changes), targeting (``out_proj`` alone, ``all-linear``), and the
transformer layers that read the attention's weights themselves."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import assert_unchanged, attention, perturb_trainable, snapshot_all

import lorakit
from lorakit.errors import AdapterError, MixedBatchError, TargetingError
from lorakit.layers import Linear, MultiheadAttention

EPS32 = torch.finfo(torch.float32).eps
X = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(1))  # (T, B, E)


def _model(**config):
    config = {"target_modules": ["mha"], "init_lora_weights": False, **config}
    return lorakit.get_peft_model(attention(), lorakit.LoraConfig(**config))


def _reference(mha: nn.MultiheadAttention, x: torch.Tensor, adapters: list[tuple]) -> torch.Tensor:
    """torch's attention called with ``W_in + Σ s·B A`` and ``W_out + Σ s'·B' A'`` written out;
    ``adapters``: (s, A, B, s', A', B') per adapter."""
    w_in = mha.in_proj_weight + sum((b @ a) * s for s, a, b, *_ in adapters)
    w_out = mha.out_proj.weight + sum((b @ a) * s for *_, s, a, b in adapters)
    out, _ = F.multi_head_attention_forward(
        x, x, x, 8, 2, w_in, mha.in_proj_bias, None, None, False, 0.0, w_out, mha.out_proj.bias,
        training=False,
    )  # fmt: skip
    return out


def _factors(layer: MultiheadAttention, name: str = "default") -> tuple:
    out = layer.base_layer.out_proj
    return (layer.scaling[name], *layer.factors(name), out.scaling[name], *out.factors(name))


def test_structure_and_keys_are_peft_s():
    model = _model()
    layer = model.base_model.model.mha
    assert isinstance(layer, MultiheadAttention) and isinstance(layer.base_layer.out_proj, Linear)
    assert layer.lora_A["default"].weight.shape == (8, 8) and layer.lora_B["default"].weight.shape == (24, 8)
    assert sorted(lorakit.get_peft_model_state_dict(model)) == [
        "base_model.model.mha.base_layer.out_proj.lora_A.weight",
        "base_model.model.mha.base_layer.out_proj.lora_B.weight",
        "base_model.model.mha.lora_A.weight",
        "base_model.model.mha.lora_B.weight",
    ]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "base_model.model.mha.base_layer.out_proj.lora_A.default.weight",
        "base_model.model.mha.base_layer.out_proj.lora_B.default.weight",
        "base_model.model.mha.lora_A.default.weight",
        "base_model.model.mha.lora_B.default.weight",
    ]


def test_output_is_attention_with_adapted_weights():
    model = _model()
    layer = model.base_model.model.mha
    with torch.no_grad():
        ours, _ = layer(X, X, X)
        reference = _reference(attention().mha, X, [_factors(layer)])
        base, _ = attention().mha(X, X, X)
    assert (ours - base).abs().max() > 0.05  # both updates matter
    torch.testing.assert_close(ours, reference, rtol=0, atol=0)  # the same operations


def test_gradients_are_those_of_the_written_out_attention():
    model = _model(lora_bias=True)
    layer = model.base_model.model.mha
    params = layer.adapter_parameters("default") + layer.base_layer.out_proj.adapter_parameters("default")
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.3)
    target = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(2))
    ours = torch.autograd.grad((layer(X, X, X)[0] * target).sum(), params)
    a, b, a2, b2 = (p.detach().clone().requires_grad_(True) for p in params if p.dim() == 2)
    bias, bias2 = (p.detach().clone().requires_grad_(True) for p in params if p.dim() == 1)
    mha = attention().mha
    s = layer.scaling["default"]
    out, _ = F.multi_head_attention_forward(
        X, X, X, 8, 2, mha.in_proj_weight + (b @ a) * s, mha.in_proj_bias + bias * s, None, None, False, 0.0,
        mha.out_proj.weight + (b2 @ a2) * s, mha.out_proj.bias + bias2 * s, training=False,
    )  # fmt: skip
    expected = torch.autograd.grad((out * target).sum(), [a, b, bias, a2, b2, bias2])
    for g, e in zip(ours, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_two_adapters_sum():
    model = _model()
    model.add_adapter("b", lorakit.LoraConfig(target_modules=["mha"], r=4, init_lora_weights=False))
    layer = model.base_model.model.mha
    layer.set_active(["default", "b"])
    with torch.no_grad():
        ours, _ = layer(X, X, X)
        reference = _reference(attention().mha, X, [_factors(layer), _factors(layer, "b")])
    # ΔW summed before adding W (lorakit) or W + ΔW₁ + ΔW₂ (reference): one rounding apart per weight
    # element, each moving an output by at most E·|x|·ulp; 3 projections in a row
    bound = 3 * 8 * EPS32 * X.abs().max() * ours.abs().max()
    assert (ours - reference).abs().max() <= bound


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_merge_equals_unmerged_and_unmerge_restores_bit_for_bit(dtype):
    model = _model(lora_bias=True).to(dtype)
    layer = model.base_model.model.mha
    with torch.no_grad():
        layer.lora_B["default"].bias.normal_()
        layer.base_layer.out_proj.lora_B["default"].bias.normal_()
    x = X.to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged = model(x)
    model.merge_adapter()
    assert layer.merged and layer.base_layer.out_proj.merged
    assert not torch.equal(
        layer.base_layer.in_proj_weight, before["base_model.model.mha.base_layer.in_proj_weight"]
    )
    # forward adds W + ΔW rounded once into the weights' dtype, as merging writes them: the same tensors
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=0)
    model.merge_adapter()  # twice is once
    model.unmerge_adapter()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_merge_and_unload_and_unload():
    model = _model()
    expected = model(X)
    merged = model.merge_and_unload()
    assert type(merged.mha) is nn.MultiheadAttention and type(merged.mha.out_proj).__name__.endswith("Linear")
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(merged(X), expected, rtol=1e-6, atol=1e-6)
    base = attention()
    original_out_proj = base.mha.out_proj
    plain = lorakit.get_peft_model(base, lorakit.LoraConfig(target_modules=["mha"])).unload()
    assert plain.mha.out_proj is original_out_proj
    assert all(torch.equal(v, attention().state_dict()[k]) for k, v in plain.state_dict().items())


def test_disable_delete_and_forward_keep_state():
    model = _model()
    base = attention()
    with model.disable_adapter():
        assert torch.equal(model(X), base(X))
    keys = set(model.state_dict())
    model.add_adapter("b", lorakit.LoraConfig(target_modules=["mha"], init_lora_weights=False))
    model.set_adapter("b")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(X)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.set_adapter("default")
    model.delete_adapter("b")
    assert set(model.state_dict()) == keys
    assert "b" not in model.base_model.model.mha.base_layer.out_proj.r


def test_pickle_and_deepcopy():
    model = _model()
    layer = model.base_model.model.mha
    expected = layer(X, X, X)[0]
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert torch.equal(clone(X, X, X)[0], expected)
        assert clone.base_layer.out_proj is not layer.base_layer.out_proj


def test_mixed_batches_are_refused():
    model = _model()
    before = snapshot_all(model)
    with pytest.raises(
        MixedBatchError, match="lora.MultiheadAttention does not support mixed adapter batches"
    ):
        model(X, adapter_names=["default"] * 4)
    assert issubclass(MixedBatchError, TypeError)  # what PEFT raises
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    ("kwargs", "config", "message"),
    [
        ({"kdim": 4, "vdim": 4}, {}, "kdim/vdim different from embed_dim"),
        ({}, {"use_dora": True}, "DoRA is not supported on nn.MultiheadAttention"),
        ({}, {"init_lora_weights": "pissa"}, "init_lora_weights='pissa' is not supported"),
    ],
)
def test_refused_before_anything_changes(kwargs, config, message):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("mha", nn.MultiheadAttention(8, 2, **kwargs))
    before = snapshot_all(model)
    with pytest.raises(TargetingError, match=message):
        lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules=["mha"], **config))
    assert_unchanged(model, before)


def test_out_proj_alone_is_refused_and_all_linear_skips_it():
    model = attention()
    before = snapshot_all(model)
    with pytest.raises(TargetingError, match=r"mha\.out_proj \(MultiheadAttention 'mha' reads its weights"):
        lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules=["out_proj", "lin0"]))
    assert_unchanged(model, before)
    wrapped = lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules="all-linear"))
    assert wrapped.peft_config["default"].target_modules == ["lin0"]  # MHA is not linear (as PEFT)
    assert [row["name"] for row in lorakit.inspect(attention()).modules] == ["mha", "lin0"]


def test_exposes_the_attention_s_attributes():
    base = attention(batch_first=True)
    layer = lorakit.get_peft_model(base, lorakit.LoraConfig(target_modules=["mha"])).base_model.model.mha
    mha = layer.base_layer
    assert (layer.embed_dim, layer.kdim, layer.vdim, layer.num_heads, layer.head_dim) == (8, 8, 8, 2, 4)
    assert (
        layer.batch_first and layer._qkv_same_embed_dim and not layer.add_zero_attn and layer.dropout == 0.0
    )
    assert layer.in_proj_weight is mha.in_proj_weight and layer.in_proj_bias is mha.in_proj_bias
    assert layer.out_proj is mha.out_proj.base_layer and layer.bias_k is None and layer.bias_v is None
    assert layer.merge_masks(None, None, X) == (None, None)


def test_lora_dropout_warns_that_it_does_not_apply():
    with pytest.warns(UserWarning, match="lora_dropout=0.1 has no effect on nn.MultiheadAttention"):
        model = _model(lora_dropout=0.1)
    model.train()
    assert torch.equal(model(X), model(X))


def test_attention_without_bias_takes_a_lora_bias():
    model = lorakit.get_peft_model(
        attention(bias=False),
        lorakit.LoraConfig(target_modules=["mha"], lora_bias=True, init_lora_weights=False),
    )
    layer = model.base_model.model.mha
    with torch.no_grad():
        layer.lora_B["default"].bias.normal_()
    assert layer.in_proj_bias is None and "in_proj_bias" in layer.adapted_tensors()
    reference = copy.deepcopy(layer.base_layer)
    with torch.no_grad():
        reference.in_proj_weight.add_(layer.delta_weight("default"))
        reference.in_proj_bias = nn.Parameter(layer.lora_B["default"].bias * layer.scaling["default"])
        out = reference.out_proj
        out.base_layer.weight.add_(out.delta_weight("default"))
        out.base_layer.bias = nn.Parameter(out.lora_B["default"].bias * out.scaling["default"])
        torch.testing.assert_close(layer(X, X, X)[0], reference(X, X, X)[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(AdapterError, match="base layer has no bias"):
        model.merge_adapter()


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_layers_that_read_the_weights_still_apply_the_adapter(batch_first):
    """nn.TransformerEncoderLayer has a fused inference path that reads self_attn.in_proj_weight
    and out_proj.weight itself (PEFT's adapters are silently skipped there); lorakit's are not."""
    torch.manual_seed(0)
    encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first).eval()
    x = torch.randn(2, 5, 8)
    config = lorakit.LoraConfig(target_modules=["self_attn"], init_lora_weights=False)
    model = lorakit.get_peft_model(copy.deepcopy(encoder), config).eval()
    with_grad = model(x)
    with torch.no_grad():
        without_grad = model(x)
        base = encoder(x)
    assert (with_grad - base).abs().max() > 0.05
    torch.testing.assert_close(without_grad, with_grad, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_and_hotswap(tmp_path):
    model = _model(bias="all")
    with torch.no_grad():
        model.base_model.model.mha.base_layer.in_proj_bias.normal_()
    model.save_pretrained(tmp_path / "a")
    loaded = lorakit.PeftModel.from_pretrained(attention(), tmp_path / "a")
    torch.testing.assert_close(loaded(X), model(X), rtol=0, atol=0)
    other = _model()
    with torch.no_grad():
        for p in other.parameters():
            if p.requires_grad:
                p.add_(1.0)
    lorakit.hotswap_adapter_from_state_dict(loaded, lorakit.get_peft_model_state_dict(other))
    swapped = lorakit.get_peft_model_state_dict(loaded)
    for key, value in lorakit.get_peft_model_state_dict(other).items():
        assert torch.equal(swapped[key], value), key  # the nested out_proj's tensors too


def test_weighted_combination_of_one_adapter_is_the_adapter():
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.add_weighted_adapter(["default"], [1.0], "copy", combination_type="linear")
    expected = model(X)
    model.set_adapter("copy")
    torch.testing.assert_close(model(X), expected, rtol=1e-6, atol=1e-6)


# -- parity with PEFT 0.21.2 ------------------------------------------------------------------------
# PEFT 0.21.2 applies the out_proj update twice in forward and in merges (W_out + 2·s·B A; fixed
# upstream in huggingface/peft#3774), but its gradient sees one of the two (the second is added to
# ``.data``). lorakit applies it once. So lorakit with the out_proj's B doubled computes PEFT's
# outputs, and its gradients are PEFT's for B, twice PEFT's for the out_proj's A.
PEFT_CASES = {
    "mha": {"target_modules": ["mha"]},
    "mha-lin0-rslora": {"target_modules": ["mha", "lin0"], "use_rslora": True, "lora_alpha": 3},
    "patterns": {"target_modules": ["mha"], "rank_pattern": {"mha": 2}, "alpha_pattern": {"mha": 5}},
}
OUT_B = "base_model.model.mha.base_layer.out_proj.lora_B.default.weight"
OUT_A = "base_model.model.mha.base_layer.out_proj.lora_A.default.weight"


def _pair(case: str):
    """(PEFT model, lorakit model holding PEFT's perturbed adapter with the out_proj's B doubled)."""
    import peft

    kw = {"r": 4, "init_lora_weights": False, **PEFT_CASES[case]}
    theirs = peft.get_peft_model(attention(), peft.LoraConfig(**kw))
    ours = lorakit.get_peft_model(attention(), lorakit.LoraConfig(**kw))
    perturb_trainable(theirs)
    lorakit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    with torch.no_grad():
        ours.get_parameter(OUT_B).mul_(2)
    return theirs, ours


def _tolerance(y: torch.Tensor) -> float:
    """PEFT adds ΔW_out to W_out twice (two roundings per weight element), lorakit 2·ΔW_out once:
    each weight element one ulp apart, and each output a sum of E = 8 such products (relative
    error ≤ E·u), with a few roundings to spare. Relative to the output's largest element."""
    return (8 + 4) * EPS32 * float(y.abs().max())


@pytest.mark.parity
@pytest.mark.parametrize("case", PEFT_CASES)
def test_keys_outputs_and_gradients_match_peft(case):
    import peft

    theirs, ours = _pair(case)
    assert set(ours.state_dict()) == set(theirs.state_dict())  # (PEFT re-registers in_proj_weight last)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    theirs_sd = peft.get_peft_model_state_dict(theirs)
    assert {k: v.shape for k, v in lorakit.get_peft_model_state_dict(ours).items()} == {
        k: v.shape for k, v in theirs_sd.items()
    }
    y_theirs, y_ours = theirs(X), ours(X)
    assert (y_theirs - attention()(X)).abs().max() > 0.01
    assert (y_ours - y_theirs).abs().max() <= _tolerance(y_theirs)
    (y_theirs**2).sum().backward()
    (y_ours**2).sum().backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            expected = grads[name] * (2 if name == OUT_A else 1)
            assert expected.abs().max() > 0, name
            # gradients are sums over T·B = 12 positions of products with the outputs above
            assert (param.grad - expected).abs().max() <= 12 * _tolerance(expected), name


@pytest.mark.parity
def test_in_proj_alone_is_bit_for_bit_peft_s():
    theirs, ours = _pair("mha")
    with torch.no_grad():
        theirs.get_parameter(OUT_B).zero_()
        ours.get_parameter(OUT_B).zero_()
        assert torch.equal(ours(X), theirs(X))


@pytest.mark.parity
def test_files_load_both_ways(tmp_path):
    import peft

    theirs, ours = _pair("mha-lin0-rslora")
    theirs.save_pretrained(tmp_path / "peft")
    ours.save_pretrained(tmp_path / "lorakit")
    in_lorakit = lorakit.PeftModel.from_pretrained(attention(), tmp_path / "peft")
    in_peft = peft.PeftModel.from_pretrained(attention(), tmp_path / "lorakit")
    for loaded, source in ((in_lorakit, theirs), (in_peft, ours)):
        loaded_sd = (lorakit if loaded is in_lorakit else peft).get_peft_model_state_dict(loaded)
        source_sd = (peft if source is theirs else lorakit).get_peft_model_state_dict(source)
        assert loaded_sd.keys() == source_sd.keys()
        assert all(torch.equal(loaded_sd[k], v) for k, v in source_sd.items())
    with torch.no_grad():
        in_lorakit.get_parameter(OUT_B).mul_(2)  # PEFT's doubling, as in _pair
        assert (in_lorakit(X) - theirs(X)).abs().max() <= _tolerance(theirs(X))


@pytest.mark.parity
def test_all_linear_and_refusals_as_peft():
    """PEFT's all-linear does not pick the attention; it picks its out_proj, whose adapter the
    attention never applies (unmerged: no effect, merged: a change). lorakit leaves it out."""
    import peft

    theirs = peft.get_peft_model(attention(), peft.LoraConfig(target_modules="all-linear"))
    ours = lorakit.get_peft_model(attention(), lorakit.LoraConfig(target_modules="all-linear"))
    assert theirs.peft_config["default"].target_modules == {"lin0", "mha.out_proj"}
    assert ours.peft_config["default"].target_modules == ["lin0"]
