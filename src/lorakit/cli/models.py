"""Base models for the command: a folder or a Hugging Face Hub id, checked before any weight loads.

:func:`model_config` reads only ``config.json`` (from the folder, the HF cache, or the Hub through
:func:`lorakit.hub.local_folder`), so a wrong path, a missing id offline or a model that cannot
learn the task is one line before the slow part; transformers then loads the weights itself, from
the folder or the id, honouring the HF cache, ``HF_HUB_OFFLINE`` and the revision.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lorakit.cli.errors import CliError
from lorakit.cli.tasks import Task, check_model_fits
from lorakit.hub import is_hub_id, local_folder

__all__ = ["model_reference", "model_config", "load_model", "load_tokenizer", "DTYPES"]

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "auto": "auto"}


def model_reference(name: str, flag: str = "--model") -> str:
    """What transformers is given: an existing folder as an absolute path (so that records of the
    run do not depend on the working directory), a Hub id as it is."""
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise CliError(
                f"model folder {name!r} has no config.json; it needs what save_pretrained() writes"
            )
        return str(Path(name).resolve())
    if is_hub_id(name):
        return name
    raise CliError(
        f"{flag} {name!r} is neither a folder nor a Hugging Face Hub id (org/name); give a transformers "
        "model folder (config.json, weights, tokenizer) or a Hub id"
    )


def model_config(
    name: str, revision: str | None = None, trust_remote_code: bool = False, flag: str = "--model"
) -> Any:
    """The model's transformers config, read without its weights (for a Hub id: config.json only,
    from the HF cache or the Hub)."""
    import transformers

    reference = model_reference(name, flag)
    folder = local_folder(reference, revision=revision, files=["config.json"], what="model")
    if not (folder / "config.json").is_file():
        raise CliError(f"model {name!r} has no config.json; it needs what save_pretrained() writes")
    try:
        return transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise CliError(f"model {name!r}: config.json cannot be used: {str(exc).splitlines()[0]}") from exc


def check_model(
    task: Task, name: str, revision: str | None, trust_remote_code: bool, flag: str = "--model"
) -> str:
    """The reference to load ``name`` by, after checking it exists and can learn ``task``."""
    config = model_config(name, revision, trust_remote_code, flag)
    check_model_fits(task, config, name)
    return model_reference(name, flag)


def load_model(
    task: Task,
    name: str,
    labels: list[str],
    *,
    revision: str | None = None,
    dtype: str = "fp32",
    trust_remote_code: bool = False,
) -> Any:
    """The pretrained model with the task's head (a new head for classification, whose config
    carries the class names as ``id2label``)."""
    import transformers

    cls = getattr(transformers, task.auto_class)
    kwargs: dict[str, Any] = {
        "revision": revision,
        "dtype": DTYPES[dtype],
        "trust_remote_code": trust_remote_code,
    }
    if task.classifies:
        kwargs |= {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {n: i for i, n in enumerate(labels)},
            "ignore_mismatched_sizes": True,
        }
    try:
        return cls.from_pretrained(name, **kwargs)
    except (OSError, ValueError) as exc:  # e.g. "Unrecognized configuration class", no weights
        raise CliError(
            f"model {name!r} cannot be loaded for --task {task.name}: {str(exc).splitlines()[0]}"
        ) from exc


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, with a pad token (its end-of-text token if it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name, revision=revision, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise CliError(f"model {name!r} has no usable tokenizer: {str(exc).splitlines()[0]}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer
