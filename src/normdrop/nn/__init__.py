"""Modules: drop-in replacements for ``torch.nn``'s BatchNorm and Dropout layers."""

from normdrop.nn.batch_renorm import BatchRenorm1d, BatchRenorm2d
from normdrop.nn.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from normdrop.nn.drop import DropBlock2d, DropConnect, DropPath, GaussianDropout
from normdrop.nn.dropout import (
    AlphaDropout,
    Dropout,
    Dropout1d,
    Dropout2d,
    Dropout3d,
    FeatureAlphaDropout,
)
from normdrop.nn.frozen_batchnorm import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    freeze_batchnorm,
    unfreeze_batchnorm,
)
from normdrop.nn.ghost_batchnorm import GhostBatchNorm1d, GhostBatchNorm2d
from normdrop.nn.norm_act import BatchNormAct1d, BatchNormAct2d
from normdrop.nn.sync_batchnorm import (
    SyncBatchNorm,
    convert_sync_batchnorm,
    revert_sync_batchnorm,
)

__all__ = [
    "AlphaDropout",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "DropBlock2d",
    "DropConnect",
    "DropPath",
    "Dropout",
    "Dropout1d",
    "Dropout2d",
    "Dropout3d",
    "FeatureAlphaDropout",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GaussianDropout",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "freeze_batchnorm",
    "revert_sync_batchnorm",
    "unfreeze_batchnorm",
]
