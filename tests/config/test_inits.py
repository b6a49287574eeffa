"""The initialisation choices in LoraConfig (``init_lora_weights``): errors name the value and the
choices, and every choice survives a dict round trip and is one PEFT accepts."""

from __future__ import annotations

import peft
import pytest

import lorakit


@pytest.mark.parametrize(
    ("kwargs", "parts"),
    [
        ({"init_lora_weights": "evas"}, ["'evas'", "'pissa'", "'olora'", "'orthogonal'", "pissa_niter_<N>"]),
        ({"init_lora_weights": "corda"}, ["'corda'", "not supported", "preprocess_corda", "conversion"]),
        (
            {"init_lora_weights": "loftq"},
            ["'loftq'", "not supported", "quantize", "init_lora_weights to true"],
        ),
        ({"init_lora_weights": "lora_ga"}, ["'lora_ga'", "not supported", "gradients"]),
        ({"init_lora_weights": "pissa_niter_x"}, ["'pissa_niter_x'"]),
        ({"init_lora_weights": "orthogonal", "r": 3, "rank_pattern": {"v": 5}}, ["even", "'r': 3", "5"]),
        ({"init_lora_weights": "pissa", "lora_bias": True}, ["lora_bias", "'pissa'"]),
    ],
)
def test_config_errors_name_the_value_and_the_choices(kwargs, parts):
    with pytest.raises(lorakit.ConfigError) as err:
        lorakit.LoraConfig(**kwargs)
    for part in parts:
        assert part in str(err.value)


@pytest.mark.parity
@pytest.mark.parametrize(
    "init", ["gaussian", "pissa", "pissa_niter_16", "olora", "orthogonal", "eva", "mica"]
)
def test_config_round_trip_and_peft_accepts_the_same_value(init):
    config = lorakit.LoraConfig(init_lora_weights=init, r=4)
    assert lorakit.LoraConfig.from_dict(config.to_dict()) == config
    assert peft.LoraConfig(init_lora_weights=init, r=4).init_lora_weights == init
