r"""Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017, "Train longer, generalize better").

A large batch of ``N`` samples is split into ``G = N / B`` consecutive *virtual* (ghost)
batches of ``B = virtual_batch_size`` samples, and each is normalized with its own statistics.
For an ``(N, C, *)`` input and ghost batch ``g`` (samples ``gB .. gB + B - 1``), per channel::

    mu_g  = mean(x_g),   var_g = mean((x_g - mu_g)^2)       over the B samples and dims *
    y_g   = gamma * (x_g - mu_g) / sqrt(var_g + eps) + beta

Large-batch training keeps the regularizing noise of small-batch statistics. One set of running
statistics is kept: it moves towards each ghost batch in turn, as if the ``G`` ghost batches
were ``G`` training steps (Algorithm 1 of the paper)::

    for g in 1..G:  running <- (1 - momentum) * running + momentum * stat_g

so ``num_batches_tracked`` counts ghost batches and ``momentum=None`` averages over all of
them. (Keras 2 averaged the G statistics and made one update instead; the two differ only in
how much weight the last ghost batches get.) Evaluation uses the running statistics, exactly
as BatchNorm. The gradient is BatchNorm's, per ghost batch: the layer reuses
:class:`normdrop.functional._BatchNormFunction` on a view where each (ghost batch, channel) pair
is one channel.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, fx

from normdrop.errors import InputError, InputTypeError
from normdrop.functional import (
    _batch_norm_function,
    _check_batch_norm_args,
    _update_running_stats,
    batch_statistics,
)
from normdrop.nn.batchnorm import _BatchNorm
from normdrop.nn.tracing import record_call

__all__ = ["DEFAULT_VIRTUAL_BATCH_SIZE", "GhostBatchNorm1d", "GhostBatchNorm2d"]

DEFAULT_VIRTUAL_BATCH_SIZE = 32


def _to_ghost_layout(input: Tensor, ghosts: int) -> Tensor:
    """``(G*B, C, *)`` -> ``(B, G*C, *)``: channel ``g*C + c`` holds channel c of ghost batch g."""
    n, c, *rest = input.shape
    split = input.reshape(ghosts, n // ghosts, c, *rest)
    return split.transpose(0, 1).reshape(n // ghosts, ghosts * c, *rest)


def _from_ghost_layout(output: Tensor, ghosts: int) -> Tensor:
    """Inverse of :func:`_to_ghost_layout`."""
    b, gc, *rest = output.shape
    split = output.reshape(b, ghosts, gc // ghosts, *rest)
    return split.transpose(0, 1).reshape(b * ghosts, gc // ghosts, *rest)


class _GhostBatchNorm(_BatchNorm):
    """BatchNorm whose training statistics are per virtual batch; see the module docstring.

    Args:
        num_features: C.
        virtual_batch_size: B, samples per ghost batch; the training batch size must be a
            multiple of it. A batch of exactly B is plain BatchNorm.
        eps, momentum, affine, track_running_stats, device, dtype, bias: as for BatchNorm.
            With ``track_running_stats=False`` evaluation normalizes per ghost batch too.
    """

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = DEFAULT_VIRTUAL_BATCH_SIZE,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        if isinstance(virtual_batch_size, bool) or not isinstance(
            virtual_batch_size, numbers.Integral
        ):
            raise InputTypeError(
                f"virtual_batch_size must be a positive int, got {virtual_batch_size!r}"
            )
        if virtual_batch_size < 1:
            raise InputError(f"virtual_batch_size must be a positive int, got {virtual_batch_size}")
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.virtual_batch_size = int(virtual_batch_size)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"

    def _ghost_count(self, input: Tensor) -> int:
        name, n, b = type(self).__name__, input.shape[0], self.virtual_batch_size
        if n == 0 or n % b:
            raise InputError(
                f"{name}(virtual_batch_size={b}): the batch size must be a positive multiple "
                f"of virtual_batch_size, got a batch of {n} (input shape {tuple(input.shape)}); "
                "drop or pad the last incomplete batch (DataLoader(drop_last=True))"
            )
        if input.numel() // (n // b) // input.shape[1] == 1:
            raise InputError(
                f"{name}(virtual_batch_size={b}): each ghost batch has 1 value per channel "
                f"(input shape {tuple(input.shape)}); its variance is 0. Use a larger "
                "virtual_batch_size"
            )
        return n // b

    def _track_ghost_statistics(self, means: Tensor, variances: Tensor, count: int) -> None:
        """One moving-average step per ghost batch, in order (``momentum=None``: 1/t each)."""
        for mean, var in zip(means, variances, strict=True):
            momentum = self._momentum_for_this_batch()
            _update_running_stats(self.running_mean, self.running_var, mean, var, count, momentum)
            self.num_batches_tracked.add_(1)

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return record_call(self, input)
        self._check_input_dim(input)
        if not self.training and self.running_mean is not None:
            return super().forward(input)  # plain BatchNorm with the running statistics
        ghosts = self._ghost_count(input)
        # The core's checks (dtype, device, eps) on the whole batch; ghosts were checked above.
        _check_batch_norm_args(
            input, self.running_mean, self.running_var, self.weight, self.bias, True, 0.0,
            self.eps,
        )  # fmt: skip
        x = _to_ghost_layout(input, ghosts)
        with torch.no_grad():
            mean, var = batch_statistics(x)  # (G*C,)
        if self.training and self.track_running_stats:
            count = x.numel() // x.shape[1]
            channels = self.num_features
            self._track_ghost_statistics(
                mean.view(ghosts, channels), var.view(ghosts, channels), count
            )
        invstd = torch.rsqrt(var + self.eps)
        weight = None if self.weight is None else self.weight.repeat(ghosts)
        bias = None if self.bias is None else self.bias.repeat(ghosts)
        output = _batch_norm_function().apply(x, weight, bias, mean, invstd, True, self.eps)
        output = _from_ghost_layout(output, ghosts)
        if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
            output = output.contiguous(memory_format=torch.channels_last)
        return output


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost BatchNorm over ``(N, C)`` or ``(N, C, L)`` input; see :class:`_GhostBatchNorm`."""

    _input_ranks = (2, 3)
    _input_shapes = "(N, C) or (N, C, L)"


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost BatchNorm over ``(N, C, H, W)`` input; see :class:`_GhostBatchNorm`."""

    _input_ranks = (4,)
    _input_shapes = "(N, C, H, W)"
