"""The grouped-convolution LoRA layer (lorakit.layers.conv_grouped): ΔW by hand, the forward against
an ordinary convolution with that ΔW, PEFT's norm layout for DoRA, what it refuses (ranks, merging,
combinations) before anything changes, and the invariants every layer keeps (disable, delete,
pickle, gradients, mixed batches, hot-swap padding)."""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import add_adapter, assert_unchanged, conv_groups, perturb_trainable, snapshot_all

import lorakit
from lorakit.errors import AdapterError, TargetingError
from lorakit.functional import lora as LF
from lorakit.layers import Conv, GroupedConv, lora_layer_for

EPS32 = torch.finfo(torch.float32).eps
CONV_FN = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def _grouped(dim: int, seed: int = 0, **adapter) -> tuple[GroupedConv, torch.Tensor]:
    """A LoRA layer (adapter 'a', r=4, random B) around a grouped convolution of ``dim`` spatial
    dimensions (groups 2, strided and padded), and an input for it."""
    torch.manual_seed(seed)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    base = conv(4, 6, 3, stride=2, padding=1, groups=2)
    layer = add_adapter(GroupedConv(base), r=4, alpha=3.0, **adapter)
    return layer, torch.randn(3, 4, *([5] * dim))


def _branch_bound(layer: GroupedConv, x: torch.Tensor, name: str = "a") -> torch.Tensor:
    """Rounding bound of a float32 branch, elementwise: (n + 2) u Σ|terms|, where n is the reduction
    length of the two convolutions (C_in·k, then r/G) and Σ|terms| is the convolution of |x| with the
    ΔW of |A|, |B| (Higham, Accuracy and Stability, §3.1)."""
    a, b = layer.factors(name)
    n = a[0].numel() + b.shape[1]
    abs_delta = LF.grouped_conv_delta(a.abs(), b.abs(), abs(layer.scaling[name]), layer.rank_blocks)
    conv = layer.base_layer
    terms = CONV_FN[abs_delta.dim()](x.abs(), abs_delta, None, conv.stride, conv.padding, conv.dilation)
    return (n + 2) * EPS32 * terms


def test_delta_weight_and_output_by_hand():
    base = nn.Conv1d(2, 4, 2, groups=2, bias=False)  # weight (C_out=4, C_in/G=1, k=2)
    base.weight.data.fill_(1.0)
    layer = add_adapter(GroupedConv(base), r=2, alpha=2.0)  # s = 1; B reads r/G = 1 row of A per group
    layer.lora_A["a"].weight.data.copy_(torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 2.0], [1.0, 0.0]]]))
    layer.lora_B["a"].weight.data.copy_(torch.tensor([1.0, 2.0, 3.0, -1.0]).reshape(4, 1, 1))
    # outputs 0, 1 (group 0) read A's row 0, outputs 2, 3 (group 1) A's row 1: ΔW[o] = B[o] A[g(o)]
    expected_delta = torch.tensor(
        [
            [[1.0, 0.0], [0.0, 1.0]],
            [[2.0, 0.0], [0.0, 2.0]],
            [[0.0, 6.0], [3.0, 0.0]],
            [[0.0, -2.0], [-1.0, 0.0]],
        ]
    )  # (C_out=4, C_in=2, k=2): a full convolution, not the grouped weight's (4, 1, 2)
    assert torch.equal(layer.delta_weight("a"), expected_delta)
    x = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]])  # (N=1, C_in=2, L=3)
    # base: each output reads its group's channel with kernel [1, 1]: [3, 5] (o0, o1), [9, 11] (o2, o3)
    # branch: o0 = x0[t] + x1[t+1] → [6, 8]; o1 = 2·o0; o2 = 6·x0[t+1] + 3·x1[t] → [24, 33];
    # o3 = −2·x0[t+1] − x1[t] → [−8, −11]
    assert torch.equal(layer(x), torch.tensor([[[9.0, 13.0], [15.0, 21.0], [33.0, 44.0], [1.0, 0.0]]]))
    assert torch.equal(F.conv1d(x, expected_delta), layer(x) - base(x))
    # PEFT's layout for DoRA's norms: B rows (o0, o1) and (o2, o3) side by side times A, re-read as
    # (4, 1, 2): row 0 = 1·A0 + 2·A1 = [1, 4, 2, 1], row 1 = 3·A0 − A1 = [3, −2, −1, 3]
    assert torch.equal(
        layer.norm_delta("a"), torch.tensor([[[1.0, 4.0]], [[2.0, 1.0]], [[3.0, -2.0]], [[-1.0, 3.0]]])
    )


def test_flat_layout_is_delta_weight_without_groups():
    torch.manual_seed(0)
    layer = add_adapter(Conv(nn.Conv2d(3, 5, 3)), r=2)
    a, b = layer.factors("a")
    flat = LF.conv_delta_flat(a, b, layer.scaling["a"], layer.base_layer.weight.shape)
    # two float32 sums of r = 2 products each, in different orders: within (r + 1) u Σ|terms| of
    # each other's exact value (Higham §3.1)
    terms = LF.conv_delta(a.abs(), b.abs(), layer.scaling["a"])
    assert ((flat - layer.delta_weight("a")).abs() <= 2 * 3 * EPS32 * terms).all()


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_forward_is_base_plus_convolution_with_delta_weight(dim):
    layer, x = _grouped(dim)
    conv = layer.base_layer
    with torch.no_grad():
        reference = CONV_FN[dim + 2](
            x.double(), layer.delta_weight("a").double(), None, conv.stride, conv.padding
        )
        ours = layer(x) - conv(x)
    assert reference.abs().max() > 0.1  # the adapter does something
    # ours holds the branch's rounding and that of subtracting the base back out (one ulp of |y|)
    bound = _branch_bound(layer, x) + 2 * EPS32 * (ours.abs() + conv(x).abs())
    assert ((ours.double() - reference).abs() <= bound.double()).all()


def test_layout_matches_peft():
    layer, _ = _grouped(2)
    assert layer.lora_A["a"].groups == 1 and layer.lora_A["a"].weight.shape == (4, 4, 3, 3)
    assert layer.lora_B["a"].groups == 2 and layer.lora_B["a"].weight.shape == (6, 2, 1, 1)
    assert layer.lora_A["a"].stride == (2, 2) and layer.lora_A["a"].padding == (1, 1)


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_default_inits_start_as_identity(init):
    layer, x = _grouped(2, init=init)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_rank_not_a_multiple_of_groups_is_refused_before_anything_changes():
    model = conv_groups()
    before = snapshot_all(model)
    with pytest.raises(TargetingError, match=r"conv1d \(r=6 is not a multiple .*groups=4") as err:
        lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules=["conv2d", "conv1d"], r=6))
    assert "conv2d (" not in str(err.value)  # 6 is a multiple of conv2d's 2 groups
    assert_unchanged(model, before)
    lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules=["conv2d", "conv1d"], r=8))


def test_merging_is_refused_before_anything_changes():
    config = lorakit.LoraConfig(target_modules=["lin0", "conv2d"], init_lora_weights=False)
    model = lorakit.get_peft_model(conv_groups(), config)
    x = torch.randn(2, 12)
    before, expected = snapshot_all(model), model(x)
    for merge in (model.merge_adapter, model.merge_and_unload, lambda: model.merge_adapter(safe_merge=True)):
        with pytest.raises(AdapterError, match="conv2d: .*grouped convolution .*groups=2"):
            merge()
        assert_unchanged(model, before)  # lin0 was not merged either
    layer = model.base_model.model.conv2d
    with pytest.raises(AdapterError, match="grouped"):
        layer.merge()
    assert not layer.merged and torch.equal(model(x), expected)


def test_unload_gives_the_original_module_back():
    base = conv_groups()
    original = base.conv2d
    weights = {k: v.clone() for k, v in base.state_dict().items()}
    model = lorakit.get_peft_model(
        base, lorakit.LoraConfig(target_modules=["conv2d"], init_lora_weights=False)
    )
    plain = model.unload()
    assert plain.conv2d is original
    assert all(torch.equal(v, weights[k]) for k, v in plain.state_dict().items())


def test_disable_gives_base_and_delete_leaves_no_trace():
    layer, x = _grouped(2)
    keys = set(layer.state_dict())
    layer.disable_adapters = True
    assert torch.equal(layer(x), layer.base_layer(x))
    layer.disable_adapters = False
    layer.add_adapter("b", 2, 2.0, use_rslora=False, dropout=0.1, init=False, lora_bias=True)
    layer.delete_adapter("b")
    assert set(layer.state_dict()) == keys and "b" not in layer.lora_dropout and "b" not in layer.r


def test_pickle_deepcopy_and_forward_keep_state():
    layer, x = _grouped(3)
    expected = layer(x)
    for clone in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert torch.equal(clone(x), expected)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(x, adapter_names=["a", "__base__", "a"])
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("dim", [1, 2])
def test_gradients_equal_the_plain_reference(dim):
    """x, A, B and the LoRA bias get the gradients of ``base(x) + s·B(A(x))`` written out."""
    layer, x = _grouped(dim, lora_bias=True)
    layer.base_layer.requires_grad_(False)
    grads = []
    for use_layer in (True, False):
        layer.zero_grad()
        xi = x.clone().requires_grad_(True)
        if use_layer:
            out = layer(xi)
        else:
            a, b = layer.factors("a")
            conv = layer.base_layer
            h = CONV_FN[dim + 2](xi, a, None, conv.stride, conv.padding)
            out = conv(xi) + CONV_FN[dim + 2](h, b, layer.lora_b_bias("a"), groups=2) * layer.scaling["a"]
        out.backward(torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin())
        grads.append([xi.grad] + [p.grad.clone() for p in layer.adapter_parameters("a")] + [out.detach()])
    for ours, reference in zip(*grads, strict=True):
        assert torch.equal(ours, reference)  # the same operations in the same order


def test_mixed_batch_rows():
    layer, x = _grouped(2)
    layer.add_adapter("b", 2, 2.0, use_rslora=False, dropout=0.0, init=False, lora_bias=False)
    names = ["b", "__base__", "a"]
    mixed = layer(x, adapter_names=names)
    base = layer.base_layer(x)
    for i, name in enumerate(names):
        if name == "__base__":
            assert torch.equal(mixed[i], base[i])
            continue
        layer.set_active([name])
        # the rows run as a smaller batch (the convolution may sum in another order): both within
        # the branch's bound of the exact value, plus one rounding of the sum with the base
        bound = 2 * _branch_bound(layer, x, name)[i] + 2 * EPS32 * base[i].abs()
        assert ((mixed[i] - layer(x)[i]).abs() <= bound).all()


def test_dora_follows_its_definition_with_peft_norms():
    """``y = m/‖W + ΔW_flat‖ ⊙ (W x + s·B A x) + b`` (ΔW_flat: PEFT's layout), and a fresh DoRA
    adapter (B = 0) leaves the output unchanged."""
    torch.manual_seed(0)
    base = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    x = torch.randn(2, 4, 5, 5)
    config = lorakit.LoraConfig(target_modules=["conv"], use_dora=True)
    model = lorakit.get_peft_model(_Holder(base), config)
    layer = model.base_model.model.conv
    assert torch.allclose(model(x), base(x), atol=1e-6)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
        layer.lora_magnitude_vector["default"].weight.mul_(1.5)
    w = base.weight.detach()
    norm = (w + layer.norm_delta("default")).flatten(1).norm(dim=1)
    m = layer.lora_magnitude_vector["default"].weight.reshape(-1)
    branch = layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
    direct = F.conv2d(x, w, None, padding=1, groups=2)
    expected = (m / norm).reshape(1, -1, 1, 1) * (direct + branch) + base.bias.reshape(1, -1, 1, 1)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


class _Holder(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_combinations_need_the_factor_types():
    config = lorakit.LoraConfig(target_modules=["conv2d"], init_lora_weights=False)
    model = lorakit.get_peft_model(conv_groups(), config)
    model.add_adapter("b", config)
    before = snapshot_all(model)
    for combination in ("cat", "svd", "ties_svd"):
        with pytest.raises(AdapterError, match=rf"conv2d: combination_type='{combination}' is not defined"):
            model.add_weighted_adapter(["default", "b"], [1.0, 0.5], "mix", combination_type=combination)
        assert_unchanged(model, before)
    model.add_weighted_adapter(["default", "b"], [1.0, 0.5], "mix", combination_type="linear")
    layer = model.base_model.model.conv2d
    c = [1.0 * layer.scaling["default"], 0.5 * layer.scaling["b"]]
    a = sum(c_i**0.5 * layer.lora_A[n].weight for c_i, n in zip(c, ["default", "b"], strict=True))
    torch.testing.assert_close(layer.lora_A["mix"].weight, a, rtol=1e-6, atol=1e-7)


def test_hotswap_pads_each_group():
    """Padding to a larger rank keeps outputs; an adapter of the smaller rank swapped in gives the
    outputs it gives loaded on its own."""
    x = torch.randn(2, 12)
    small = lorakit.LoraConfig(target_modules=["conv2d", "conv1d"], r=4, init_lora_weights=False)
    model = lorakit.get_peft_model(conv_groups(), lorakit.LoraConfig(**{**small.to_dict(), "r": 8}))
    other = lorakit.get_peft_model(conv_groups(), small)
    lorakit.prepare_model_for_compiled_hotswap(model, target_rank=16)
    assert model.base_model.model.conv1d.lora_B["default"].weight.shape == (8, 4, 1)  # 16 / 4 groups
    lorakit.hotswap_adapter_from_state_dict(model, lorakit.get_peft_model_state_dict(other), config=small)
    torch.testing.assert_close(model(x), other(x), rtol=1e-5, atol=1e-6)


def test_hotswap_rank_must_suit_the_groups():
    model = lorakit.get_peft_model(conv_groups(), lorakit.LoraConfig(target_modules=["conv1d"], r=4))
    before = snapshot_all(model)
    with pytest.raises(AdapterError, match=r"target_rank=10 is not a multiple of the groups .*\[4\]"):
        lorakit.prepare_model_for_compiled_hotswap(model, target_rank=10)
    assert_unchanged(model, before)


def test_inspect_and_dispatch():
    report = lorakit.inspect(conv_groups())
    rows = {m["name"]: m for m in report.modules}
    assert rows["conv2d"]["shape"] == (8, 2, 3, 3) and rows["conv2d"]["params"] == 8 * 2 * 9 + 8
    assert lora_layer_for(nn.Conv2d(4, 4, 1, groups=4)) is GroupedConv


# -- parity with PEFT 0.21.2 ------------------------------------------------------------------------
PEFT_CASES = {
    "lora": {},
    "dora": {"use_dora": True},
    "lora_bias-rslora": {"lora_bias": True, "use_rslora": True, "lora_alpha": 3},
    "patterns": {"rank_pattern": {"conv1d": 8}, "alpha_pattern": {"conv2d": 2}},
}


def _pair(case: str):
    """(PEFT model, lorakit model) on conv_groups(), with PEFT's perturbed adapter loaded into
    lorakit, and an input."""
    import peft

    kw = {"target_modules": ["conv2d", "conv1d"], "r": 4, "init_lora_weights": False, **PEFT_CASES[case]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: "Merging is not supported" for groups > 1
        theirs = peft.get_peft_model(conv_groups(), peft.LoraConfig(**kw))
    ours = lorakit.get_peft_model(conv_groups(), lorakit.LoraConfig(**kw))
    perturb_trainable(theirs)
    lorakit.set_peft_model_state_dict(ours, peft.get_peft_model_state_dict(theirs))
    return theirs, ours, torch.randn(3, 12, generator=torch.Generator().manual_seed(3))


def _tolerance(model: nn.Module, case: str) -> float:
    """How far lorakit's and PEFT's outputs and gradients may be apart, relative to their largest
    element. LoRA: 0 (the same operations in the same order). DoRA: the channel norms are float32
    sums taken in another order, each off by at most (n + 1)·u relatively (n ≤ the largest fan-in;
    Higham, Accuracy and Stability, §3.1); every output and gradient is a sum of at most that many
    such terms, so (n + 4)·u with a few roundings to spare."""
    if "dora" not in case:
        return 0.0
    fan_in = max(
        m.weight[0].numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear))
    )
    return (fan_in + 4) * EPS32


@pytest.mark.parity
@pytest.mark.parametrize("case", PEFT_CASES)
def test_keys_outputs_and_gradients_match_peft(case):
    theirs, ours, x = _pair(case)
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n for n, p in theirs.named_parameters() if p.requires_grad
    }
    import peft

    theirs_sd, ours_sd = peft.get_peft_model_state_dict(theirs), lorakit.get_peft_model_state_dict(ours)
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in theirs_sd.items()}
    assert all(torch.equal(ours_sd[k], v) for k, v in theirs_sd.items())
    y_theirs, y_ours = theirs(x), ours(x)
    assert (y_theirs - conv_groups()(x)).abs().max() > 0.01  # the adapters do something
    rel = _tolerance(theirs, case)
    assert (y_ours - y_theirs).abs().max() <= rel * y_theirs.abs().max()
    (y_theirs**2).sum().backward()
    (y_ours**2).sum().backward()
    grads_theirs = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    for name, param in ours.named_parameters():
        if param.requires_grad:
            expected = grads_theirs[name]
            assert expected.abs().max() > 0, name
            assert (param.grad - expected).abs().max() <= rel * expected.abs().max(), name


@pytest.mark.parity
@pytest.mark.parametrize("case", ["lora", "dora"])
def test_files_load_both_ways(tmp_path, case):
    import peft

    theirs, ours, x = _pair(case)
    theirs.save_pretrained(tmp_path / "peft")
    perturb_trainable(ours, seed=5)
    ours.save_pretrained(tmp_path / "lorakit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(conv_groups(), tmp_path / "lorakit")
    in_lorakit = lorakit.PeftModel.from_pretrained(conv_groups(), tmp_path / "peft")
    rel = _tolerance(theirs, case)
    assert (in_lorakit(x) - theirs(x)).abs().max() <= rel * theirs(x).abs().max()
    assert (in_peft(x) - ours(x)).abs().max() <= rel * ours(x).abs().max()
