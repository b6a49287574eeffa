"""TaskType: every PEFT task type name is accepted, with PEFT's aliases and members."""

from __future__ import annotations

import peft
import pytest

from lorakit import LoraConfig, TaskType

# -- TaskType --------------------------------------------------------------------------------------
TASK_NAMES = [
    "CAUSAL_LM",
    "SEQ_2_SEQ_LM",
    "SEQ_CLS",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
    "QUESTION_ANSWERING",
    "TRANSLATION",
    "SPEECH_SEQ_2_SEQ",
    "MULTIPLE_CHOICE",
    "IMAGE_CLASSIFICATION",
    "OTHER",
]


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_type_names(name):
    member = TaskType[name]
    assert LoraConfig(task_type=name).task_type is member
    assert LoraConfig(task_type=member).task_type is member


@pytest.mark.parity
@pytest.mark.parametrize("name", [t.value for t in peft.TaskType])
def test_peft_task_types_are_accepted(name):
    assert LoraConfig(task_type=name).task_type == TaskType(name)


def test_question_answering_is_question_ans():
    assert TaskType.QUESTION_ANSWERING is TaskType.QUESTION_ANS
    assert LoraConfig(task_type=TaskType.QUESTION_ANSWERING).to_dict()["task_type"] == "QUESTION_ANS"


@pytest.mark.parity
def test_task_type_from_peft_member():
    assert LoraConfig(task_type=peft.TaskType.CAUSAL_LM).task_type is TaskType.CAUSAL_LM
