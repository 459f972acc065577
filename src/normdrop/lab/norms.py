"""Which batch-normalization layer a variant uses: ``--bn-type batchnorm|ghost|renorm``.

The classes are looked up in :mod:`normdrop.nn` by name when a model is built, so the lab needs
nothing from a layer family until it is asked for, and a missing one is a clear error.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from normdrop.errors import InputError

__all__ = ["BN_CLASSES", "norm_factory"]

# --bn-type -> class names in normdrop.nn for (N, C) and (N, C, H, W) input.
BN_CLASSES = {
    "batchnorm": ("BatchNorm1d", "BatchNorm2d"),
    "ghost": ("GhostBatchNorm1d", "GhostBatchNorm2d"),
    "renorm": ("BatchRenorm1d", "BatchRenorm2d"),
}


def _lookup(bn_type: str, spatial: bool) -> type[nn.Module]:
    import normdrop.nn

    if bn_type not in BN_CLASSES:
        raise InputError(f"--bn-type must be one of {tuple(BN_CLASSES)}, got {bn_type!r}")
    name = BN_CLASSES[bn_type][spatial]
    layer = getattr(normdrop.nn, name, None)
    if layer is None:
        raise InputError(
            f"--bn-type {bn_type}: normdrop.nn.{name} is not available in this version of "
            "normdrop; use --bn-type batchnorm"
        )
    return layer


def norm_factory(
    bn_type: str = "batchnorm", momentum: float = 0.1, virtual_batch_size: int | None = None
) -> Callable[[int, bool], nn.Module]:
    """A function ``make(num_features, spatial)`` building the chosen BN layer.

    ``spatial`` selects the 2d class (for conv features) over the 1d one. ``virtual_batch_size``
    is passed to ghost batch norm only, and only when given (else the class's default).
    """
    extra = {} if virtual_batch_size is None else {"virtual_batch_size": virtual_batch_size}

    def make(num_features: int, spatial: bool = False) -> nn.Module:
        return _lookup(bn_type, spatial)(num_features, momentum=momentum, **extra)

    return make
