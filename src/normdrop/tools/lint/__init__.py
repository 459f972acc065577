"""Lint models for BatchNorm and Dropout pitfalls: :func:`lint` (the rules, in
:mod:`normdrop.tools.lint.checks`) and the ``normdrop lint`` command (:func:`cli_main`, in
:mod:`normdrop.tools.lint.cli`; ``python -m normdrop.tools.lint`` runs it too).

This is a package, not a module, so that ``python -m normdrop.tools.lint`` can run while
``normdrop.tools`` exports the function ``lint`` under the same name.
"""

from normdrop.tools.lint.checks import SEVERITIES, Finding, lint
from normdrop.tools.lint.cli import cli_main

__all__ = ["SEVERITIES", "Finding", "cli_main", "lint"]
