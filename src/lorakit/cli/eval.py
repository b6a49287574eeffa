"""``lorakit eval ADAPTER``: the task's metrics for a saved adapter on held-out data.

ADAPTER is a folder or a Hugging Face Hub id, written by ``lorakit train``, by lorakit from Python,
or by PEFT. Without ``--data`` it re-creates the held-out examples of the run recorded beside the
adapter (its --eval-data, or the same data, seed and split); with ``--data`` it evaluates on every
row of the file. The base model is ``--base``, else the adapter's ``base_model_name_or_path``.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from typing import Any

from lorakit.cli import data as data_mod
from lorakit.cli.errors import CliError
from lorakit.cli.evaluation import evaluate
from lorakit.cli.loading import Adapter, adapter_labels, base_name, load_adapted, open_adapter
from lorakit.cli.output import stdout_to_stderr
from lorakit.cli.parsing import new_parser
from lorakit.cli.settings import TrainSettings
from lorakit.cli.tasks import encode
from lorakit.cli.trainer import build_trainer
from lorakit.cli.training import resolve_columns

__all__ = ["parser", "run", "HELP"]

HELP = "evaluate a saved adapter"


def parser() -> Any:
    p = new_parser(prog="lorakit eval", description=__doc__)
    p.add_argument("adapter", help="an adapter folder or Hub id (lorakit train's --out, or any PEFT adapter)")
    p.add_argument("--revision", default=None, help="the adapter's Hub revision (branch, tag or commit)")
    p.add_argument("--base", default=None, help="the base model folder or Hub id (default: the adapter's)")
    p.add_argument("--data", default=None, help="a CSV/JSONL/Parquet file to evaluate on (all rows)")
    p.add_argument("--text-column", default=None, help="(default: the training run's, else 'text')")
    p.add_argument("--label-column", default=None, help="(default: the training run's, else 'label')")
    p.add_argument("--drop-incomplete", action="store_true", help="leave out rows with no text or label")
    p.add_argument("--max-eval-samples", type=int, default=None, help="evaluate at most N rows")
    p.add_argument("--batch-size", type=int, default=None, help="examples per evaluation batch")
    p.add_argument(
        "--json", action="store_true", help="print the metrics as JSON (and nothing else on stdout)"
    )
    return p


def _settings(args: Any, adapter: Adapter, base: str) -> TrainSettings:
    """The run's settings (if recorded), with this command's flags on top."""
    known = {f.name for f in dataclasses.fields(TrainSettings)}
    values = {k: v for k, v in (adapter.settings or {}).items() if k in known}
    values |= {"task": adapter.task.name, "model": base, "out": None, "resume": False, "overwrite": False}
    values |= {"rank_sweep": None, "preset": None}
    for name in ("data", "text_column", "label_column", "max_eval_samples"):
        if args[name] is not None:
            values[name] = args[name]
    if args.drop_incomplete:
        values["drop_incomplete"] = True
    if args.batch_size is not None:
        values["eval_batch_size"] = args.batch_size
    return TrainSettings(**values)


def _rows(args: Any, adapter: Adapter, s: TrainSettings) -> tuple[data_mod.Rows, str]:
    """(the rows to evaluate on, where they came from)."""
    recorded = adapter.settings or {}
    if args.data is not None:
        return data_mod.read_table(args.data), args.data
    if recorded.get("eval_data"):
        return data_mod.read_table(recorded["eval_data"]), recorded["eval_data"]
    if recorded.get("data"):
        return data_mod.split(data_mod.read_table(recorded["data"]), s.test_size, s.seed)[1], recorded["data"]
    if recorded.get("preset"):
        from lorakit.cli.presets import get_preset

        preset = get_preset(recorded["preset"])
        return data_mod.split(preset.rows(), s.test_size, s.seed)[1], preset.data
    raise CliError(f"adapter {args.adapter!r} has no record of its training data; pass --data FILE")


def run(args: Any) -> int:
    adapter = open_adapter(args.adapter, args.revision)
    base = base_name(adapter, args.base)
    revision = None if args.base else adapter.config.get("revision")
    s = _settings(args, adapter, base)
    rows, source = _rows(args, adapter, s)
    s = resolve_columns(s, adapter.task, rows, f"data {source!r}")
    columns = [str(s.text_column)] + ([s.label_column] if s.label_column else [])
    rows, _ = data_mod.complete_rows(rows, columns, f"data {source!r}", s.drop_incomplete)
    rows = rows[: s.max_eval_samples] if s.max_eval_samples else rows
    with stdout_to_stderr(args.json), tempfile.TemporaryDirectory(prefix="lorakit-eval-") as scratch:
        labels = adapter_labels(adapter, base, revision)
        model, tokenizer = load_adapted(adapter, base, labels, revision)
        features = encode(adapter.task, rows, tokenizer, s, s.label_column, labels)
        trainer = build_trainer(model, tokenizer, adapter.task, [], features, s, scratch)
        metrics = evaluate(trainer, adapter.task, features, rows, tokenizer, s, s.label_column)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{adapter.name} on {len(rows)} examples of {source}")
        for name, value in metrics.items():
            print(f"  {name:<12} {value:.4f}")
    return 0
