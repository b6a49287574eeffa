"""Adapter directories: what ``PeftModel.save_pretrained`` writes and ``from_pretrained`` /
``load_adapter`` read. The layout is PEFT's (design §3)::

    <dir>/adapter_config.json          the "default" adapter (or the one loaded into "default")
    <dir>/adapter_model.safetensors    metadata {"format": "pt", "lorakit_version", fingerprint}
    <dir>/<name>/adapter_config.json   every other adapter, in a subfolder named after it
    <dir>/<name>/adapter_model.safetensors

Saving validates everything first and writes the whole directory atomically (see
:mod:`lorakit.fileio`). Loading reads and checks the config, every key and every shape against
what the config would create on this model *before* changing the model; all problems are reported
together, and a load that still fails afterwards is rolled back, so a failed load leaves the model
exactly as it was.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from lorakit import fileio
from lorakit._version import __version__
from lorakit.config import LoraConfig, TaskType, peft_json
from lorakit.config.files import adapter_folder
from lorakit.errors import (
    AdapterError,
    AdapterFileError,
    AdapterShapeError,
    BaseModelMismatchError,
    BaseModelMismatchWarning,
)
from lorakit.layers import LoraLayer
from lorakit.model import engines, injection
from lorakit.model.injection import Plan
from lorakit.persistence import conversion
from lorakit.persistence.fingerprint import METADATA_KEY, Fingerprint, fingerprint
from lorakit.persistence.keys import (
    adapter_keys,
    from_file_keys,
    parse_key,
    planned_embedding_shapes,
    planned_shapes,
    saved_tensors,
    to_file_keys,
)

__all__ = [
    "AdapterFiles",
    "save_adapters",
    "save_adapter_tensors",
    "read_adapter",
    "check_adapter",
]

BaseMismatch = Literal["warn", "error", "ignore"]
_MISMATCH_CHOICES = ("warn", "error", "ignore")
_TASK_KEY = "lorakit_task_type"
_MAX_LINES = 40


@dataclasses.dataclass
class AdapterFiles:
    """One adapter as read from disk: its config, tensors (file keys without ``base_model.model.``)
    and safetensors header metadata (empty for a legacy ``.bin``)."""

    config: LoraConfig
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    weights_path: Path


# -- saving ---------------------------------------------------------------------------------------
def _subfolder(name: str) -> str:
    return "" if name == "default" else name


def _adapter_payload(
    model: nn.Module,
    name: str,
    config: LoraConfig,
    initial: AdapterFiles | None = None,
    whole: Mapping[str, torch.Tensor] | None = None,
    save_embedding_layers: bool | str = "auto",
) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    """(config JSON text, file tensors, header metadata) of adapter ``name``. ``initial``: the
    adapter as saved right after a PiSSA/OLoRA init (the result is converted to a plain LoRA for the
    original base); ``whole``: the adapter's tensors gathered from a sharded model (by
    :mod:`lorakit.distributed`)."""
    config = as_fitted(config)
    live = saved_tensors(
        model,
        name,
        config.bias,
        config.target_modules,
        save_embedding_layers=save_embedding_layers,
        trainable_tokens=config.trainable_token_indices is not None,
    )
    if whole is None:
        tensors = dict(live)
    else:
        gathered_keys = set(adapter_keys(model, name, config.bias).tensors)
        tensors = {**{k: t for k, t in live.items() if k not in gathered_keys}, **whole}
    _refuse_shards(model, name, live, tensors)
    tensors = {engines.canonical_name(k): t for k, t in tensors.items()}
    if initial is not None:
        source = str(initial.weights_path)
        config, tensors = conversion.to_plain_lora(config, tensors, initial.tensors, source)
    targets = [(p, m) for p, m in model.named_modules() if isinstance(m, LoraLayer) and m.has_adapter(name)]
    if any(engines.is_engine_sharded(m.weight) for _, m in targets):
        targets = []  # the fingerprint needs whole base weights; a sharded save goes without it
    if initial is not None:
        targets = []  # a converted adapter is for the original base, which the live (residual) one is not
    metadata = {"format": "pt", "lorakit_version": __version__}
    fp = fingerprint(targets) if targets else None
    if fp is not None:
        metadata[METADATA_KEY] = fp.to_json()
    if config.task_type is not None and peft_json.peft_task_type(config.task_type) != str(config.task_type):
        metadata[_TASK_KEY] = str(config.task_type)
    data = peft_json.config_to_peft_dict(
        config,
        auto_mapping={"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
        base_model_name_or_path=getattr(model, "name_or_path", None) or None,
    )
    return peft_json.dumps(data), to_file_keys(tensors), metadata


def _refuse_shards(
    model: nn.Module, name: str, live: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]
) -> None:
    """Never write a shard as if it were the adapter (PEFT writes empty tensors under ZeRO-3/FSDP1)."""
    canon = engines.canonical_name
    shapes = {canon(k): v for k, v in engines.expected_shapes(model, live).items()}
    tensors = {canon(k): v for k, v in tensors.items()}
    problems = [
        f"{n}: recorded at injection, but the wrapped model hides it (FSDP1 without use_orig_params=True?)"
        for n in engines.hidden_adapter_params(model, name)
    ]
    problems += [f"{k}: the model has no such adapter tensor" for k in tensors if k not in shapes]
    problems += [f"{k}: missing" for k in shapes if k not in tensors]
    problems += engines.shard_problems({k: v for k, v in tensors.items() if k in shapes}, shapes)
    if problems:
        raise AdapterFileError(
            f"refusing to save adapter {name!r}: {len(problems)} of its {len(shapes)} tensors are not "
            "whole tensors:\n  - " + "\n  - ".join(problems[:_MAX_LINES]) + "\nUnder a sharded engine "
            "(FSDP, ZeRO-3) call save_pretrained on every rank, which gathers the adapter and writes "
            "on rank 0, or lorakit.distributed.gather_adapter_state_dict"
        )


def save_adapters(
    model: nn.Module,
    configs: Mapping[str, LoraConfig],
    directory: str | os.PathLike[str],
    selected_adapters: Sequence[str] | None = None,
    *,
    is_main_process: bool = True,
    safe_serialization: bool = True,
    save_embedding_layers: bool | str = "auto",
    path_initial_model_for_weight_conversion: str | os.PathLike[str] | None = None,
    whole: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> None:
    """Save adapters of ``model`` (the user's model, holding the LoRA layers) into ``directory``.

    "default" goes to the directory itself, every other adapter to ``directory/<name>``. All
    adapters are validated and serialised in memory first; then the directory is replaced
    atomically (other files in it are kept). A path that is an existing file is refused.

    ``safe_serialization=False``: ``adapter_model.bin`` (tensors only, as PEFT writes it) instead
    of ``adapter_model.safetensors``. ``save_embedding_layers``: see
    :func:`lorakit.persistence.keys.saved_tensors`.
    ``path_initial_model_for_weight_conversion``: the directory where a PiSSA/OLoRA adapter was
    saved right after its initialisation; the adapters are then saved as plain LoRA adapters of
    twice the rank that apply to the original base (:mod:`lorakit.persistence.conversion`), and
    that directory's config is marked ``init_lora_weights=True``, as PEFT does.
    """
    names = list(configs) if selected_adapters is None else list(selected_adapters)
    unknown = [n for n in names if n not in configs]
    if unknown or not names:
        raise AdapterError(
            f"selected_adapters={names!r}: nothing to save or unknown adapter(s) {unknown}; "
            f"existing adapters: {list(configs)}"
        )
    unsafe = [n for n in names if not n or n != os.path.basename(n) or "\\" in n or n in (".", "..")]
    if unsafe:
        raise AdapterError(
            f"adapter name(s) {unsafe} cannot be saved: each non-default adapter is written "
            "to a subfolder named after it, so a name must be a single path component"
        )
    initial = (
        None
        if path_initial_model_for_weight_conversion is None
        else read_adapter(path_initial_model_for_weight_conversion)
    )
    payloads = {
        n: _adapter_payload(
            model, n, configs[n], initial, None if whole is None else whole[n], save_embedding_layers
        )
        for n in names
    }
    if not is_main_process:  # other ranks of a distributed run validate, but only rank 0 writes
        return
    replaced = [
        os.path.join(_subfolder(n), f)
        for n in names
        for f in (fileio.CONFIG_NAME, fileio.WEIGHTS_NAME, fileio.LEGACY_WEIGHTS_NAME)
    ]
    with fileio.atomic_directory(directory, replaced) as staging:
        for name, (text, tensors, metadata) in payloads.items():
            out = staging / _subfolder(name)
            out.mkdir(parents=True, exist_ok=True)
            if safe_serialization:
                fileio.write_safetensors(out / fileio.WEIGHTS_NAME, tensors, metadata)
            else:
                fileio.write_legacy_bin(out / fileio.LEGACY_WEIGHTS_NAME, tensors)
            (out / fileio.CONFIG_NAME).write_text(text, encoding="utf-8")
    if initial is not None:
        _mark_initial_plain(path_initial_model_for_weight_conversion)  # type: ignore[arg-type]


def _mark_initial_plain(directory: str | os.PathLike[str]) -> None:
    """As PEFT: after converting against the initial PiSSA/OLoRA adapter, its saved config says
    ``init_lora_weights=True`` (it is then a plain LoRA of the residual base model)."""
    path = adapter_folder(directory) / fileio.CONFIG_NAME
    data = fileio.read_json(path)
    if isinstance(data, dict) and data.get("init_lora_weights") is not True:
        data["init_lora_weights"] = True
        fileio.atomic_write_text(path, peft_json.dumps(data))


def save_adapter_tensors(
    directory: str | os.PathLike[str],
    config: LoraConfig,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write one adapter that exists only as data (resized, extracted): ``tensors`` keyed by module
    path (``<m>.lora_A.weight``, no ``base_model.model.``), atomically, in PEFT's layout."""
    header = {"format": "pt", "lorakit_version": __version__, **(metadata or {})}
    text = peft_json.dumps(peft_json.config_to_peft_dict(config))
    replaced = [fileio.CONFIG_NAME, fileio.WEIGHTS_NAME, fileio.LEGACY_WEIGHTS_NAME]
    with fileio.atomic_directory(directory, replaced) as staging:
        fileio.write_safetensors(staging / fileio.WEIGHTS_NAME, to_file_keys(dict(tensors)), header)
        (staging / fileio.CONFIG_NAME).write_text(text, encoding="utf-8")


# -- reading --------------------------------------------------------------------------------------
def read_adapter(
    path: str | os.PathLike[str],
    *,
    is_trainable: bool = False,
    subfolder: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
) -> AdapterFiles:
    """Read an adapter directory (a path, or a Hub id fetched at ``revision``): config, then
    ``adapter_model.safetensors`` (or the legacy ``adapter_model.bin`` through
    ``torch.load(weights_only=True)``)."""
    directory = adapter_folder(path, subfolder, revision=revision, token=token)
    config = LoraConfig.from_pretrained(directory)
    safe, legacy = directory / fileio.WEIGHTS_NAME, directory / fileio.LEGACY_WEIGHTS_NAME
    if safe.is_file():
        tensors, metadata = fileio.read_safetensors(safe)
        weights = safe
    elif legacy.is_file():
        tensors, metadata, weights = fileio.read_legacy_bin(legacy), {}, legacy
    else:
        present = sorted(p.name for p in directory.iterdir())
        raise AdapterFileError(
            f"no adapter weights in {str(directory)!r}: neither {fileio.WEIGHTS_NAME} "
            f"nor {fileio.LEGACY_WEIGHTS_NAME} exists (found: {present})"
        )
    task = metadata.get(_TASK_KEY)
    if task in {t.value for t in TaskType} and peft_json.peft_task_type(task) == (
        None if config.task_type is None else str(config.task_type)
    ):
        config = dataclasses.replace(config, task_type=TaskType(task))
    config = dataclasses.replace(config, inference_mode=not is_trainable)
    return AdapterFiles(as_fitted(config), from_file_keys(tensors), metadata, weights)


def as_fitted(config: LoraConfig) -> LoraConfig:
    """The config of an adapter whose initialisation is done and stored in its tensors: LoftQ's
    ``init_lora_weights="loftq"`` becomes ``True`` (PEFT's LoftQ recipe saves it so), since its
    factors were fitted to a base that already holds the quantized weights, and running LoftQ again
    on load would quantize that base once more (and cannot run at all on a quantized one)."""
    if config.init_lora_weights != "loftq":
        return config
    return dataclasses.replace(config, init_lora_weights=True, loftq_config={})


# -- checking -------------------------------------------------------------------------------------
_SIZE_MISMATCH = "size mismatch"


def _key_problems(
    expected: Mapping[str, tuple[int, ...]],
    optional: Mapping[str, tuple[int, ...]],
    found: Mapping[str, torch.Tensor],
    *,
    ignore_mismatched_sizes: bool = False,
) -> list[str]:
    """Unknown keys, missing keys and shape mismatches, one line each (optional keys may be absent;
    mismatches are no problem with ``ignore_mismatched_sizes``: the loader skips them)."""
    lines = []
    for key in sorted(set(found) - set(expected) - set(optional)):
        lines.append(f"{key}: in the file, but no module of the model has this adapter tensor")
    for key in sorted(set(expected) - set(found)):
        module, tensor = _split(key)
        lines.append(
            f"{module}: targeted by the config, but the file has no {tensor!r} "
            f"(expected shape {expected[key]})"
        )
    known = {**optional, **expected}
    for key in sorted(set(known) & set(found)):
        shape = tuple(found[key].shape)
        if shape != tuple(known[key]) and not ignore_mismatched_sizes:
            module, tensor = _split(key)
            hint = (
                " (was the vocabulary resized? resize the model's embeddings first)"
                if key in optional
                else ""
            )
            lines.append(
                f"{module}: {tensor} has shape {shape} in the file, the model expects {known[key]}{hint} "
                f"({_SIZE_MISMATCH}; ignore_mismatched_sizes=True skips such tensors)"
            )
    return lines


def _split(key: str) -> tuple[str, str]:
    """(module path, tensor name from the LoRA container on) of a file key."""
    parsed = parse_key(key)
    return parsed.module, ".".join(p for p in (parsed.part, parsed.tensor) if p)


def _check_base(plan: Plan, files_: AdapterFiles, on_base_mismatch: str) -> None:
    recorded = files_.metadata.get(METADATA_KEY)
    if on_base_mismatch == "ignore" or recorded is None:
        return
    trained = Fingerprint.from_json(recorded)
    current = fingerprint([*plan.targets, *plan.parameter_weights()])
    if trained is None or current is None:
        return
    diffs = trained.differences(current)
    if not diffs:
        return
    shown = "; ".join(diffs[:5]) + (f"; ... ({len(diffs) - 5} more)" if len(diffs) > 5 else "")
    message = (
        f"this adapter was trained on a different base model: {files_.weights_path}: "
        f"{len(diffs)} of {len(trained.shapes)} targeted modules differ ({shown}). Its outputs on "
        "this model will not be what they were in training. Pass on_base_mismatch='error' to "
        "refuse such loads, or 'ignore' to silence this warning"
    )
    if on_base_mismatch == "error":
        raise BaseModelMismatchError(message)
    warnings.warn(message, BaseModelMismatchWarning, stacklevel=5)  # the caller of from_pretrained


def check_adapter(
    model: nn.Module,
    files_: AdapterFiles,
    adapter_name: str,
    on_base_mismatch: BaseMismatch = "warn",
    *,
    ignore_mismatched_sizes: bool = False,
) -> Plan:
    """Everything that can go wrong with loading ``files_`` into ``model``, checked read-only:
    the config against the model, then every key and shape (a size mismatch raises
    :class:`~lorakit.errors.AdapterShapeError`, unless ``ignore_mismatched_sizes``), then the base
    fingerprint."""
    if on_base_mismatch not in _MISMATCH_CHOICES:
        raise AdapterError(
            f"on_base_mismatch={on_base_mismatch!r}: must be one of {', '.join(_MISMATCH_CHOICES)}"
        )
    with injection.filling_from_file():
        plan = injection.plan(model, files_.config, adapter_name)
    lines = _key_problems(
        planned_shapes(model, plan, adapter_name),
        planned_embedding_shapes(model, plan),
        files_.tensors,
        ignore_mismatched_sizes=ignore_mismatched_sizes,
    )
    if lines:
        sizes = any(_SIZE_MISMATCH in line for line in lines)
        more = f"\n  ... and {len(lines) - _MAX_LINES} more" if len(lines) > _MAX_LINES else ""
        raise (AdapterShapeError if sizes else AdapterError)(
            f"cannot load {str(files_.weights_path)!r} as adapter {adapter_name!r} "
            f"({len(lines)} problem(s)); the model was not changed:\n  - "
            + "\n  - ".join(lines[:_MAX_LINES])
            + more
        )
    _check_base(plan, files_, on_base_mismatch)
    return plan
