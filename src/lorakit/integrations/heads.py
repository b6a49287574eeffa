"""Find a task model's head: the modules that sit beside the pretrained backbone.

A transformers task model (``BertForSequenceClassification``, ``LlamaForSequenceClassification``,
``ViTForImageClassification``, ...) is a backbone, reachable as ``model.<base_model_prefix>``, plus
freshly initialised modules on top of it (``classifier``, ``score``, ``qa_outputs``,
``classification_head``, ``pre_classifier`` + ``classifier``, ...). Those modules must be trained in
full and saved with the adapter, so they become ``modules_to_save``.

The head is found by inspecting the model, not by guessing one name: it is every top-level child
that holds parameters and is not (and shares no parameter with) the backbone. For a plain
``nn.Module`` without a transformers backbone, PEFT's head names (``classifier``, ``score``, ...)
are looked up as a fallback.
"""

from __future__ import annotations

import warnings

from torch import nn

from lorakit.config import TaskType

__all__ = ["HEAD_TASKS", "find_heads", "head_modules_to_save"]

# Tasks whose model ends in a newly initialised head that must be trained and saved.
HEAD_TASKS = (
    TaskType.SEQ_CLS,
    TaskType.TOKEN_CLS,
    TaskType.QUESTION_ANS,
    TaskType.MULTIPLE_CHOICE,
    TaskType.IMAGE_CLASSIFICATION,
)

# PEFT's names, used only when the model has no transformers backbone to compare against.
FALLBACK_HEAD_NAMES = ("classifier", "score", "qa_outputs", "classification_head")


def _backbone(model: nn.Module) -> nn.Module | None:
    prefix = getattr(model, "base_model_prefix", None)
    backbone = getattr(model, prefix, None) if isinstance(prefix, str) and prefix else None
    return backbone if isinstance(backbone, nn.Module) and backbone is not model else None


def find_heads(model: nn.Module) -> list[str]:
    """Names of ``model``'s head modules (top-level children), in definition order; may be empty.

    With a transformers backbone: every top-level child with parameters that shares none of them
    with the backbone (so a tied ``lm_head`` never counts). Without one: the children named like
    PEFT's heads.
    """
    backbone = _backbone(model)
    if backbone is None:
        return [name for name in FALLBACK_HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]
    backbone_params = {id(p) for p in backbone.parameters()}
    heads = []
    for name, child in model.named_children():
        params = list(child.parameters())
        if child is backbone or not params:
            continue
        if any(id(p) in backbone_params for p in params):
            continue
        heads.append(name)
    return heads


def head_modules_to_save(model: nn.Module, task: TaskType, user_modules: list[str] | None) -> list[str]:
    """The ``modules_to_save`` for ``task``: the user's list plus the model's head (deduplicated).

    A head task on a model without a head (a backbone, a custom module) is accepted as in PEFT,
    with a warning: a head added later would stay frozen and would not be saved.
    """
    wanted = list(user_modules or [])
    heads = find_heads(model)
    if not heads and not wanted:
        children = ", ".join(n for n, _ in model.named_children()) or "(none)"
        warnings.warn(
            f"task_type={task.value} usually trains a head, but no head was found in "
            f"{type(model).__name__} (top-level modules: {children}); only the LoRA weights will train. "
            f"Pass modules_to_save=[...] naming the head if there is one",
            UserWarning,
            stacklevel=5,
        )
    return list(dict.fromkeys(wanted + heads))
