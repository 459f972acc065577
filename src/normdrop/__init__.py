"""normdrop: Batch Normalization and Dropout for PyTorch, exact, fast and measured.

- :mod:`normdrop.functional`: the math, one reference implementation.
- :mod:`normdrop.nn`: modules that replace ``torch.nn``'s one for one.
- :func:`set_backend` / :func:`use_backend`: fast kernels (default) or the reference math.
"""

from normdrop import functional, nn
from normdrop.backend import get_backend, set_backend, use_backend
from normdrop.errors import InputError, InputTypeError

__version__ = "0.1.0"

__all__ = [
    "InputError",
    "InputTypeError",
    "__version__",
    "functional",
    "get_backend",
    "nn",
    "set_backend",
    "use_backend",
]
