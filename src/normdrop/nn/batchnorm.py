"""BatchNorm modules, drop-in replacements for ``torch.nn.BatchNorm{1,2,3}d`` and
``torch.nn.LazyBatchNorm{1,2,3}d``.

Each class subclasses its ``torch.nn`` counterpart, so parameters, buffers, ``state_dict`` keys,
checkpoint loading, ``reset_parameters`` and every ``isinstance`` check of the ecosystem
(``update_bn``, weight-decay filters, ``convert_sync_batchnorm``, model initializers) are those
of PyTorch. What normdrop owns is the argument checks and the forward: the math in
:func:`normdrop.functional.batch_norm`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Container

import torch
from torch import Tensor, fx
from torch.nn.modules.batchnorm import _LazyNormBase
from torch.nn.modules.lazy import LazyModuleMixin

from normdrop.errors import InputError, InputTypeError
from normdrop.kernels import dispatch
from normdrop.nn.tracing import not_scriptable, record_call

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
]


def _check_batch_norm_config(num_features: int, eps: float, momentum: float | None) -> None:
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
        raise InputTypeError(f"num_features must be a positive int, got {num_features!r}")
    if num_features <= 0:
        raise InputError(f"num_features must be a positive int, got {num_features}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise InputTypeError(f"eps must be a real number (positive to train), got {eps!r}")
    if math.isnan(eps):
        raise InputError(f"eps must be a real number (positive to train), got {eps!r}")
    # The sign of eps is checked by the forward, as torch.nn does (its own module tests expect
    # "eps must be positive" from forward, not the constructor): eps = 0 is valid in eval mode,
    # so a model whose BatchNorms were built with eps=0 for inference still converts and runs.
    if momentum is not None and not (isinstance(momentum, numbers.Real) and 0 <= momentum <= 1):
        raise InputError(
            f"momentum must be a number in [0, 1] or None (cumulative average), got {momentum!r}"
        )


def check_input(
    name: str, input: Tensor, num_features: int | None, ranks: Container[int], shapes: str
) -> None:
    """What every BatchNorm-like module checks of its input: a tensor of one of ``ranks``
    (described by ``shapes``, e.g. ``"(N, C, H, W)"``) with ``num_features`` channels in dim 1
    (None: any number, for a lazy module that has yet to learn it)."""
    if not isinstance(input, Tensor):
        raise InputTypeError(f"{name}: input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() not in ranks:
        raise InputError(
            f"{name} expects input of shape {shapes}, got {input.dim()}-D input "
            f"of shape {tuple(input.shape)}"
        )
    if num_features is not None and input.shape[1] != num_features:
        raise InputError(
            f"{name}(num_features={num_features}) got input with {input.shape[1]} "
            f"channels (dim 1) in shape {tuple(input.shape)}"
        )


_MISSING = object()


def _registered(module: torch.nn.Module, registry: dict, name: str) -> Tensor | None:
    """``getattr(module, name)`` for a name in ``registry`` (``_parameters`` or ``_buffers``),
    without ``nn.Module.__getattr__``; any other name through it."""
    value = registry.get(name, _MISSING)
    return getattr(module, name) if value is _MISSING else value


class _BatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    r"""Batch Normalization over the channel dim 1 of an ``(N, C, *)`` input.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    In training, mean and (biased) variance are those of the batch, per channel, and the
    running estimates move by ``momentum`` towards them (with the unbiased variance); with
    ``momentum=None`` they are the cumulative average over ``num_batches_tracked`` batches. In
    eval mode the running estimates normalize, unless ``track_running_stats=False``, in which
    case batch statistics are used in both modes.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance for stability; positive.
        momentum: in [0, 1], or None for a cumulative moving average.
        affine: learn ``weight`` (gamma) and ``bias`` (beta).
        track_running_stats: keep ``running_mean``, ``running_var``, ``num_batches_tracked``.
        bias: with ``affine``, learn ``bias`` too (keyword-only, as in ``torch.nn``).

    Subclasses only say which input ranks they take.
    """

    _input_ranks: tuple[int, ...] = ()
    _input_shapes: str = ""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        # A lazy module learns num_features from its first input (it passes 0 until then).
        lazy = isinstance(self, LazyModuleMixin)
        _check_batch_norm_config(1 if lazy else num_features, eps, momentum)
        # bias=False (a learned scale without shift) exists since torch 2.13; older torch
        # rejects the keyword, so it is passed only when asked for.
        only_if_asked = {} if bias else {"bias": False}
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **only_if_asked
        )

    def _check_input_dim(self, input: Tensor) -> None:
        name, ranks, shapes = type(self).__name__, self._input_ranks, self._input_shapes
        check_input(name, input, self.num_features, ranks, shapes)

    def __prepare_scriptable__(self) -> torch.nn.Module:
        raise not_scriptable(self, twin=True)

    def _momentum_for_this_batch(self) -> float:
        """The running-average factor: ``momentum``, or 1/t at batch t for ``momentum=None``."""
        if self.momentum is None:
            counted = self.num_batches_tracked
            # torch.nn: without a counter (set to None), no cumulative average
            return 0.0 if counted is None else 1.0 / (float(counted) + 1.0)
        return self.momentum

    def _fast_path_cache(self) -> dispatch.eager.ModuleCache | None:
        """What the kernels' eager path remembers between calls (made on first use, so modules
        built or unpickled without ``__init__`` have one too); unused under torch.compile."""
        cache = self.__dict__.get("_eager_cache")
        if cache is None and dispatch.eager is not None:
            cache = self.__dict__["_eager_cache"] = dispatch.eager.ModuleCache()
        return cache

    def _call_arguments(self) -> tuple:
        """The functional call's ``(running_mean, running_var, weight, bias, training,
        momentum)`` for this module's mode: buffers normalize in eval; in training they are
        passed only to be updated; batch statistics in training or without buffers.

        Parameters and buffers are read from the module's registries: ``nn.Module.__getattr__``
        costs about 0.6 us a name (``benchmarks/breakdown.py``), a noticeable share of a small
        step. A name missing from them (a parametrization's property, a plain attribute) is
        read by ``getattr``."""
        params, buffers = self._parameters, self._buffers
        running_mean = _registered(self, buffers, "running_mean")
        training, tracking = self.training, self.track_running_stats
        use_buffers = not training or tracking
        return (
            running_mean if use_buffers else None,
            _registered(self, buffers, "running_var") if use_buffers else None,
            _registered(self, params, "weight"),
            _registered(self, params, "bias"),
            training or running_mean is None,
            self._momentum_for_this_batch() if training and tracking else 0.0,
        )

    def _count_batch(self) -> None:
        """One more batch in ``num_batches_tracked`` where it is tracked. Called after
        :meth:`_call_arguments` and before the functional call, as torch.nn counts: a call that
        the functional checks then refuse (a batch of one, a wrong channel count) still counts."""
        if self.training and self.track_running_stats:
            counter = _registered(self, self._buffers, "num_batches_tracked")
            if counter is not None:
                counter.add_(1)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return record_call(self, input)
        try:
            self._check_input_dim(input)
        except InputError:
            if isinstance(input, Tensor) and input.dim() in self._input_ranks:
                self._count_batch()  # torch.nn checks the channels after counting the batch
            raise
        arguments = self._call_arguments()
        self._count_batch()
        return dispatch.batch_norm(input, *arguments, self.eps, cache=self._fast_path_cache())


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    """BatchNorm over ``(N, C)`` or ``(N, C, L)`` input; see :class:`_BatchNorm`."""

    _input_ranks = (2, 3)
    _input_shapes = "(N, C) or (N, C, L)"


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    """BatchNorm over ``(N, C, H, W)`` input; see :class:`_BatchNorm`."""

    _input_ranks = (4,)
    _input_shapes = "(N, C, H, W)"


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    """BatchNorm over ``(N, C, D, H, W)`` input; see :class:`_BatchNorm`."""

    _input_ranks = (5,)
    _input_shapes = "(N, C, D, H, W)"


class _LazyBatchNorm(_LazyNormBase):
    """``torch.nn.LazyBatchNorm*d`` on normdrop's BatchNorm: built without ``num_features``
    (parameters and buffers uninitialized), it takes them from dim 1 of its first input and
    then becomes :attr:`cls_to_become`, the normdrop BatchNorm of its rank (torch's
    ``LazyModuleMixin``). The first forward is already normdrop's."""

    def initialize_parameters(self, input: Tensor) -> None:
        if self.num_features:
            return
        # the forward's checks, before dim 1 is read from the input
        name, ranks, shapes = type(self).__name__, self._input_ranks, self._input_shapes
        if isinstance(input, fx.Proxy):
            raise InputTypeError(
                f"{name} learns num_features from its first input: run one batch through the "
                "model before tracing it"
            )
        check_input(name, input, None, ranks, shapes)
        if input.shape[1] == 0:
            raise InputError(
                f"{name} learns num_features from dim 1 of its first input, which has none: "
                f"shape {tuple(input.shape)}"
            )
        super().initialize_parameters(input)  # materializes the parameters and buffers
        # Nothing to materialize (affine=False without running stats), or what a loaded
        # state_dict materialized: torch.nn leaves num_features at 0 there; the tensors'
        # length, else the input's channels (the forward then checks the input against it).
        sized = [t for t in (self.weight, self.running_mean) if t is not None]
        self.num_features = int(sized[0].shape[0]) if sized else int(input.shape[1])


class LazyBatchNorm1d(_LazyBatchNorm, BatchNorm1d):
    """:class:`BatchNorm1d` with ``num_features`` from the first input; see
    :class:`_LazyBatchNorm`. Arguments: those of :class:`BatchNorm1d` but ``num_features``."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyBatchNorm, BatchNorm2d):
    """:class:`BatchNorm2d` with ``num_features`` from the first input."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyBatchNorm, BatchNorm3d):
    """:class:`BatchNorm3d` with ``num_features`` from the first input."""

    cls_to_become = BatchNorm3d
