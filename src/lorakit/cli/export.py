"""``lorakit export ADAPTER --to gguf --out FILE.gguf``: an adapter for llama.cpp (and what runs on it).

llama.cpp applies the file to the base model's GGUF at load time:

    llama-cli -m base.gguf --lora FILE.gguf          # or llama_cpp.Llama(model_path=..., lora_path=...)

ADAPTER is a folder or a Hugging Face Hub id. ``--base`` is the base model's GGUF file (tensor names
and shapes are then checked against it) or its transformers folder or Hub id; by default the
adapter's ``base_model_name_or_path``. What a GGUF adapter cannot express (DoRA, modules_to_save
heads, LoRA biases, convolutions, MoE experts) is refused before anything is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorakit.cli.errors import CliError
from lorakit.cli.models import model_reference
from lorakit.cli.parsing import new_parser
from lorakit.hub import ADAPTER_FILES, local_folder

__all__ = ["parser", "run", "HELP", "FORMATS"]

HELP = "write an adapter in another runtime's format (GGUF for llama.cpp)"

FORMATS = ("gguf",)


def parser() -> Any:
    p = new_parser(prog="lorakit export", description=__doc__)
    p.add_argument("adapter", help="an adapter folder or Hub id (PEFT format)")
    p.add_argument("--revision", default=None, help="the adapter's Hub revision (branch, tag or commit)")
    p.add_argument("--to", choices=FORMATS, default="gguf", help="the target format")
    p.add_argument("--out", required=True, help="the file to write (FILE.gguf)")
    p.add_argument(
        "--base",
        default=None,
        help="the base model's GGUF file, or its folder or Hub id (default: the adapter's base model)",
    )
    p.add_argument("--outtype", choices=["f32", "f16"], default="f32", help="tensor type (f32 is exact)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p


def _adapter_folder(name: str, revision: str | None) -> Path:
    folder = local_folder(name, revision=revision, files=ADAPTER_FILES, what="adapter")
    if not folder.is_dir():
        raise CliError(
            f"adapter {name!r} is neither a folder nor a Hugging Face Hub id; give the --out folder of "
            "`lorakit train`, any PEFT adapter folder, or org/name"
        )
    if not (folder / "adapter_config.json").is_file():
        raise CliError(
            f"adapter folder {name!r} has no adapter_config.json; model.save_pretrained(folder) writes it"
        )
    return folder


def _base(args: Any, folder: Path) -> str:
    """``--base`` (a GGUF file must exist; a folder needs a config.json), else the adapter's base."""
    if args.base is not None:
        if args.base.endswith(".gguf"):
            if not Path(args.base).is_file():
                raise CliError(f"--base {args.base!r}: no such GGUF file")
            return str(args.base)
        return model_reference(args.base, "--base")
    from lorakit import LoraConfig

    recorded = LoraConfig.from_pretrained(str(folder)).base_model_name_or_path
    if not recorded:
        raise CliError(
            f"adapter {args.adapter!r} does not name its base model; pass --base (its GGUF file or folder)"
        )
    return model_reference(str(recorded), f"the base model of {args.adapter!r}")


def run(args: Any) -> int:
    out = Path(args.out)
    if out.is_dir():
        raise CliError(f"--out {args.out!r} is a folder; give a file name (FILE.gguf)")
    if out.exists() and not args.overwrite:
        raise CliError(f"--out {args.out!r} exists; give a new file name or pass --overwrite")
    folder = _adapter_folder(args.adapter, args.revision)
    base = _base(args, folder)
    try:
        import gguf  # noqa: F401  (lorakit.export imports it where it writes)
    except ImportError as exc:
        raise CliError(
            f"the GGUF export needs the gguf package: pip install 'lorakit[gguf]' ({exc})"
        ) from exc
    from lorakit.export import export_gguf

    result = export_gguf(folder, out, base=base, dtype=args.outtype)
    scaling = "scalings folded into lora_b, alpha 0" if result.folded_scaling else f"alpha {result.alpha:g}"
    print(
        f"wrote {result.path}: {result.pairs} LoRA pairs for llama.cpp's {result.architecture!r} ({scaling})"
    )
    print(f"use it with: llama-cli -m BASE.gguf --lora {result.path}")
    return 0
