"""Reading LoRA factors from adapter files (lorakit.rank.factors): a grouped convolution's B spread
into the matrix with ΔW = s·B·A, and the LoRA layer an attention nests taking its target's rank."""

from __future__ import annotations

import torch
from zoo import attention, conv_groups

from lorakit import LoraConfig, get_peft_model, get_peft_model_state_dict
from lorakit.rank.factors import split_factors, target_name


def test_grouped_b_spreads_into_the_update_matrix():
    config = LoraConfig(target_modules=["conv1d"], r=8, init_lora_weights=False)
    model = get_peft_model(conv_groups(), config)
    (m,), _ = split_factors(config, get_peft_model_state_dict(model))
    layer = model.base_model.model.conv1d
    assert m.groups == 4 and m.dense_b().shape == (8, 8)
    expected = layer.delta_weight("default").flatten(1)  # (C_out, C_in·k), full
    ours = (m.dense_b() @ m.a.flatten(1)) * m.scaling
    # the same r/G products per element, summed in other orders (with exact zeros between): each
    # within (r + 1)·u·Σ|terms| of the exact sum (Higham §3.1)
    terms = (m.dense_b().abs() @ m.a.flatten(1).abs()) * m.scaling
    assert ((ours - expected).abs() <= 2 * (8 + 1) * torch.finfo(torch.float32).eps * terms).all()


def test_nested_out_proj_takes_the_attention_s_rank_and_alpha():
    config = LoraConfig(target_modules=["mha"], rank_pattern={"mha": 2}, alpha_pattern={"mha": 6})
    modules, rest = split_factors(config, get_peft_model_state_dict(get_peft_model(attention(), config)))
    assert not rest
    assert {(target_name(m.prefix), m.rank, m.scaling) for m in modules} == {("mha", 2, 3.0)}
    assert target_name("base_model.model.mha.base_layer.out_proj") == "mha"
