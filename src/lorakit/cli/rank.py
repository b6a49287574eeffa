"""``lorakit rank ADAPTER``: how much of its rank each adapted module really uses.

Prints, by layer and module kind, the effective rank (Roy & Vetterli 2007) over the allotted r and
the rank that keeps 95 % of the update's energy, then a suggested rank. ``--json`` prints every
number (singular values, energy curve, effective and stable rank, 90/95/99 % ranks); ``--plot
FILE.png`` draws the heatmap and the spectra of the most and least used modules. The singular
values come from the factors (QR of B and Aᵀ, SVD of an r × r core): the d × k update is never formed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lorakit
from lorakit.cli.errors import CliError
from lorakit.cli.output import stdout_to_stderr
from lorakit.cli.parsing import new_parser

__all__ = ["parser", "run", "HELP"]

HELP = "how much of each module's rank an adapter uses"


def parser() -> Any:
    p = new_parser(prog="lorakit rank", description=__doc__)
    p.add_argument("adapter", help="an adapter folder or Hub id (PEFT format)")
    p.add_argument(
        "--base", default=None, help="the base model folder or Hub id: also report |ΔW| / |W| per module"
    )
    p.add_argument(
        "--json", action="store_true", help="print all numbers as JSON (and nothing else on stdout)"
    )
    p.add_argument(
        "--plot", default=None, metavar="FILE.png", help="write the heatmap and spectra (a new file)"
    )
    return p


def run(args: Any) -> int:
    if args.plot and Path(args.plot).exists():
        raise CliError(f"--plot {args.plot!r} exists; give a new file name")
    if args.plot and Path(args.plot).suffix.lower() not in (".png", ".pdf", ".svg"):
        raise CliError(f"--plot {args.plot!r}: give a .png, .pdf or .svg file name")
    try:
        with stdout_to_stderr(args.json):
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
