"""The command's parsers, on jsonargparse: typed flags from a dataclass, config files, one-line errors.

Why jsonargparse (and not tyro): it reads the settings dataclass (types, defaults, attribute
docstrings as help) *and* does what a training command needs around it, which tyro leaves to the
caller: ``--config`` files layered under the flags with the same type checks, ``--print-config``
that writes a file ``--config`` reads back, and set-able defaults for presets. It is argparse
underneath, so the other subcommands keep their plain ``add_argument`` calls, ``torchrun -m
lorakit.cli`` is unchanged, and errors arrive as exceptions we print as one line (tyro prints
multi-line panels itself). LitGPT and Lightning build their commands on it.

Two adaptations keep the flags the command always had: dashes (``--max-steps``; jsonargparse names
flags after the fields, ``--max_steps``, which is still accepted) and ``--flag`` / ``--no-flag``
switches for booleans.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from typing import Any

from lorakit.cli.errors import CliError

__all__ = ["new_parser", "add_dataclass", "one_line", "plain_help"]

_LOADER = "lorakit"


def _setup() -> None:
    try:
        from jsonargparse import set_loader, set_parsing_settings
    except ImportError as exc:
        raise CliError(
            "the lorakit command needs jsonargparse: pip install 'jsonargparse[signatures]' "
            "(or install lorakit with its cli extra)"
        ) from exc

    from lorakit.cli.settings import load_config_text

    set_loader(_LOADER, load_config_text, exceptions=(CliError,))
    set_parsing_settings(docstring_parse_attribute_docstrings=True)


def new_parser(**kwargs: Any) -> Any:
    """A jsonargparse parser that raises instead of exiting on bad input (``main`` prints one line),
    reads config files as TOML, YAML or JSON, and spells its print-config flag with a dash."""
    from jsonargparse import ArgumentParser

    _setup()
    kwargs.setdefault("formatter_class", _formatter())
    if "description" in kwargs:
        kwargs["description"] = plain_help(kwargs["description"])
    return ArgumentParser(
        exit_on_error=False, parser_mode=_LOADER, print_config="--print-config", env_prefix=False, **kwargs
    )


def _formatter() -> type:
    """jsonargparse's help (each flag's type and default) with descriptions kept as written."""
    from jsonargparse import DefaultHelpFormatter

    class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    return HelpFormatter


def add_dataclass(parser: Any, cls: type) -> None:
    """One flag per field of ``cls`` (help: the field's docstring), dashed, booleans as switches."""
    from jsonargparse import ActionYesNo

    flags = [f for f in dataclasses.fields(cls) if f.type not in ("bool", bool)]
    switches = [f for f in dataclasses.fields(cls) if f.type in ("bool", bool)]
    parser.add_class_arguments(cls, nested_key=None, as_group=False, skip={f.name for f in switches})
    helps = _field_docs(cls)
    for field in switches:
        parser.add_argument(
            "--" + field.name.replace("_", "-"),
            action=ActionYesNo(no_prefix="no-"),
            dest=field.name,
            default=field.default,
            help=f"{helps.get(field.name, '')} (default: {field.default})",
        )
    names = {f.name for f in flags}
    for action in list(parser._actions):  # noqa: SLF001 (argparse has no public alias API)
        if action.dest not in names:
            continue
        for option in list(action.option_strings):
            dashed = option.replace("_", "-")
            if option.startswith("--") and dashed != option:
                action.option_strings[action.option_strings.index(option)] = dashed  # help shows dashes
                parser._option_string_actions[dashed] = action  # noqa: SLF001
                # the underscore spelling still parses (jsonargparse's own, and config-file keys)


def _field_docs(cls: type) -> dict[str, str]:
    """Each field's attribute docstring, as one line (what jsonargparse shows for the other flags)."""
    from docstring_parser import parse_from_object

    return {
        p.arg_name: " ".join((p.description or "").split())
        for p in parse_from_object(cls).params
        if p.args and p.args[0] == "attribute"
    }


def plain_help(text: str | None) -> str:
    """A docstring as terminal help: reStructuredText's ``literals``, :roles:`x` and `refs`_ as
    plain text."""
    if not text:
        return ""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    text = text.replace("``", "`")
    return re.sub(r"`([^`]+)`_", r"\1", text).strip()


def one_line(exc: BaseException) -> str:
    """A parser's error as one line: jsonargparse's multi-line type errors are shortened to what
    was wrong with which flag."""
    text = str(exc)
    key = re.match(r'Parser key "([\w.]+)":', text)
    missing = re.search(r"File does not exist: '([^']*)'", text)
    unknown = re.match(r"Option '([\w.-]+)' is not accepted", text)
    if key and key.group(1) == "config" and missing:
        return f"config file {missing.group(1)!r} does not exist"
    if unknown:
        return f"{unknown.group(1)!r} is not a setting (a key of the config file, or a flag)"
    if key:
        got = re.search(r"(?:Given value|Got value):\s*(.*)", text)
        value = got.group(1).strip() if got else ""
        flag = "--" + key.group(1).replace("_", "-")
        literal = re.search(r"Literal\[(.*?)\]", text)
        if literal:
            return f"argument {flag}: invalid choice {value!r}; choose from {literal.group(1)}"
        expected = re.findall(r"Expected a <class '(\w+)'>", text)
        kinds = " or ".join(dict.fromkeys(e for e in expected if e != "NoneType")) or "another value"
        return f"argument {flag}: invalid value {value!r} (expected {kinds})"
    return " ".join(text.split())
