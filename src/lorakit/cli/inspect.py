"""``lorakit inspect MODEL``: the modules LoRA can target in a model, and the defaults it would use.

Reads only ``config.json``: the model is built on the ``meta`` device, so no weight is loaded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import lorakit
from lorakit.cli.errors import CliError
from lorakit.cli.settings import TrainSettings
from lorakit.cli.tasks import TASKS, get_task

__all__ = ["add_parser", "run", "build_empty"]


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect", help="list the modules LoRA can target, and the defaults", description=__doc__
    )
    parser.add_argument("model", help="a transformers model folder, or a preset name")
    parser.add_argument(
        "--task",
        choices=list(TASKS),
        default=None,
        help="the head to build (default: the architecture in config.json)",
    )
    parser.set_defaults(func=run, command="inspect")


def build_empty(path: str, task: str | None) -> Any:
    """The model of ``path/config.json`` (with the task's head), on the meta device: shapes only."""
    import torch
    import transformers

    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise CliError(f"model {path!r} has no config.json; give a transformers model folder")
    config = transformers.AutoConfig.from_pretrained(path)
    architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures") or []
    if task is not None:
        cls = getattr(transformers, get_task(task).auto_class)
    elif architectures and hasattr(transformers, architectures[0]):
        cls = getattr(transformers, architectures[0])
    else:
        cls = transformers.AutoModel
    with torch.device("meta"):
        return cls.from_config(config) if cls.__name__.startswith("Auto") else cls(config)


def run(args: argparse.Namespace) -> int:
    from lorakit.cli.presets import PRESETS

    path = PRESETS[args.model].model() if args.model in PRESETS else args.model
    model = build_empty(path, args.task)
    print(f"{type(model).__name__} from {path}")
    report = lorakit.inspect(model)
    print(report)
    defaults = TrainSettings()
    print(
        f"\nlorakit train defaults: r={defaults.r}, alpha={defaults.alpha}, dropout={defaults.dropout}, "
        "target_modules=the default above (override with --target-modules a,b)"
    )
    experts = [".".join(p["name"].rsplit(".", 2)[-2:]) for p in report.parameters if len(p["shape"]) == 3]
    if experts:
        print(f"LoRA on the experts too: --target-parameters {','.join(dict.fromkeys(experts))}")
    return 0
