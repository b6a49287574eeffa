"""Resizing an adapter's rank: the error is the Eckart-Young bound, a true rank is kept losslessly,
and the resized adapter loads in PEFT and lorakit."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from zoo import llama_wide

from lorakit import LoraConfig, get_peft_model, get_peft_model_state_dict
from lorakit.rank import resize_adapter


def _known(d: int, k: int, sigma: list[float], s: float, seed: int = 0):
    """Factors with ΔW = s·B·A = U diag(σ) Vᵀ exactly (U, V orthonormal)."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, len(sigma), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, len(sigma), generator=gen, dtype=torch.float64))
    b = u * torch.tensor(sigma, dtype=torch.float64) / s
    return v.T.contiguous(), b


def _adapter(sigma: list[float], r: int, s: float):
    a, b = _known(16, 12, sigma + [0.0] * (r - len(sigma)), s)
    config = LoraConfig(r=r, lora_alpha=s * r, target_modules=["proj"])
    return config, {
        "base_model.model.proj.lora_A.weight": a.float(),
        "base_model.model.proj.lora_B.weight": b.float(),
    }


@pytest.mark.parametrize("new_rank", [1, 2, 3, 6])
def test_resize_error_is_the_eckart_young_bound(new_rank):
    sigma = [5.0, 3.0, 2.0, 1.0]
    config, sd = _adapter(sigma, 6, 2.0)
    result = resize_adapter(config, sd, rank=new_rank)
    expected = math.sqrt(sum(x**2 for x in sigma[new_rank:]) / sum(x**2 for x in sigma))
    assert result.errors["proj"] == pytest.approx(expected, abs=1e-6)
    s_new = result.config.scaling_for(new_rank, result.config.lora_alpha)
    a2, b2 = sd_pair(result.state_dict)
    assert a2.shape == (new_rank, 12) and b2.shape == (16, new_rank)
    a1, b1 = sd_pair(sd)
    full = 2.0 * b1.double() @ a1.double()
    approx = s_new * b2.double() @ a2.double()
    assert float((full - approx).norm() / full.norm()) == pytest.approx(expected, abs=1e-5)


def sd_pair(sd):
    return sd["base_model.model.proj.lora_A.weight"], sd["base_model.model.proj.lora_B.weight"]


def test_resize_to_true_rank_is_lossless_and_energy_mode_picks_it():
    config, sd = _adapter([4.0, 2.0, 1.0], 8, 0.5)
    for result in (resize_adapter(config, sd, rank=3), resize_adapter(config, sd, energy=0.999999)):
        assert result.ranks == {"proj": 3}
        assert result.errors["proj"] < 1e-6


def test_resize_rejects_bad_arguments():
    config, sd = _adapter([1.0], 2, 1.0)
    for kwargs in ({}, {"rank": 2, "energy": 0.9}, {"rank": 0}, {"energy": 1.5}):
        with pytest.raises(ValueError):
            resize_adapter(config, sd, **kwargs)


@pytest.mark.parity
def test_resized_adapter_loads_in_peft_and_lorakit_with_per_module_ranks():
    model = get_peft_model(
        llama_wide(),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    sd = get_peft_model_state_dict(model)
    result = resize_adapter(model.peft_config["default"], sd, energy=0.9)
    assert len(set(result.ranks.values())) >= 1 and all(1 <= k <= 8 for k in result.ranks.values())
    ids = torch.randint(0, 100, (2, 5))
    outs = []
    for lib in (peft, __import__("lorakit")):
        cfg = lib.LoraConfig(**{k: v for k, v in result.config.to_dict().items() if k != "task_type"})
        m = lib.get_peft_model(llama_wide(), cfg)
        lib.set_peft_model_state_dict(m, result.state_dict)
        outs.append(m(input_ids=ids).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-4)


@pytest.mark.parity
def test_resized_adapter_written_to_disk_loads_in_peft(tmp_path):
    from lorakit.persistence.adapter_dir import read_adapter, save_adapter_tensors

    model = get_peft_model(
        llama_wide(),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "full")
    files = read_adapter(tmp_path / "full")
    result = resize_adapter(files.config, files.tensors, rank=8)
    assert max(result.errors.values()) < 1e-6
    save_adapter_tensors(tmp_path / "same", result.config, result.state_dict)
    ids = torch.randint(0, 100, (2, 5))
    reloaded = peft.PeftModel.from_pretrained(llama_wide(), tmp_path / "same")
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_attention_resizes_in_proj_and_out_proj_to_one_rank():
    """Both of an attention's adapters live under one target and share its rank; at full rank the
    resized adapter computes the same outputs."""
    from zoo import attention

    config = LoraConfig(target_modules=["mha", "lin0"], r=6, init_lora_weights=False)
    model = get_peft_model(attention(), config)
    by_energy = resize_adapter(config, get_peft_model_state_dict(model), energy=0.5)
    assert by_energy.ranks["mha"] == by_energy.ranks["mha.base_layer.out_proj"]
    full = resize_adapter(config, get_peft_model_state_dict(model), rank=6)
    resized = get_peft_model(attention(), full.config)
    from lorakit import set_peft_model_state_dict

    set_peft_model_state_dict(resized, full.state_dict)
    x = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(resized(x), model(x), rtol=1e-5, atol=1e-6)


def test_grouped_convolutions_are_not_resized():
    from zoo import conv_groups

    from lorakit.errors import AdapterError

    config = LoraConfig(target_modules=["conv2d", "lin0"])
    state = get_peft_model_state_dict(get_peft_model(conv_groups(), config))
    with pytest.raises(AdapterError, match=r"grouped convolutions: \['conv2d'\]"):
        resize_adapter(config, state, rank=2)
