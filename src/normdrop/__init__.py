"""normdrop: Batch Normalization and Dropout for PyTorch, exact, fast and measured.

- :mod:`normdrop.functional`: the math, one reference implementation.
- :mod:`normdrop.nn`: modules that replace ``torch.nn``'s one for one.
"""

from normdrop import functional, nn
from normdrop.errors import InputError, InputTypeError

__version__ = "0.1.0"

__all__ = ["InputError", "InputTypeError", "__version__", "functional", "nn"]
