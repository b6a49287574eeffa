"""``lorakit inspect MODEL``: the modules LoRA can target in a model, and the defaults it would use.

Reads only ``config.json``: the model is built on the ``meta`` device, so no weight is loaded.
"""

from __future__ import annotations

from typing import Any

import lorakit
from lorakit.cli.models import model_config
from lorakit.cli.parsing import new_parser
from lorakit.cli.settings import TrainSettings
from lorakit.cli.tasks import TASKS, get_task

__all__ = ["parser", "run", "build_empty", "HELP"]

HELP = "list the modules LoRA can target, and the defaults"


def parser() -> Any:
    p = new_parser(prog="lorakit inspect", description=__doc__)
    p.add_argument("model", help="a transformers model folder, a Hub id, or a preset name")
    p.add_argument(
        "--task",
        choices=list(TASKS),
        default=None,
        help="the head to build (default: the architecture in config.json)",
    )
    p.add_argument("--revision", default=None, help="the model's Hub revision")
    p.add_argument(
        "--trust-remote-code", action="store_true", help="run the model's own code (trusted models only)"
    )
    return p


def build_empty(
    path: str, task: str | None, revision: str | None = None, trust_remote_code: bool = False
) -> Any:
    """The model of ``path``'s config.json (a folder or Hub id; with the task's head), on the meta
    device: shapes only, no weights read."""
    import torch
    import transformers

    config = model_config(path, revision, trust_remote_code)
    architectures = getattr(config, "architectures", None) or []
    if task is not None:
        cls = getattr(transformers, get_task(task).auto_class)
    elif architectures and hasattr(transformers, architectures[0]):
        cls = getattr(transformers, architectures[0])
    else:
        cls = transformers.AutoModel
    with torch.device("meta"):
        if cls.__name__.startswith("Auto"):
            return cls.from_config(config, trust_remote_code=trust_remote_code)
        return cls(config)


def run(args: Any) -> int:
    from lorakit.cli.presets import PRESETS

    path = PRESETS[args.model].model() if args.model in PRESETS else args.model
    model = build_empty(path, args.task, args.revision, args.trust_remote_code)
    print(f"{type(model).__name__} from {path}")
    print(lorakit.inspect(model))
    defaults = TrainSettings()
    print(
        f"\nlorakit train defaults: r={defaults.r}, alpha={defaults.alpha}, dropout={defaults.dropout}, "
        "target_modules=the default above (override with --target-modules a,b)"
    )
    return 0
