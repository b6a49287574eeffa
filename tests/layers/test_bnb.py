"""bitsandbytes kinds (``layers/bnb.py``): ``deq(Q)`` equals bitsandbytes' own dequantization, and
bitsandbytes' CPU repacking (AVX512-BF16 CPUs: Intel Sapphire Rapids+, AMD Zen 4+) is handled.

The repacking tests assert what must hold on every CPU (stored data untouched by an eval forward,
gradients through every layer after evaluating); on CPUs without AVX512-BF16 bitsandbytes never
repacks and they hold trivially, on CPUs with it they fail without lorakit's handling (the CI
machines of this project have it: ``test_this_cpu_exercises_the_repacking`` says which ran).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import quantized as Q

import lorakit
from lorakit.layers import LoraLayer

bnb = pytest.importorskip("bitsandbytes")

IDS = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def _bnb_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


@pytest.mark.parametrize("scheme", ["nf4", "fp4", "int8"])
def test_dequantized_weight_is_bitsandbytes_own_dequantization(scheme: str) -> None:
    model = lorakit.get_peft_model(
        Q.quantized("llama", scheme), lorakit.LoraConfig(target_modules="all-linear")
    )
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(layers) == 14
    for layer in layers:
        weight = layer.base_layer.weight
        if scheme == "int8":
            state = layer.base_layer.state
            reference = bnb.functional.int8_vectorwise_dequant(
                weight.data, weight.SCB if weight.SCB is not None else state.SCB
            )
        else:
            reference = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)  # float32 model
        assert layer.dequantized().dtype == torch.float32
        assert torch.equal(layer.dequantized(), reference.float())


def test_this_cpu_exercises_the_repacking() -> None:
    """Not a check: records whether bitsandbytes repacks 4-bit weights on this CPU."""
    repacks = bnb.functional.has_avx512bf16()
    print(f"bitsandbytes repacks 4-bit weights for CPU inference here: {repacks}")


def _snapshot(model: nn.Module) -> list[torch.Tensor]:
    out = []
    for layer in _bnb_layers(model):
        out.append(layer.weight.data.clone())
        out.extend(v.clone() for v in layer.weight.quant_state.as_dict(packed=True).values())
    return out


@pytest.mark.parametrize("target_modules", [["q_proj", "v_proj"], "all-linear"])
def test_eval_forward_leaves_every_4bit_layer_as_stored_and_training_still_reaches_every_adapter(
    target_modules,
) -> None:
    model = lorakit.get_peft_model(
        Q.quantized("llama", "nf4"),
        lorakit.LoraConfig(target_modules=target_modules, init_lora_weights=False),
    )
    before = _snapshot(model)
    model.train()
    with torch.no_grad():
        train_out = model(input_ids=IDS).logits
    model.eval()
    with torch.no_grad():
        eval_out = model(input_ids=IDS).logits
    after = _snapshot(model)
    assert len(before) == len(after) and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert torch.equal(train_out, eval_out)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    missing = [
        n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert missing == []


def _nf4(dense: nn.Linear) -> nn.Module:
    layer = bnb.nn.Linear4bit(
        dense.in_features,
        dense.out_features,
        bias=dense.bias is not None,
        compute_dtype=torch.float32,
        quant_type="nf4",
    )
    layer.weight = bnb.nn.Params4bit(
        dense.weight.data.clone(), requires_grad=False, quant_type="nf4", module=layer
    ).to("cpu")
    if dense.bias is not None:
        layer.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return layer


def test_a_model_evaluated_before_it_is_adapted_trains_through_every_layer() -> None:
    torch.manual_seed(0)
    base = nn.Sequential(_nf4(nn.Linear(64, 64, bias=False)), nn.ReLU(), _nf4(nn.Linear(64, 64, bias=False)))
    x = torch.randn(3, 64)
    with torch.no_grad():
        base.eval()(x)  # bitsandbytes repacks both layers here on AVX512-BF16 CPUs
    model = lorakit.inject_adapter_in_model(
        lorakit.LoraConfig(target_modules=["0"], init_lora_weights=False), base
    )
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in _bnb_layers(model))
    model.train()
    model(x).square().sum().backward()  # through the second layer, which is not adapted
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert len(grads) == 2 and all(g is not None and g.any() for g in grads)


def test_a_4bit_layer_with_bias_and_in_features_not_a_multiple_of_64_evaluates() -> None:
    """bitsandbytes' repacked CPU path fails on such layers; lorakit never takes it."""
    torch.manual_seed(0)
    dense = nn.Linear(48, 32, bias=True)
    layer = _nf4(dense)
    model = lorakit.inject_adapter_in_model(
        lorakit.LoraConfig(target_modules=["0"]), nn.Sequential(layer).eval()
    )
    x = torch.randn(3, 48)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert torch.equal(first, second)
    deq = model[0].dequantized()
    assert torch.allclose(first, x @ deq.T + dense.bias, atol=48 * 2**-24 * 64)
