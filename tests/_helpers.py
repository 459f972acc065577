"""Assertions shared by the tests."""

from __future__ import annotations

import torch


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """``actual == expected`` to ``rtol`` relative to the scale of ``expected``.

    Sums over many elements (weight gradients, statistics) carry rounding error proportional to
    the tensor's magnitude, so the absolute tolerance is ``rtol * max(1, max|expected|)``.
    """
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)
