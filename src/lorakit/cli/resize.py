"""``lorakit resize ADAPTER --rank R | --energy E --out DIR``: a PEFT-format copy of the adapter at
another rank, by truncated SVD of each module's update (or zero padding to grow it).

``--rank`` sets one rank for every module; ``--energy 0.95`` gives each module the smallest rank
that keeps that share of its ‖ΔW‖_F² (recorded in ``rank_pattern``). Each module's relative
Frobenius error is printed: exactly the Eckart–Young bound of the discarded singular values.
"""

from __future__ import annotations

import argparse
from typing import Any

import lorakit
from lorakit.cli.errors import CliError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "resize",
        help="truncate or pad an adapter to another rank",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("adapter", help="an adapter folder (PEFT format)")
    size = parser.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank", type=int, help="the new rank of every module")
    size.add_argument("--energy", type=float, help="keep this share of each update's energy, e.g. 0.95")
    parser.add_argument("--out", required=True, help="the folder to write the resized adapter to")
    parser.set_defaults(func=run, command="resize")


def run(args: argparse.Namespace) -> int:
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
