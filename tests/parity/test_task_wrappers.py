"""What users see, compared with real PEFT: ``print(model)`` and ``print_trainable_parameters()``
for every task wrapper PEFT has, and the same head saved for the tasks PEFT lacks."""

from __future__ import annotations

import contextlib
import io

import peft
import pytest
from zoo import task_model

import lorakit

pytestmark = pytest.mark.parity

PEFT_TASKS = [
    ("llama", "ForCausalLM", "CAUSAL_LM"),
    ("gpt2", "LMHeadModel", "CAUSAL_LM"),
    ("bert", "ForSequenceClassification", "SEQ_CLS"),
    ("llama", "ForSequenceClassification", "SEQ_CLS"),
    ("bert", "ForTokenClassification", "TOKEN_CLS"),
    ("bert", "ForQuestionAnswering", "QUESTION_ANS"),
    ("t5", "ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("bart", "ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("bert", "Model", "FEATURE_EXTRACTION"),
]


def _printed(model) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        model.print_trainable_parameters()
    return out.getvalue()


@pytest.mark.parametrize("arch,head,task", PEFT_TASKS, ids=lambda v: str(v))
def test_print_and_trainable_parameters_match_peft(arch: str, head: str, task: str) -> None:
    ours = lorakit.get_peft_model(task_model(arch, head), lorakit.LoraConfig(task_type=task))
    theirs = peft.get_peft_model(task_model(arch, head), peft.LoraConfig(task_type=task))
    assert repr(ours) == repr(theirs)
    assert "lora_A" in repr(ours) and "lora_B" in repr(ours) and "lora_dropout" in repr(ours)
    assert _printed(ours) == _printed(theirs)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


@pytest.mark.parametrize(
    "arch,head,task",
    [
        ("bert", "ForMultipleChoice", "MULTIPLE_CHOICE"),
        ("vit", "ForImageClassification", "IMAGE_CLASSIFICATION"),
    ],
)
def test_tasks_peft_lacks_equal_peft_with_the_head_in_modules_to_save(
    arch: str, head: str, task: str
) -> None:
    ours = lorakit.get_peft_model(task_model(arch, head), lorakit.LoraConfig(task_type=task))
    theirs = peft.get_peft_model(
        task_model(arch, head),
        peft.LoraConfig(
            target_modules=ours.peft_config["default"].target_modules, modules_to_save=["classifier"]
        ),
    )
    assert repr(ours.base_model) == repr(theirs.base_model)
    assert _printed(ours) == _printed(theirs)
