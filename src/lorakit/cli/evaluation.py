"""Evaluating a model on held-out rows: the task's metrics, with a progress bar."""

from __future__ import annotations

from typing import Any

from lorakit.cli.data import Rows
from lorakit.cli.settings import TrainSettings
from lorakit.cli.tasks import Task, perplexity, prompt_text

__all__ = ["evaluate", "exact_match"]


def evaluate(
    trainer: Any,
    task: Task,
    features: list,
    rows: Rows,
    tokenizer: Any,
    settings: TrainSettings,
    label_column: str | None,
) -> dict[str, float]:
    """``{"accuracy": ...}`` for classifiers; ``{"perplexity": ..., "exact_match": ...}`` for LMs."""
    result = trainer.evaluate(eval_dataset=features)
    metrics = {"loss": float(result["eval_loss"])}
    if task.classifies:
        return {"accuracy": float(result["eval_accuracy"]), **metrics}
    metrics = {"perplexity": perplexity(metrics["loss"]), **metrics}
    if label_column is not None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        metrics["exact_match"] = exact_match(model, task, rows, tokenizer, settings, label_column)
    return metrics


def generate_answers(
    model: Any,
    task: Task,
    prompts: list[str],
    tokenizer: Any,
    max_new_tokens: int,
    batch_size: int,
    desc: str = "generating",
) -> list[str]:
    """Greedy continuations of each prompt (decoder-only: left-padded; the prompt is cut off)."""
    import torch
    from tqdm.auto import tqdm

    answers: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch", dynamic_ncols=True):
            batch = tokenizer(
                prompts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                add_special_tokens=task.name == "seq2seq",
            )
            batch = {k: v.to(model.device) for k, v in batch.items()}
            with torch.no_grad():
                out = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            if task.name == "causal-lm":
                out = out[:, batch["input_ids"].shape[1] :]  # (batch, new tokens)
            answers.extend(tokenizer.batch_decode(out, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return answers


def exact_match(
    model: Any, task: Task, rows: Rows, tokenizer: Any, settings: TrainSettings, label_column: str
) -> float:
    """The fraction of rows whose generated answer equals the target (surrounding spaces ignored)."""
    texts = [str(row[str(settings.text_column)]) for row in rows]
    if task.name == "causal-lm":
        texts = [prompt_text(tokenizer, t, settings.chat_template) for t in texts]
    answers = generate_answers(
        model, task, texts, tokenizer, settings.max_new_tokens, settings.eval_batch_size
    )
    hits = sum(a.strip() == str(row[label_column]).strip() for a, row in zip(answers, rows, strict=True))
    return hits / len(rows)
