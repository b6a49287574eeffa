"""`TrainSettings`: every knob of ``lorakit train``, in one typed dataclass that is at once the
command's flags, its config file and its Python entry point.

* Flags: jsonargparse reads the dataclass (types, defaults, and each field's docstring as its
  help), so ``max_steps: int | None`` is ``--max-steps`` and a bad value is refused by type.
* Config file: ``--config run.yaml`` (or ``.toml``, or ``.json``) holds the same keys; flags given
  after it win. ``--print-config`` prints the resolved settings as such a file, and every run writes
  it to ``<out>/config.yaml``, so ``lorakit train --config runs/x/config.yaml`` repeats a run.
* Python: ``lorakit.cli.train(TrainSettings(model=..., data=...))``, or
  ``TrainSettings.from_preset("smollm2-trec", max_steps=300)``.

Precedence, lowest first: the field defaults, the preset, the config file, the flags. Every value is
checked when the dataclass is built (:meth:`TrainSettings.problems`), so a bad number is one line
before anything slow happens.

A new setting is one field here with its docstring (and its use where it acts); e.g. the quantized
base is ``quantize: Quantize = "none"``, read where the model is loaded (``cli/models.py``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

from lorakit.cli.errors import CliError

__all__ = [
    "TrainSettings",
    "TaskName",
    "SCHEDULERS",
    "DTYPES",
    "PRECISIONS",
    "QUANTIZE",
    "INITS",
    "load_config_text",
]

TaskName = Literal["seq-cls", "token-cls", "causal-lm", "seq2seq"]
Scheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
]
Dtype = Literal["fp32", "bf16", "fp16", "auto"]
Precision = Literal["no", "bf16", "fp16"]
# "none", then the names of lorakit.QUANTIZATIONS (a test keeps the two equal)
Quantize = Literal["none", "nf4", "fp4", "int8", "int8-ao"]
Init = Literal["default", "gaussian", "pissa", "olora", "eva", "lora-ga"]
SCHEDULERS = typing.get_args(Scheduler)
DTYPES = typing.get_args(Dtype)
PRECISIONS = typing.get_args(Precision)
QUANTIZE = typing.get_args(Quantize)
INITS = typing.get_args(Init)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """What ``lorakit train`` does. With no model, data or preset: the embedded default preset."""

    preset: str | None = None
    """a ready-made run: model, data and settings (see --list-presets)"""
    model: str | None = None
    """a transformers model folder, or a Hugging Face Hub id (org/name)"""
    revision: str | None = None
    """the model's Hub revision: a branch, tag or commit"""
    trust_remote_code: bool = False
    """run the modelling code shipped with the model (only for models you trust)"""
    data: str | None = None
    """a CSV, TSV, JSONL/JSON or Parquet file of examples"""
    eval_data: str | None = None
    """a file of held-out examples, used instead of splitting --test-size off --data"""
    task: TaskName = "seq-cls"
    """what to train the model for (see the list below)"""
    text_column: str | None = None
    """the column of input text, word lists (token-cls) or chat messages (default: text; causal-lm:
    messages when the data has it and no text column)"""
    label_column: str | None = None
    """the column of labels, tags or target text (default: label; causal-lm: label if present,
    else plain language modelling)"""
    drop_incomplete: bool = False
    """leave out rows whose text or label is missing or empty, and say how many (without it such
    rows are refused, naming them)"""
    r: int = 8
    """LoRA rank"""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / r"""
    dropout: float = 0.0
    """dropout on the LoRA branch's input"""
    target_modules: str | list[str] | None = None
    """module names, comma-separated or a list, or all-linear (default: the architecture's table;
    see `lorakit inspect`)"""
    target_parameters: str | list[str] | None = None
    """parameter names, comma-separated or a list, e.g. experts.gate_up_proj,experts.down_proj: LoRA
    on the experts of mixture-of-experts models (see `lorakit inspect`)"""
    init: Init = "default"
    """how A and B start: default (A kaiming-uniform, B = 0), gaussian (A ~ N(0, 1/r)), pissa or
    olora (from the base weights; the base keeps the residual), eva (A from the principal
    directions of each layer's inputs on --init-batches training batches, ranks redistributed),
    lora-ga (A, B from the gradient on --init-batches training batches)"""
    init_batches: int = 8
    """training batches that eva and lora-ga read before training (eva cycles them until it converges)"""
    use_rslora: bool = False
    """rank-stabilised LoRA: scale the update by alpha / sqrt(r) instead of alpha / r"""
    use_dora: bool = False
    """DoRA: learn each output channel's magnitude apart from the direction of W + BA"""
    loraplus_ratio: float | None = None
    """LoRA+: B learns this many times faster than A (--lr is A's; the paper uses 16)"""
    lr: float = 2e-3
    """peak learning rate (2e-3: in the README's study 5e-4 learned far less on both presets)"""
    lr_scheduler: Scheduler = "linear"
    """how the learning rate changes after the warm-up"""
    warmup_ratio: float = 0.05
    """fraction of the steps spent warming the learning rate up"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    epochs: float = 1.0
    """passes over the training split (ignored when --max-steps is set)"""
    max_steps: int | None = None
    """number of optimizer steps (overrides --epochs)"""
    batch_size: int = 16
    """training examples per device and forward pass"""
    gradient_accumulation_steps: int = 1
    """forward passes per optimizer step (effective batch: batch-size x this x devices)"""
    eval_batch_size: int = 64
    """examples per evaluation batch"""
    max_length: int = 128
    """longest input in tokens; longer inputs are cut (with --packing: the length of a packed row)"""
    packing: bool = False
    """causal-lm: pack several short examples into each row of --max-length tokens"""
    dtype: Dtype = "fp32"
    """the dtype the base model's weights are loaded in (auto: as saved); LoRA weights stay fp32"""
    mixed_precision: Precision = "no"
    """compute in bf16 or fp16 autocast while training (fp16 needs a GPU)"""
    quantize: Quantize = "none"
    """load the base model's linear layers quantized and train LoRA on them (QLoRA): nf4, fp4 or
    int8 (bitsandbytes), int8-ao (torchao); a classifier's new head stays unquantized"""
    test_size: float = 0.2
    """held-out fraction (or count, if >= 1) for evaluation, when there is no --eval-data"""
    max_eval_samples: int | None = None
    """evaluate on at most this many held-out examples"""
    eval_steps: int | None = None
    """evaluate on a held-out sample every N steps (for the plot; 0: never)"""
    early_stopping_patience: int | None = None
    """stop when the held-out metric has not improved for N evaluations (needs --eval-steps)"""
    logging_steps: int = 10
    """record the training loss every N steps"""
    save_steps: int = 100
    """write a resumable checkpoint every N steps"""
    tensorboard: bool = False
    """also log to TensorBoard, in <out>/tensorboard"""
    chat_template: bool = True
    """causal-lm with a label column: wrap each prompt in the tokenizer's chat template, if it has
    one (else the prompt is the text and a newline)"""
    max_new_tokens: int = 8
    """tokens generated per example for exact match (language models)"""
    seed: int = 0
    """seed for the split, the initialisation and the data order"""
    threads: int | None = None
    """CPU threads for torch (default: torch's choice; 1 is faster on a machine busy with other work)"""
    out: str | None = None
    """output folder (default: runs/<preset or model name>)"""
    overwrite: bool = False
    """replace the run already in --out (its adapter, metrics and checkpoints)"""
    resume: bool = False
    """continue the interrupted run in --out from its last checkpoint (same settings)"""
    rank_sweep: str | list[int] | None = None
    """ranks, comma-separated or a list, e.g. 1,2,4,8,16,32: train once per rank (alpha scaled to
    keep alpha / r) and plot the held-out metric and the trainable parameters against the rank"""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            object.__setattr__(self, "target_modules", _comma_list(self.target_modules))
        if isinstance(self.target_parameters, str):
            object.__setattr__(self, "target_parameters", _comma_list(self.target_parameters))
        if isinstance(self.rank_sweep, str):
            object.__setattr__(self, "rank_sweep", _ints(self.rank_sweep))
        problems = self.problems()
        if problems:
            raise CliError("; ".join(problems))

    @classmethod
    def from_preset(cls, name: str, **changes: Any) -> TrainSettings:
        """A preset's settings (see ``lorakit train --list-presets``) with ``changes`` on top."""
        from lorakit.cli.presets import get_preset

        return cls(**{**get_preset(name).settings, "preset": name, **changes})

    def problems(self) -> list[str]:
        """Every value out of its range or of the wrong type, one phrase each (empty: all good)."""
        problems = _type_problems(self)
        if problems:
            return problems
        rules: list[tuple[str, bool, str]] = [
            ("r", self.r >= 1, "must be >= 1"),
            ("alpha", self.alpha > 0, "must be > 0"),
            ("dropout", 0 <= self.dropout < 1, "must be in [0, 1)"),
            ("lr", self.lr > 0 and math.isfinite(self.lr), "must be > 0"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "must be in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("epochs", self.epochs > 0 and math.isfinite(self.epochs), "must be > 0"),
            ("max_steps", self.max_steps is None or self.max_steps >= 1, "must be >= 1 (or unset: --epochs)"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, "must be >= 1"),
            ("eval_batch_size", self.eval_batch_size >= 1, "must be >= 1"),
            ("max_length", self.max_length >= 2, "must be >= 2"),
            (
                "test_size",
                0 < self.test_size < 1 or (self.test_size >= 1 and float(self.test_size).is_integer()),
                "must be a fraction in (0, 1) or a whole count >= 1",
            ),
            ("max_eval_samples", self.max_eval_samples is None or self.max_eval_samples >= 1, "must be >= 1"),
            ("eval_steps", self.eval_steps is None or self.eval_steps >= 0, "must be >= 0"),
            ("logging_steps", self.logging_steps >= 1, "must be >= 1"),
            ("save_steps", self.save_steps >= 1, "must be >= 1"),
            ("max_new_tokens", self.max_new_tokens >= 1, "must be >= 1"),
            ("init_batches", self.init_batches >= 1, "must be >= 1"),
            (
                "loraplus_ratio",
                self.loraplus_ratio is None
                or (self.loraplus_ratio > 0 and math.isfinite(self.loraplus_ratio)),
                "must be > 0 (or unset: plain LoRA)",
            ),
            ("threads", self.threads is None or self.threads >= 1, "must be >= 1"),
            (
                "early_stopping_patience",
                self.early_stopping_patience is None or self.early_stopping_patience >= 1,
                "must be >= 1",
            ),
            (
                "rank_sweep",
                not self.rank_sweep or isinstance(self.rank_sweep, str) or min(self.rank_sweep) >= 1,
                "ranks must be >= 1",
            ),
        ]
        out = [f"{flag(n)} {getattr(self, n)!r} {why}" for n, ok, why in rules if not ok]
        if isinstance(self.rank_sweep, str):
            out.append(f"--rank-sweep {self.rank_sweep!r}: give whole numbers, e.g. 1,2,4,8")
        if self.early_stopping_patience and not self.eval_steps:
            out.append("--early-stopping-patience needs --eval-steps N (how often the metric is measured)")
        if self.resume and self.overwrite:
            out.append("--resume continues the run in --out, --overwrite replaces it: give one")
        if self.rank_sweep and self.resume:
            out.append("--rank-sweep cannot --resume; rerun the sweep with --overwrite")
        if self.packing and self.task != "causal-lm":
            out.append(f"--packing is for --task causal-lm, not {self.task}")
        if (
            self.mixed_precision == "fp16"
            and self.dtype == "bf16"
            or (self.mixed_precision == "bf16" and self.dtype == "fp16")
        ):
            out.append(
                f"--mixed-precision {self.mixed_precision} on a --dtype {self.dtype} base: use one kind"
            )
        return out


def flag(name: str) -> str:
    """The command-line flag of a settings field: ``max_steps`` -> ``--max-steps``."""
    return "--" + name.replace("_", "-")


def _comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ints(text: str) -> list[int] | str:
    try:
        return sorted({int(v) for v in _comma_list(text)})
    except ValueError:
        return text  # reported by the type check, naming the flag


def _allowed(hint: Any) -> list[Any]:
    """The members of a (possibly optional / union) field type."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(hint) for m in _allowed(a)]
    return [hint]


def _matches(value: Any, member: Any) -> bool:
    origin = typing.get_origin(member)
    if member is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(member)
    if origin is list:
        (item,) = typing.get_args(member)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if member is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if member is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, member)


def _describe(member: Any) -> str:
    if member is type(None):
        return "unset"
    if typing.get_origin(member) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(member)))
    if typing.get_origin(member) is list:
        return f"a list of {typing.get_args(member)[0].__name__}"
    return str(member.__name__)


def _type_problems(settings: TrainSettings) -> list[str]:
    """Values of the wrong type (a Python caller's mistake; the parser checks flags and files)."""
    hints = typing.get_type_hints(TrainSettings)
    out = []
    for field in dataclasses.fields(TrainSettings):
        value, members = getattr(settings, field.name), _allowed(hints[field.name])
        if not any(_matches(value, m) for m in members):
            out.append(f"{flag(field.name)} {value!r} must be {' or '.join(_describe(m) for m in members)}")
    return out


def load_config_text(text: str) -> Any:
    """A config file's settings: TOML (``r = 4``), else YAML or JSON (``r: 4``); ``max-steps`` and
    ``max_steps`` are the same key. jsonargparse calls this for every ``--config`` file."""
    import sys

    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    import yaml

    data: Any = None
    toml_error: Exception | None = None
    if "\n" in text.strip():  # a file of several lines (a value on the command line is YAML)
        try:
            return _dashes(tomllib.loads(text))
        except tomllib.TOMLDecodeError as exc:
            toml_error = exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        toml = f"not TOML ({toml_error}), " if toml_error else ""
        raise CliError(f"{toml}not YAML{where}") from exc
    return _dashes(data)


def _dashes(data: Any) -> Any:
    if isinstance(data, dict):
        return {str(k).replace("-", "_"): v for k, v in data.items()}
    return data
