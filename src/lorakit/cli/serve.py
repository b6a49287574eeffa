"""``lorakit serve``: many adapters on one base model, behind OpenAI's API (as vLLM serves LoRA).

    lorakit serve --model BASE --adapter NAME=DIR [--adapter ...] [--port 8000]

Clients put the base model's name or an adapter's name in ``model``. Requests for different
adapters are decoded together in one batch. With no ``--model``, it serves the ``smollm2-trec``
preset's base (SmolLM2-135M-Instruct) with the adapter ``lorakit train --preset smollm2-trec``
wrote to ``runs/smollm2-trec``, if there is one. Models and adapters are folders or Hugging Face
Hub ids; every one is checked before any weight loads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from lorakit.cli.errors import CliError
from lorakit.cli.models import model_config, model_reference
from lorakit.cli.parsing import new_parser
from lorakit.hub import ADAPTER_FILES, local_folder

__all__ = ["parser", "run", "plan", "check", "HELP", "PRESET", "PRESET_NAME"]

HELP = "serve a base model and its adapters with OpenAI's API"

PRESET = "smollm2-trec"
PRESET_NAME = "SmolLM2-135M-Instruct"
DTYPES = ("auto", "float32", "bfloat16", "float16")
# adapter names become keys of the model's nn.ModuleDicts (lorakit.serving refuses others too)
_ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def parser() -> Any:
    p = new_parser(prog="lorakit serve", description=__doc__)
    p.add_argument(
        "--model", default=None, help=f"base model folder or Hub id (default: the {PRESET} preset's base)"
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="an adapter folder (or Hub id) to serve as NAME (repeatable); PATH alone: named after it",
    )
    p.add_argument(
        "--served-model-name", default=None, help="the base model's name in requests (default: --model)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (1-65535)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="requests decoded together at most")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="the weights' dtype")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    return p


def _adapter(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep:
        path, name = spec, Path(spec.rstrip("/")).name
    if not name or not path:
        raise CliError(f"--adapter {spec!r}: give NAME=PATH (or a folder)")
    if not _ADAPTER_NAME.fullmatch(name):
        raise CliError(f"--adapter {spec!r}: the name {name!r} must be letters, digits, '_' or '-'")
    return name, path


def plan(args: Any, cwd: str | os.PathLike[str] = ".") -> tuple[str | None, str, list[tuple[str, str]]]:
    """(model path or ``None`` for the preset's, served name, [(adapter name, path)]) for ``args``."""
    adapters = [_adapter(spec) for spec in args.adapter]
    names = [n for n, _ in adapters]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise CliError(f"--adapter names must differ; repeated: {', '.join(duplicates)}")
    if args.model is not None:
        model, served = args.model, args.served_model_name or args.model
    else:
        trained = Path(cwd) / "runs" / PRESET
        if (trained / "adapter_config.json").is_file() and PRESET not in names:
            adapters.insert(0, (PRESET, str(trained)))
        model, served = None, args.served_model_name or PRESET_NAME
    if served in names:
        raise CliError(f"--adapter name {served!r} is the base model's name; give the adapter another name")
    return model, served, adapters


def check(args: Any) -> None:
    """The numeric flags, before anything is read."""
    if not 1 <= args.port <= 65535:
        raise CliError(f"--port {args.port} must be in 1..65535")
    if args.max_num_seqs < 1:
        raise CliError(f"--max-num-seqs {args.max_num_seqs} must be >= 1")
    if args.threads is not None and args.threads < 1:
        raise CliError(f"--threads {args.threads} must be >= 1")


def _check_model(name: str) -> str:
    """The reference transformers loads ``name`` by, after checking it is a decoder-only LM."""
    from transformers.models.auto import modeling_auto

    config = model_config(name, flag="--model")
    model_type = getattr(config, "model_type", "?")
    masked = model_type in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(
        config, "is_decoder", False
    )
    if not getattr(config, "auto_map", None) and (
        getattr(config, "is_encoder_decoder", False)
        or masked
        or model_type not in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    ):
        raise CliError(
            f"--model {name!r} ({model_type}) is not a decoder-only language model; "
            "lorakit serve generates text with causal LMs"
        )
    return model_reference(name)


def _check_adapter(name: str, path: str) -> None:
    folder = local_folder(path, files=ADAPTER_FILES, what="adapter")
    if not folder.is_dir():
        raise CliError(
            f"--adapter {name}={path}: {path!r} is neither a folder nor a Hugging Face Hub id; give an "
            "adapter folder (lorakit train's --out, any PEFT adapter) or org/name"
        )
    if not (folder / "adapter_config.json").is_file():
        raise CliError(
            f"--adapter {name}={path}: the folder has no adapter_config.json; "
            "model.save_pretrained(folder) writes it"
        )


def run(args: Any) -> int:
    check(args)
    model_path, name, adapters = plan(args)
    try:
        from lorakit.serving import Engine, ServedModel, load_base, serve
    except ImportError as exc:
        raise CliError(f"serving needs FastAPI and uvicorn: pip install 'lorakit[serve]' ({exc})") from exc
    for adapter_name, path in adapters:
        _check_adapter(adapter_name, path)
    if model_path is None:
        from lorakit.cli.presets import get_preset

        model_path = get_preset(PRESET).model()
    model_path = _check_model(model_path)
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
