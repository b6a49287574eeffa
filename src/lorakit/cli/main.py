"""The ``lorakit`` command: a table of subcommands, each in its own module with ``parser()``,
``HELP`` and ``run``.

Bad input never ends in a traceback: a flag the parser refuses, a :class:`CliError` of the
command, or a :class:`lorakit.LorakitError` of the library is printed as one line,
``lorakit <command>: error: ...``, with exit status 2. A closed pipe (``lorakit inspect m | head``)
ends the command quietly.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from lorakit import LorakitError, __version__
from lorakit.cli import eval as eval_cmd
from lorakit.cli import extract, info, inspect, merge, rank, resize, training
from lorakit.cli.errors import CliError
from lorakit.cli.parsing import new_parser, one_line
from lorakit.distributed import process_group_scope

__all__ = ["main", "build_parser", "SUBCOMMANDS"]

SUBCOMMANDS = {
    "train": training,
    "eval": eval_cmd,
    "inspect": inspect,
    "merge": merge,
    "info": info,
    "rank": rank,
    "resize": resize,
    "extract": extract,
}
SIGPIPE_EXIT = 141  # what a shell reports for a process ended by SIGPIPE


def build_parser() -> Any:
    parser = new_parser(
        prog="lorakit",
        description="LoRA fine-tuning with PEFT's file format. "
        "`lorakit train` with no arguments runs the embedded default.",
    )
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    subcommands = parser.add_subcommands(dest="command", required=False, title="commands")
    for name, module in SUBCOMMANDS.items():
        subcommands.add_subcommand(name, module.parser(), help=module.HELP)
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


def _flags(text: str) -> str:
    """``merge.adapter`` (jsonargparse's name of a subcommand's argument) as the user types it:
    ``--adapter`` for an option, ``adapter`` for a positional argument."""

    def spelled(match: re.Match[str]) -> str:
        command, dest = match.group(1), match.group(2)
        actions = SUBCOMMANDS[command].parser()._actions  # noqa: SLF001
        options: list[str] = next((a.option_strings for a in actions if a.dest == dest), [])
        return options[0] if options else dest

    return re.sub(rf"\b({'|'.join(SUBCOMMANDS)})\.(\w+)\b", spelled, text)


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "train":  # parsed in two passes (its preset sets defaults)
        return training.run(argv[1:])
    parser = build_parser()
    cfg = parser.parse_args(argv)
    if not cfg.command:
        parser.print_help()
        return 2
    return int(SUBCOMMANDS[cfg.command].run(cfg[cfg.command]) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = f"lorakit {args[0]}" if args and args[0] in SUBCOMMANDS else "lorakit"
    try:
        _quiet_libraries()
        # Under a launcher the Trainer creates the process group; it must not outlive the command.
        with process_group_scope(f"the end of `{command}`"):
            return _dispatch(args)
    except argparse.ArgumentError as exc:
        print(f"{command}: error: {_flags(one_line(exc))} (see {command} --help)", file=sys.stderr)
        return 2
    except (CliError, LorakitError) as exc:
        print(f"{command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop, and let nothing flush into the pipe
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return SIGPIPE_EXIT


if __name__ == "__main__":
    sys.exit(main())
