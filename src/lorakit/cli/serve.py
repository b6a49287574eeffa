"""``lorakit serve``: many adapters on one base model, behind OpenAI's API (as vLLM serves LoRA).

    lorakit serve --model BASE --adapter NAME=DIR [--adapter ...] [--port 8000]

Clients put the base model's name or an adapter's name in ``model``. Requests for different
adapters are decoded together in one batch. With no ``--model``, it serves the ``smollm2-trec``
preset's base (SmolLM2-135M-Instruct) with the adapter ``lorakit train --preset smollm2-trec``
wrote to ``runs/smollm2-trec``, if there is one.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from lorakit.cli.errors import CliError

__all__ = ["add_parser", "run", "plan"]

PRESET = "smollm2-trec"
PRESET_NAME = "SmolLM2-135M-Instruct"


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a base model and its adapters with OpenAI's API",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", default=None, help=f"base model folder or hub id (default: the {PRESET} preset's base)"
    )
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an adapter folder (or hub id) to serve as NAME (repeatable); PATH alone: named after it",
    )
    parser.add_argument(
        "--served-model-name", default=None, help="the base model's name in requests (default: --model)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--max-num-seqs", type=int, default=32, help="requests decoded together at most (default: 32)"
    )
    parser.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto", help="weights' dtype"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.set_defaults(func=run, command="serve")


def _adapter(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep:
        path, name = spec, Path(spec.rstrip("/")).name
    if not name or not path:
        raise CliError(f"--adapter {spec!r}: give NAME=PATH (or a folder)")
    return name, path


def plan(
    args: argparse.Namespace, cwd: str | os.PathLike[str] = "."
) -> tuple[str | None, str, list[tuple[str, str]]]:
    """(model path or ``None`` for the preset's, served name, [(adapter name, path)]) for ``args``."""
    adapters = [_adapter(spec) for spec in args.adapter]
    names = [n for n, _ in adapters]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CliError(f"--adapter names must differ; repeated: {', '.join(duplicates)}")
    if args.model is not None:
        return args.model, args.served_model_name or args.model, adapters
    trained = Path(cwd) / "runs" / PRESET
    if (trained / "adapter_config.json").is_file() and PRESET not in names:
        adapters.insert(0, (PRESET, str(trained)))
    return None, args.served_model_name or PRESET_NAME, adapters


def run(args: argparse.Namespace) -> int:
    try:
        from lorakit.serving import Engine, ServedModel, load_base, serve
    except ImportError as exc:
        raise CliError(f"serving needs FastAPI and uvicorn: pip install 'lorakit[serve]' ({exc})") from exc
    model_path, name, adapters = plan(args)
    if model_path is None:
        from lorakit.cli.presets import get_preset

        model_path = get_preset(PRESET).model()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    base, tokenizer = load_base(model_path, None if args.dtype == "auto" else args.dtype)
    served = ServedModel(base, tokenizer, name)
    for adapter_name, path in adapters:
        served.load_adapter(adapter_name, path)
    engine = Engine(served, max_batch_size=args.max_num_seqs)
    url = f"http://{args.host}:{args.port}/v1"
    print(f"serving {name!r} ({model_path}) with adapters: {', '.join(served.adapters) or '(none)'}")
    example = next(iter(served.adapters), name)
    prompt = "Who wrote Hamlet?\\nAnswer type:" if example == PRESET else "Hello, my name is"
    print(
        f"try: python -c \"import openai; c = openai.OpenAI(base_url='{url}', api_key='-'); "
        f"print(c.completions.create(model='{example}', prompt='{prompt}', max_tokens=5).choices[0].text)\""
    )
    serve(engine, host=args.host, port=args.port)
    return 0
