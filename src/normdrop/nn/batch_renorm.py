r"""Batch Renormalization (Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch
Dependence in Batch-Normalized Models").

BatchNorm trains with batch statistics and predicts with running ones; with small or non-iid
batches the two disagree. Batch Renorm corrects the training output towards the running
statistics, per channel, with ``sigma_B = sqrt(var_B + eps)`` and
``sigma = sqrt(running_var + eps)``::

    r    = clip(sigma_B / sigma,                 1 / rmax, rmax)     treated as constants:
    d    = clip((mu_B - running_mean) / sigma,   -dmax,    dmax)     no gradient flows through them
    y    = gamma * ((x - mu_B) / sigma_B * r + d) + beta

With ``r = 1, d = 0`` this is BatchNorm; without clipping it is ``(x - running_mean) / sigma``,
the inference transform. ``r`` and ``d`` use the running statistics from *before* this batch's
update. Since r and d are constants, ``y`` is BatchNorm with weight ``gamma * r`` and bias
``gamma * d + beta``, and the layer reuses :class:`normdrop.functional._BatchNormFunction`
(gradient of the paper's Algorithm 1).

The running statistics are the paper's: ``running_mean`` moves towards ``mu_B`` and
``sigma`` towards ``sigma_B`` (with the *biased* batch variance), both by ``momentum``::

    running_mean <- running_mean + momentum * (mu_B - running_mean)
    sigma        <- sigma + momentum * (sigma_B - sigma),   stored as  running_var = sigma^2 - eps

so that ``state_dict`` keys match BatchNorm's and evaluation, BatchNorm with the running
statistics, divides by exactly ``sigma``. This matters on small batches, the setting Batch
Renorm is for: PyTorch's BatchNorm averages the unbiased variance, whose square root is about
1.8x the mean of ``sigma_B`` over batches of 2 (``E[sigma_B] = sigma / sqrt(pi)`` for two
normal samples); ``r`` would then sit near 0.56 instead of 1, and the lower clip ``1 / rmax``
would cut 36% of the channels of each batch instead of 21%, so that training and inference
transforms differ far more often than the paper intends.

Warm-up (the paper's Section 4: rmax = 1, dmax = 0 for the first 5k steps, then relaxed to 3
and 5 by 40k and 25k steps). At step ``t = num_batches_tracked``::

    t <  warmup_steps:  rmax_t = 1, dmax_t = 0                               (BatchNorm)
    t >= warmup_steps:  rmax_t = 1 + (rmax - 1) * min(1, (t - warmup_steps) / rmax_ramp_steps)
                        dmax_t = dmax * min(1, (t - warmup_steps) / dmax_ramp_steps)

(a ramp of 0 steps jumps straight to the limit). Evaluation is BatchNorm with the running
statistics.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, fx

from normdrop.errors import InputError, InputTypeError
from normdrop.functional import (
    _batch_norm_function,
    _check_batch_norm_args,
    _compute_dtype,
    _empty_batch_norm,
    _store_finite,
    _values_per_channel,
    batch_statistics,
)
from normdrop.nn.batchnorm import _BatchNorm
from normdrop.nn.tracing import record_call

__all__ = [
    "BatchRenorm1d",
    "BatchRenorm2d",
    "renorm_correction",
    "stored_variance",
    "update_renorm_stats",
]


@torch.no_grad()
def renorm_correction(
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    rmax: float,
    dmax: float,
) -> tuple[Tensor, Tensor]:
    """The per-channel ``(r, d)`` of Batch Renorm, from batch and running statistics.

    All inputs are ``(C,)``; ``var`` and ``running_var`` are variances (eps is added here).
    Returns two ``(C,)`` tensors in ``mean``'s dtype, outside autograd.
    """
    sigma_batch = torch.sqrt(var + eps)
    sigma = torch.sqrt(running_var.to(mean.dtype) + eps)
    r = (sigma_batch / sigma).clamp(1.0 / rmax, rmax)
    d = ((mean - running_mean.to(mean.dtype)) / sigma).clamp(-dmax, dmax)
    return r, d


def stored_variance(sigma: Tensor, eps: float) -> Tensor:
    """``running_var`` for a running ``sigma``: ``sigma^2 - eps``, at least 0 (the buffer keeps
    BatchNorm's meaning, so ``sigma = sqrt(running_var + eps)`` again)."""
    return (sigma * sigma - eps).clamp_min(0.0)


@torch.no_grad()
def update_renorm_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    eps: float,
    count: int,
    momentum: float,
) -> None:
    """The paper's moving averages (see the module docstring): the mean, and ``sigma =
    sqrt(running_var + eps)`` towards ``sigma_B = sqrt(var + eps)``, ``var`` the biased batch
    variance. As in :func:`normdrop.functional._update_running_stats`, an empty batch changes
    nothing and a channel with non-finite batch statistics keeps its running ones (with a
    warning on CPU)."""
    if count < 2 or momentum == 0:  # nothing to learn; no sqrt-and-square rounding either
        return
    sigma_batch = torch.sqrt(var + eps)
    sigma = torch.sqrt(running_var.to(mean.dtype) + eps)
    new_mean = running_mean + momentum * (mean - running_mean.to(mean.dtype))
    new_sigma = sigma + momentum * (sigma_batch - sigma)
    new_var = stored_variance(new_sigma, eps)
    finite = torch.isfinite(mean) & torch.isfinite(sigma_batch)
    _store_finite(running_mean, running_var, new_mean, new_var, finite, "BatchRenorm")


def _check_renorm_config(
    rmax: float, dmax: float, warmup_steps: int, rmax_ramp_steps: int, dmax_ramp_steps: int
) -> None:
    for name, value, low, meaning in (("rmax", rmax, 1, "1 means no r correction"),
                                      ("dmax", dmax, 0, "0 means no d correction")):  # fmt: skip
        message = f"{name} must be a number >= {low} ({meaning}), got {value!r}"
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise InputTypeError(message)
        if math.isnan(value) or value < low:
            raise InputError(message)
    steps = {
        "warmup_steps": warmup_steps,
        "rmax_ramp_steps": rmax_ramp_steps,
        "dmax_ramp_steps": dmax_ramp_steps,
    }
    for name, value in steps.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise InputTypeError(f"{name} must be a non-negative int, got {value!r}")
        if value < 0:
            raise InputError(f"{name} must be a non-negative int, got {value}")


def _ramp(step: int, start: int, length: int) -> float:
    """0 before ``start``, then linear to 1 over ``length`` steps (a step at once if 0)."""
    if step < start:
        return 0.0
    return 1.0 if length == 0 else min(1.0, (step - start) / length)


class _BatchRenorm(_BatchNorm):
    """Batch Renormalization; see the module docstring for the math and the schedule.

    Args:
        num_features, eps, momentum, affine, device, dtype, bias: as for BatchNorm.
        rmax: upper clip of r (and 1/rmax the lower), >= 1. ``math.inf``: no clipping.
        dmax: clip of |d|, >= 0.
        warmup_steps: training steps of plain BatchNorm before any correction.
        rmax_ramp_steps, dmax_ramp_steps: steps over which the limits grow linearly from
            (1, 0) to (rmax, dmax) after the warm-up.
        track_running_stats: must be True: r and d are defined by the running statistics.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        rmax: float = 3.0,
        dmax: float = 5.0,
        warmup_steps: int = 0,
        rmax_ramp_steps: int = 0,
        dmax_ramp_steps: int = 0,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        _check_renorm_config(rmax, dmax, warmup_steps, rmax_ramp_steps, dmax_ramp_steps)
        if not track_running_stats:
            raise InputError(
                f"{type(self).__name__} needs running statistics (r and d compare the batch "
                "with them); track_running_stats must be True"
            )
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, bias=bias)
        self.rmax, self.dmax = float(rmax), float(dmax)
        self.warmup_steps = int(warmup_steps)
        self.rmax_ramp_steps, self.dmax_ramp_steps = int(rmax_ramp_steps), int(dmax_ramp_steps)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, "
            f"warmup_steps={self.warmup_steps}, rmax_ramp_steps={self.rmax_ramp_steps}, "
            f"dmax_ramp_steps={self.dmax_ramp_steps}"
        )

    def current_limits(self) -> tuple[float, float]:
        """``(rmax_t, dmax_t)`` for the next training step ``t = num_batches_tracked``."""
        step = int(self.num_batches_tracked)
        r_fraction = _ramp(step, self.warmup_steps, self.rmax_ramp_steps)
        d_fraction = _ramp(step, self.warmup_steps, self.dmax_ramp_steps)
        # Spelled out so that an infinite limit (no clipping) times a zero fraction is no NaN.
        rmax = 1.0 if r_fraction == 0 else 1.0 + (self.rmax - 1.0) * r_fraction
        dmax = 0.0 if d_fraction == 0 else self.dmax * d_fraction
        return rmax, dmax

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return record_call(self, input)
        self._check_input_dim(input)
        if not self.training:
            return super().forward(input)
        momentum = self._momentum_for_this_batch()
        # momentum was checked by the constructor; with momentum=None it is a tensor's value,
        # which the core's NaN test cannot read under torch.compile(fullgraph=True).
        _check_batch_norm_args(
            input, self.running_mean, self.running_var, self.weight, self.bias, True, 0.0,
            self.eps,
        )  # fmt: skip
        if input.numel() == 0:  # as BatchNorm: counted, nothing learned, zero gradients
            self.num_batches_tracked.add_(1)
            return _empty_batch_norm(input, self.weight, self.bias)
        with torch.no_grad():
            mean, var = batch_statistics(input)
            rmax, dmax = self.current_limits()
            r, d = renorm_correction(
                mean, var, self.running_mean, self.running_var, self.eps, rmax, dmax
            )
            # Through one cat, so that torch.compile's partitioner saves r and d for the
            # backward: it would recompute them there from the running statistics, moved by then
            # by the update below (pytorch/pytorch#197039); cat is not on its recompute list.
            r, d = torch.cat([r, d]).split(self.num_features)
            # After r and d: they compare the batch with the statistics it has not yet moved.
            update_renorm_stats(
                self.running_mean,
                self.running_var,
                mean,
                var,
                self.eps,
                _values_per_channel(input),
                momentum,
            )
        self.num_batches_tracked.add_(1)
        compute = _compute_dtype(input)
        invstd = torch.rsqrt(var + self.eps)
        weight, shift = r, d
        if self.weight is not None:
            weight = self.weight.to(compute) * r
            shift = self.weight.to(compute) * d
        if self.bias is not None:
            shift = shift + self.bias.to(compute)
        return _batch_norm_function().apply(input, weight, shift, mean, invstd, True, self.eps)


class BatchRenorm1d(_BatchRenorm):
    """Batch Renorm over ``(N, C)`` or ``(N, C, L)`` input; see :class:`_BatchRenorm`."""

    _input_ranks = (2, 3)
    _input_shapes = "(N, C) or (N, C, L)"


class BatchRenorm2d(_BatchRenorm):
    """Batch Renorm over ``(N, C, H, W)`` input; see :class:`_BatchRenorm`."""

    _input_ranks = (4,)
    _input_shapes = "(N, C, H, W)"
