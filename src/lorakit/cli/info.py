"""``lorakit info ADAPTER``: an adapter folder's config, targets, sizes and fingerprint.

Reads only the files (JSON and the safetensors header): no model is loaded.
"""

from __future__ import annotations

import hashlib
from typing import Any

from lorakit.cli.errors import CliError
from lorakit.cli.loading import open_adapter
from lorakit.cli.parsing import new_parser

__all__ = ["parser", "run", "describe", "HELP"]

HELP = "describe an adapter folder"

LORA_PARTS = (
    ".lora_A.",
    ".lora_B.",
    ".lora_embedding_A",
    ".lora_embedding_B",
    ".lora_magnitude_vector",
    ".token_adapter.",  # trainable token rows
)


def parser() -> Any:
    p = new_parser(prog="lorakit info", description=__doc__)
    p.add_argument("adapter", help="an adapter folder or Hub id (PEFT format)")
    p.add_argument("--revision", default=None, help="the adapter's Hub revision (branch, tag or commit)")
    return p


def _sha256(path: Any) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def describe(path: str, revision: str | None = None) -> dict[str, Any]:
    """The facts ``lorakit info`` prints, as a dict."""
    from safetensors import SafetensorError, safe_open

    adapter = open_adapter(path, revision)
    targets: set[str] = set()
    saved: set[str] = set()
    params = 0
    try:
        with safe_open(str(adapter.weights), framework="pt") as f:
            metadata = f.metadata() or {}
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                shape = f.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                params += count
                module = key.removeprefix("base_model.model.")
                part = next((p for p in LORA_PARTS if p in module), None)
                (targets if part else saved).add(module.split(part)[0] if part else module.rsplit(".", 1)[0])
    except SafetensorError as exc:
        raise CliError(f"{adapter.weights} is not a readable safetensors file: {exc}") from exc
    cfg = adapter.config
    return {
        "path": str(adapter.path)
        if adapter.name == str(adapter.path)
        else f"{adapter.name} ({adapter.path})",
        "task_type": cfg.get("task_type"),
        "base model": cfg.get("base_model_name_or_path"),
        "r": cfg.get("r"),
        "lora_alpha": cfg.get("lora_alpha"),
        "lora_dropout": cfg.get("lora_dropout"),
        "target_modules": cfg.get("target_modules"),
        "adapted modules": len(targets),
        "modules saved in full": sorted(saved),
        "parameters": params,
        "file bytes": adapter.weights.stat().st_size,
        "sha256": _sha256(adapter.weights),
        "base fingerprint": _fingerprint(metadata),
        "metadata": {k: v for k, v in metadata.items() if not k.endswith("fingerprint")},
        "trained": _trained(adapter.record),
    }


def _fingerprint(metadata: dict[str, str]) -> str | None:
    """The base-weights fingerprint lorakit stores in the header, in short: its hash and extent."""
    import json

    text = next((v for k, v in metadata.items() if k.endswith("fingerprint")), None)
    if text is None:
        return None
    try:
        data = json.loads(text)
        return f"sha256 {data['sha256']} ({len(data.get('modules', {}))} modules sampled)"
    except (ValueError, KeyError, TypeError):
        return text[:80]


def _trained(record: dict[str, Any] | None) -> str | None:
    if not record:
        return None
    metric = record.get("metric", "")
    before, after = record.get("before", {}).get(metric), record.get("after", {}).get(metric)
    return f"{record.get('steps')} steps; {metric} {before:.4f} -> {after:.4f}" if after is not None else None


def run(args: Any) -> int:
    facts = describe(args.adapter, args.revision)
    width = max([len(k) for k in facts] + [len("metadata " + k) for k in facts["metadata"]])
    for key, value in facts.items():
        if key == "metadata":
            for name, text in sorted(value.items()):
                print(f"{'metadata ' + name:<{width}}  {text[:100]}")
            continue
        if value is not None:
            print(f"{key:<{width}}  {f'{value:,}' if isinstance(value, int) else value}")
    return 0
