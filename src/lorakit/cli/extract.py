"""``lorakit extract --base MODEL --tuned MODEL --rank R | --energy E --out DIR``: a LoRA adapter
from a full fine-tune.

Each linear layer (and, with ``--embeddings``, each embedding) whose weight changed gets the best
rank-R approximation of ``W_tuned − W_base`` (truncated SVD); a changed bias of such a layer goes
into ``lora_B``'s bias; every other changed parameter (norms, heads) is saved in full through
``modules_to_save``. Tensors are read one module at a time from the two safetensors checkpoints.
"""

from __future__ import annotations

from typing import Any

import lorakit
from lorakit.cli.errors import CliError
from lorakit.cli.parsing import new_parser
from lorakit.cli.resize import refuse_existing
from lorakit.cli.tasks import TASKS

__all__ = ["parser", "run", "HELP"]

HELP = "turn a full fine-tune into a LoRA adapter"


def parser() -> Any:
    p = new_parser(prog="lorakit extract", description=__doc__)
    p.add_argument("--base", required=True, help="the base model folder or Hub id (safetensors)")
    p.add_argument(
        "--tuned", required=True, help="the fully fine-tuned model folder or Hub id (same architecture)"
    )
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="the rank of every extracted module")
    size.add_argument("--energy", type=float, help="keep this share of each update's energy, e.g. 0.95")
    p.add_argument("--embeddings", action="store_true", help="also extract embedding layers as LoRA")
    p.add_argument(
        "--task",
        choices=list(TASKS),
        default=None,
        help="the task the tuned model does, recorded in the adapter so that `lorakit eval` and "
        "`merge` can load it with the right head",
    )
    p.add_argument("--out", required=True, help="a new folder to write the adapter to")
    return p


def run(args: Any) -> int:
    refuse_existing(args.out)
    try:
        result = lorakit.extract_adapter(
            args.base,
            args.tuned,
            rank=args.rank,
            energy=args.energy,
            include_embeddings=args.embeddings,
            out=args.out,
            task_type=TASKS[args.task].task_type if args.task else None,
        )
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    if result.ranks:
        width = max(len(n) for n in result.ranks)
        print(f"{'module':<{width}}  rank  relative error")
        for name, k in result.ranks.items():
            print(f"{name:<{width}}  {k:>4}  {result.errors[name]:.6f}")
    kept = ", ".join(result.modules_to_save) or "none"
    print(f"{len(result.ranks)} low-rank modules; kept in full: {kept}")
    print(f"wrote {args.out}")
    return 0
