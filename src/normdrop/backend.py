"""Which implementation runs inside ``normdrop.nn``: the fast kernels or the reference math.

``"fast"`` (the default) uses the compiled kernels where they apply (see
:mod:`normdrop.kernels`) and the reference elsewhere; ``"reference"`` always runs
:mod:`normdrop.functional`, the readable math, which is handy for debugging.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from normdrop.errors import InputError

BACKENDS = ("fast", "reference")
_backend = "fast"


def set_backend(name: str) -> None:
    """Select ``"fast"`` or ``"reference"`` for every normdrop module, process-wide."""
    global _backend
    if name not in BACKENDS:
        raise InputError(f"set_backend: name must be one of {BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    """The backend in use: ``"fast"`` or ``"reference"``."""
    return _backend


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with the given backend, then restore the previous one."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)
