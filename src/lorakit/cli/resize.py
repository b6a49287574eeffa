"""``lorakit resize ADAPTER --rank R | --energy E --out DIR``: a PEFT-format copy of the adapter at
another rank, by truncated SVD of each module's update (or zero padding to grow it).

``--rank`` sets one rank for every module; ``--energy 0.95`` gives each module the smallest rank
that keeps that share of its ‖ΔW‖_F² (recorded in ``rank_pattern``). Each module's relative
Frobenius error is printed: exactly the Eckart–Young bound of the discarded singular values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lorakit
from lorakit.cli.errors import CliError
from lorakit.cli.parsing import new_parser

__all__ = ["parser", "run", "HELP", "refuse_existing"]

HELP = "truncate or pad an adapter to another rank"


def parser() -> Any:
    p = new_parser(prog="lorakit resize", description=__doc__)
    p.add_argument("adapter", help="an adapter folder or Hub id (PEFT format)")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="the new rank of every module")
    size.add_argument("--energy", type=float, help="keep this share of each update's energy, e.g. 0.95")
    p.add_argument("--out", required=True, help="a new folder to write the resized adapter to")
    return p


def refuse_existing(out: str) -> None:
    """Nothing is written over: ``--out`` must not exist (so it is never the source either)."""
    if Path(out).exists():
        raise CliError(f"--out {out!r} exists; give a new folder (nothing is written over)")


def run(args: Any) -> int:
    refuse_existing(args.out)
    try:
        result = lorakit.resize_adapter_files(args.adapter, args.out, rank=args.rank, energy=args.energy)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    width = max(len(n) for n in result.ranks)
    print(f"{'module':<{width}}  rank  relative error")
    for name, k in result.ranks.items():
        print(f"{name:<{width}}  {k:>4}  {result.errors[name]:.6f}")
    print(f"max relative error {max(result.errors.values()):.6f}; wrote {args.out}")
    return 0
