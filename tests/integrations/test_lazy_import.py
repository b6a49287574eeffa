"""``import lorakit`` registers every task wrapper without importing transformers (design §4)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CODE = """
import sys
import lorakit
from lorakit.wrapper.peft_model import _TASK_MODELS
assert "transformers" not in sys.modules, "import lorakit imported transformers"
missing = {t for t in lorakit.TaskType if t is not lorakit.TaskType.OTHER} - set(_TASK_MODELS)
assert not missing, missing
"""


@pytest.mark.slow
def test_import_registers_tasks_without_transformers(subprocess_env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", CODE],
        capture_output=True,
        text=True,
        env=subprocess_env,
    )
    assert result.returncode == 0, result.stderr
