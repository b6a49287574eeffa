"""`TrainSettings`: every knob of ``lorakit train``, its flag, its config-file key and its help.

One dataclass is the single source of truth. Each field becomes a flag (``max_steps`` ->
``--max-steps``) and a config-file key (``max_steps`` or ``max-steps``, in TOML or YAML); its help is
the field's ``help`` metadata. Precedence, lowest first: the field default, the preset, the config
file, the flags given on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any

from lorakit.cli.errors import CliError, choices

__all__ = ["TrainSettings", "add_arguments", "resolve", "read_config_file"]


def _opt(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """What ``lorakit train`` does. With neither ``model`` nor ``data`` the embedded default runs."""

    preset: str | None = _opt(None, "a ready-made run: model, data and settings (see --list-presets)")
    model: str | None = _opt(None, "a transformers model folder (config.json, weights, tokenizer)")
    data: str | None = _opt(None, "a CSV, JSONL/JSON or Parquet file of examples")
    task: str = _opt("seq-cls", "what to train the model for")
    text_column: str = _opt("text", "the column holding the input text")
    label_column: str = _opt("label", "the column holding the label / tags / target text")
    r: int = _opt(8, "LoRA rank")
    alpha: float = _opt(16.0, "LoRA alpha; the update is scaled by alpha / r")
    dropout: float = _opt(0.0, "dropout on the LoRA branch's input")
    target_modules: list[str] | None = _opt(
        None, "comma-separated module names (default: the architecture's table; see `lorakit inspect`)"
    )
    target_parameters: list[str] | None = _opt(
        None,
        "comma-separated parameter names, e.g. experts.gate_up_proj,experts.down_proj: LoRA on the "
        "experts of mixture-of-experts models (see `lorakit inspect`)",
    )
    lr: float = _opt(5e-4, "peak learning rate (linear decay after warm-up)")
    warmup_ratio: float = _opt(0.05, "fraction of the steps spent warming the learning rate up")
    epochs: float = _opt(1.0, "passes over the training split (ignored when --max-steps is set)")
    max_steps: int | None = _opt(None, "number of optimizer steps (overrides --epochs)")
    batch_size: int = _opt(16, "training examples per step")
    eval_batch_size: int = _opt(64, "examples per evaluation batch")
    max_length: int = _opt(128, "longest input in tokens; longer inputs are cut")
    test_size: float = _opt(0.2, "held-out fraction (or count, if >= 1) for evaluation")
    max_eval_samples: int | None = _opt(None, "evaluate on at most this many held-out examples")
    eval_steps: int | None = _opt(None, "evaluate on a held-out sample every N steps (for the plot)")
    logging_steps: int = _opt(10, "record the training loss every N steps")
    save_steps: int = _opt(100, "write a resumable checkpoint every N steps")
    chat_template: bool = _opt(
        True,
        "causal-lm with a label column: wrap each prompt in the tokenizer's "
        "chat template, if it has one (else the prompt is the text and a newline)",
    )
    max_new_tokens: int = _opt(8, "tokens generated per example for exact-match (language models)")
    seed: int = _opt(0, "seed for the split, the initialisation and the data order")
    threads: int | None = _opt(
        None, "CPU threads for torch (default: torch's choice; 1 is faster on a machine busy with other work)"
    )
    out: str | None = _opt(None, "output directory (default: runs/<preset or model name>)")
    rank_sweep: list[str] | None = _opt(
        None,
        "comma-separated ranks, e.g. 1,2,4,8,16,32: train once per "
        "rank (alpha scaled to keep alpha / r), plot the held-out metric "
        "and the trainable parameters against the rank",
    )
    resume: bool = _opt(False, "continue from the last checkpoint in --out")


def _field_type(field: dataclasses.Field) -> tuple[type, bool]:
    """(the scalar type, is it a list) of a settings field."""
    hint = typing.get_type_hints(TrainSettings)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and args:
        hint = args[0]
    if typing.get_origin(hint) is list:
        return str, True
    return hint, False


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per field; flags default to "not given" so that the config file can fill them."""
    for field in dataclasses.fields(TrainSettings):
        flag = "--" + field.name.replace("_", "-")
        kind, is_list = _field_type(field)
        help_text = f"{field.metadata['help']} (default: {field.default})"
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        else:
            parser.add_argument(
                flag,
                type=_comma_list if is_list else kind,
                default=argparse.SUPPRESS,
                metavar=field.name.upper(),
                help=help_text,
            )


def _parse(text: str, suffix: str) -> Any:
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        return tomllib.loads(text)
    import yaml

    return yaml.safe_load(text) or {}


def read_config_file(path: str) -> dict[str, Any]:
    """The settings in a TOML or YAML file (keys as field names, ``-`` or ``_``)."""
    file = Path(path)
    if not file.is_file():
        raise CliError(f"config file {path!r} does not exist")
    if file.suffix not in (".toml", ".yaml", ".yml"):
        raise CliError(f"config file {path!r}: use a .toml, .yaml or .yml file")
    try:
        data = _parse(file.read_text(encoding="utf-8"), file.suffix)
    except Exception as exc:  # tomllib.TOMLDecodeError, yaml.YAMLError: both name the line
        raise CliError(f"config file {path!r} could not be read: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise CliError(f"config file {path!r} must hold a table of settings")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _coerce(name: str, value: Any) -> Any:
    field = {f.name: f for f in dataclasses.fields(TrainSettings)}[name]
    kind, is_list = _field_type(field)
    if value is None:
        return None
    if is_list:
        if isinstance(value, str):
            return _comma_list(value)
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise CliError(f"setting {name!r} must be a list of module names, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CliError(f"setting {name!r} must be {kind.__name__}, got {value!r}")
    return value


def resolve(*layers: dict[str, Any]) -> TrainSettings:
    """Settings from layers of values, later layers winning; unknown keys are refused by name."""
    known = [f.name for f in dataclasses.fields(TrainSettings)]
    values: dict[str, Any] = {}
    for layer in layers:
        unknown = sorted(set(layer) - set(known))
        if unknown:
            raise CliError(f"unknown setting(s) {', '.join(unknown)}; settings: {choices(known)}")
        values.update({k: _coerce(k, v) for k, v in layer.items()})
    return TrainSettings(**values)
