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
        ({"init_lora_weights": "loftq"}, ["'loftq'", "needs loftq_config", "LoftQConfig"]),
        (
            {"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 3, "iters": 2}},
            ["loftq_bits", "3", "one of 4, 8", "unknown key(s) ['iters']"],
        ),
        ({"init_lora_weights": "eva", "eva_config": {"rho": 0.5}}, ["eva_config", "rho=0.5", ">= 1.0"]),
        ({"init_lora_weights": "eva", "eva_config": {"rank": 2}}, ["eva_config", "'rank'", "tau"]),
        ({"init_lora_weights": "lora_ga", "lora_ga_config": {"direction": "AB"}}, ["'AB'", "ArB2r"]),
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
    "init", ["gaussian", "pissa", "pissa_niter_16", "olora", "orthogonal", "eva", "lora_ga", "mica"]
)
@pytest.mark.filterwarnings("ignore:init_lora_weights=:UserWarning")  # the data inits' default sub-configs
def test_config_round_trip_and_peft_accepts_the_same_value(init):
    config = lorakit.LoraConfig(init_lora_weights=init, r=4)
    assert lorakit.LoraConfig.from_dict(config.to_dict()) == config
    assert peft.LoraConfig(init_lora_weights=init, r=4).init_lora_weights == init


@pytest.mark.parity
@pytest.mark.parametrize(
    ("init", "field", "sub"),
    [
        ("eva", "eva_config", dict(rho=1.5, tau=0.9, whiten=True, adjust_scaling_factors=False)),
        ("lora_ga", "lora_ga_config", dict(direction="ArBr", scale="gd_scale", stable_gamma=8)),
    ],
)
def test_data_init_sub_configs_are_peft_json(init, field, sub, tmp_path):
    """The sub-config is written as PEFT writes it (a JSON object of its fields) and read back by
    both libraries as their dataclass."""
    from lorakit.config.init_configs import EvaConfig, LoraGAConfig

    cls = {"eva_config": EvaConfig, "lora_ga_config": LoraGAConfig}[field]
    config = lorakit.LoraConfig(r=4, target_modules=["q"], init_lora_weights=init, **{field: cls(**sub)})
    config.save_pretrained(tmp_path)
    theirs = peft.LoraConfig.from_pretrained(tmp_path)
    assert getattr(theirs, field).__dict__ == getattr(config, field).__dict__
    peft_dir = tmp_path / "peft"
    theirs.save_pretrained(peft_dir)
    assert lorakit.LoraConfig.from_pretrained(peft_dir) == config


def test_data_init_without_sub_config_uses_the_defaults_with_a_warning():
    from lorakit.config.init_configs import EvaConfig

    with pytest.warns(UserWarning, match="`eva_config` is not specified"):
        config = lorakit.LoraConfig(init_lora_weights="eva")
    assert config.eva_config == EvaConfig()
    with pytest.warns(UserWarning, match="`eva_config` specified but will be ignored"):
        lorakit.LoraConfig(eva_config=EvaConfig())


def test_sub_config_fields_are_checked_on_assignment():
    config = lorakit.EvaConfig()
    config.rho = 1.5  # PEFT code sets fields after construction
    with pytest.raises(lorakit.ConfigError, match="`tau` must be between 0.0 and 1.0.: tau=2"):
        config.tau = 2
    assert (config.rho, config.tau) == (1.5, 0.99)
    with pytest.raises(lorakit.ConfigError, match="scale='x'"):
        lorakit.LoraGAConfig().scale = "x"
