"""Modules: drop-in replacements for ``torch.nn``'s BatchNorm and Dropout layers."""

from normdrop.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from normdrop.nn.dropout import (
    AlphaDropout,
    Dropout,
    Dropout1d,
    Dropout2d,
    Dropout3d,
    FeatureAlphaDropout,
)

__all__ = [
    "AlphaDropout",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "FeatureAlphaDropout",
]
