"""``python -m normdrop.tools.lint``: the ``normdrop lint`` command."""

import sys

from normdrop.tools.lint.cli import cli_main

sys.exit(cli_main())
