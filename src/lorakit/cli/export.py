"""``lorakit export ADAPTER --to gguf --out FILE.gguf``: an adapter for llama.cpp (and what runs on it).

llama.cpp applies the file to the base model's GGUF at load time::

    llama-cli -m base.gguf --lora FILE.gguf          # or llama_cpp.Llama(model_path=..., lora_path=...)

``--base`` is the base model's GGUF file (tensor names and shapes are then checked against it) or its
transformers folder; by default the adapter's ``base_model_name_or_path``. What a GGUF adapter
cannot express (DoRA, modules_to_save heads, LoRA biases, convolutions) is refused.
"""

from __future__ import annotations

import argparse
from typing import Any

from lorakit.cli.errors import CliError

__all__ = ["add_parser", "run"]

FORMATS = ("gguf",)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write an adapter in another runtime's format (GGUF for llama.cpp)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("adapter", help="the adapter folder (adapter_config.json, adapter_model.safetensors)")
    parser.add_argument("--to", choices=FORMATS, default="gguf", help="the target format (default: gguf)")
    parser.add_argument("--out", required=True, help="the file to write (FILE.gguf)")
    parser.add_argument("--base", default=None, help="the base model's GGUF file or transformers folder")
    parser.add_argument(
        "--outtype", choices=["f32", "f16"], default="f32", help="tensor type (default: f32, exact)"
    )
    parser.set_defaults(func=run, command="export")


def run(args: argparse.Namespace) -> int:
    from lorakit.export import export_gguf

    if args.to not in FORMATS:
        raise CliError(f"--to {args.to!r}: formats: {', '.join(FORMATS)}")
    result = export_gguf(args.adapter, args.out, base=args.base, dtype=args.outtype)
    scaling = "scalings folded into lora_b, alpha 0" if result.folded_scaling else f"alpha {result.alpha:g}"
    print(
        f"wrote {result.path}: {result.pairs} LoRA pairs for llama.cpp's {result.architecture!r} ({scaling})"
    )
    print(f"use it with: llama-cli -m BASE.gguf --lora {result.path}")
    return 0
