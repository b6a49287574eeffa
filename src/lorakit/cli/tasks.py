"""The tasks ``lorakit train`` knows: which transformers head, how rows become features, which metrics.

A task is a row in :data:`TASKS`. Classification tasks report ``accuracy``; language-model tasks
report ``perplexity`` (over the target tokens) and, when the data has a target column, the
``exact_match`` accuracy of greedily generated targets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from lorakit import ConfigError, TaskType, quantization_config
from lorakit.cli.data import Rows
from lorakit.cli.errors import CliError, choices
from lorakit.cli.settings import TrainSettings

__all__ = ["Task", "TASKS", "get_task", "label_names", "encode", "load_model", "classification_metrics"]

IGNORE = -100  # the label id transformers' losses skip


@dataclasses.dataclass(frozen=True)
class Task:
    """One kind of training job."""

    name: str
    task_type: TaskType
    auto_class: str  # the transformers ``AutoModelFor...`` class
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
            "one label per text (text column, label column)",
            True,
        ),
        Task(
            "token-cls",
            TaskType.TOKEN_CLS,
            "AutoModelForTokenClassification",
            "one tag per word (words and tags: lists, or space-separated strings)",
            True,
        ),
        Task(
            "causal-lm",
            TaskType.CAUSAL_LM,
            "AutoModelForCausalLM",
            "next-token prediction on the text; with a label column, prompt -> answer",
            False,
        ),
        Task(
            "seq2seq",
            TaskType.SEQ_2_SEQ_LM,
            "AutoModelForSeq2SeqLM",
            "encoder-decoder: text -> target text (label column)",
            False,
        ),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise CliError(f"unknown task {name!r}; tasks: {choices(TASKS)}")
    return TASKS[name]


def _words(value: Any, column: str) -> list[str]:
    if isinstance(value, str):
        return value.split()
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    raise CliError(f"column {column!r} must hold lists or space-separated strings, got {value!r}")


def label_names(task: Task, rows: Rows, label_column: str) -> list[str]:
    """The sorted class names a classification task will learn (empty for language models)."""
    if task.name == "seq-cls":
        names = sorted({str(row[label_column]) for row in rows})
    elif task.name == "token-cls":
        names = sorted({tag for row in rows for tag in _words(row[label_column], label_column)})
    else:
        return []
    if len(names) < 2:
        raise CliError(f"column {label_column!r} has {len(names)} distinct label(s); a classifier needs 2+")
    return names


# the new heads of classification models: trained in full, so kept out of quantization
HEADS = ["classifier", "score"]


def load_model(task: Task, path: str, labels: list[str], quantize: str | None = None) -> Any:
    """The pretrained model with the task's head (a new head for classification); with
    ``quantize`` (a name of :data:`lorakit.QUANTIZATIONS`) its linear layers are loaded quantized."""
    import transformers

    cls = getattr(transformers, task.auto_class)
    kwargs: dict[str, Any] = {}
    if task.classifies:
        kwargs = {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {n: i for i, n in enumerate(labels)},
            "ignore_mismatched_sizes": True,
        }
    if quantize:
        try:
            # (an explicit skip list replaces transformers' own, which keeps the output head of a
            # language model unquantized: only classifiers pass one)
            skip = HEADS if task.classifies else ()
            kwargs["quantization_config"] = quantization_config(quantize, skip_modules=skip)
        except ConfigError as exc:
            raise CliError(f"--quantize: {exc}") from exc
    try:
        return cls.from_pretrained(path, **kwargs)
    except ValueError as exc:  # e.g. "Unrecognized configuration class ... for this kind of AutoModel"
        raise CliError(
            f"model {path!r} cannot be loaded for --task {task.name}: {str(exc).splitlines()[0]}"
        ) from exc


def encode(
    task: Task,
    rows: Rows,
    tokenizer: Any,
    settings: TrainSettings,
    label_column: str | None,
    labels: list[str],
) -> list[dict[str, Any]]:
    """Token ids (and label ids) for each row, unpadded; the collator pads each batch."""
    text_column, max_length = settings.text_column, settings.max_length
    if task.name == "seq-cls":
        ids = {n: i for i, n in enumerate(labels)}
        texts = [str(row[text_column]) for row in rows]
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        return [
            {**{k: enc[k][i] for k in enc}, "labels": ids[str(row[str(label_column)])]}
            for i, row in enumerate(rows)
        ]
    if task.name == "token-cls":
        return [
            _encode_tags(row, tokenizer, text_column, str(label_column), labels, max_length) for row in rows
        ]
    if task.name == "seq2seq":
        texts = [str(row[text_column]) for row in rows]
        targets = [str(row[str(label_column)]) for row in rows]
        enc = tokenizer(texts, text_target=targets, truncation=True, max_length=max_length)
        return [{k: enc[k][i] for k in enc} for i in range(len(rows))]
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
    label_ids, previous = [], None
    for word in enc.word_ids():  # the first sub-token of each word carries its tag
        label_ids.append(IGNORE if word is None or word == previous else ids[tags[word]])
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
