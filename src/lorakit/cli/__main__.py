"""``python -m lorakit.cli``: the ``lorakit`` command."""

import sys

from lorakit.cli.main import main

sys.exit(main())
