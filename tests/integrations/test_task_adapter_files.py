"""Every task type's adapter (and head), saved with save_pretrained, loads in real PEFT 0.21 with the
same outputs, and back into lorakit (as a new adapter, and into an existing one as Trainer resumes)."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from safetensors import safe_open
from zoo import choice_inputs, image_inputs, speech_inputs, task_model, text_inputs

import lorakit
from lorakit.persistence.loading import load_weights

CASES = {
    "SEQ_CLS": ("bert", "ForSequenceClassification", text_inputs, "SEQ_CLS"),
    "TOKEN_CLS": ("roberta", "ForTokenClassification", text_inputs, "TOKEN_CLS"),
    "QUESTION_ANS": ("bert", "ForQuestionAnswering", text_inputs, "QUESTION_ANS"),
    "MULTIPLE_CHOICE": ("bert", "ForMultipleChoice", choice_inputs, None),
    "IMAGE_CLASSIFICATION": ("vit", "ForImageClassification", image_inputs, None),
    "CAUSAL_LM": ("llama", "ForCausalLM", text_inputs, "CAUSAL_LM"),
    "SEQ_2_SEQ_LM": ("t5", "ForConditionalGeneration", text_inputs, "SEQ_2_SEQ_LM"),
    "TRANSLATION": ("bart", "ForConditionalGeneration", text_inputs, "SEQ_2_SEQ_LM"),
    "SPEECH_SEQ_2_SEQ": ("whisper", "ForConditionalGeneration", speech_inputs, "SEQ_2_SEQ_LM"),
    "FEATURE_EXTRACTION": ("bert", "Model", text_inputs, "FEATURE_EXTRACTION"),
}


def _out(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    for key in ("logits", "start_logits", "last_hidden_state"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise TypeError(type(out))


def _inputs(task: str) -> dict[str, torch.Tensor]:
    inputs = CASES[task][2]()
    if task in ("SEQ_2_SEQ_LM", "TRANSLATION", "SPEECH_SEQ_2_SEQ"):
        inputs["decoder_input_ids"] = text_inputs(seed=5)["input_ids"][:, :3]
    return inputs


@pytest.mark.parity
@pytest.mark.parametrize("task", list(CASES))
def test_saved_adapter_loads_in_peft_and_lorakit(task: str, tmp_path: Path) -> None:
    arch, head, _, peft_task = CASES[task]
    torch.manual_seed(3)
    config = lorakit.LoraConfig(task_type=task, init_lora_weights=False)
    ours = lorakit.get_peft_model(task_model(arch, head), config)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.1)  # a trained head differs from the base model's
    ours.eval()
    expected = _out(ours, _inputs(task))
    ours.save_pretrained(tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == peft_task and config["peft_type"] == "LORA"
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt"
        assert f.metadata().get("lorakit_task_type", task) == task

    theirs = peft.PeftModel.from_pretrained(task_model(arch, head), str(tmp_path)).eval()
    torch.testing.assert_close(_out(theirs.get_base_model(), _inputs(task)), expected)

    fresh = lorakit.get_peft_model(task_model(arch, head), lorakit.LoraConfig(task_type=task))
    load_weights(fresh.get_base_model(), tmp_path)
    torch.testing.assert_close(_out(fresh.eval(), _inputs(task)), expected, rtol=0, atol=0)
    reloaded = lorakit.PeftModel.from_pretrained(task_model(arch, head), tmp_path)
    assert type(reloaded) is type(ours)
    torch.testing.assert_close(_out(reloaded, _inputs(task)), expected, rtol=0, atol=0)


def test_loading_from_a_directory_without_adapter_names_the_file(tmp_path: Path) -> None:
    model = lorakit.get_peft_model(task_model("bert", "Model"), lorakit.LoraConfig())
    with pytest.raises(lorakit.LorakitError, match="adapter_config.json"):
        load_weights(model.get_base_model(), tmp_path)
