"""Extracting an adapter from a tuned model: an exact-rank ΔW reproduces the tuned model in PEFT, and
a lower rank reports its error."""

from __future__ import annotations

import peft
import pytest
import torch
from transformers import LlamaForCausalLM
from zoo import llama_wide

from lorakit import get_peft_model, set_peft_model_state_dict
from lorakit.persistence.keys import to_file_keys
from lorakit.rank.extract import extract_adapter


@pytest.mark.parity
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
