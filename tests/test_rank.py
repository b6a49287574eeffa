"""Spectrum, resize and extract: checked against direct SVDs of the formed ΔW and against PEFT."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaForCausalLM
from zoo import llama_wide

from lorakit import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from lorakit.persistence.keys import to_file_keys
from lorakit.rank import resize_adapter, spectrum
from lorakit.rank.extract import extract_adapter
from lorakit.rank.spectrum import effective_rank, stable_rank


def _known(d: int, k: int, sigma: list[float], s: float, seed: int = 0):
    """Factors with ΔW = s·B·A = U diag(σ) Vᵀ exactly (U, V orthonormal)."""
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, len(sigma), generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(k, len(sigma), generator=gen, dtype=torch.float64))
    b = u * torch.tensor(sigma, dtype=torch.float64) / s
    return v.T.contiguous(), b


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.01, 10.0), min_size=1, max_size=8), st.floats(0.1, 4.0))
def test_singular_values_match_direct_svd(sigma, s):
    a, b = _known(20, 24, sigma, s)
    sp = spectrum(a, b, s)
    direct = torch.linalg.svdvals(s * b @ a)[: len(sigma)]
    assert torch.allclose(torch.tensor(sp.singular_values, dtype=torch.float64), direct, atol=1e-5)
    assert sp.singular_values == sorted(sp.singular_values, reverse=True)
    p = direct / direct.sum()
    assert sp.effective_rank == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-6)
    assert sp.stable_rank == pytest.approx(float((direct**2).sum() / direct.max() ** 2), rel=1e-6)
    assert sp.energy[-1] == pytest.approx(1.0)


def test_energy_levels_and_degenerate_updates():
    a, b = _known(30, 30, [10.0, 4.0, 2.0, 1.0], 2.0)  # energy 0.826, 0.959, 0.992, 1
    sp = spectrum(a, b, 2.0)
    assert sp.ranks_for_energy == {0.90: 2, 0.95: 2, 0.99: 3}
    assert effective_rank(torch.zeros(4)) == 0.0 and stable_rank(torch.zeros(4)) == 0.0
    zero = spectrum(torch.randn(4, 8), torch.zeros(6, 4), 1.0)
    assert zero.ranks_for_energy[0.9] == 0 and zero.effective_rank == 0.0


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


def test_extract_exact_rank_delta_reproduces_the_tuned_model_in_peft(tmp_path):
    base, tuned = llama_wide(), llama_wide()
    tuned.load_state_dict(base.state_dict())
    k = 3
    with torch.no_grad():
        for name, module in tuned.named_modules():
            if name.endswith(("q_proj", "down_proj")):
                d, n = module.weight.shape
                module.weight += 0.1 * torch.randn(d, k) @ torch.randn(k, n)
        tuned.model.norm.weight += 0.5
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    result = extract_adapter(tmp_path / "base", tmp_path / "tuned", rank=k)
    assert set(result.ranks.values()) == {k} and len(result.ranks) == 4
    by_energy = extract_adapter(tmp_path / "base", tmp_path / "tuned", energy=0.9999)
    assert set(by_energy.ranks.values()) == {k}  # the energy mode finds the true rank per module
    assert max(result.errors.values()) < 1e-6
    assert result.modules_to_save == ["model.norm"]
    cfg = peft.LoraConfig(**{kk: v for kk, v in result.config.to_dict().items() if kk != "task_type"})
    loaded = peft.get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), cfg)
    peft.set_peft_model_state_dict(loaded, to_file_keys(result.state_dict))
    ids = torch.randint(0, 100, (2, 7))
    torch.testing.assert_close(loaded(input_ids=ids).logits, tuned(input_ids=ids).logits, atol=1e-5, rtol=0)
    lk = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), result.config)
    set_peft_model_state_dict(lk, to_file_keys(result.state_dict))
    torch.testing.assert_close(lk(input_ids=ids).logits, tuned(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_extract_at_lower_rank_reports_the_error(tmp_path):
    base, tuned = llama_wide(), llama_wide(seed=1)  # unrelated weights: every linear changed at full rank
    base.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    result = extract_adapter(tmp_path / "base", tmp_path / "tuned", rank=2)
    assert all(0.3 < e < 1.0 for e in result.errors.values())
    assert "lm_head" in result.modules_to_save and "model.embed_tokens" in result.modules_to_save


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
