"""``lorakit merge``: fold an adapter into its base model and save a plain transformers model.

The result loads with ``AutoModelFor<Task>.from_pretrained(out)`` alone (no lorakit, no PEFT). The
merge is the library's own ``merge_and_unload`` (W + s·B·A computed in float32, rounded once); the
command checks that the merged model gives the adapted model's outputs on a sample input.

A QLoRA adapter (trained on a quantized base, ``lorakit train --quantize``) is merged into the
*original* full-precision weights given by ``--base`` (re-quantizing a merged NF4 weight would
destroy most of the update). Since the adapter learned against the quantized weights, the command
then also loads the quantized base with the adapter and reports how far the merged model's outputs
are from it, next to the adapter's own effect on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.cli.errors import CliError
from lorakit.cli.loading import (
    Adapter,
    adapter_labels,
    base_name,
    load_adapted,
    load_adapter_model,
    open_adapter,
)
from lorakit.cli.parsing import new_parser
from lorakit.cli.settings import QUANTIZE

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
    p.add_argument(
        "--quantize",
        choices=list(QUANTIZE),
        default=None,
        help="the quantization the adapter was trained on, to compare the merged model with (default: "
        "the one its run recorded, if any; none: no comparison)",
    )
    return p


def _outputs(model: Any, inputs: dict[str, Any]) -> Any:
    import torch

    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out[0]


def _against_quantized(
    adapter: Adapter,
    base: str,
    revision: str | None,
    quantize: str,
    labels: list[str],
    inputs: dict[str, Any],
    merged: Any,
) -> tuple[float, float]:
    """(max |merged − adapted on the quantized base|, max |adapted − base| there)."""
    model = load_adapter_model(adapter, base, labels, revision, quantize)
    model.eval()
    adapted = _outputs(model, inputs)
    with model.disable_adapter():
        plain = _outputs(model, inputs)
    return (merged - adapted).abs().max().item(), (adapted - plain).abs().max().item()


def run(args: Any) -> int:
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CliError(f"--out {args.out!r} exists and is not an empty folder; pick a new folder")
    adapter = open_adapter(args.adapter, args.revision)
    quantize = str(args.quantize or (adapter.settings or {}).get("quantize") or "none")
    if quantize not in QUANTIZE:  # a run record from elsewhere (the flag itself is checked by the parser)
        raise CliError(
            f"the adapter's run records quantize={quantize!r}, not one of {', '.join(QUANTIZE)}; "
            "pass --quantize"
        )
    base = base_name(adapter, args.base)
    revision = None if args.base else adapter.config.get("revision")
    labels = adapter_labels(adapter, base, revision)
    model, tokenizer = load_adapted(adapter, base, labels, revision)
    model.eval()
    inputs = dict(tokenizer(SAMPLE_TEXT, return_tensors="pt"))
    if adapter.task.name == "seq2seq":
        inputs["decoder_input_ids"] = inputs["input_ids"][:, :4]
    expected = _outputs(model, inputs)
    merged = model.merge_and_unload()
    merged_out = _outputs(merged, inputs)
    difference = (merged_out - expected).abs().max().item()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"merged {adapter.name} into {type(merged).__name__}; saved to {out}")
    print(f"max |merged - adapted| on a sample input: {difference:.2e}")
    if quantize != "none":
        distance, effect = _against_quantized(adapter, base, revision, quantize, labels, inputs, merged_out)
        print(
            f"max |merged - adapted on the quantized ({quantize}) base| on a sample input: {distance:.2e} "
            f"({distance / effect:.2f}× the adapter's own effect there, {effect:.2e})"
        )
    print(f"load it with: transformers.{adapter.task.auto_class}.from_pretrained({str(out)!r})")
    return 0
