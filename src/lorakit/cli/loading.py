"""Saved adapters for ``lorakit eval``, ``merge`` and ``info``: any PEFT-format adapter, from a
folder or the Hugging Face Hub, with or without the records ``lorakit train`` leaves.

The base model is ``--base``, else the adapter's ``base_model_name_or_path`` (a folder or a Hub
id). The class names of a classifier come from the run's record, else from the base model's own
``id2label`` when it fits the saved head, else ``LABEL_i``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from lorakit import PeftModel
from lorakit.cli.errors import CliError
from lorakit.cli.models import load_model, load_tokenizer, model_config, model_reference
from lorakit.cli.runs import CONFIG_FILE, absolute, read_settings
from lorakit.cli.tasks import TASKS, Task
from lorakit.hub import ADAPTER_FILES, local_folder

__all__ = ["Adapter", "open_adapter", "load_adapted", "load_adapter_model", "base_name", "adapter_labels"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
METRICS = "metrics.json"
HEAD_SUFFIXES = ("classifier.weight", "score.weight", "classifier.out_proj.weight")


@dataclasses.dataclass
class Adapter:
    """An adapter folder: its config, the training record and settings ``lorakit train`` wrote
    beside it (if it did), its task."""

    path: Path
    config: dict[str, Any]
    record: dict[str, Any] | None
    settings: dict[str, Any] | None
    task: Task
    name: str  # as the user gave it

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


def open_adapter(name: str, revision: str | None = None) -> Adapter:
    """Read an adapter folder's config (and the run's records if present), checking the files exist;
    a Hub id is fetched into (or found in) the HF cache."""
    folder = local_folder(
        name, revision=revision, files=[*ADAPTER_FILES, METRICS, CONFIG_FILE, "README.md"], what="adapter"
    )
    if not folder.is_dir():
        raise CliError(
            f"adapter {name!r} is neither a folder nor a Hugging Face Hub id; give the --out folder of "
            "`lorakit train`, any PEFT adapter folder, or org/name"
        )
    missing = [n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (folder / n).is_file()]
    if missing:
        raise CliError(
            f"adapter folder {name!r} has no {' or '.join(missing)}; "
            "model.save_pretrained(folder) writes both"
        )
    config = _read_json(folder / ADAPTER_CONFIG)
    record = _read_json(folder / METRICS) if (folder / METRICS).is_file() else None
    settings = read_settings(folder)
    if settings is None and record and isinstance(record.get("config"), dict):  # runs before config.yaml
        settings = {k: absolute(v, folder) if isinstance(v, str) else v for k, v in record["config"].items()}
    by_type = {t.task_type.value: t for t in TASKS.values()}
    task_type = config.get("task_type")
    if task_type not in by_type:
        raise CliError(
            f"adapter {name!r} has task_type {task_type!r}; the command handles {', '.join(by_type)} "
            "(`lorakit extract --task` records one)"
        )
    return Adapter(folder, config, record, settings, by_type[task_type], name)


def base_name(adapter: Adapter, base: str | None) -> str:
    """``--base``, else the adapter config's ``base_model_name_or_path`` (checked: a folder with a
    config.json, or a Hub id)."""
    name = base or adapter.config.get("base_model_name_or_path")
    if not name:
        raise CliError(f"adapter {adapter.name!r} does not name its base model; pass --base MODEL")
    return model_reference(str(name), "--base" if base else f"the base model of {adapter.name!r}")


def _head_rows(adapter: Adapter) -> int | None:
    from safetensors import safe_open

    with safe_open(str(adapter.weights), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            if key.endswith(HEAD_SUFFIXES):
                return int(f.get_slice(key).get_shape()[0])
    return None


def adapter_labels(adapter: Adapter, base: str, revision: str | None = None) -> list[str]:
    """Class names: the run's record, else the base model's ``id2label`` if it has a name per row of
    the saved head, else ``LABEL_i`` per row (empty for language models)."""
    if not adapter.task.classifies:
        return []
    if adapter.record and adapter.record.get("labels"):
        return [str(n) for n in adapter.record["labels"]]
    rows = _head_rows(adapter)
    id2label = getattr(model_config(base, revision, flag="--base"), "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label)] if id2label else []
    if names and (rows is None or len(names) == rows) and names != [f"LABEL_{i}" for i in range(len(names))]:
        return names
    if rows is None:
        raise CliError(
            f"adapter {adapter.name!r}: cannot tell the number of classes (no metrics.json, no "
            "classifier weights in the adapter, no id2label in the base model's config)"
        )
    return [f"LABEL_{i}" for i in range(rows)]


def load_adapter_model(
    adapter: Adapter, base: str, labels: list[str], revision: str | None = None, quantize: str = "none"
) -> Any:
    """The base model (in the run's dtype; ``quantize``: loaded quantized) with the adapter loaded."""
    settings = adapter.settings or {}
    model = load_model(
        adapter.task,
        base,
        labels,
        revision=revision,
        dtype=str(settings.get("dtype") or "fp32"),
        trust_remote_code=bool(settings.get("trust_remote_code")),
        quantize=quantize,
    )
    return PeftModel.from_pretrained(model, str(adapter.path))


def load_adapted(
    adapter: Adapter, base: str, labels: list[str], revision: str | None = None
) -> tuple[Any, Any]:
    """(the base model with the adapter loaded, its tokenizer)."""
    trust = bool((adapter.settings or {}).get("trust_remote_code"))
    return load_adapter_model(adapter, base, labels, revision), load_tokenizer(base, revision, trust)
