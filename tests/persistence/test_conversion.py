"""PiSSA / OLoRA → plain LoRA on save (``path_initial_model_for_weight_conversion``): the saved
rank-2r adapter equals PEFT's file for file, applies to the untouched base in lorakit and in PEFT
with the trained model's outputs, and the refusals."""

from __future__ import annotations

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file
from zoo import gpt2, ids, llama

import lorakit


def _trained(lib, base, init, **kw):
    torch.manual_seed(0)
    config = lib.LoraConfig(
        **{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": init, **kw}
    )
    model = lib.get_peft_model(copy.deepcopy(base), config)
    return model


def _train(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parity
@pytest.mark.parametrize(
    ("build", "init", "targets"),
    [
        (llama, "pissa", ["q_proj", "v_proj"]),
        (llama, "olora", ["q_proj", "down_proj"]),
        (gpt2, "pissa", ["c_attn", "c_proj"]),
    ],
)
def test_converted_adapter_matches_peft_and_applies_to_the_original_base(tmp_path, build, init, targets):
    base, x = build(), ids()
    outputs = {}
    for lib in (lorakit, peft):
        model = _trained(lib, base, init, target_modules=targets)
        model.save_pretrained(tmp_path / lib.__name__ / "init")
        _train(model)
        with torch.no_grad():
            outputs[lib.__name__] = model(x).logits
        model.save_pretrained(
            tmp_path / lib.__name__ / "plain",
            path_initial_model_for_weight_conversion=str(tmp_path / lib.__name__ / "init"),
        )
    ours = load_file(tmp_path / "lorakit" / "plain" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "plain" / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        torch.testing.assert_close(ours[key], value, atol=1e-6, rtol=1e-5, msg=key)
    config = lorakit.LoraConfig.from_pretrained(tmp_path / "lorakit" / "plain")
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (8, 16, True)
    for saved_by in ("lorakit", "peft"):
        for lib in (lorakit, peft):
            loaded = lib.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / saved_by / "plain"))
            with torch.no_grad():
                torch.testing.assert_close(loaded(x).logits, outputs[saved_by], atol=1e-5, rtol=1e-4)


def test_dora_and_mismatched_initial_adapters_are_refused(tmp_path):
    base = llama()
    model = _trained(lorakit, base, "pissa", use_dora=True)
    model.save_pretrained(tmp_path / "init")
    with pytest.raises(lorakit.AdapterError, match="DoRA adapters cannot be converted"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
    other = _trained(lorakit, base, "pissa", target_modules=["q_proj"])
    other.save_pretrained(tmp_path / "q_only")
    plain = _trained(lorakit, base, "pissa")
    with pytest.raises(lorakit.AdapterError, match=r"lacks 4 tensor\(s\) of this adapter"):
        plain.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "q_only")
    assert not (tmp_path / "out").exists()
