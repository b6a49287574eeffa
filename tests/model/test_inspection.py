"""``lorakit.inspect``: the targetable modules of a model, GPT-2's Conv1D, and after injection."""

from __future__ import annotations

from zoo import gpt2, llama

import lorakit
from lorakit import LoraConfig


def test_inspect_lists_targetable_modules():
    model = llama()
    report = lorakit.inspect(model)
    assert report.model_type == "llama"
    assert report.default_targets == ["q_proj", "v_proj"]
    rows = {row["name"]: row for row in report.modules}
    q = rows["model.layers.0.self_attn.q_proj"]
    assert (q["type"], q["shape"], q["params"], q["default"]) == ("Linear", (16, 16), 256, True)
    assert rows["model.layers.0.self_attn.k_proj"]["shape"] == (8, 16)  # 1 kv head of size 8
    assert rows["model.layers.0.self_attn.k_proj"]["default"] is False
    assert rows["model.embed_tokens"]["type"] == "Embedding"
    assert "model.norm" not in rows
    assert sum(row["default"] for row in report.modules) == 4
    text = str(report)
    assert "model.layers.1.mlp.down_proj" in text and "yes" in text


def test_inspect_gpt2_conv1d_and_after_injection():
    model = gpt2()
    rows = {row["name"]: row for row in lorakit.inspect(model).modules}
    assert rows["transformer.h.0.attn.c_attn"]["type"] == "Conv1D"
    assert rows["transformer.h.0.attn.c_attn"]["shape"] == (16, 48)
    assert rows["transformer.h.0.attn.c_attn"]["params"] == 16 * 48 + 48
    lorakit.inject_adapter_in_model(LoraConfig(target_modules=["c_attn"]), model)
    after = {row["name"]: row for row in lorakit.inspect(model).modules}
    assert after == rows  # the wrapped modules are still listed as their base layers


def test_inspect_lists_the_parameters_of_experts():
    from zoo import moe

    report = lorakit.inspect(moe("mixtral"))
    names = [p["name"] for p in report.parameters]
    assert "model.layers.0.mlp.experts.gate_up_proj" in names and "model.layers.1.mlp.gate.weight" in names
    text = str(report)
    assert "parameters for target_parameters" in text and "MixtralExperts" in text
