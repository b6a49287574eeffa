"""LoftQ on linear layers (``layers/linear.py`` + ``layers/loftq.py``): the error it removes, per
layer and on outputs, the files it writes (PEFT's format, loadable both ways on the quantized base),
and the configs it takes or refuses.

The error reduction is ``‖W − (Q + s·B A)‖_F / ‖W − q(W)‖_F`` (< 1: better than quantizing alone);
on the zoo's random Gaussian weights a rank-4 adapter can recover little of an NF4 error that is
nearly white noise, so the bounds here only say "better"; structured pretrained weights gain more
(``benchmarks/quantized.py`` measures SmolLM2-135M).
"""

from __future__ import annotations

import peft
import pytest
import torch
from zoo import llama
from zoo import quantized as Q

import lorakit
from lorakit.layers import LoraLayer

bnb = pytest.importorskip("bitsandbytes")

IDS = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _nf4(w: torch.Tensor) -> torch.Tensor:
    codes, state = bnb.functional.quantize_4bit(w.contiguous(), blocksize=64, quant_type="nf4")
    return bnb.functional.dequantize_4bit(codes, state)


def _loftq(iters: int = 1, alpha: float = 16, bits: int = 4) -> lorakit.PeftModel:
    config = lorakit.LoraConfig(
        r=4,
        lora_alpha=alpha,
        target_modules=TARGETS,
        init_lora_weights="loftq",
        loftq_config=lorakit.LoftQConfig(loftq_bits=bits, loftq_iter=iters),
    )
    return lorakit.get_peft_model(llama(), config)


@pytest.mark.parametrize("alpha", [4, 16, 64])  # s = 1, 4, 16
def test_every_layer_is_closer_to_its_weight_than_quantizing_alone(alpha: float) -> None:
    original = dict(llama().named_modules())
    model = _loftq(alpha=alpha)
    ratios = {}
    for name, layer in model.get_base_model().named_modules():
        if isinstance(layer, LoraLayer):
            w = original[name].weight.detach()
            q = layer.base_layer.weight.detach()
            assert torch.equal(q, _nf4(w))  # the base now holds q(W)
            ratios[name] = float((w - (q + layer.delta_weight("default"))).norm() / (w - q).norm())
    assert len(ratios) == 14 and max(ratios.values()) < 1.0


def test_more_rounds_and_8_bits() -> None:
    def total_error(model: lorakit.PeftModel) -> float:
        original = dict(llama().named_modules())
        layers = [(n, m) for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)]
        return sum(
            float((original[n].weight - m.base_layer.weight - m.delta_weight("default")).norm())
            for n, m in layers
        )

    assert total_error(_loftq(iters=4)) <= total_error(_loftq(iters=1)) * (1 + 1e-6)
    assert total_error(_loftq(bits=8)) < total_error(_loftq(bits=4)) / 4  # int8 rows: a far finer grid


def test_outputs_are_closer_to_the_full_precision_model_than_the_quantized_one(tmp_path) -> None:
    reference = llama()(input_ids=IDS).logits.detach()
    model = _loftq(iters=2)
    with torch.no_grad():
        adapted = model(input_ids=IDS).logits
        with model.disable_adapter():
            quantized_only = model(input_ids=IDS).logits
    assert (adapted - reference).norm() < (quantized_only - reference).norm()

    # the deployed form: the base saved with Q, loaded in 4 bits, the adapter loaded on it
    model.save_pretrained(tmp_path / "adapter")
    base_dir = Q.saved("llama", model.unload())
    for load in (lorakit.PeftModel.from_pretrained, peft.PeftModel.from_pretrained):
        deployed = load(
            Q.no_cpu_repacking(Q.quantized("llama", "nf4-single", base_dir)), tmp_path / "adapter"
        )
        with torch.no_grad():
            logits = deployed(input_ids=IDS).logits
        # same Q (NF4 without double quantization reloads exactly) and factors: float32 roundings only
        assert (logits - adapted).abs().max() <= 14 * 6 * 2**-24 * 64 * adapted.abs().max()


def test_the_file_is_peft_loftq_recipe_format(tmp_path) -> None:
    model = _loftq()
    model.save_pretrained(tmp_path)
    saved = lorakit.LoraConfig.from_pretrained(tmp_path)
    assert saved.init_lora_weights is True and saved.loftq_config == {}  # fitted: nothing to redo on load
    assert model.peft_config["default"].init_lora_weights == "loftq"


def test_a_peft_config_asking_for_loftq_loads_onto_the_quantized_base(tmp_path) -> None:
    model = _loftq()
    model.save_pretrained(tmp_path)
    config = (tmp_path / "adapter_config.json").read_text()
    (tmp_path / "adapter_config.json").write_text(
        config.replace('"init_lora_weights": true', '"init_lora_weights": "loftq"').replace(
            '"loftq_config": {}', '"loftq_config": {"loftq_bits": 4, "loftq_iter": 1}'
        )
    )
    base_dir = Q.saved("llama", model.unload())
    loaded = lorakit.PeftModel.from_pretrained(Q.quantized("llama", "nf4-single", base_dir), tmp_path)
    assert loaded.peft_config["default"].init_lora_weights is True


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "needs loftq_config"),
        ({"loftq_config": {"loftq_bits": 3}}, "loftq_bits'\\]=3: must be one of 4, 8"),
        ({"loftq_config": {"loftq_iter": 0}}, "loftq_iter'\\]=0: must be a positive integer"),
        ({"loftq_config": {"bits": 4}}, "unknown key"),
    ],
)
def test_loftq_configs_are_checked(kwargs, message) -> None:
    with pytest.raises(lorakit.ConfigError, match=message):
        lorakit.LoraConfig(init_lora_weights="loftq", **kwargs)


def test_a_loftq_config_without_loftq_is_ignored_with_a_warning() -> None:
    with pytest.warns(
        UserWarning, match="loftq_config is set but init_lora_weights=True is not .loftq.: it is ignored"
    ):
        config = lorakit.LoraConfig(loftq_config={"loftq_bits": 4})
    assert config.loftq_config == {}


def test_loftq_on_a_quantized_base_or_an_embedding_is_refused() -> None:
    with pytest.raises(lorakit.TargetingError, match="needs the full-precision weight"):
        lorakit.get_peft_model(
            Q.quantized("llama", "nf4"),
            lorakit.LoraConfig(
                target_modules=["q_proj"], init_lora_weights="loftq", loftq_config={"loftq_bits": 4}
            ),
        )
    with pytest.raises(lorakit.TargetingError, match="linear layers only"):
        lorakit.get_peft_model(
            llama(),
            lorakit.LoraConfig(
                target_modules=["embed_tokens"], init_lora_weights="loftq", loftq_config={"loftq_bits": 4}
            ),
        )
