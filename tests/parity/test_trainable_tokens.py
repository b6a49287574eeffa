"""``trainable_token_indices`` against PEFT 0.21.2: the same modules get trainable rows (tied heads
sharing the embedding's), the same state-dict and file keys, the same outputs and gradients, files
loading both ways; several adapters, mixed batches and merging.

Indices are drawn from each model's inputs, so the trained rows are looked up (and, through a tied
head, scored) in the forward pass; every trainable tensor is perturbed before comparing.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
from safetensors import safe_open
from zoo import ZOO, main_output

import lorakit

pytestmark = [pytest.mark.parity, pytest.mark.slow]

ATOL, RTOL = 1e-5, 1e-4  # as tests/parity/test_models.py
BASE = {"r": 4, "lora_alpha": 8, "init_lora_weights": False}


def _present(arch: str) -> list[int]:
    """Two token ids of the inputs (encoder and decoder side) and one that does not occur."""
    inputs = ZOO[arch].inputs()
    ids = (
        inputs["input_ids"][0, :1].tolist()
        + inputs.get("decoder_input_ids", inputs["input_ids"])[1, :1].tolist()
    )
    absent = next(
        i for i in range(3, 100) if all(i not in t for t in inputs.values() if t.dtype == torch.long)
    )
    return sorted(set(ids)) + [absent]


# case → (zoo model, LoraConfig kwargs given the indices, the modules PEFT wraps)
CASES = {
    "llama-list": ("llama", lambda i: {"target_modules": ["q_proj", "v_proj"], "trainable_token_indices": i}),
    "llama_tied-list": ("llama_tied", lambda i: {"target_modules": ["q_proj"], "trainable_token_indices": i}),
    "llama_tied-dict-same-rows": (
        "llama_tied",
        lambda i: {
            "target_modules": ["o_proj"],
            "trainable_token_indices": {"lm_head": i, "embed_tokens": i},
        },
    ),
    "llama_tied-dict-other-rows": (
        "llama_tied",
        lambda i: {
            "target_modules": ["o_proj"],
            "trainable_token_indices": {"lm_head": i[:1], "embed_tokens": i},
        },
    ),
    "gpt2-list": ("gpt2", lambda i: {"target_modules": ["c_attn"], "trainable_token_indices": i}),
    "t5-shared": ("t5", lambda i: {"target_modules": ["q", "v"], "trainable_token_indices": {"shared": i}}),
    "bart-embed_tokens": (
        "bart",
        lambda i: {"target_modules": ["q_proj"], "trainable_token_indices": {"embed_tokens": i}},
    ),
}


def _wrapped(model):
    return sorted(n for n, m in model.named_modules() if type(m).__name__ == "TrainableTokensWrapper")


def _perturb_and_copy(theirs, ours):
    """Move every adapter tensor of PEFT's model (trainable or not) and copy it into ours."""
    gen = torch.Generator().manual_seed(1)
    mine = dict(ours.named_parameters())
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name or "trainable_tokens_delta" in name:
                param.add_(torch.randn(param.shape, generator=gen) * 0.1)
                mine[name].copy_(param)


def _out(model, arch):
    return main_output(model(**ZOO[arch].inputs()))


def _file_keys(path):
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as fh:
        return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}  # noqa: SIM118


@pytest.mark.parametrize("case", CASES)
def test_tokens_match_peft(case, tmp_path, parity_diffs):
    arch, make = CASES[case]
    kwargs = {**BASE, **make(_present(arch))}
    base_out = _out(ZOO[arch].build(), arch).detach()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's deprecation chatter
        theirs = peft.get_peft_model(ZOO[arch].build(), peft.LoraConfig(**kwargs))
    ours = lorakit.get_peft_model(ZOO[arch].build(), lorakit.LoraConfig(**kwargs))

    # the same modules wrapped, the same state-dict keys, the same trainable parameters
    assert _wrapped(ours) == _wrapped(theirs) != []
    assert list(ours.state_dict()) == list(theirs.state_dict())
    trainable = sorted(n for n, p in theirs.named_parameters() if p.requires_grad)
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == trainable
    _perturb_and_copy(theirs, ours)

    # outputs and gradients
    expected, got = _out(theirs, arch), _out(ours, arch)
    assert (expected - base_out).abs().max() > 1e-3
    parity_diffs[f"tokens-{case}"] = (got - expected).abs().max().item()
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=RTOL)
    expected.pow(2).mean().backward()
    got.pow(2).mean().backward()
    mine = dict(ours.named_parameters())
    for name, param in theirs.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(mine[name].grad, param.grad, atol=ATOL, rtol=RTOL, msg=name)

    # files: the same keys and shapes, and each library loads the other's with the same outputs
    for lib, model in (("peft", theirs), ("lorakit", ours)):
        model.eval()
        model.save_pretrained(tmp_path / lib)
    assert _file_keys(tmp_path / "lorakit") == _file_keys(tmp_path / "peft")
    assert any("token_adapter.trainable_tokens_delta" in k for k in _file_keys(tmp_path / "peft"))
    with torch.no_grad():
        ours_from_peft = lorakit.PeftModel.from_pretrained(ZOO[arch].build(), tmp_path / "peft")
        torch.testing.assert_close(_out(ours_from_peft, arch), expected.detach(), atol=ATOL, rtol=RTOL)
        peft_from_ours = peft.PeftModel.from_pretrained(ZOO[arch].build(), tmp_path / "lorakit")
        torch.testing.assert_close(_out(peft_from_ours, arch), got.detach(), atol=ATOL, rtol=RTOL)


def _two_adapters(lib):
    model = lib.get_peft_model(
        ZOO["llama_tied"].build(),
        lib.LoraConfig(**BASE, target_modules=["q_proj"], trainable_token_indices=_present("llama")[:2]),
        adapter_name="a",
    )
    model.add_adapter(
        "b", lib.LoraConfig(**BASE, target_modules=["v_proj"], trainable_token_indices=_present("llama")[2:])
    )
    return model


def test_several_adapters_mixed_batches_and_merges_match_peft(tmp_path):
    """Two adapters with their own rows on a tied model: each alone, a mixed batch, and the merge;
    PEFT's merge_and_unload gives the same model, still tied."""
    theirs, ours = _two_adapters(peft), _two_adapters(lorakit)
    _perturb_and_copy(theirs, ours)
    inputs = ZOO["llama"].inputs()
    rows = ["a", "b"][: inputs["input_ids"].shape[0]]
    with torch.no_grad():
        for model in (theirs, ours):
            model.eval()
        for name in ("a", "b"):
            theirs.set_adapter(name)
            ours.set_adapter(name)
            torch.testing.assert_close(_out(ours, "llama"), _out(theirs, "llama"), atol=ATOL, rtol=RTOL)
        mixed = main_output(ours(**inputs, adapter_names=rows))
        torch.testing.assert_close(
            mixed, main_output(theirs(**inputs, adapter_names=rows)), atol=ATOL, rtol=RTOL
        )

        ours.set_adapter("b")
        unmerged = _out(ours, "llama")
        ours.merge_adapter()
        torch.testing.assert_close(_out(ours, "llama"), unmerged, atol=ATOL, rtol=RTOL)
        ours.unmerge_adapter()
        assert torch.equal(_out(ours, "llama"), unmerged)  # rows written back bit for bit

        theirs.set_adapter("b")
        merged = ours.merge_and_unload()
        peft_merged = theirs.merge_and_unload()
        assert merged.lm_head.weight is merged.model.embed_tokens.weight  # still tied
        torch.testing.assert_close(_out(merged, "llama"), _out(peft_merged, "llama"), atol=ATOL, rtol=RTOL)
