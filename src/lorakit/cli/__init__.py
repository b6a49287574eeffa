"""The ``lorakit`` command line: one module per subcommand, each over lorakit's public API.

Entry points: :func:`lorakit.cli.main.main` (the ``lorakit`` console script, or ``python -m
lorakit.cli``), and from Python ``lorakit.cli.train(TrainSettings(...))``, the same run as
``lorakit train`` with the same settings.
"""

from lorakit.cli.settings import TrainSettings
from lorakit.cli.training import train

__all__ = ["TrainSettings", "train"]
