"""Gradient checkpointing with frozen embeddings: in both the reentrant and the non-reentrant mode
every LoRA (and head) weight gets exactly the gradient of the run without checkpointing."""

from __future__ import annotations

import pytest
import torch
from zoo import labels_for, speech_inputs, task_model, text_inputs

from lorakit import LoraConfig, get_peft_model

CASES = {
    "llama-CAUSAL_LM": ("llama", "ForCausalLM", "CAUSAL_LM", text_inputs),
    "gpt2-CAUSAL_LM": ("gpt2", "LMHeadModel", "CAUSAL_LM", text_inputs),
    "bert-SEQ_CLS": ("bert", "ForSequenceClassification", "SEQ_CLS", text_inputs),
    # main_input_name is input_features: transformers itself does not make the inputs require grad
    "whisper-SPEECH_SEQ_2_SEQ": ("whisper", "ForConditionalGeneration", "SPEECH_SEQ_2_SEQ", speech_inputs),
}


def _grads(model, inputs, task: str, **kwargs) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**inputs, **labels_for(task), **kwargs).loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("case", list(CASES))
def test_checkpointed_gradients_equal_plain_gradients(case: str, reentrant: bool) -> None:
    arch, head, task, inputs_fn = CASES[case]
    torch.manual_seed(0)
    model = get_peft_model(task_model(arch, head), LoraConfig(task_type=task, init_lora_weights=False))
    model.train()
    assert not model.get_input_embeddings().weight.requires_grad
    expected = _grads(model, inputs_fn(), task)

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert model.is_gradient_checkpointing
    extra = {"use_cache": True} if task != "SEQ_CLS" else {}  # the cache is dropped while checkpointing
    got = _grads(model, inputs_fn(), task, **extra)
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        assert grad is not None, f"{name} got no gradient"
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7)

    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing


def test_activation_checkpointing_name_works_too() -> None:
    torch.manual_seed(0)
    model = get_peft_model(
        task_model("llama", "ForCausalLM"), LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False)
    )
    model.train()
    expected = _grads(model, text_inputs(), "CAUSAL_LM")
    model.activation_checkpointing_enable({"use_reentrant": True})
    assert model.is_activation_checkpointing
    got = _grads(model, text_inputs(), "CAUSAL_LM")
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7)
