"""The activations of the fused BatchNorm -> activation -> Dropout, as torch computes them.

The reference paths (and the double-backward path of the fused op) apply them with these torch
functions; the kernels implement the same formulas, with the same conventions at the kinks
(``relu'(0) = 0``, ``leaky_relu'(0) = negative_slope``) and the exact, erf-based GELU.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from normdrop.errors import InputError, InputTypeError

__all__ = ["ACTIVATION_NAMES", "activate", "check_activation"]

ACTIVATION_NAMES = ("relu", "leaky_relu", "identity", "gelu")


def check_activation(name: str, activation: str, negative_slope: float) -> None:
    """Raise if ``activation`` is not one of :data:`ACTIVATION_NAMES` or the slope not real."""
    if not isinstance(activation, str) or activation not in ACTIVATION_NAMES:
        raise InputError(
            f"{name}: activation must be one of {ACTIVATION_NAMES}, got {activation!r}"
        )
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, numbers.Real):
        raise InputTypeError(
            f"{name}: negative_slope must be a real number, got {negative_slope!r}"
        )
    # NaN would turn every negative value into NaN. Comparisons, not math.isfinite: under
    # torch.compile(dynamic=True) the slope is a symbolic float, which dynamo compares only.
    if negative_slope != negative_slope or abs(negative_slope) == math.inf:
        raise InputError(f"{name}: negative_slope must be finite, got {negative_slope!r}")


def activate(z: Tensor, activation: str, negative_slope: float = 0.01) -> Tensor:
    """``act(z)`` for one of :data:`ACTIVATION_NAMES`, differentiable (twice)."""
    if activation == "relu":
        return torch.nn.functional.relu(z)
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(z, negative_slope)
    if activation == "gelu":
        return torch.nn.functional.gelu(z)
    return z
