"""The base-weight fingerprint: equal for the same weights in any float dtype, different otherwise."""

from __future__ import annotations

import torch
from zoo import tiny

from lorakit import LoraConfig
from lorakit.model import injection
from lorakit.persistence.fingerprint import Fingerprint, fingerprint


def _targets(model):
    return [(n, m) for n, m in model.named_modules() if n in ("fc1", "fc2", "emb")]


def test_same_weights_match_and_json_roundtrips():
    fp = fingerprint(_targets(tiny(0)))
    again = Fingerprint.from_json(fp.to_json())
    assert again == fp and again.digest() == fp.digest()
    assert fp.differences(fingerprint(_targets(tiny(0)))) == []


def test_dtype_casts_match():
    fp = fingerprint(_targets(tiny(0)))
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert fp.differences(fingerprint(_targets(tiny(0).to(dtype)))) == [], dtype


def test_different_weights_and_shapes_differ():
    fp = fingerprint(_targets(tiny(0)))
    diffs = fp.differences(fingerprint(_targets(tiny(1))))
    assert len(diffs) == 3 and all("sampled weight" in d for d in diffs)
    small = tiny(0)
    small.fc1 = torch.nn.Linear(8, 12)
    assert any(
        "weight shape (16, 8) when trained, (12, 8) now" in d
        for d in fp.differences(fingerprint(_targets(small)))
    )


def test_one_changed_element_in_a_sample_position_is_detected():
    model = tiny(0)
    fp = fingerprint(_targets(model))
    with torch.no_grad():
        model.fc2.weight.view(-1)[-1] += 0.5
    assert [d.split(":")[0] for d in fp.differences(fingerprint(_targets(model)))] == ["fc2"]


def test_merged_layers_use_the_original_weight():
    model = tiny(0)
    fp = fingerprint(_targets(model))
    injection.inject(model, LoraConfig(target_modules=["fc1"], init_lora_weights=False), "a")
    model.fc1.set_active(["a"])
    model.fc1.merge()
    assert fp.differences(fingerprint(_targets(model))) == []


def test_unreadable_weights_are_skipped():
    assert fingerprint([("m", torch.nn.Linear(2, 2, device="meta"))]) is None
    assert Fingerprint.from_json("not json") is None
