"""Exceptions for bad input.

PyTorch reports most bad input from deep inside ATen as a bare ``RuntimeError``; Python code
expects ``ValueError`` or ``TypeError``. Ours are both, so an ``except`` clause written for either
convention keeps working when a model switches from ``torch.nn`` to ``normdrop``.
"""


class InputError(ValueError, RuntimeError):
    """An argument has the wrong shape, size, range or device."""


class InputTypeError(TypeError, RuntimeError):
    """An argument has the wrong type or dtype."""
