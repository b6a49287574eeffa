"""DoRA: the fused layer path against the plain reference (outputs, gradients, fp32/bf16), parity
with PEFT 0.21.2 on several architectures (keys, magnitude init, outputs, gradients, cross-loading
both ways, merge), mixed batches, invariants, and the lean dropout path."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn
from zoo import TOY_TARGETS, ZOO, ids, llama, main_output, toy

import lorakit
from lorakit.functional import dora as LD
from lorakit.functional import dropout
from lorakit.layers import Linear
from lorakit.layers.dora import DORA
from lorakit.persistence.keys import adapter_keys

# (zoo architecture, targets): Linear, transformers Conv1D, Embedding, Conv2d, encoder-decoder
ARCHS = {
    "llama": ["q_proj", "v_proj", "o_proj"],
    "gpt2": ["c_attn", "c_proj"],
    "bert": ["query", "value", "word_embeddings"],
    "t5": ["q", "v", "wo"],
    "mlp": ["emb", "conv", "lin0", "lin1"],
}


def _perturb(model: nn.Module, seed: int = 3) -> None:
    """Non-zero B and a magnitude away from its init, so every DoRA term matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def _pair(arch: str, **extra):
    entry = ZOO[arch]
    base = entry.build()
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ARCHS[arch], "use_dora": True, **extra}
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    lk = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw))
    return base, pm, lk, entry.inputs()


def _peft_sd(pm) -> dict[str, torch.Tensor]:
    # PEFT also saves whole embedding tables when an embedding is targeted; those are not adapter keys
    return {k: v for k, v in peft.get_peft_model_state_dict(pm).items() if ".base_layer." not in k}


# -- the fused path against the reference ------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_layer_matches_reference_outputs_and_gradients(dtype, fan_in_fan_out):
    torch.manual_seed(0)
    base = nn.Linear(12, 10).to(dtype)
    if fan_in_fan_out:
        from transformers.pytorch_utils import Conv1D

        conv = Conv1D(10, 12).to(dtype)
        with torch.no_grad():
            conv.weight.copy_(base.weight.T)
            conv.bias.copy_(base.bias)
        base = conv
    layer = Linear(base)
    layer.add_adapter("a", 3, 6.0, use_rslora=False, dropout=0.0, init=False, lora_bias=False, variant=DORA)
    layer.set_active(["a"])
    with torch.no_grad():
        layer.lora_magnitude_vector["a"].weight.mul_(1.3)
    x = torch.randn(2, 5, 12, dtype=dtype, requires_grad=True)
    a, b = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    m = layer.lora_magnitude_vector["a"].weight
    out = layer(x)
    ref = LD.dora_linear(x, base.weight, base.bias, a, b, m, 2.0, fan_in_fan_out)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, **tol)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out.float(), (x, a, b, m), g)
    want = torch.autograd.grad(ref, (x, a, b, m), g)
    for name, u, v in zip("xabm", got, want, strict=True):
        scale = v.abs().max().item() + 1e-6
        torch.testing.assert_close(u.float() / scale, v.float() / scale, **tol, msg=f"grad {name}")


def test_dropout_uses_one_base_matmul_and_matches_reference_with_the_same_mask():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = Linear(base)
    layer.add_adapter("a", 2, 4.0, use_rslora=False, dropout=0.5, init=False, lora_bias=False, variant=DORA)
    layer.set_active(["a"])
    layer.train()
    calls = []
    base.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(3, 8, requires_grad=True)
    torch.manual_seed(7)
    mask = dropout.dropout_keep_mask(x, 0.5) / 0.5  # the same draw the layer makes after reseeding
    torch.manual_seed(7)
    out = layer(x)
    assert len(calls) == 1  # PEFT runs the base weight a second time on dropout(x)
    m = layer.lora_magnitude_vector["a"].weight
    ref = LD.dora_linear(
        x,
        base.weight,
        base.bias,
        layer.lora_A["a"].weight,
        layer.lora_B["a"].weight,
        m,
        2.0,
        dropout_mask=mask,
    )
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    a = layer.lora_A["a"].weight
    for u, v in zip(
        torch.autograd.grad(out, (x, a, m), g), torch.autograd.grad(ref, (x, a, m), g), strict=True
    ):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_dropout_is_unbiased():
    """The mean over many dropout draws is the eval-mode output (as for PEFT's scheme)."""
    torch.manual_seed(0)
    layer = Linear(nn.Linear(8, 6))
    layer.add_adapter("a", 2, 4.0, use_rslora=False, dropout=0.3, init=False, lora_bias=False, variant=DORA)
    layer.set_active(["a"])
    x = torch.randn(4, 8)
    with torch.no_grad():
        want = layer.eval()(x)
        layer.train()
        draws = torch.stack([layer(x) for _ in range(3000)])
    assert not torch.equal(draws[0], draws[1])  # dropout is on
    torch.testing.assert_close(draws.mean(0), want, atol=0.03, rtol=0.0)


@pytest.mark.parity
def test_saved_activations_leaner_than_peft_with_dropout():
    """Bytes autograd keeps for backward in one DoRA layer, dropout 0.1, input (8, 64, 256)."""
    torch.manual_seed(0)
    base = nn.Linear(256, 256)

    def saved_bytes(model: nn.Module) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            if t.dim() >= 2 and t.shape[0] == 8:  # activation-sized, not weights
                total += t.numel() * t.element_size()
            return t

        x = torch.randn(8, 64, 256, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return total

    kw = {"r": 8, "target_modules": ["lin"], "use_dora": True, "lora_dropout": 0.1}
    wrap = nn.Sequential()
    wrap.add_module("lin", copy.deepcopy(base))
    lk = lorakit.get_peft_model(copy.deepcopy(wrap), lorakit.LoraConfig(**kw)).train()
    pm = peft.get_peft_model(copy.deepcopy(wrap), peft.LoraConfig(**kw)).train()
    assert saved_bytes(lk) < 0.75 * saved_bytes(pm)


# -- parity with PEFT --------------------------------------------------------------------------
@pytest.mark.parity
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_magnitude_init_keys_and_shapes_match_peft(arch):
    base, pm, lk, inputs = _pair(arch, init_lora_weights=False)
    live = adapter_keys(lk, "default").tensors
    with torch.no_grad():  # same A and B as PEFT drew
        for key, value in _peft_sd(pm).items():
            if "magnitude" not in key:
                live[key].copy_(value)
    for layer in (m for m in lk.modules() if isinstance(m, lorakit.layers.LoraLayer)):
        DORA.init(layer, "default")  # re-derive m from PEFT's A, B
    ours, theirs = lorakit.get_peft_model_state_dict(lk), _peft_sd(pm)
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert ours[key].shape == value.shape and ours[key].dtype == value.dtype, key
        torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=1e-5, msg=key)


def _adapter_grads(pm, lk, want, got):
    """Backpropagate ``mean(out²)`` through PEFT's (``want``) and lorakit's (``got``) outputs; each
    model's trainable gradients by name without the adapter name, checked to be the same set."""
    want.square().mean().backward()
    got.square().mean().backward()
    pg = {n.replace(".default", ""): p.grad for n, p in pm.named_parameters() if p.requires_grad}
    lg = {n.replace(".default", ""): p.grad for n, p in lk.named_parameters() if p.requires_grad}
    assert sorted(pg) == sorted(lg)
    return pg, lg


@pytest.mark.parity
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_outputs_gradients_and_merge_match_peft(arch):
    base, pm, lk, inputs = _pair(arch)
    _perturb(pm)
    lorakit.set_peft_model_state_dict(lk, _peft_sd(pm))
    with torch.no_grad():
        effect = (main_output(pm(**inputs)) - main_output(base(**inputs))).abs().max()
    assert effect > 1e-3
    want, got = main_output(pm(**inputs)), main_output(lk(**inputs))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    pg, lg = _adapter_grads(pm, lk, want, got)
    for name, grad in pg.items():
        torch.testing.assert_close(lg[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    pm.merge_adapter()
    lk.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(main_output(lk(**inputs)), main_output(pm(**inputs)), atol=1e-5, rtol=1e-4)


@pytest.mark.parity
@pytest.mark.parametrize("arch", ["llama", "mlp"])
def test_cross_loading_both_ways(arch):
    base, pm, lk, inputs = _pair(arch)
    _perturb(lk, seed=5)
    peft.set_peft_model_state_dict(pm, lorakit.get_peft_model_state_dict(lk))  # lorakit -> PEFT
    with torch.no_grad():
        torch.testing.assert_close(main_output(pm(**inputs)), main_output(lk(**inputs)), atol=1e-5, rtol=1e-4)
    _perturb(pm, seed=6)
    lorakit.set_peft_model_state_dict(lk, _peft_sd(pm))  # PEFT -> lorakit
    with torch.no_grad():
        torch.testing.assert_close(main_output(lk(**inputs)), main_output(pm(**inputs)), atol=1e-5, rtol=1e-4)


@pytest.mark.parity
def test_bf16_base_outputs_and_gradients_match_peft():
    base = ZOO["llama"].build().to(torch.bfloat16)
    inputs = ZOO["llama"].inputs()
    kw = {"r": 4, "lora_alpha": 8, "target_modules": ARCHS["llama"], "use_dora": True}
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kw))
    lk = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**kw))
    _perturb(pm)
    lorakit.set_peft_model_state_dict(lk, _peft_sd(pm))
    want, got = main_output(pm(**inputs)).float(), main_output(lk(**inputs)).float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
    pg, lg = _adapter_grads(pm, lk, want, got)
    for name, grad in pg.items():
        assert lg[name].dtype == grad.dtype == torch.float32, name  # float32 adapters on a bf16 base
        assert (lg[name] - grad).abs().max() <= 0.1 * grad.abs().max() + 1e-6, name


def test_lora_bias_with_dora_is_refused_like_peft():
    with pytest.raises(lorakit.ConfigError, match="lora_bias=True is not supported for DoRA"):
        lorakit.LoraConfig(use_dora=True, lora_bias=True)


def test_print_shows_magnitude():
    _, _, lk, _ = _pair("llama")
    assert "(lora_magnitude_vector): ModuleDict" in repr(lk) and "lora.dora." in repr(lk)


# -- mixed batches, several adapters, invariants -----------------------------------------------
def _toy_two_adapters():
    lk = lorakit.get_peft_model(
        toy(), lorakit.LoraConfig(r=2, target_modules=TOY_TARGETS, use_dora=True, init_lora_weights=False)
    )
    lk.add_adapter("plain", lorakit.LoraConfig(r=3, target_modules=TOY_TARGETS, init_lora_weights=False))
    lk.add_adapter(
        "dora2",
        lorakit.LoraConfig(r=4, target_modules=["lin", "conv2"], use_dora=True, init_lora_weights=False),
    )
    _perturb(lk)
    return lk


def test_mixed_batch_rows_equal_each_adapter_alone():
    lk = _toy_two_adapters()
    x = ids(batch=4, seq=5)
    names = ["default", "__base__", "plain", "dora2"]
    with torch.no_grad():
        mixed = lk(x, adapter_names=names)
        for i, name in enumerate(names):
            if name == "__base__":
                with lk.disable_adapter():
                    alone = lk(x)
            else:
                lk.set_adapter(name)
                alone = lk(x)
            torch.testing.assert_close(mixed[i], alone[i], atol=1e-5, rtol=1e-5, msg=name)


def _layer_with_three(kind: str):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base, x = {
        "linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(2, 3, 6)),
        "conv1d_tf": (lambda: Conv1D(5, 6), lambda: torch.randn(2, 3, 6)),
        "embedding": (lambda: nn.Embedding(11, 5), lambda: torch.randint(0, 11, (2, 3))),
        "conv2d": (lambda: nn.Conv2d(3, 5, 3, padding=1), lambda: torch.randn(2, 3, 4, 4)),
    }[kind]
    layer = lorakit.layers.lora_layer_for(base_module := base())(base_module)
    for name, r, dora in (("d1", 2, True), ("p", 3, False), ("d2", 4, True)):
        layer.add_adapter(
            name,
            r,
            2.0 * r,
            use_rslora=False,
            dropout=0.0,
            init=False,
            lora_bias=False,
            variant=DORA if dora else None,
        )
    _perturb(layer)
    return layer, x()


@pytest.mark.parametrize("kind", ["linear", "conv1d_tf", "embedding", "conv2d"])
def test_several_active_adapters_sum_their_changes_and_merge_to_the_same(kind):
    layer, x = _layer_with_three(kind)
    with torch.no_grad():
        base = layer.base_layer(x)
        changes = []
        for name in ["d1", "p", "d2"]:
            layer.set_active([name])
            changes.append(layer(x) - base)
        layer.set_active(["d1", "p", "d2"])
        together = layer(x)
        torch.testing.assert_close(together, base + sum(changes), atol=1e-5, rtol=1e-5)
        layer.merge()
        torch.testing.assert_close(layer(x), together, atol=1e-5, rtol=1e-5)
        layer.merge(["d1"])  # already merged: no change
        layer.unmerge()
        layer.merge(["p"])  # a DoRA adapter over a merged one still adds its own change
        torch.testing.assert_close(layer(x), together, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_unmerge_bit_exact_disable_is_base(dtype):
    lk = _toy_two_adapters().to(dtype)
    lk.set_adapter(["default", "dora2"])
    before = {k: v.clone() for k, v in lk.state_dict().items()}
    x = ids(batch=2, seq=5)
    with torch.no_grad():
        unmerged = lk(x)
        lk.merge_adapter()
        lk.merge_adapter()  # idempotent
        merged = lk(x)
        with lk.disable_adapter():
            disabled = lk(x)
        lk.unmerge_adapter()
        with lk.disable_adapter():
            base = lk(x)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(merged.float(), unmerged.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(disabled, base, atol=0, rtol=0)
    after = lk.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_merge_and_unload_equals_adapter_output():
    lk = _toy_two_adapters()
    x = ids(batch=2, seq=5)
    with torch.no_grad():
        want = lk(x)
        plain = lk.merge_and_unload()
        torch.testing.assert_close(plain(x), want, atol=1e-5, rtol=1e-5)
    assert not any("lora" in n for n, _ in plain.named_parameters())


@pytest.mark.parity
def test_peft_multi_active_lora_then_dora_matches_when_dora_first():
    """PEFT sums several active adapters; with a DoRA adapter after another one PEFT rescales the
    other's update too, so lorakit (which sums changes) agrees with it when DoRA comes first."""
    base = llama()
    kw = {"r": 2, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(use_dora=True, **kw), "d")
    pm.add_adapter("p", peft.LoraConfig(**kw))
    lk = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(use_dora=True, **kw), "d")
    lk.add_adapter("p", lorakit.LoraConfig(**kw))
    for name in ("d", "p"):
        lorakit.set_peft_model_state_dict(lk, peft.get_peft_model_state_dict(pm, adapter_name=name), name)
    pm.base_model.set_adapter(["d", "p"])
    lk.set_adapter(["d", "p"])
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(lk(x).logits, pm(x).logits, atol=1e-5, rtol=1e-4)


@pytest.mark.parity
@pytest.mark.parametrize("arch", ["llama", "gpt2", "mlp"])
def test_files_load_both_ways_with_equal_outputs(tmp_path, arch):
    entry = ZOO[arch]
    base, pm, lk, inputs = _pair(arch)
    _perturb(lk, seed=8)
    lk.save_pretrained(tmp_path / "ours")
    _perturb(pm, seed=9)
    pm.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        want_ours, want_theirs = main_output(lk(**inputs)), main_output(pm(**inputs))
        into_peft = peft.PeftModel.from_pretrained(entry.build(), str(tmp_path / "ours"))
        torch.testing.assert_close(main_output(into_peft(**inputs)), want_ours, atol=1e-5, rtol=1e-4)
        into_lorakit = lorakit.PeftModel.from_pretrained(entry.build(), tmp_path / "theirs")
        torch.testing.assert_close(main_output(into_lorakit(**inputs)), want_theirs, atol=1e-5, rtol=1e-4)
    assert "lora_magnitude_vector" in str(sorted(lorakit.get_peft_model_state_dict(into_lorakit)))
