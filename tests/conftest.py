"""Fixtures shared by the whole suite.

The helpers are importable because pyproject's ``pythonpath = ["tests", "."]`` puts tests/ (the model
zoo ``zoo`` and ``cli_fixtures``) and the repository root (``benchmarks``) on ``sys.path``; a Python
process a test launches gets the same through :func:`subprocess_env`. Test modules are imported by
path (``--import-mode=importlib``), so the folders that mirror src/ need no ``__init__.py``.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.register_assert_rewrite("zoo")  # readable failures in the zoo's state checks

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """The environment for a Python process a test launches (torchrun workers, a saver to kill, a
    fresh interpreter): this checkout's src/ and tests/ first on ``PYTHONPATH``."""
    path = [str(SRC), str(TESTS), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def free_port() -> Callable[[], int]:
    """``free_port()``: a TCP port on 127.0.0.1 that was free a moment ago (a launcher's rendezvous)."""
    return _free_port


@pytest.fixture(scope="session")
def cli_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Saved tiny BERT, Llama and T5 folders with tokenizers, and sentiment (CSV), tagging (Parquet)
    and question-answering (JSONL) data, for ``lorakit train`` (read-only: write elsewhere)."""
    from cli_fixtures import qa_rows, sentiment_rows, tagging_rows, tiny_bert, tiny_llama, tiny_t5, write_rows

    root = tmp_path_factory.mktemp("cli")
    tiny_bert(root / "bert")
    tiny_llama(root / "llama")
    tiny_t5(root / "t5")
    write_rows(sentiment_rows(), root / "sentiment.csv")
    write_rows(tagging_rows(), root / "tags.parquet")
    write_rows(qa_rows(), root / "qa.jsonl")
    return root


# -- the PEFT-parity summary: the largest output difference over every compared case ------------------
_PARITY_DIFFS = pytest.StashKey[dict[str, float]]()


@pytest.fixture(scope="session")
def parity_diffs(request: pytest.FixtureRequest) -> dict[str, float]:
    """case id → max |lorakit − PEFT| over its eval-mode outputs; reported after the run."""
    return request.config.stash.setdefault(_PARITY_DIFFS, {})


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    diffs = config.stash.get(_PARITY_DIFFS, {})
    if not diffs:
        return
    worst = max(diffs, key=diffs.__getitem__)
    terminalreporter.write_sep("-", "lorakit vs peft parity")
    terminalreporter.write_line(
        f"max |lorakit - peft| = {diffs[worst]:.3e} (worst case: {worst}; {len(diffs)} cases compared)"
    )
