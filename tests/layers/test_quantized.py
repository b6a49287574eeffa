"""What every quantized kind shares (``layers/quantized.py``): exact unmerge, honest merges, options
refused before anything changes, and the adapter features on a quantized base.

Tolerances: a merged layer computes ``x · (deq(Q) + ΔW)ᵀ`` in float32, the unmerged one
``x · deq(Q)ᵀ + s·B(Ax)``; both are float32 sums of ≤ k + r products (k ≤ 32 here, u = 2⁻²⁴), so an
adapted layer's output may differ by (k + r) u relative to its magnitude, and by ``n (k + r) u``
over ``n`` adapted layers. Comparisons run in train mode (no dropout in these models): LLM.int8()'s
eval product quantizes the activations too (a step of max|x|/127 per row), its train product does not.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import quantized as Q
from zoo import structure

import lorakit
from lorakit.layers import LoraLayer

pytest.importorskip("bitsandbytes")
pytest.importorskip("torchao")

SCHEMES = ["nf4", "fp4", "int8", "int8-ao"]
TARGETS = ["q_proj", "v_proj", "down_proj"]
K_MAX, R = 32, 4
IDS = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def _adapted(scheme: str, **kwargs) -> lorakit.PeftModel:
    config = {"r": R, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **kwargs}
    torch.manual_seed(1)
    return lorakit.get_peft_model(Q.quantized("llama", scheme), lorakit.LoraConfig(**config))


def _logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    model.train()  # see the module docstring
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _tolerance(reference: torch.Tensor, n_layers: int = 6) -> float:
    return n_layers * (K_MAX + R) * 2.0**-24 * reference.abs().max().item()


def _is_quantized(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt") or (
        type(getattr(module, "weight", None)).__name__ == "Int8Tensor"
    )


def _is_quantized(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt") or (
        type(getattr(module, "weight", None)).__name__ == "Int8Tensor"
    )


def _quantized_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor bitsandbytes / torchao store for the quantized layers (codes, scales, packed
    quantization state), as ``state_dict`` writes them."""
    state = {}
    for name, module in model.named_modules():
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if _is_quantized(base):
            for key, value in base.state_dict().items():
                tensors = value.__tensor_flatten__()[0] if hasattr(value, "__tensor_flatten__") else None
                if tensors:
                    state.update({f"{name}.{key}.{t}": getattr(value, t).clone() for t in tensors})
                else:
                    state[f"{name}.{key}"] = value.clone()
    return state


@pytest.mark.slow
@pytest.mark.parametrize("scheme", SCHEMES)
def test_merge_keeps_outputs_and_unmerge_restores_the_quantized_data_bit_for_bit(scheme: str) -> None:
    model = _adapted(scheme)
    before = _quantized_state(model)
    unmerged = _logits(model)
    model.merge_adapter()
    merged = _logits(model)
    assert (merged - unmerged).abs().max().item() <= _tolerance(unmerged)
    model.unmerge_adapter()
    after = _quantized_state(model)
    assert before.keys() == after.keys() and len(before) >= 3 * len(TARGETS) // 3
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(_logits(model), unmerged)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", [*SCHEMES, "nf4-bf16"])
def test_merge_and_unload_gives_dense_exact_layers_in_the_model_dtype(scheme: str) -> None:
    model = _adapted(scheme)
    expected = _logits(model)
    targeted = [n for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)]
    merged = model.merge_and_unload()
    dtype = Q.scheme_dtype(scheme)
    for name in targeted:
        layer = merged.get_submodule(name)
        assert type(layer) is nn.Linear and type(layer.weight) is nn.Parameter
        assert layer.weight.dtype == dtype and not layer.weight.requires_grad
    assert _is_quantized(merged.model.layers[0].self_attn.k_proj)  # not targeted: untouched
    got = _logits(merged)
    tol = _tolerance(expected) if dtype == torch.float32 else 6 * 2.0**-8 * expected.abs().max().item()
    assert (got - expected).abs().max().item() <= tol


@pytest.mark.slow
@pytest.mark.parametrize("scheme", SCHEMES)
def test_requantizing_merge_is_explicit_and_reports_its_error(scheme: str) -> None:
    model = _adapted(scheme)
    with pytest.warns(lorakit.RequantizationWarning, match=r"re-quantized 6 merged layer\(s\)") as caught:
        merged = model.merge_and_unload(requantize=True)
    assert "× the merged update" in str(caught[0].message)
    assert _is_quantized(merged.model.layers[0].self_attn.q_proj)  # quantized again, like k_proj
    assert type(merged.model.layers[0].self_attn.q_proj) is type(merged.model.layers[0].self_attn.k_proj)
    assert torch.isfinite(_logits(merged)).all()


@pytest.mark.parametrize("scheme", SCHEMES)
def test_requantize_report_measures_the_weight_error_against_the_update(scheme: str) -> None:
    model = _adapted(scheme)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    layer.merge()
    module, report = layer.requantized("q")
    exact = layer.merged_weight
    update = exact - layer.dequantized()
    kept = type(layer).dequantize(module)
    assert report.relative_error == pytest.approx(float((kept - exact).norm() / update.norm()), rel=1e-5)
    assert report.relative_error > 0


@pytest.mark.parametrize(
    ("scheme", "kwargs", "reason"),
    [
        ("nf4", {"init_lora_weights": "pissa"}, "re-quantized"),
        ("int8", {"init_lora_weights": "olora"}, "re-quantized"),
        ("int8-ao", {"lora_bias": True}, "lora_bias=True on a torchao base"),
    ],
)
def test_options_a_quantized_base_cannot_take_are_refused_before_anything_changes(
    scheme, kwargs, reason
) -> None:
    base = Q.quantized("llama", scheme)
    before, modules = _quantized_state(base), structure(base)
    with pytest.raises(lorakit.TargetingError, match=reason):
        lorakit.get_peft_model(base, lorakit.LoraConfig(target_modules=TARGETS, **kwargs))
    after = _quantized_state(base)
    assert structure(base) == modules and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("scheme", ["nf4", "int8-ao"])
def test_disabled_adapters_compute_exactly_the_quantized_base(scheme: str) -> None:
    model = _adapted(scheme)
    with model.disable_adapter():
        disabled = _logits(model)
    assert torch.equal(disabled, _logits(Q.quantized("llama", scheme)))


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["nf4", "int8"])
def test_mixed_batch_rows_get_their_own_adapter(scheme: str) -> None:
    model = _adapted(scheme)
    torch.manual_seed(2)
    model.add_adapter("other", lorakit.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
    model.eval()
    with torch.no_grad():
        mixed = model(input_ids=IDS, adapter_names=["default", "other"]).logits
        model.set_adapter("default")
        first = model(input_ids=IDS[:1]).logits
        model.set_adapter("other")
        second = model(input_ids=IDS[1:]).logits
    tol = _tolerance(first)
    assert (mixed[:1] - first).abs().max().item() <= tol and (mixed[1:] - second).abs().max().item() <= tol


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["nf4", "int8", "int8-ao"])
def test_gradient_checkpointing_gives_the_same_gradients(scheme: str) -> None:
    grads = []
    for checkpointing in (False, True):
        model = _adapted(scheme)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
            model.enable_input_require_grads()
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert torch.equal(grad, grads[1][name]), name


@pytest.mark.slow
def test_compiled_qlora_step_matches_eager_gradients() -> None:
    model = _adapted("nf4")
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    torch.compile(model, backend="aot_eager")(input_ids=IDS, labels=IDS).loss.backward()
    for name, grad in eager.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("scheme", ["nf4", "int8", "int8-ao"])
def test_backward_keeps_no_dense_copy_of_a_quantized_weight(scheme: str) -> None:
    model = _adapted(scheme, target_modules="all-linear")  # every quantized layer is lorakit's
    shapes = {tuple(m.dense_weight().shape) for m in model.modules() if isinstance(m, LoraLayer)}
    shapes |= {s[::-1] for s in shapes}
    saved: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        model(input_ids=IDS, labels=IDS).loss.backward()
    dense = [tuple(t.shape) for t in saved if t.is_floating_point() and tuple(t.shape) in shapes]
    assert dense == []
