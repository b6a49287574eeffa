"""The ``lorakit`` command line: one module per subcommand, each over lorakit's public API.

Entry point: :func:`lorakit.cli.main.main` (the ``lorakit`` console script, or ``python -m lorakit.cli``).
"""
