"""``lorakit train``: fine-tune a model with LoRA on a dataset, evaluate before and after, save all.

With no arguments it runs the embedded default (the ``minilm-vader`` preset): all-MiniLM-L6-v2
learns positive/negative on the VADER movie-review sentences. Everything else is a flag, a config
file key, or both (see :mod:`lorakit.cli.settings`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

from lorakit import LoraConfig, get_peft_model
from lorakit.cli import data as data_mod
from lorakit.cli import report
from lorakit.cli.errors import CliError
from lorakit.cli.evaluation import evaluate
from lorakit.cli.presets import DEFAULT_PRESET, PRESETS, Preset, get_preset
from lorakit.cli.settings import TrainSettings, add_arguments, read_config_file, resolve
from lorakit.cli.tasks import TASKS, Task, encode, get_task, label_names, load_model
from lorakit.cli.trainer import build_trainer, last_checkpoint

__all__ = ["add_parser", "run", "fit", "Plan", "plan_run"]

EVAL_SAMPLE = 256  # held-out examples evaluated every --eval-steps (the whole split before and after)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune with LoRA (no arguments: the embedded default)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="settings from a .toml or .yaml file; flags win")
    parser.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    add_arguments(parser)
    parser.epilog = "tasks: " + "; ".join(f"{t.name}: {t.help}" for t in TASKS.values())
    parser.set_defaults(func=run, command="train")


@dataclasses.dataclass
class Plan:
    """Everything settled before the first slow step: settings, task, model path, rows."""

    settings: TrainSettings
    task: Task
    model_path: str
    rows: data_mod.Rows
    data_name: str
    label_column: str | None
    preset: Preset | None


def _given(args: argparse.Namespace) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(TrainSettings)}
    return {k: v for k, v in vars(args).items() if k in names}


def plan_run(args: argparse.Namespace) -> Plan:
    """Resolve the settings (preset < config file < flags) and check every input, reading nothing big."""
    flags = _given(args)
    from_file = read_config_file(args.config) if getattr(args, "config", None) else {}
    chosen = {**from_file, **flags}
    name = chosen.get("preset") or (None if chosen.get("model") or chosen.get("data") else DEFAULT_PRESET)
    preset = get_preset(name) if name else None
    settings = resolve(preset.settings if preset else {}, from_file, flags, {"preset": name})
    task = get_task(settings.task)
    if preset is None and not (settings.model and settings.data):
        raise CliError("give both --model and --data (or a --preset, or neither for the embedded default)")
    model_path = settings.model or (preset.model() if preset else "")
    _check_model_path(model_path)
    rows = data_mod.read_table(settings.data) if settings.data else preset.rows()  # type: ignore[union-attr]
    source = f"data file {settings.data!r}" if settings.data else f"preset {name!r}"
    label_column: str | None = settings.label_column
    if task.name == "causal-lm" and "label_column" not in chosen and label_column not in rows[0]:
        label_column = None  # plain language modelling on the text column
    needed = [("--text-column", settings.text_column)]
    if label_column is not None:
        needed.append(("--label-column", label_column))
    data_mod.require_columns(rows, needed, source)
    data_name = settings.data or (preset.data if preset else "")
    return Plan(settings, task, model_path, rows, data_name, label_column, preset)


def _check_model_path(path: str) -> None:
    if not os.path.isdir(path):
        raise CliError(
            f"model {path!r} is not a folder; give a transformers model folder (config.json, "
            "weights, tokenizer) or pick a --preset"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CliError(f"model folder {path!r} has no config.json; it needs what save_pretrained() writes")


def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise CliError(f"model folder {path!r} has no usable tokenizer: {str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def build_model(plan: Plan, labels: list[str]) -> Any:
    """The base model with a fresh LoRA adapter; the task's wrapper makes a classifier's head
    trainable (and saved with the adapter) by itself."""
    s = plan.settings
    base = load_model(plan.task, plan.model_path, labels)
    config = LoraConfig(
        r=s.r,
        lora_alpha=s.alpha,
        lora_dropout=s.dropout,
        target_modules=s.target_modules,
        target_parameters=s.target_parameters,
        task_type=plan.task.task_type,
        base_model_name_or_path=plan.model_path,
    )
    return get_peft_model(base, config)


def by_length(features: list[dict], rows: data_mod.Rows) -> tuple[list[dict], data_mod.Rows]:
    """Features and rows sorted by token count: evaluation batches then hold similar lengths, so
    dynamic padding wastes little (the metrics do not depend on the order)."""
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    return [features[i] for i in order], [rows[i] for i in order]


def _record(
    plan: Plan,
    model: Any,
    trainer: Any,
    results: dict[str, Any],
    timings: dict[str, float],
    out: str,
    counts: dict[str, int],
    labels: list[str],
) -> dict[str, Any]:
    s = plan.settings
    trainable, total = model.get_nb_trainable_parameters()
    title = (
        plan.preset.description
        if plan.preset and not s.model and not s.data
        else (f"{Path(plan.model_path).name} on {Path(plan.data_name).name} ({plan.task.name})")
    )
    return {
        "title": title,
        "preset": s.preset,
        "model": plan.model_path,
        "data": plan.data_name,
        "task": plan.task.name,
        "auto_class": plan.task.auto_class,
        "metric": plan.task.metric,
        "labels": labels,
        "label_column": plan.label_column,
        "config": dataclasses.asdict(s),
        "target_modules": sorted(model.peft_config["default"].target_modules or []),
        "target_parameters": sorted(model.peft_config["default"].target_parameters or []),
        **results,
        "steps": trainer.state.global_step,
        "examples": counts,
        "parameters": {"trainable": trainable, "total": total},
        "adapter_bytes": report.folder_bytes(out),
        "timings": timings,
        "versions": report.versions(),
        "out": out,
        "citation": plan.preset.citation if plan.preset and not s.data else None,
    }


def run(args: argparse.Namespace) -> int:
    """Plan, then fit; the main process writes the adapter, metrics, plot and card, and prints a table."""
    if getattr(args, "list_presets", False):
        for preset in PRESETS.values():
            mark = " (default)" if preset.name == DEFAULT_PRESET else ""
            print(f"{preset.name:<14} {preset.description}{mark}")
        return 0
    start = time.perf_counter()
    plan = plan_run(args)
    s = plan.settings
    out = s.out or os.path.join("runs", s.preset or Path(plan.model_path).name)
    checkpoint = last_checkpoint(out) if s.resume else None
    if s.resume and checkpoint is None:
        raise CliError(f"--resume: no checkpoint in {os.path.join(out, 'checkpoints')}; run without --resume")
    if s.rank_sweep:
        from lorakit.cli.sweep import run_sweep

        run_sweep(plan, out, fit)
        return 0
    record = fit(plan, out, checkpoint, start)
    if record is not None:
        report.write_metrics(out, record)
        report.plot(out, record)
        report.model_card(out, record)
        print(report.summary_table(record))
    return 0


def fit(
    plan: Plan, out: str, checkpoint: str | None, start: float, before: dict[str, float] | None = None
) -> dict[str, Any] | None:
    """Split, load, evaluate, train, evaluate, save the adapter; the run's record (None off rank 0).
    ``before``: the metrics of the untrained model when already known (a rank sweep's later runs)."""
    import torch
    from transformers import set_seed

    s = plan.settings
    train_rows, held_rows = data_mod.split(plan.rows, s.test_size, s.seed)
    held_rows = held_rows[: s.max_eval_samples] if s.max_eval_samples else held_rows
    labels = label_names(plan.task, plan.rows, str(plan.label_column))
    if s.threads:
        torch.set_num_threads(s.threads)
    set_seed(s.seed)
    tokenizer = _tokenizer(plan.model_path)
    model = build_model(plan, labels)
    feats = [encode(plan.task, r, tokenizer, s, plan.label_column, labels) for r in (train_rows, held_rows)]
    trainer = build_trainer(model, tokenizer, plan.task, feats[0], feats[1][:EVAL_SAMPLE], s, out)
    feats[1], held_rows = by_length(feats[1], held_rows)
    timings = {"load_s": time.perf_counter() - start}

    def measure(name: str) -> dict[str, float]:
        began = time.perf_counter()
        result = evaluate(trainer, plan.task, feats[1], held_rows, tokenizer, s, plan.label_column)
        timings[f"eval_{name}_s"] = time.perf_counter() - began
        return result

    before = measure("before") if before is None else before
    began = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    timings["train_s"] = time.perf_counter() - began
    curves = report.curves(trainer.state.log_history, plan.task.metric)  # before the final evaluation
    after = measure("after")
    if not trainer.is_world_process_zero():
        return None
    model.save_pretrained(out)
    timings["total_s"] = time.perf_counter() - start
    counts = {
        "train": len(train_rows),
        "held_out": len(held_rows),
        "eval_sample": min(EVAL_SAMPLE, len(held_rows)),
    }
    results = {"before": before, "after": after, "loss_curve": curves[0], "eval_curve": curves[1]}
    return _record(plan, model, trainer, results, timings, out, counts, labels)
