"""transformers specifics: task wrappers, heads, generation, checkpointing, Trainer support.

Importing this package registers one ``PeftModel`` subclass per task type with
:func:`lorakit.get_peft_model`. It does not import transformers: only
:mod:`lorakit.integrations.trainer` (imported explicitly by the user) does.
"""

# importing these registers the model_type table and the transformers-4 MoE config rewrite
from lorakit.integrations import default_targets, moe_targets  # noqa: F401
from lorakit.integrations.heads import find_heads
from lorakit.integrations.tasks import (
    TASK_MODELS,
    PeftModelForCausalLM,
    PeftModelForFeatureExtraction,
    PeftModelForImageClassification,
    PeftModelForMultipleChoice,
    PeftModelForQuestionAnswering,
    PeftModelForSeq2SeqLM,
    PeftModelForSequenceClassification,
    PeftModelForSpeechSeq2Seq,
    PeftModelForTokenClassification,
    PeftModelForTranslation,
    TaskPeftModel,
)

__all__ = [
    "find_heads",
    "TASK_MODELS",
    "TaskPeftModel",
    "PeftModelForCausalLM",
    "PeftModelForFeatureExtraction",
    "PeftModelForImageClassification",
    "PeftModelForMultipleChoice",
    "PeftModelForQuestionAnswering",
    "PeftModelForSeq2SeqLM",
    "PeftModelForSequenceClassification",
    "PeftModelForSpeechSeq2Seq",
    "PeftModelForTokenClassification",
    "PeftModelForTranslation",
]
