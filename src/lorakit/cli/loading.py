"""Loading a saved adapter and its base model for ``lorakit eval`` and ``lorakit merge``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from lorakit import PeftModel
from lorakit.cli.errors import CliError
from lorakit.cli.tasks import TASKS, Task, load_model

__all__ = ["Adapter", "open_adapter", "load_adapted"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
METRICS = "metrics.json"
HEAD_SUFFIXES = ("classifier.weight", "score.weight", "classifier.out_proj.weight")


@dataclasses.dataclass
class Adapter:
    """An adapter folder: its config, its training record (if ``lorakit train`` wrote it), its task."""

    path: Path
    config: dict[str, Any]
    record: dict[str, Any] | None
    task: Task

    @property
    def weights(self) -> Path:
        return self.path / ADAPTER_WEIGHTS


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CliError(f"{path} could not be read: {exc}") from exc
    if not isinstance(data, dict):
        raise CliError(f"{path} must hold a JSON object")
    return data


def open_adapter(path: str) -> Adapter:
    """Read an adapter folder's config (and ``metrics.json`` if present), checking the files exist."""
    folder = Path(path)
    if not folder.is_dir():
        raise CliError(
            f"adapter {path!r} is not a folder; give the --out folder of `lorakit train` "
            "or any PEFT adapter folder"
        )
    missing = [n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (folder / n).is_file()]
    if missing:
        raise CliError(
            f"adapter folder {path!r} has no {' or '.join(missing)}; "
            "model.save_pretrained(folder) writes both"
        )
    config = _read_json(folder / ADAPTER_CONFIG)
    record = _read_json(folder / METRICS) if (folder / METRICS).is_file() else None
    by_type = {t.task_type.value: t for t in TASKS.values()}
    task_type = config.get("task_type")
    if task_type not in by_type:
        raise CliError(
            f"adapter {path!r} has task_type {task_type!r}; the command handles {', '.join(by_type)}"
        )
    return Adapter(folder, config, record, by_type[task_type])


def _labels(adapter: Adapter) -> list[str]:
    """Class names from the training record, else ``LABEL_i`` for each row of the saved head."""
    if not adapter.task.classifies:
        return []
    if adapter.record and adapter.record.get("labels"):
        return list(adapter.record["labels"])
    from safetensors import safe_open

    with safe_open(str(adapter.weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            if key.endswith(HEAD_SUFFIXES):
                return [f"LABEL_{i}" for i in range(f.get_slice(key).get_shape()[0])]
    raise CliError(
        f"adapter {str(adapter.path)!r}: cannot tell the number of classes (no metrics.json "
        "and no classifier weights in the adapter)"
    )


def base_path(adapter: Adapter, base: str | None) -> str:
    """``--base``, else the adapter config's ``base_model_name_or_path``; it must be a folder."""
    path = base or adapter.config.get("base_model_name_or_path")
    if not path:
        raise CliError(f"adapter {str(adapter.path)!r} does not name its base model; pass --base MODEL")
    if not Path(path).is_dir():
        raise CliError(f"base model {path!r} is not a folder; pass --base with a transformers model folder")
    return str(path)


def load_adapted(adapter: Adapter, base: str | None) -> tuple[Any, Any, list[str]]:
    """(the base model with the adapter loaded, its tokenizer, the class names)."""
    from transformers import AutoTokenizer

    path = base_path(adapter, base)
    labels = _labels(adapter)
    model = PeftModel.from_pretrained(load_model(adapter.task, path, labels), str(adapter.path))
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, labels
