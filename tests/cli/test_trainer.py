"""The usual training knobs map onto transformers' ``TrainingArguments`` and callbacks; TensorBoard
writes a real event file, read back here with TensorBoard's own reader; early stopping stops."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from cli_fixtures import sentiment_rows, write_rows

from lorakit.cli import TrainSettings
from lorakit.cli.main import main
from lorakit.cli.trainer import build_trainer
from lorakit.cli.training import build_model, plan_run

pytestmark = pytest.mark.slow  # builds a model; one test trains


def settings(files: Path, **changes: object) -> TrainSettings:
    base = {"model": str(files / "bert"), "data": str(files / "sentiment.csv"), "text_column": "sentence"}
    return TrainSettings(**{**base, "label_column": "sentiment", **changes})  # type: ignore[arg-type]


def test_settings_map_onto_training_arguments(cli_files: Path, tmp_path: Path) -> None:
    import torch
    from tqdm.auto import tqdm
    from transformers import EarlyStoppingCallback

    s = settings(
        cli_files,
        lr_scheduler="cosine",
        weight_decay=0.01,
        gradient_accumulation_steps=4,
        mixed_precision="bf16",
        dtype="bf16",
        eval_steps=5,
        save_steps=7,
        early_stopping_patience=2,
    )
    plan = plan_run(s)
    model = build_model(plan, ["neg", "pos"])
    base = model.get_base_model().bert.encoder.layer[0].attention.self.query
    assert (
        base.base_layer.weight.dtype == torch.bfloat16
        and base.lora_A["default"].weight.dtype == torch.float32
    )
    trainer = build_trainer(model, None, plan.task, [], [], plan.settings, str(tmp_path))
    a = trainer.args
    assert (a.lr_scheduler_type, a.weight_decay, a.gradient_accumulation_steps) == ("cosine", 0.01, 4)
    assert a.bf16 and not a.fp16 and a.load_best_model_at_end and a.metric_for_best_model == "accuracy"
    assert a.save_steps == a.eval_steps == 5  # best-model tracking saves at every evaluation
    assert any(isinstance(c, EarlyStoppingCallback) for c in trainer.callback_handler.callbacks)
    bar = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "BarCallback")
    bar.training_bar = tqdm(total=1, file=io.StringIO())
    state = trainer.state
    state.is_world_process_zero = True
    bar.on_log(a, state, trainer.control, logs={"loss": 0.7})
    bar.on_log(a, state, trainer.control, logs={"eval_loss": 0.5, "eval_accuracy": 0.75})
    assert bar.training_bar.postfix == "loss=0.7, eval_loss=0.5, eval_acc=0.75"  # eval loss not called loss


def test_tensorboard_early_stopping_and_eval_data(cli_files: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    write_rows(sentiment_rows(16, seed=9), tmp_path / "held.jsonl")
    data = ["--data", str(cli_files / "sentiment.csv"), "--eval-data", str(tmp_path / "held.jsonl")]
    columns = ["--text-column", "sentence", "--label-column", "sentiment"]
    quick = ["--max-steps", "40", "--eval-steps", "2", "--early-stopping-patience", "1", "--lr", "1e-9"]
    argv = ["train", "--model", str(cli_files / "bert"), *data, *columns, *quick, "--tensorboard"]
    assert main([*argv, "--logging-steps", "1", "--threads", "1", "--out", str(tmp_path / "run")]) == 0
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["steps"] == 4  # the metric did not improve at step 4: stopped, not at 40
    assert record["examples"]["held_out"] == 16 and record["examples"]["train"] == 120  # no split
    (events,) = (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    scalars = accumulator.Tags()["scalars"]
    assert {"train/loss", "train/learning_rate", "eval/accuracy"} <= set(scalars)
    assert [e.step for e in accumulator.Scalars("eval/accuracy")] == [
        0,
        2,
        4,
    ]  # before training, then every 2
