"""The run folder (``--out``): nothing a user made is overwritten or lost.

* A folder that holds a run is refused unless ``--resume`` (continue it) or ``--overwrite``
  (replace it); any other non-empty folder is refused too.
* Every run writes its resolved settings to ``<out>/config.yaml`` before the model loads (a file
  ``--config`` reads back), so an interrupted run can be checked against: ``--resume`` with
  settings that change what is trained (rank, targets, data, model, ...) is refused, listing them.
* ``--overwrite`` removes only what a run writes (the files below); anything else in the folder stays.
* Paths in the record are written relative to the run folder, so ``lorakit eval`` finds them from
  any working directory.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from lorakit.cli.errors import CliError
from lorakit.cli.settings import TrainSettings, flag

__all__ = ["prepare_out", "write_settings", "read_settings", "relative", "absolute", "CONFIG_FILE"]

CONFIG_FILE = "config.yaml"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
RUN_FILES = (
    CONFIG_FILE,
    "metrics.json",
    "training.png",
    "README.md",
    "adapter_config.json",
    "adapter_model.safetensors",
    "sweep.json",
    "sweep.png",
)
RUN_FOLDERS = (CHECKPOINTS, TENSORBOARD)
# Settings a resumed run may change: how long it goes on, how often it reports, where it runs.
RESUMABLE = {
    "resume",
    "overwrite",
    "threads",
    "out",
    "max_steps",
    "epochs",
    "eval_batch_size",
    "max_eval_samples",
    "eval_steps",
    "logging_steps",
    "save_steps",
    "tensorboard",
    "early_stopping_patience",
    "max_new_tokens",
}
PATH_FIELDS = ("model", "data", "eval_data")


def _empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _sweep_runs(folder: Path) -> list[Path]:
    """The ``r<rank>`` runs of a rank sweep in ``folder``."""
    return [
        p
        for p in folder.iterdir()
        if p.is_dir()
        and p.name[:1] == "r"
        and p.name[1:].isdigit()
        and any((p / n).exists() for n in RUN_FILES)
    ]


def _is_run(folder: Path) -> bool:
    return any((folder / n).exists() for n in RUN_FILES + RUN_FOLDERS) or bool(_sweep_runs(folder))


def relative(path: str | None, out: str) -> str | None:
    """A local path as written in the run's records: relative to ``out``, starting with ``./`` or
    ``../`` so that it cannot be read as a Hub id; a Hub id (or None) unchanged."""
    if path is None or not os.path.exists(path):
        return path
    text = os.path.relpath(os.path.abspath(path), os.path.abspath(out))
    return text if text.startswith("..") else f"./{text}"


def absolute(path: str | None, out: str | Path) -> str | None:
    """A recorded path, back from relative-to-the-run to one that works from here."""
    if path is None or not path.startswith(("./", "../")):
        return path
    return os.path.normpath(os.path.join(os.path.abspath(out), path))


def write_settings(settings: TrainSettings, out: str) -> None:
    """``<out>/config.yaml``: the settings of this run (paths relative to ``out``)."""
    import yaml

    values = dataclasses.asdict(settings)
    for name in PATH_FIELDS:
        values[name] = relative(values[name], out)
    values["out"] = "."
    for name in ("resume", "overwrite"):
        values[name] = False
    Path(out).mkdir(parents=True, exist_ok=True)
    text = "# lorakit train --config this file repeats the run (paths are relative to this folder)\n"
    (Path(out) / CONFIG_FILE).write_text(text + yaml.safe_dump(values, sort_keys=False), encoding="utf-8")


def read_settings(out: str | Path) -> dict[str, Any] | None:
    """The settings recorded in ``<out>/config.yaml`` (paths made usable from here), if any."""
    import yaml

    file = Path(out) / CONFIG_FILE
    if not file.is_file():
        return None
    try:
        values = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise CliError(f"{file} could not be read: {str(exc).splitlines()[0]}") from exc
    if not isinstance(values, dict):
        raise CliError(f"{file} must hold a table of settings")
    for name in PATH_FIELDS:
        if isinstance(values.get(name), str):
            values[name] = absolute(values[name], out)
    return values


def _differences(settings: TrainSettings, recorded: dict[str, Any]) -> list[str]:
    now = dataclasses.asdict(settings)
    for name in PATH_FIELDS:
        if isinstance(now[name], str) and os.path.exists(now[name]):
            now[name] = os.path.abspath(now[name])
    return [
        f"{flag(name)} {recorded.get(name)!r} -> {now[name]!r}"
        for name in now
        if name not in RESUMABLE and name in recorded and recorded[name] != now[name]
    ]


def prepare_out(settings: TrainSettings, out: str, checkpoint: str | None, remove: bool = True) -> None:
    """Check ``out`` against ``--resume`` / ``--overwrite`` before anything slow, then (overwrite,
    and ``remove``: the main process) remove the previous run's files; ``checkpoint``: the last
    checkpoint found in ``out``."""
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise CliError(f"--out {out!r} is a file; give a folder")
    # A run stopped before its first checkpoint leaves only its config.yaml: nothing to lose.
    busy = folder.is_dir() and any(p.name != CONFIG_FILE and not _empty_dir(p) for p in folder.iterdir())
    if settings.resume:
        if checkpoint is None:
            raise CliError(
                f"--resume: no checkpoint in {os.path.join(out, CHECKPOINTS)}; run without --resume"
            )
        recorded = read_settings(out)
        if recorded is None:
            raise CliError(f"--resume: {out!r} has no {CONFIG_FILE} to check the settings against")
        changed = _differences(settings, recorded)
        if changed:
            raise CliError(
                f"--resume with settings that differ from the run in {out!r}: {'; '.join(changed)}; "
                "resume with the run's settings (--config " + os.path.join(out, CONFIG_FILE) + "), "
                "or start anew with --overwrite"
            )
        return
    if not busy:
        return
    if not settings.overwrite:
        what = "holds a run" if _is_run(folder) else "is not empty"
        hint = "--resume to continue it, " if checkpoint else ""
        raise CliError(f"--out {out!r} {what}; pass {hint}--overwrite to replace it, or choose another --out")
    if not remove:
        return
    for name in RUN_FILES:
        (folder / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(folder / name, ignore_errors=True)
    for sub in _sweep_runs(folder):
        shutil.rmtree(sub)
