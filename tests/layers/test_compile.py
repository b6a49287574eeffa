"""torch.compile sees no graph break inside lorakit code, with dropout, in training mode."""

from __future__ import annotations

import pytest
import torch
from zoo import llama_wide

import lorakit

pytestmark = pytest.mark.slow


def test_no_graph_break_in_training_forward_with_dropout():
    base = llama_wide(seed=0, layers=2)
    model = lorakit.get_peft_model(
        base, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    )
    model.train()
    ids = torch.randint(0, 100, (2, 8))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=ids)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_compiled_training_step_matches_eager_gradients():
    base = llama_wide(seed=0, layers=1)
    model = lorakit.get_peft_model(
        base, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    ids = torch.randint(0, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    compiled(input_ids=ids, labels=ids).loss.backward()
    for name, grad in eager.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)


def test_dora_training_forward_compiles_without_graph_break_and_matches_eager():
    base = llama_wide(seed=0, layers=1)
    model = lorakit.get_peft_model(
        base,
        lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False),
    )
    ids = torch.randint(0, 100, (2, 8))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(input_ids=ids)
    assert explanation.graph_break_count == 0, [b.reason for b in explanation.break_reasons]
    model(input_ids=ids, labels=ids).loss.backward()
    eager = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in eager)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    torch.compile(model, backend="aot_eager")(input_ids=ids, labels=ids).loss.backward()
    for name, grad in eager.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6)
