"""Head discovery by inspection: the top-level modules beside the backbone, whatever their name."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zoo import task_model

from lorakit import LoraConfig, get_peft_model
from lorakit.integrations import find_heads


@pytest.mark.parametrize(
    "arch,head,expected",
    [
        ("bert", "ForSequenceClassification", ["classifier"]),
        ("roberta", "ForSequenceClassification", ["classifier"]),  # a two-layer head: dense + out_proj
        ("llama", "ForSequenceClassification", ["score"]),
        ("gpt2", "ForSequenceClassification", ["score"]),
        ("bart", "ForSequenceClassification", ["classification_head"]),
        ("t5", "ForSequenceClassification", ["classification_head"]),
        ("bart", "ForQuestionAnswering", ["qa_outputs"]),
        ("bert", "ForMultipleChoice", ["classifier"]),
        ("vit", "ForImageClassification", ["classifier"]),
        ("gpt2", "LMHeadModel", []),  # lm_head is tied to the input embeddings: not a new head
        ("bert", "Model", []),
    ],
    ids=lambda v: str(v),
)
def test_heads_of_transformers_task_models(arch: str, head: str, expected: list[str]) -> None:
    assert find_heads(task_model(arch, head)) == expected


class Custom(nn.Module):
    """No transformers backbone: PEFT's head names are looked up."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.classifier = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.encoder(x)))


def test_plain_module_head_by_peft_names() -> None:
    assert find_heads(Custom()) == ["classifier"]
    model = get_peft_model(Custom(), LoraConfig(task_type="SEQ_CLS", target_modules=["encoder"]))
    assert model.peft_config["default"].modules_to_save == ["classifier"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "base_model.model.encoder.lora_A.default.weight",
        "base_model.model.encoder.lora_B.default.weight",
        "base_model.model.classifier.modules_to_save.default.weight",
        "base_model.model.classifier.modules_to_save.default.bias",
    }
