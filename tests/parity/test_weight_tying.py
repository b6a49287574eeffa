"""``ensure_weight_tying`` against PEFT 0.21.2 on a Llama whose lm_head shares the embedding weight:
the same rewritten config, the head's adapter in the same memory as the embedding's, the same keys,
outputs and gradients, files loading both ways; and merges that keep the pair tied and exact (PEFT
adds the shared ΔW twice when it merges LoRA factors of a tied pair)."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
from safetensors import safe_open
from zoo import ZOO, main_output

import lorakit

pytestmark = [pytest.mark.parity, pytest.mark.slow]

ATOL, RTOL = 1e-5, 1e-4  # as tests/parity/test_models.py
BASE = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "ensure_weight_tying": True}
CASES = {
    "targets-embed_tokens": {"target_modules": ["q_proj", "embed_tokens"]},
    "targets-lm_head": {"target_modules": ["q_proj", "lm_head"]},
    "targets-regex": {"target_modules": ".*(q_proj|lm_head)"},
    "saves-lm_head": {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
}


def _out(model):
    return main_output(model(**ZOO["llama_tied"].inputs()))


def _shared(model, lora: bool) -> bool:
    """Whether the head's adapter tensors are the embedding's (same memory)."""
    embedding, head = model.base_model.model.model.embed_tokens, model.base_model.model.lm_head
    if lora:
        return (
            head.lora_A["default"].weight.data_ptr() == embedding.lora_embedding_B["default"].data_ptr()
            and head.lora_B["default"].weight.data_ptr() == embedding.lora_embedding_A["default"].data_ptr()
        )
    return head.modules_to_save["default"].weight is embedding.modules_to_save["default"].weight


@pytest.mark.parametrize("case", CASES)
def test_tied_adapters_match_peft(case, tmp_path):
    kwargs = {**BASE, **CASES[case]}
    lora = "modules_to_save" not in kwargs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(ZOO["llama_tied"].build(), peft.LoraConfig(**kwargs))
    ours = lorakit.get_peft_model(ZOO["llama_tied"].build(), lorakit.LoraConfig(**kwargs))
    assert _shared(theirs, lora) and _shared(ours, lora)
    for field in ("target_modules", "modules_to_save"):
        value = getattr(theirs.peft_config["default"], field)
        assert getattr(ours.peft_config["default"], field) == (
            sorted(value) if isinstance(value, set) else value
        )
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        n for n, p in theirs.named_parameters() if p.requires_grad
    )

    gen = torch.Generator().manual_seed(1)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, param in theirs.named_parameters():  # shared tensors move once per name, in both
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
                mine[name].copy_(param)
    assert _shared(ours, lora)
    expected, got = _out(theirs), _out(ours)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    expected.pow(2).mean().backward()
    got.pow(2).mean().backward()
    for name, param in theirs.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(mine[name].grad, param.grad, atol=ATOL, rtol=RTOL, msg=name)

    for lib, model in (("peft", theirs), ("lorakit", ours)):
        model.eval()
        model.save_pretrained(tmp_path / lib)
    keys = []
    for lib in ("peft", "lorakit"):
        with safe_open(str(tmp_path / lib / "adapter_model.safetensors"), "pt") as fh:
            keys.append({k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()})  # noqa: SIM118
    assert keys[0] == keys[1]
    assert (
        json.loads((tmp_path / "lorakit" / "adapter_config.json").read_text())["ensure_weight_tying"] is True
    )
    with torch.no_grad():
        from_peft = lorakit.PeftModel.from_pretrained(ZOO["llama_tied"].build(), tmp_path / "peft")
        assert _shared(from_peft, lora)
        torch.testing.assert_close(_out(from_peft), expected.detach(), atol=ATOL, rtol=RTOL)
        from_ours = peft.PeftModel.from_pretrained(ZOO["llama_tied"].build(), tmp_path / "lorakit")
        torch.testing.assert_close(_out(from_ours), got.detach(), atol=ATOL, rtol=RTOL)

        # merging: the tied pair changes once, unmerging restores it bit for bit, unloading keeps it tied
        unmerged = _out(ours)
        weight = ours.base_model.model.model.embed_tokens.weight.clone()
        ours.merge_adapter()
        torch.testing.assert_close(_out(ours), unmerged, atol=ATOL, rtol=RTOL)
        ours.unmerge_adapter()
        assert torch.equal(ours.base_model.model.model.embed_tokens.weight, weight)
        merged = ours.merge_and_unload()
        assert merged.lm_head.weight is merged.model.embed_tokens.weight
        torch.testing.assert_close(_out(merged), unmerged, atol=ATOL, rtol=RTOL)
        if lora:  # the documented difference: PEFT's merge adds the tied ΔW twice
            peft_merged = theirs.merge_and_unload()
            assert (_out(peft_merged) - expected).abs().max() > 1e-2
