"""``lorakit rank ADAPTER``: how much of its rank each adapted module really uses.

Prints, by layer and module kind, the effective rank (Roy & Vetterli 2007) over the allotted r and
the rank that keeps 95 % of the update's energy, then a suggested rank. ``--json`` prints every
number (singular values, energy curve, effective and stable rank, 90/95/99 % ranks); ``--plot
FILE.png`` draws the heatmap and the spectra of the most and least used modules. The singular
values come from the factors (QR of B and Aᵀ, SVD of an r × r core): the d × k update is never formed.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import lorakit
from lorakit.cli.errors import CliError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "rank",
        help="how much of each module's rank an adapter uses",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("adapter", help="an adapter folder (PEFT format)")
    parser.add_argument(
        "--base", default=None, help="the base model folder: also report |ΔW| / |W| per module"
    )
    parser.add_argument("--json", action="store_true", help="print all numbers as JSON")
    parser.add_argument("--plot", default=None, metavar="FILE.png", help="write the heatmap and spectra")
    parser.set_defaults(func=run, command="rank")


def run(args: argparse.Namespace) -> int:
    try:
        report = lorakit.rank_report(args.adapter, base=args.base)
    except (ValueError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from exc
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.table())
    if args.plot:
        report.plot(args.plot)
        print(f"wrote {args.plot}")
    return 0
