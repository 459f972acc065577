"""Dropout modules, drop-in replacements for ``torch.nn``'s dropout family.

Each class subclasses its ``torch.nn`` counterpart (same constructor, ``repr`` and
``isinstance`` checks); the forward is normdrop's :mod:`normdrop.functional`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, fx

from normdrop import functional as F
from normdrop.functional import _check_dropout_p
from normdrop.kernels import dispatch
from normdrop.nn.tracing import not_scriptable, record_call

__all__ = [
    "AlphaDropout",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "FeatureAlphaDropout",
]


class _Dropout(torch.nn.modules.dropout._DropoutNd):
    """Applies ``_function(input, p, training, inplace)``; subclasses only name the function.

    Args:
        p: probability of dropping an element (or a channel), in [0, 1]. Default: 0.5.
        inplace: overwrite the input instead of allocating the output.
    """

    _function: Callable[..., Tensor]
    _honours_inplace = True

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        _check_dropout_p(type(self).__name__, p)
        super().__init__(p, inplace)

    def __prepare_scriptable__(self) -> torch.nn.Module:
        raise not_scriptable(self, twin=True)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return record_call(self, input)
        inplace = self.inplace and self._honours_inplace
        return dispatch.module_dropout(type(self)._function, input, self.p, self.training, inplace)


class Dropout(_Dropout, torch.nn.Dropout):
    """Element-wise inverted dropout, any input shape: ``x * Bernoulli(1 - p) / (1 - p)``."""

    _function = staticmethod(F.dropout)


class Dropout1d(_Dropout, torch.nn.Dropout1d):
    """Zeroes whole channels of ``(N, C, L)`` or ``(C, L)`` input."""

    _function = staticmethod(F.dropout1d)


class Dropout2d(_Dropout, torch.nn.Dropout2d):
    """Zeroes whole channels of ``(N, C, H, W)`` input (3-D input: read as ``(N, C, L)``)."""

    _function = staticmethod(F.dropout2d)


class Dropout3d(_Dropout, torch.nn.Dropout3d):
    """Zeroes whole channels of ``(N, C, D, H, W)`` or ``(C, D, H, W)`` input."""

    _function = staticmethod(F.dropout3d)


class AlphaDropout(_Dropout, torch.nn.AlphaDropout):
    """Alpha dropout for SELU networks; like PyTorch's, it ignores ``inplace``."""

    _function = staticmethod(F.alpha_dropout)
    _honours_inplace = False


class FeatureAlphaDropout(_Dropout, torch.nn.FeatureAlphaDropout):
    """Channel-wise alpha dropout for SELU networks; like PyTorch's, it ignores ``inplace``."""

    _function = staticmethod(F.feature_alpha_dropout)
    _honours_inplace = False
