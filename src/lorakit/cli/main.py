"""The ``lorakit`` command: a table of subcommands, each in its own module with ``add_parser``.

Bad input (a :class:`CliError`, or a :class:`lorakit.LorakitError` from the library) is printed as
one line, ``lorakit <command>: error: ...``, with exit status 2, as argparse does for bad flags.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from lorakit import LorakitError, __version__
from lorakit.cli import eval as eval_cmd
from lorakit.cli import export, extract, info, inspect, merge, rank, resize, serve, train
from lorakit.cli.errors import CliError
from lorakit.distributed import process_group_scope

__all__ = ["main", "build_parser"]

SUBCOMMANDS = (train, eval_cmd, inspect, merge, info, rank, resize, extract, serve, export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning with PEFT's file format. "
        "`lorakit train` with no arguments runs the embedded default.",
    )
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(subparsers)
    return parser


def _quiet_libraries() -> None:
    """Keep the terminal for progress bars and results: no load reports or advisory warnings.
    Environment variables, so that commands which never import transformers stay fast; a user's own
    settings win."""
    import warnings

    for name, value in (
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(name, value)
    warnings.filterwarnings("ignore", module="transformers")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    command = args.command
    try:
        _quiet_libraries()
        # Under a launcher the Trainer creates the process group; it must not outlive the command.
        with process_group_scope(f"the end of `lorakit {command}`"):
            return int(args.func(args) or 0)
    except (CliError, LorakitError) as exc:
        print(f"lorakit {command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorakit {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
