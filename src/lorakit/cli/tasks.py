"""The tasks ``lorakit train`` knows: which transformers head, which models can learn it, how rows
become features, which metrics.

A task is a row in :data:`TASKS`. Classification tasks report ``accuracy``; language-model tasks
report ``perplexity`` (over the target tokens) and, when the data has a target column, the
``exact_match`` accuracy of greedily generated targets. ``causal-lm`` on chat data (a column of
``[{"role": ..., "content": ...}, ...]``) renders each conversation with the tokenizer's chat
template and puts the loss on the assistant turns only (:mod:`lorakit.cli.chat`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from lorakit import TaskType
from lorakit.cli.chat import encode_chat, is_chat
from lorakit.cli.data import Rows, class_name, class_names
from lorakit.cli.errors import CliError, choices
from lorakit.cli.settings import TrainSettings

__all__ = [
    "Task",
    "TASKS",
    "IGNORE",
    "get_task",
    "label_names",
    "encode",
    "check_model_fits",
    "classification_metrics",
]

IGNORE = -100  # the label id transformers' losses skip


@dataclasses.dataclass(frozen=True)
class Task:
    """One kind of training job."""

    name: str
    task_type: TaskType
    auto_class: str  # the transformers ``AutoModelFor...`` class
    mapping: str  # transformers' table of the model types that class can build
    help: str
    classifies: bool  # reports accuracy from logits (else perplexity and exact match)

    @property
    def metric(self) -> str:
        """The headline metric: ``accuracy`` or ``perplexity``."""
        return "accuracy" if self.classifies else "perplexity"


TASKS = {
    t.name: t
    for t in (
        Task(
            "seq-cls",
            TaskType.SEQ_CLS,
            "AutoModelForSequenceClassification",
            "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
            "one label per text (text column, label column)",
            True,
        ),
        Task(
            "token-cls",
            TaskType.TOKEN_CLS,
            "AutoModelForTokenClassification",
            "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
            "one tag per word (words and tags: lists, or space-separated strings)",
            True,
        ),
        Task(
            "causal-lm",
            TaskType.CAUSAL_LM,
            "AutoModelForCausalLM",
            "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
            "next-token prediction on the text; with a label column, prompt -> answer; on a column "
            "of chat messages, the assistant turns",
            False,
        ),
        Task(
            "seq2seq",
            TaskType.SEQ_2_SEQ_LM,
            "AutoModelForSeq2SeqLM",
            "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
            "encoder-decoder: text -> target text (label column)",
            False,
        ),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise CliError(f"unknown task {name!r}; tasks: {choices(TASKS)}")
    return TASKS[name]


def check_model_fits(task: Task, config: Any, name: str) -> None:
    """Refuse, before loading any weight, a model that cannot learn ``task``: a type without the
    task's head, an encoder for ``causal-lm`` (BERT would train a left-to-right head it was never
    trained for, without a word), an encoder-decoder outside ``seq2seq``."""
    from transformers.models.auto import modeling_auto

    model_type = getattr(config, "model_type", "?")
    if getattr(config, "auto_map", None):  # the model's own code (--trust-remote-code) decides
        return
    if task.name == "causal-lm" and getattr(config, "is_encoder_decoder", False):
        raise CliError(f"model {name!r} ({model_type}) is an encoder-decoder: use --task seq2seq")
    if (
        task.name == "causal-lm"
        and model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES
        and not getattr(config, "is_decoder", False)
    ):
        raise CliError(
            f"model {name!r} ({model_type}) is an encoder trained on masked tokens, not a language "
            "model that writes left to right: use --task seq-cls or token-cls, or a decoder model"
        )
    if model_type not in getattr(modeling_auto, task.mapping):
        fitting = [t.name for t in TASKS.values() if model_type in getattr(modeling_auto, t.mapping)]
        hint = f"; it can learn: {', '.join(fitting)}" if fitting else ""
        raise CliError(f"model {name!r} ({model_type}) has no head for --task {task.name}{hint}")


def _words(value: Any, column: str) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise CliError(f"column {column!r} must hold lists or space-separated strings, got {value!r}")


def label_names(task: Task, rows: Rows, label_column: str) -> list[str]:
    """The class names a classification task will learn, in numeric order when the labels are
    numbers (empty for language models)."""
    if task.name == "seq-cls":
        names = class_names([row[label_column] for row in rows])
    elif task.name == "token-cls":
        names = class_names([tag for row in rows for tag in _words(row[label_column], label_column)])
    else:
        return []
    if len(names) < 2:
        raise CliError(f"column {label_column!r} has {len(names)} distinct label(s); a classifier needs 2+")
    return names


def _label_ids(rows: Rows, label_column: str, labels: list[str]) -> list[int]:
    ids = {n: i for i, n in enumerate(labels)}
    unknown = [(i, class_name(row[label_column])) for i, row in enumerate(rows)]
    unknown = [(i, name) for i, name in unknown if name not in ids]
    if unknown:
        shown = ", ".join(f"{name!r} (row {i + 1})" for i, name in unknown[:5])
        raise CliError(
            f"{len(unknown)} label(s) in column {label_column!r} are not classes of the model: {shown}; "
            f"its classes: {choices(labels)}"
        )
    return [ids[class_name(row[label_column])] for row in rows]


def encode(
    task: Task,
    rows: Rows,
    tokenizer: Any,
    settings: TrainSettings,
    label_column: str | None,
    labels: list[str],
) -> list[dict[str, Any]]:
    """Token ids (and label ids) for each row, unpadded; the collator pads each batch."""
    text_column, max_length = str(settings.text_column), settings.max_length
    if task.name == "seq-cls":
        label_ids = _label_ids(rows, str(label_column), labels)
        enc = tokenizer([str(row[text_column]) for row in rows], truncation=True, max_length=max_length)
        return [{**{k: enc[k][i] for k in enc}, "labels": label_ids[i]} for i in range(len(rows))]
    if task.name == "token-cls":
        return [
            _encode_tags(row, tokenizer, text_column, str(label_column), labels, max_length) for row in rows
        ]
    if task.name == "seq2seq":
        texts = [str(row[text_column]) for row in rows]
        targets = [str(row[str(label_column)]) for row in rows]
        enc = tokenizer(texts, text_target=targets, truncation=True, max_length=max_length)
        return [{k: enc[k][i] for k in enc} for i in range(len(rows))]
    if rows and is_chat(rows[0][text_column]):
        return [encode_chat(row[text_column], tokenizer, max_length, i) for i, row in enumerate(rows)]
    return [
        _encode_causal(row, tokenizer, text_column, label_column, max_length, settings.chat_template)
        for row in rows
    ]


def _encode_tags(
    row: dict[str, Any],
    tokenizer: Any,
    text_column: str,
    label_column: str,
    labels: list[str],
    max_length: int,
) -> dict[str, Any]:
    words, tags = _words(row[text_column], text_column), _words(row[label_column], label_column)
    if len(words) != len(tags):
        raise CliError(
            f"a row has {len(words)} words in {text_column!r} but {len(tags)} tags "
            f"in {label_column!r}: {' '.join(words)[:60]!r}"
        )
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    ids = {n: i for i, n in enumerate(labels)}
    unknown = sorted({class_name(t) for t in tags} - set(ids))
    if unknown:
        raise CliError(
            f"tag(s) {choices(unknown)} are not classes of the model; its classes: {choices(labels)}"
        )
    label_ids, previous = [], None
    for word in enc.word_ids():  # the first sub-token of each word carries its tag
        label_ids.append(IGNORE if word is None or word == previous else ids[class_name(tags[word])])
        previous = word
    return {**dict(enc), "labels": label_ids}


def prompt_text(tokenizer: Any, text: str, chat: bool) -> str:
    """The prompt a causal LM answers: with ``chat``, the chat template's user turn (if the tokenizer
    has a template); else the text and a newline."""
    if chat and getattr(tokenizer, "chat_template", None):
        return str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
        )
    return text + "\n"


def _encode_causal(
    row: dict[str, Any],
    tokenizer: Any,
    text_column: str,
    label_column: str | None,
    max_length: int,
    chat: bool,
) -> dict[str, Any]:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if label_column is None:  # plain language modelling: every token is a target
        ids = tokenizer(str(row[text_column]), truncation=True, max_length=max_length - len(eos)).input_ids
        ids = ids + eos
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}
    prompt_str = prompt_text(tokenizer, str(row[text_column]), chat)
    prompt = tokenizer(prompt_str, add_special_tokens=False).input_ids
    answer = tokenizer(str(row[label_column]), add_special_tokens=False).input_ids + eos
    prompt = prompt[-max(1, max_length - len(answer)) :]  # keep the end of a long prompt
    ids = (prompt + answer)[:max_length]
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": ([IGNORE] * len(prompt) + answer)[:max_length],
    }


def pack(features: list[dict[str, Any]], max_length: int) -> list[dict[str, Any]]:
    """Consecutive examples joined into rows of at most ``max_length`` tokens, in order (labels
    kept, so masked prompt tokens stay masked). Packed examples see the earlier ones of their row
    (plain packing, as TRL's first ``packing=True``); short examples then cost no padding."""
    rows: list[dict[str, Any]] = []
    current: dict[str, list[int]] = {"input_ids": [], "attention_mask": [], "labels": []}
    for feature in features:
        if current["input_ids"] and len(current["input_ids"]) + len(feature["input_ids"]) > max_length:
            rows.append(current)
            current = {"input_ids": [], "attention_mask": [], "labels": []}
        for key in current:
            current[key] = current[key] + list(feature[key])
    if current["input_ids"]:
        rows.append(current)
    return rows


def collator(task: Task, tokenizer: Any) -> Any:
    """Pads each batch to its longest member (dynamic padding)."""
    import transformers

    if task.name == "seq-cls":
        return transformers.DataCollatorWithPadding(tokenizer)
    if task.name == "token-cls":
        return transformers.DataCollatorForTokenClassification(tokenizer)
    return transformers.DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE)


def argmax_logits(logits: Any, labels: Any) -> Any:
    """Keep only predicted ids during evaluation (the logits of a whole split need not be kept)."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(dim=-1)


def classification_metrics(prediction: Any) -> dict[str, float]:
    """Accuracy over labelled positions (every example, or every tagged word)."""
    preds, label_ids = np.asarray(prediction.predictions), np.asarray(prediction.label_ids)
    mask = label_ids != IGNORE
    return {"accuracy": float((preds[mask] == label_ids[mask]).mean())}


def perplexity(loss: float) -> float:
    """exp of the mean cross-entropy per target token, capped so that JSON stays finite."""
    return float(math.exp(min(loss, 50.0)))
