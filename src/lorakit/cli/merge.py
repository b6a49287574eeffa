"""``lorakit merge``: fold an adapter into its base model and save a plain transformers model.

The result loads with ``AutoModelFor<Task>.from_pretrained(out)`` alone (no lorakit, no PEFT). The
merge is the library's own ``merge_and_unload`` (W + s·B·A computed in float32, rounded once); the
command checks that the merged model gives the adapted model's outputs on a sample input.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.cli.errors import CliError
from lorakit.cli.loading import adapter_labels, base_name, load_adapted, open_adapter
from lorakit.cli.parsing import new_parser

__all__ = ["parser", "run", "SAMPLE_TEXT", "HELP"]

HELP = "merge an adapter into its base model and save it"

SAMPLE_TEXT = "LoRA adds a low-rank update to frozen weights; merging folds it in."


def parser() -> Any:
    p = new_parser(prog="lorakit merge", description=__doc__)
    p.add_argument("--adapter", required=True, help="the adapter folder or Hub id")
    p.add_argument("--revision", default=None, help="the adapter's Hub revision (branch, tag or commit)")
    p.add_argument(
        "--base",
        default=None,
        help="the base model folder or Hub id (default: the adapter's base_model_name_or_path)",
    )
    p.add_argument("--out", required=True, help="folder for the merged model (new or empty)")
    return p


def _outputs(model: Any, inputs: dict[str, Any]) -> Any:
    import torch

    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out[0]


def run(args: Any) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CliError(f"--out {args.out!r} exists and is not an empty folder; pick a new folder")
    adapter = open_adapter(args.adapter, args.revision)
    base = base_name(adapter, args.base)
    revision = None if args.base else adapter.config.get("revision")
    model, tokenizer = load_adapted(adapter, base, adapter_labels(adapter, base, revision), revision)
    model.eval()
    inputs = dict(tokenizer(SAMPLE_TEXT, return_tensors="pt"))
    if adapter.task.name == "seq2seq":
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :4]
    expected = _outputs(model, inputs)
    merged = model.merge_and_unload()
    difference = (_outputs(merged, inputs) - expected).abs().max().item()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged {adapter.name} into {type(merged).__name__}; saved to {out}")
    print(f"max |merged - adapted| on a sample input: {difference:.2e}")
    print(f"load it with: transformers.{adapter.task.auto_class}.from_pretrained({str(out)!r})")
    return 0
