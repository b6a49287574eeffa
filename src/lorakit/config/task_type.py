"""``TaskType``: what kind of model an adapter is for (PEFT's members plus common aliases)."""

from __future__ import annotations

import enum

__all__ = ["TaskType", "PeftType"]


class TaskType(str, enum.Enum):
    """The kind of model an adapter is for; it selects the wrapper and the trainable head.

    PEFT's members plus the names users also reach for. ``QUESTION_ANSWERING`` is an alias of
    ``QUESTION_ANS`` (the same member), so both spellings save as ``"QUESTION_ANS"``.
    """

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    SEQ_CLS = "SEQ_CLS"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    QUESTION_ANSWERING = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"
    TRANSLATION = "TRANSLATION"
    SPEECH_SEQ_2_SEQ = "SPEECH_SEQ_2_SEQ"
    MULTIPLE_CHOICE = "MULTIPLE_CHOICE"
    IMAGE_CLASSIFICATION = "IMAGE_CLASSIFICATION"
    OTHER = "OTHER"

    def __str__(self) -> str:
        return self.value


class PeftType(str, enum.Enum):
    """The kind of adapter (PEFT's ``PeftType``); lorakit's configs are all LoRA."""

    LORA = "LORA"

    def __str__(self) -> str:
        return self.value
