"""The Hugging Face Hub side of saving: the README model card PEFT writes, and ``push_to_hub``.

The card is YAML front matter plus Markdown. lorakit sets what the Hub reads for an adapter in
PEFT's format (``library_name: peft``, ``tags`` with ``lora``, ``base_model``, and
``pipeline_tag: text-generation`` for a causal LM) and records its own version; an existing card
keeps every other line. ``huggingface_hub`` is needed only to upload (``pip install lorakit[hub]``).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lorakit import fileio
from lorakit._version import __version__
from lorakit.errors import LorakitError

__all__ = ["model_card_facts", "write_model_card", "push_to_hub"]

_FRONT = re.compile(r"\A---\n(.*?)\n?---\n?", re.DOTALL)
_VERSIONS_HEADING = "### Framework versions"

_TEMPLATE = """# Model Card for {title}

A LoRA adapter in PEFT's file format (`adapter_config.json`, `adapter_model.safetensors`), written
by lorakit. It loads with `lorakit.PeftModel.from_pretrained` or `peft.PeftModel.from_pretrained`
on top of the base model named in `adapter_config.json`.

## Model Details

### Model Description

- **Developed by:** [More Information Needed]
- **Model type:** LoRA adapter ({kind})
- **Language(s):** [More Information Needed]
- **License:** [More Information Needed]
- **Finetuned from model:** {base}

## Uses

### Direct Use

```python
from transformers import AutoModel  # or the task's AutoModelFor... class
from lorakit import PeftModel

base = AutoModel.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "<this repository or folder>")
```

### Out-of-Scope Use

[More Information Needed]

## Bias, Risks, and Limitations

[More Information Needed]

## Training Details

### Training Data

[More Information Needed]

### Training Procedure

[More Information Needed]

## Evaluation

[More Information Needed]

## Environmental Impact

[More Information Needed]
"""


def _user_model(model: nn.Module) -> nn.Module:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_card_facts(model: nn.Module) -> dict[str, Any]:
    """What the card's front matter says about ``model`` (a ``PeftModel``): ``library_name``,
    ``tags`` and, when known, ``base_model`` and ``pipeline_tag``."""
    user = _user_model(model)
    facts: dict[str, Any] = {"library_name": "peft"}
    tags = set(getattr(user, "model_tags", None) or [])
    tags.add("lora")
    if any(c.__name__ == "PreTrainedModel" for c in type(user).__mro__):
        tags.add("transformers")
    name = getattr(user, "name_or_path", None)
    if name:
        tags.add(f"base_model:adapter:{name}")
    facts["tags"] = sorted(tags)
    config = getattr(user, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if callable(to_dict):
        data = to_dict()
        if isinstance(data, dict) and "_name_or_path" in data:
            facts["base_model"] = data["_name_or_path"]
    task = getattr(getattr(model, "active_peft_config", None), "task_type", None)
    if task is not None and str(getattr(task, "value", task)) == "CAUSAL_LM":
        facts["pipeline_tag"] = "text-generation"
    return facts


def _blocks(front: str) -> list[tuple[str | None, list[str]]]:
    """Front-matter lines grouped by top-level key (continuation lines belong to the key above)."""
    blocks: list[tuple[str | None, list[str]]] = []
    for line in front.splitlines():
        match = re.match(r"^([A-Za-z0-9_-]+):", line)
        if match or not blocks:
            blocks.append((match.group(1) if match else None, [line]))
        else:
            blocks[-1][1].append(line)
    return blocks


def _listed(lines: list[str]) -> list[str]:
    """The items of a YAML list written as a block (``- a``) or inline (``[a, b]``)."""
    head = lines[0].split(":", 1)[1].strip()
    if head.startswith("[") and head.endswith("]"):
        return [i.strip().strip("'\"") for i in head[1:-1].split(",") if i.strip()]
    return [ln.strip()[2:].strip().strip("'\"") for ln in lines[1:] if ln.strip().startswith("- ")]


def _scalar(value: Any) -> str:
    """A YAML scalar: plain when that reads back as the same string, else JSON-quoted (valid YAML)."""
    text = str(value)
    plain = (
        re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:/+-]*", text)
        and text.lower() not in _YAML_WORDS
        and not text.endswith(":")
    )
    return text if plain else json.dumps(text)


_YAML_WORDS = {"true", "false", "yes", "no", "on", "off", "null", "~"}


def _yaml(key: str, value: Any) -> list[str]:
    if isinstance(value, list):
        return [f"{key}:"] + [f"- {_scalar(v)}" for v in value]
    return [f"{key}: {_scalar(value)}"]


def _merged_front(front: str, facts: dict[str, Any]) -> str:
    blocks = _blocks(front)
    keys = {k for k, _ in blocks}
    out: list[str] = []
    for key, lines in blocks:
        if key == "tags" and "tags" in facts:
            out += _yaml("tags", sorted(set(_listed(lines)) | set(facts["tags"])))
        elif key == "pipeline_tag" and lines[0].split(":", 1)[1].strip():
            out += lines  # the card's own choice wins (as in PEFT)
        elif key in facts:
            out += _yaml(key, facts[key])
        else:
            out += lines
    for key, value in facts.items():
        if key not in keys:
            out += _yaml(key, value)
    return "\n".join(out)


def write_model_card(model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Create or update ``directory/README.md`` (atomically): the front matter gets
    :func:`model_card_facts`, the body a ``lorakit`` line under "Framework versions"; everything
    else in an existing card is kept."""
    path = Path(directory) / "README.md"
    facts = model_card_facts(model)
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    else:
        base = facts.get("base_model") or "[More Information Needed]"
        text = _TEMPLATE.format(
            title=base if facts.get("base_model") else "a LoRA adapter", kind="LoRA", base=base
        )
    match = _FRONT.match(text)
    front, body = (match.group(1), text[match.end() :]) if match else ("", text)
    version_line = f"- lorakit {__version__}"
    if version_line not in body.splitlines():
        lines = body.rstrip("\n").splitlines()
        if _VERSIONS_HEADING in lines:
            lines.insert(lines.index(_VERSIONS_HEADING) + 1, version_line)
        else:
            lines += ["", _VERSIONS_HEADING, "", version_line]
        body = "\n".join(lines) + "\n"
    fileio.atomic_write_text(path, f"---\n{_merged_front(front, facts)}\n---\n{body}")


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    safe_serialization: bool = True,
    selected_adapters: Sequence[str] | None = None,
    save_embedding_layers: str | bool = "auto",
    endpoint: str | None = None,
) -> Any:
    """Save ``model``'s adapters (with the model card) to a temporary folder and upload it to the
    Hub repository ``repo_id`` in one commit (the repository is created if needed). Returns the
    ``huggingface_hub`` commit info. ``endpoint``: another Hub server (e.g. a private mirror)."""
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise LorakitError(f"repo_id={repo_id!r}: expected a Hub repository name like 'user/my-adapter'")
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise LorakitError(
            "push_to_hub needs the huggingface_hub package: pip install 'lorakit[hub]'"
        ) from None
    api = HfApi(endpoint=endpoint, token=token)
    with tempfile.TemporaryDirectory(prefix="lorakit-push-") as folder:
        # Saved first: an adapter that cannot be saved creates no repository.
        model.save_pretrained(  # type: ignore[operator]
            folder,
            safe_serialization=safe_serialization,
            selected_adapters=selected_adapters,
            save_embedding_layers=save_embedding_layers,
        )
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=folder,
            commit_message=commit_message or "Upload model",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
            repo_type="model",
        )
