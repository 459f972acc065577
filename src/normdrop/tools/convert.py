"""Swap a model's BatchNorm and Dropout layers between ``torch.nn`` and ``normdrop.nn``.

``convert(model, to="normdrop")`` puts normdrop's implementation behind an existing model (a
torchvision or timm network, a checkpoint) without touching its code; ``to="torch"`` takes it
back out. Each layer keeps its parameters and buffers (the very tensors, same names and order),
its mode, device, dtype, hyperparameters, other instance attributes and hooks (forward,
backward and state_dict ones, in the same hook tables: handles still remove them), so
``state_dict`` is unchanged and a round trip is the identity; a layer shared by two parents
stays one layer. Only exact classes are swapped: a user's subclass of ``torch.nn.BatchNorm2d``
(timm's ``BatchNormAct2d``, a parametrized layer) has its own reasons and stays, named in a
warning.
"""

from __future__ import annotations

import warnings

import torch

from normdrop import nn as ndnn
from normdrop.errors import InputError
from normdrop.nn.swap import swap_layers
from normdrop.nn.sync_batchnorm import _move_state
from normdrop.tools._model import check_model, deep_copy

__all__ = ["convert"]

_COUNTERPARTS: dict[type[torch.nn.Module], type[torch.nn.Module]] = {
    torch.nn.BatchNorm1d: ndnn.BatchNorm1d,
    torch.nn.BatchNorm2d: ndnn.BatchNorm2d,
    torch.nn.BatchNorm3d: ndnn.BatchNorm3d,
    torch.nn.SyncBatchNorm: ndnn.SyncBatchNorm,
    torch.nn.Dropout: ndnn.Dropout,
    torch.nn.Dropout1d: ndnn.Dropout1d,
    torch.nn.Dropout2d: ndnn.Dropout2d,
    torch.nn.Dropout3d: ndnn.Dropout3d,
    torch.nn.AlphaDropout: ndnn.AlphaDropout,
    torch.nn.FeatureAlphaDropout: ndnn.FeatureAlphaDropout,
}
_TARGETS = {
    "normdrop": _COUNTERPARTS,
    "torch": {ours: theirs for theirs, ours in _COUNTERPARTS.items()},
}


def _rebuild(module: torch.nn.Module, cls: type[torch.nn.Module]) -> torch.nn.Module:
    """A ``cls`` with ``module``'s configuration, tensors, mode and hooks."""
    if isinstance(module, torch.nn.modules.dropout._DropoutNd):
        new = cls(module.p, module.inplace)
    else:
        extra = {} if not module.affine or module.bias is not None else {"bias": False}
        args = [module.num_features, module.eps, module.momentum, module.affine]
        args.append(module.track_running_stats)
        if issubclass(cls, torch.nn.SyncBatchNorm | ndnn.SyncBatchNorm):
            args.append(module.process_group)
        new = cls(*args, **extra)
    # The very parameters, buffers and hook tables, and the instance's other attributes.
    new = _move_state(module, new)
    return new


def _is_layer(module: torch.nn.Module) -> bool:
    """A normdrop BatchNorm or dropout-like layer (as opposed to a container)."""
    from normdrop.nn.drop import DropBlock2d, DropConnect, DropPath, GaussianDropout
    from normdrop.nn.frozen_batchnorm import _FrozenBatchNorm

    kinds = (
        torch.nn.modules.batchnorm._BatchNorm,
        torch.nn.modules.dropout._DropoutNd,
        _FrozenBatchNorm,
        DropBlock2d,
        DropConnect,
        DropPath,
        GaussianDropout,
    )
    return isinstance(module, kinds)


def convert(
    model: torch.nn.Module, to: str = "normdrop", *, inplace: bool = False
) -> torch.nn.Module:
    """Swap every BatchNorm/Dropout layer of ``model`` for its ``torch.nn`` or normdrop twin.

    Args:
        model: any module (a bare BatchNorm or Dropout too).
        to: ``"normdrop"`` (torch.nn -> normdrop.nn) or ``"torch"`` (the reverse).
        inplace: modify ``model`` itself instead of a deep copy.

    Returns:
        The converted model (``model`` itself when ``inplace``, unless ``model`` is a layer
        that had to be replaced). With ``to="torch"``, normdrop layers that have no torch.nn
        twin (ghost, renorm, frozen, drop-path, ...) stay, with a warning naming them.
    """
    if to not in _TARGETS:
        raise InputError(f"convert: to must be one of {tuple(_TARGETS)}, got {to!r}")
    check_model("convert", model)
    target = model if inplace else deep_copy(model, "convert", "; pass inplace=True to convert it")
    table = _TARGETS[to]
    left: list[str] = []
    kept: dict[str, list[str]] = {}  # class name -> paths of torch.nn layers left as they are

    def twin(layer: torch.nn.Module, path: str) -> torch.nn.Module | None:
        if type(layer) in table:
            return _rebuild(layer, table[type(layer)])
        ours = type(layer).__module__.startswith("normdrop.")
        if ours and _is_layer(layer):
            left.append(f"{path or '<root>'} ({type(layer).__name__})")
        elif to == "normdrop" and not ours and isinstance(layer, _TORCH_LAYERS):
            kept.setdefault(type(layer).__name__, []).append(f"'{path or '<root>'}'")
        return None

    converted = swap_layers(target, twin)
    if to == "torch" and left:
        warnings.warn(
            "convert(to='torch'): these normdrop layers have no torch.nn counterpart and were "
            f"kept: {', '.join(left)}",
            UserWarning,
            stacklevel=2,
        )
    if kept:
        classes = "; ".join(
            f"{name} x{len(paths)} ({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''})"
            for name, paths in kept.items()
        )
        warnings.warn(
            "convert(to='normdrop'): these BatchNorm/Dropout layers are not exactly torch.nn's "
            "classes and were kept as they are: a subclass with code of its own, a "
            "parametrized layer (torch.nn.utils.parametrize), or a lazy layer not yet "
            f"initialized (run one forward first): {classes}",
            UserWarning,
            stacklevel=2,
        )
    return converted


# torch.nn's kinds of layer whose subclasses convert leaves, with a warning.
_TORCH_LAYERS = (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)
