"""``lorakit eval ADAPTER``: the task's metrics for a saved adapter on held-out data.

Without ``--data`` it re-creates the held-out split of the run recorded in the adapter's
``metrics.json`` (same data, seed and size); with ``--data`` it evaluates on every row of the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from lorakit.cli import data as data_mod
from lorakit.cli.errors import CliError
from lorakit.cli.evaluation import evaluate
from lorakit.cli.loading import load_adapted, open_adapter
from lorakit.cli.settings import TrainSettings
from lorakit.cli.tasks import encode
from lorakit.cli.train import plan_run
from lorakit.cli.trainer import build_trainer

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a saved adapter", description=__doc__)
    parser.add_argument("adapter", help="an adapter folder written by `lorakit train` (or PEFT)")
    parser.add_argument("--base", default=None, help="the base model folder (default: from the adapter)")
    parser.add_argument("--data", default=None, help="a CSV/JSONL/Parquet file to evaluate on (all rows)")
    parser.add_argument("--text-column", default=None, help="(default: the training run's, else 'text')")
    parser.add_argument("--label-column", default=None, help="(default: the training run's, else 'label')")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="evaluate at most N rows")
    parser.add_argument("--batch-size", type=int, default=None, help="examples per evaluation batch")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.set_defaults(func=run, command="eval")


def _settings(args: argparse.Namespace, record: dict[str, Any] | None) -> TrainSettings:
    known = TrainSettings.__annotations__
    recorded = {k: v for k, v in (record or {}).get("config", {}).items() if k in known}
    if args.data is None and not recorded:
        raise CliError(
            f"adapter {args.adapter!r} has no metrics.json to take the held-out split from; pass --data FILE"
        )
    for name in ("data", "text_column", "label_column", "max_eval_samples"):
        if getattr(args, name) is not None:
            recorded[name] = getattr(args, name)
    if args.batch_size is not None:
        recorded["eval_batch_size"] = args.batch_size
    if args.base is not None:
        recorded["model"] = args.base
    return TrainSettings(**recorded)


def run(args: argparse.Namespace) -> int:
    adapter = open_adapter(args.adapter)
    s = _settings(args, adapter.record)
    plan = plan_run(argparse.Namespace(**{**dataclasses.asdict(s), "task": adapter.task.name}))
    rows = plan.rows if args.data else data_mod.split(plan.rows, s.test_size, s.seed)[1]
    rows = rows[: s.max_eval_samples] if s.max_eval_samples else rows
    model, tokenizer, labels = load_adapted(adapter, args.base or plan.model_path)
    features = encode(plan.task, rows, tokenizer, s, plan.label_column, labels)
    trainer = build_trainer(model, tokenizer, plan.task, [], features, s, str(adapter.path))
    metrics = evaluate(trainer, plan.task, features, rows, tokenizer, s, plan.label_column)
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(f"{adapter.path} on {len(rows)} examples of {plan.data_name}")
        for name, value in metrics.items():
            print(f"  {name:<12} {value:.4f}")
    return 0
