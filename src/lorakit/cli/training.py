"""``lorakit train``: fine-tune a model with LoRA on a dataset, evaluate before and after, save all.

With no arguments it runs the embedded default (the ``minilm-vader`` preset): all-MiniLM-L6-v2
learns positive/negative on the VADER movie-review sentences. Every setting is a flag, a key of a
``--config`` file, and a field of ``TrainSettings``: ``lorakit.cli.train(settings)`` is the same run
from Python.

Everything that can be checked is checked before the model loads: settings, the output folder,
the model's config (a folder or a Hub id) and whether it can learn the task, the data's columns and
rows.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, cast

from lorakit import (
    EvaConfig,
    LoraConfig,
    LoraGAConfig,
    base_model_bytes,
    create_loraplus_optimizer,
    get_peft_model,
    initialize_lora_eva_weights,
    prepare_model_for_kbit_training,
    preprocess_loraga,
)
from lorakit.cli import data as data_mod
from lorakit.cli import report, runs
from lorakit.cli.chat import is_chat
from lorakit.cli.errors import CliError
from lorakit.cli.evaluation import evaluate
from lorakit.cli.models import check_model, load_model, load_tokenizer, quantization
from lorakit.cli.parsing import add_dataclass, new_parser
from lorakit.cli.presets import DEFAULT_PRESET, PRESETS, Preset, get_preset
from lorakit.cli.settings import TrainSettings
from lorakit.cli.tasks import TASKS, Task, collator, encode, get_task, label_names, pack
from lorakit.cli.trainer import build_trainer, check_precision, last_checkpoint, steps_end_on_ctrl_c

__all__ = ["parser", "parse_settings", "run", "train", "fit", "Plan", "plan_run", "resolve_columns"]

EVAL_SAMPLE = 256  # held-out examples evaluated every --eval-steps (the whole split before and after)
HELP = "fine-tune with LoRA (no arguments: the embedded default)"


def parser(defaults: dict[str, Any] | None = None) -> Any:
    """The flags of ``lorakit train``: one per field of :class:`TrainSettings`, ``--config``,
    ``--print-config`` and ``--list-presets``; ``defaults`` (a preset's settings) under them."""
    from jsonargparse import ActionConfigFile

    p = new_parser(prog="lorakit train", description=__doc__)
    p.add_argument(
        "--config",
        action=ActionConfigFile,
        help="settings from a .yaml, .toml or .json file; flags after it win",
    )
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    add_dataclass(p, TrainSettings)
    if defaults:
        p.set_defaults(defaults)
    p.epilog = "tasks:\n" + "\n".join(f"  {t.name:<10} {t.help}" for t in TASKS.values())
    return p


def _values(namespace: Any) -> dict[str, Any]:
    return {f.name: namespace[f.name] for f in dataclasses.fields(TrainSettings)}


def parse_settings(argv: list[str]) -> TrainSettings | None:
    """The settings of ``lorakit train ARGV`` (None: ``--list-presets`` was asked for). A first pass
    finds the preset (given, or the default when neither a model nor data is); the second parses
    with the preset's settings as defaults, so that a config file and flags win over them."""
    first = parser().parse_args([a for a in argv if not a.startswith("--print-config")])
    if first.list_presets:
        return None
    name = first.preset or (None if first.model or first.data else DEFAULT_PRESET)
    defaults = {**get_preset(name).settings, "preset": name} if name else {}
    namespace = parser(defaults).parse_args(argv)
    return TrainSettings(**_relative_to_files(_values(namespace), namespace.config or []))


def _relative_to_files(values: dict[str, Any], files: list[Any]) -> dict[str, Any]:
    """Paths written ``./x`` or ``../x`` in a config file are relative to that file (a run's
    ``config.yaml`` names its data relative to the run folder), unless a flag replaced them."""
    from lorakit.cli.settings import load_config_text

    for file in files:
        path = Path(getattr(file, "absolute", str(file)))
        written = load_config_text(path.read_text(encoding="utf-8"))
        for name in runs.PATH_FIELDS:
            value = values.get(name)
            if isinstance(value, str) and value.startswith(("./", "../")) and written.get(name) == value:
                values[name] = os.path.normpath(path.parent / value)
    return values


@dataclasses.dataclass
class Plan:
    """Everything settled before the first slow step: settings (columns resolved), task, model,
    rows (training, and held-out when given apart), where they came from."""

    settings: TrainSettings
    task: Task
    model_path: str
    rows: data_mod.Rows
    eval_rows: data_mod.Rows | None
    data_name: str
    preset: Preset | None
    dropped: int = 0

    @property
    def label_column(self) -> str | None:
        return self.settings.label_column

    @property
    def model_name(self) -> str:
        """The model as a reader knows it: a preset's Hub id, else what was given."""
        if self.preset and not self.settings.model:
            return self.preset.hub_id
        return str(self.settings.model)


def resolve_columns(settings: TrainSettings, task: Task, rows: data_mod.Rows, source: str) -> TrainSettings:
    """The settings with their text and label columns chosen (see their help) and checked."""
    present = rows[0] if rows else {}
    text = settings.text_column
    if text is None:
        text = (
            "messages"
            if task.name == "causal-lm" and "text" not in present and "messages" in present
            else "text"
        )
    label = settings.label_column
    chat = task.name == "causal-lm" and text in present and is_chat(present[text])
    if chat and label is not None:
        raise CliError(
            f"column {text!r} holds chat messages; the targets are its assistant turns (drop --label-column)"
        )
    if label is None and not chat:
        label = None if task.name == "causal-lm" and "label" not in present else "label"
    needed = [("--text-column", text)] + ([("--label-column", label)] if label is not None else [])
    data_mod.require_columns(rows, needed, source)
    return dataclasses.replace(settings, text_column=text, label_column=label)


def _clean(rows: data_mod.Rows, settings: TrainSettings, source: str) -> tuple[data_mod.Rows, int]:
    columns = [str(settings.text_column)] + ([settings.label_column] if settings.label_column else [])
    return data_mod.complete_rows(rows, columns, source, settings.drop_incomplete)


def plan_run(settings: TrainSettings) -> Plan:
    """Check every input (model config, data, columns, rows) and read the data: nothing big loads."""
    task = get_task(settings.task)
    preset = get_preset(settings.preset) if settings.preset else None
    if preset is None and not (settings.model and settings.data):
        raise CliError("give both --model and --data (or a --preset, or neither for the embedded default)")
    check_precision(settings)
    if settings.quantize != "none":  # an unknown name, or its package missing: one line, before anything slow
        quantization(settings.quantize, task)
    model = settings.model or preset.model()  # type: ignore[union-attr]
    model_path = check_model(task, model, settings.revision, settings.trust_remote_code)
    rows = data_mod.read_table(settings.data) if settings.data else preset.rows()  # type: ignore[union-attr]
    source = f"data file {settings.data!r}" if settings.data else f"preset {settings.preset!r}"
    settings = resolve_columns(settings, task, rows, source)
    rows, dropped = _clean(rows, settings, source)
    eval_rows = None
    if settings.eval_data:
        eval_source = f"--eval-data {settings.eval_data!r}"
        eval_rows = data_mod.read_table(settings.eval_data)
        resolve_columns(settings, task, eval_rows, eval_source)
        eval_rows, dropped_eval = _clean(eval_rows, settings, eval_source)
        dropped += dropped_eval
    if dropped:
        print(f"left out {dropped} row(s) with a missing text or label (--drop-incomplete)", file=sys.stderr)
    data_name = settings.data or (preset.data if preset else "")
    return Plan(settings, task, model_path, rows, eval_rows, data_name, preset, dropped)


# --init -> init_lora_weights
INIT_LORA_WEIGHTS: dict[str, bool | str] = {"default": True, "lora-ga": "lora_ga"}


def lora_config(plan: Plan) -> LoraConfig:
    """The adapter's ``LoraConfig`` from the settings (rank, targets, init and variants)."""
    s = plan.settings
    return LoraConfig(
        r=s.r,
        lora_alpha=s.alpha,
        lora_dropout=s.dropout,
        target_modules=s.target_modules,
        target_parameters=cast("list[str] | None", s.target_parameters),  # a list after __post_init__
        task_type=plan.task.task_type,
        base_model_name_or_path=plan.model_path,
        revision=s.revision,
        init_lora_weights=INIT_LORA_WEIGHTS.get(s.init, s.init),
        eva_config=EvaConfig() if s.init == "eva" else None,
        lora_ga_config=LoraGAConfig() if s.init == "lora-ga" else None,
        use_rslora=s.use_rslora,
        use_dora=s.use_dora,
    )


def build_model(plan: Plan, labels: list[str], init_batches: list[dict] | None = None) -> Any:
    """The base model with a fresh LoRA adapter; the task's wrapper makes a classifier's head
    trainable (and saved with the adapter) by itself. ``init_batches``: the training batches that
    ``--init eva`` and ``--init lora-ga`` read."""
    s = plan.settings
    base = load_model(
        plan.task,
        plan.model_path,
        labels,
        revision=s.revision,
        dtype=s.dtype,
        trust_remote_code=s.trust_remote_code,
        quantize=s.quantize,
    )
    if s.quantize != "none":  # freeze, norms in float32, bitsandbytes' CPU repacking off (PEFT's recipe)
        prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    config = lora_config(plan)
    if s.init == "lora-ga":

        def train_step() -> None:  # the gradient LoRA-GA starts from: the mean over the batches
            for batch in init_batches or []:
                base(**batch).loss.backward()

        preprocess_loraga(base, config, train_step)
    model = get_peft_model(base, config)
    if s.init == "eva":
        # a sequence label is one id per row, not per token: EVA's label mask cannot read it
        batches = [
            {k: v for k, v in b.items() if k != "labels" or v.shape == b["input_ids"].shape}
            for b in init_batches or []
        ]
        initialize_lora_eva_weights(model, batches, show_progress_bar=False)
    return model


def first_batches(plan: Plan, tokenizer: Any, train_set: list[dict]) -> list[dict] | None:
    """The first ``--init-batches`` training batches (padded tensors), for eva and lora-ga."""
    s = plan.settings
    if s.init not in ("eva", "lora-ga"):
        return None
    collate = collator(plan.task, tokenizer)
    size = s.batch_size
    return [
        collate(train_set[i : i + size]) for i in range(0, min(len(train_set), size * s.init_batches), size)
    ]


def loraplus_optimizer(model: Any, settings: TrainSettings) -> Any:
    """``--loraplus-ratio``: AdamW over LoRA+'s groups (B at ratio x --lr), else None (the
    Trainer's own AdamW)."""
    if settings.loraplus_ratio is None:
        return None
    import torch

    return create_loraplus_optimizer(
        model,
        torch.optim.AdamW,
        lr=settings.lr,
        loraplus_lr_ratio=settings.loraplus_ratio,
        loraplus_weight_decay=settings.weight_decay,
    )


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
        else (f"{Path(plan.model_name).name} on {Path(plan.data_name).name} ({plan.task.name})")
    )
    config = dataclasses.asdict(s)
    for name in runs.PATH_FIELDS:
        config[name] = runs.relative(config[name], out)
    return {
        "title": title,
        "preset": s.preset,
        "model": plan.model_name,
        "model_path": runs.relative(plan.model_path, out),
        "data": runs.relative(plan.data_name, out),
        "task": plan.task.name,
        "auto_class": plan.task.auto_class,
        "metric": plan.task.metric,
        "labels": labels,
        "id2label": dict(enumerate(labels)),
        "label_column": plan.label_column,
        "config": config,
        "target_modules": sorted(model.peft_config["default"].target_modules or []),
        "target_parameters": sorted(model.peft_config["default"].target_parameters or []),
        **results,
        "steps": trainer.state.global_step,
        "examples": counts,
        "parameters": {"trainable": trainable, "total": total},
        "quantize": None if s.quantize == "none" else s.quantize,
        "base_memory_bytes": base_model_bytes(model),
        "adapter_bytes": report.folder_bytes(out),
        "timings": timings,
        "versions": report.versions(),
        "out": out,
        "citation": plan.preset.citation if plan.preset and not s.data else None,
    }


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def train(settings: TrainSettings | None = None) -> dict[str, Any] | None:
    """Run ``lorakit train`` from Python: plan, fit, and write the adapter, ``metrics.json``, the
    plot and the model card to ``settings.out``. ``train()`` is the embedded default. Returns the
    run's record (what ``metrics.json`` holds; None off rank 0 of a distributed run)."""
    settings = settings or TrainSettings.from_preset(DEFAULT_PRESET)
    start = time.perf_counter()
    plan = plan_run(settings)
    s = plan.settings
    out = s.out or os.path.join("runs", s.preset or Path(plan.model_name).name)
    checkpoint = last_checkpoint(out) if os.path.isdir(out) else None
    runs.prepare_out(s, out, checkpoint, remove=_is_main_process())
    if _is_main_process():
        runs.write_settings(s, out)
    if s.rank_sweep:
        from lorakit.cli.sweep import run_sweep

        return run_sweep(plan, out, fit)
    try:
        record = fit(plan, out, checkpoint if s.resume else None, start)
    except KeyboardInterrupt:
        print(_resume_hint(out), file=sys.stderr)
        raise
    if record is not None:
        report.write_metrics(out, record)
        report.plot(out, record)
        report.model_card(out, record)
        print(report.summary_table(record))
    return record


def _resume_hint(out: str) -> str:
    """What to do after Ctrl-C: the command to continue from the last checkpoint, if there is one."""
    checkpoint = last_checkpoint(out) if os.path.isdir(out) else None
    if checkpoint is None:
        return f"no checkpoint was written yet in {out}; start again with --overwrite"
    args = [a for a in sys.argv[1:] if a not in ("--overwrite", "--resume")]
    command = shlex.join(["lorakit", *args, "--resume"]) if args and args[0] == "train" else "--resume"
    return f"the last checkpoint is {checkpoint}; continue the run with: {command}"


def run(argv: list[str]) -> int:
    """``lorakit train ARGV``."""
    settings = parse_settings(argv)
    if settings is None:
        for preset in PRESETS.values():
            mark = " (default)" if preset.name == DEFAULT_PRESET else ""
            print(f"{preset.name:<14} {preset.description}{mark}")
        return 0
    train(settings)
    return 0


def fit(
    plan: Plan, out: str, checkpoint: str | None, start: float, before: dict[str, float] | None = None
) -> dict[str, Any] | None:
    """Split, load, evaluate, train, evaluate, save the adapter; the run's record (None off rank 0).
    ``before``: the metrics of the untrained model when already known (a rank sweep's later runs)."""
    import torch
    from transformers import set_seed

    s = plan.settings
    if plan.eval_rows is None:
        train_rows, held_rows = data_mod.split(plan.rows, s.test_size, s.seed)
    else:
        train_rows, held_rows = plan.rows, plan.eval_rows
    held_rows = held_rows[: s.max_eval_samples] if s.max_eval_samples else held_rows
    labels = label_names(plan.task, plan.rows + (plan.eval_rows or []), str(plan.label_column))
    if s.threads:
        torch.set_num_threads(s.threads)
    set_seed(s.seed)
    tokenizer = load_tokenizer(plan.model_path, s.revision, s.trust_remote_code)
    feats = [encode(plan.task, r, tokenizer, s, plan.label_column, labels) for r in (train_rows, held_rows)]
    train_set = pack(feats[0], s.max_length) if s.packing else feats[0]
    model = build_model(plan, labels, first_batches(plan, tokenizer, train_set))
    optimizer = loraplus_optimizer(model, s)
    trainer = build_trainer(model, tokenizer, plan.task, train_set, feats[1][:EVAL_SAMPLE], s, out, optimizer)
    feats[1], held_rows = by_length(feats[1], held_rows)
    timings = {"load_s": time.perf_counter() - start}

    def measure(name: str) -> dict[str, float]:
        began = time.perf_counter()
        result = evaluate(trainer, plan.task, feats[1], held_rows, tokenizer, s, plan.label_column)
        timings[f"eval_{name}_s"] = time.perf_counter() - began
        return result

    before = measure("before") if before is None else before
    # Training starts from the seed whatever ran before it: an evaluation draws from torch's
    # generator (each DataLoader takes a base seed), and a sweep's later ranks skip "before".
    set_seed(s.seed)
    began = time.perf_counter()
    with steps_end_on_ctrl_c(trainer):
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
        "train_rows": len(train_set),
        "held_out": len(held_rows),
        "eval_sample": min(EVAL_SAMPLE, len(held_rows)),
        "dropped": plan.dropped,
    }
    results = {"before": before, "after": after, "loss_curve": curves[0], "eval_curve": curves[1]}
    return _record(plan, model, trainer, results, timings, out, counts, labels)
