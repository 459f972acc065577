r"""The fast kernels as ``torch.library`` custom ops, so autograd, ``torch.compile`` and
``torch.export`` see them as single operators.

Ops (namespace ``normdrop``):

* ``batch_norm_stats(input, running_mean!, running_var!, momentum, eps) -> (mean, invstd)``:
  the training statistics, ``(C,)`` each; the running buffers (optional) are updated in place
  by :func:`normdrop.functional._update_running_stats`.
* ``bn_act_dropout(input, weight, bias, mean, invstd, training, eps, activation,
  negative_slope, p, seed, offset) -> output``: ``dropout(act((x - mean) * invstd * weight +
  bias))``, differentiable in ``input``, ``weight`` and ``bias``; ``mean`` and ``invstd`` are
  constants, and in training the backward adds their dependence on ``input`` (as
  ``functional._BatchNormFunction`` does). Saved for backward: the input, the ``(C,)`` vectors
  and the seed, nothing of the input's size.
* ``bn_act_dropout_backward(...) -> (grad_input, grad_weight, grad_bias)``.
* ``dropout(input, p, seed, offset) -> output`` and the in-place ``dropout_``; the backward of
  ``dropout`` is ``dropout`` of the gradient with the same seed, so it is twice differentiable.

``seed`` is a 0-dim int64 tensor (see :func:`normdrop.kernels.philox.draw_seed`); element ``i``
(in memory order) uses Philox stream element ``offset + i``. Inputs whose memory is neither
planar (contiguous) nor rows (channels_last) are copied to contiguous first; the dispatcher
only sends tensors that need no copy.

Double backward: when the backward itself is differentiated (``create_graph=True``), it is
computed by autograd over the reference formulas of :mod:`normdrop.functional`, so gradient
penalties work; the kernels only serve first-order gradients.
"""

from __future__ import annotations

import functools
import math
import os

import numba
import numpy as np
import torch
from torch import Tensor

from normdrop import functional as F
from normdrop.kernels import cpu, philox
from normdrop.kernels.activations import activate

__all__ = [
    "PLANAR",
    "ROWS",
    "batch_norm_stats",
    "bn_act_dropout",
    "dropout",
    "dropout_",
    "layout_of",
    "reference_bn_act_dropout",
    "usable",
]

PLANAR = "planar"
ROWS = "rows"


# --------------------------------------------------------------------------------------------
# Fork safety
# --------------------------------------------------------------------------------------------

# GNU OpenMP (numba's "omp" threading layer here) cannot run in a child forked after the parent
# started it: numba terminates such a child at its first parallel kernel. A process forked
# after kernels ran therefore takes the reference path (spawned processes are unaffected).
_launched = False
_forked_after_openmp = False


def _launching() -> None:
    global _launched
    _launched = True


def _after_fork_in_child() -> None:
    global _forked_after_openmp
    if _launched and numba.threading_layer() == "omp":
        _forked_after_openmp = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def usable() -> bool:
    """False in a process forked after its parent ran the OpenMP kernels."""
    return not _forked_after_openmp


# --------------------------------------------------------------------------------------------
# Eager calls
# --------------------------------------------------------------------------------------------

_PLAIN = (Tensor, torch.nn.Parameter)


def _eager(*tensors: Tensor | None) -> bool:
    """True for plain CPU tensors outside ``torch.compile``/``torch.export`` tracing.

    Then the public functions below run the ops' implementations directly (and the autograd
    twins of the ops), which saves the custom-op dispatch, tens of microseconds per call; the
    registered ops serve tracing, fake tensors and every other tensor subclass.
    """
    if torch.compiler.is_compiling():
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


# --------------------------------------------------------------------------------------------
# Memory layouts
# --------------------------------------------------------------------------------------------


def _channels_last_order(ndim: int) -> tuple[int, ...]:
    return (0, *range(2, ndim), 1)


def layout_of(input: Tensor) -> str | None:
    """``"planar"``, ``"rows"`` or None: how the kernels can read an ``(N, C, *)`` tensor.

    planar: contiguous with more than one value per (sample, channel); rows: channel fastest
    (contiguous ``(N, C)`` or ``(N, C, 1...)``, channels_last and channels_last_3d).
    """
    if input.dim() < 2:
        return None
    plane = math.prod(input.shape[2:])
    if input.is_contiguous():
        return ROWS if plane == 1 else PLANAR
    if input.permute(_channels_last_order(input.dim())).is_contiguous():
        return ROWS
    return None


def _prepared(input: Tensor) -> tuple[Tensor, str]:
    """The input (or a contiguous copy when its layout is unsupported) and its layout."""
    layout = layout_of(input)
    if layout is None:
        input = input.contiguous()
        layout = layout_of(input)
    return input, layout


def _flat(tensor: Tensor, layout: str) -> np.ndarray:
    """The tensor's memory as a 1-D numpy array, no copy."""
    tensor = tensor.detach()
    if layout == ROWS and not tensor.is_contiguous():
        tensor = tensor.permute(_channels_last_order(tensor.dim()))
    return tensor.view(-1).numpy()


def _dense_order(tensor: Tensor) -> Tensor | None:
    """A permutation of ``tensor`` that is contiguous (a view of its memory), if one exists."""
    if tensor.is_contiguous():
        return tensor
    order = sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), -tensor.shape[d]))
    permuted = tensor.permute(order)
    return permuted if permuted.is_contiguous() else None


def _same_layout(tensor: Tensor, like: Tensor) -> Tensor:
    """``tensor`` with the strides of ``like`` (a copy only when they differ)."""
    if tensor.stride() == like.stride():
        return tensor
    out = torch.empty_like(like, dtype=tensor.dtype)
    out.copy_(tensor)
    return out


def _channels_and_plane(input: Tensor) -> tuple[int, int]:
    return int(input.shape[1]), int(math.prod(input.shape[2:]))


def _np_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(np.float32) if dtype == torch.float32 else np.dtype(np.float64)


# --------------------------------------------------------------------------------------------
# Dropout parameters
# --------------------------------------------------------------------------------------------


def _drop_scale(p: float, dtype: torch.dtype) -> float:
    """``1 / (1 - p)`` rounded as ATen's ``noise.div_(1 - p)`` rounds it in ``dtype``."""
    if p >= 1:
        return math.inf
    return float(torch.ones((), dtype=dtype).div_(1.0 - p))


def _dropout_key(p: float, seed: Tensor | None) -> tuple[int, int, int, bool]:
    """``(key0, key1, threshold, drop)`` for the kernels."""
    if p <= 0 or seed is None:
        return 0, 0, 0, False
    key0, key1 = philox.split_seed(int(seed))
    return key0, key1, philox.keep_threshold(p), True


@functools.lru_cache(maxsize=64)
def _kernel_params(dtype: torch.dtype, negative_slope: float, p: float) -> np.ndarray:
    return cpu.make_params(_np_dtype(dtype), negative_slope, _drop_scale(p, dtype))


# --------------------------------------------------------------------------------------------
# BatchNorm statistics and running averages
# --------------------------------------------------------------------------------------------


def _batch_stats(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance, ``(C,)`` in the input's dtype (float64 sums)."""
    input, layout = _prepared(input)
    channels, plane = _channels_and_plane(input)
    x = _flat(input, layout)
    _launching()
    if layout == PLANAR:
        mean, var = cpu.batch_stats_planar(x, channels, plane)
    else:
        mean, var = cpu.batch_stats_rows(x, channels)
    return torch.from_numpy(mean.astype(x.dtype)), torch.from_numpy(var.astype(x.dtype))


def _batch_norm_stats(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """Training statistics of ``(N, C, *)`` input: ``(mean, invstd)``, ``(C,)`` each.

    Mean and biased variance are accumulated in float64 (two passes per block, Chan's merge
    across blocks); ``invstd = rsqrt(var + eps)`` in the input's dtype, as the reference. The
    running buffers, when given, are updated by :func:`normdrop.functional._update_running_stats`.
    """
    mean, var = _batch_stats(input)
    if running_mean is not None:
        count = input.numel() // input.shape[1]
        F._update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return mean, torch.rsqrt(var + eps)


_batch_norm_stats_op = torch.library.custom_op(
    "normdrop::batch_norm_stats", mutates_args=("running_mean", "running_var")
)(_batch_norm_stats)


@_batch_norm_stats_op.register_fake
def _(input, running_mean, running_var, momentum, eps):
    channels = input.shape[1]
    return input.new_empty(channels), input.new_empty(channels)


def batch_norm_stats(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """The ``normdrop::batch_norm_stats`` op (its implementation directly in eager mode)."""
    if _eager(input, running_mean, running_var):
        return _batch_norm_stats(input, running_mean, running_var, momentum, eps)
    return _batch_norm_stats_op(input, running_mean, running_var, momentum, eps)


# --------------------------------------------------------------------------------------------
# Fused BatchNorm -> activation -> Dropout
# --------------------------------------------------------------------------------------------


def _numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().numpy()


def _coefs(mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None) -> np.ndarray:
    """The kernels' per-channel ``(6, C)`` stack: mean, scale, shift, invstd and two slots for
    the backward's coefficients; ``scale = invstd * weight`` as ``functional._normalize``."""
    coefs = np.zeros((6, mean.shape[0]), dtype=_np_dtype(invstd.dtype))
    coefs[0] = _numpy(mean)
    coefs[3] = _numpy(invstd)
    coefs[1] = coefs[3] if weight is None else coefs[3] * _numpy(weight)
    if bias is not None:
        coefs[2] = _numpy(bias)
    return coefs


def _bn_act_dropout(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    eps: float,
    activation: str,
    negative_slope: float,
    p: float,
    seed: Tensor | None,
    offset: int,
) -> Tensor:
    """``dropout(act((x - mean) * invstd * weight + bias), p)`` in one pass over ``input``."""
    input, layout = _prepared(input)
    output = torch.empty_like(input)
    channels, plane = _channels_and_plane(input)
    key0, key1, threshold, drop = _dropout_key(p, seed)
    kernel = cpu.forward_kernel(layout, cpu.ACTIVATIONS[activation], drop)
    _launching()
    kernel(
        _flat(input, layout),
        _flat(output, layout),
        channels,
        plane,
        _coefs(mean, invstd, weight, bias),
        _kernel_params(input.dtype, negative_slope, p),
        key0,
        key1,
        offset,
        threshold,
    )
    return output


_bn_act_dropout_op = torch.library.custom_op("normdrop::bn_act_dropout", mutates_args=())(
    _bn_act_dropout
)


@_bn_act_dropout_op.register_fake
def _(
    input, weight, bias, mean, invstd, training, eps, activation, negative_slope, p, seed, offset
):
    return torch.empty_like(input)


def _bn_act_dropout_backward(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    activation: str,
    negative_slope: float,
    p: float,
    seed: Tensor | None,
    offset: int,
    need_sums: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_input, grad_weight, grad_bias)``; the last two are ``sum(g * xhat)``, ``sum(g)``.

    With ``need_sums=False`` in inference, the per-channel sums are skipped (returned as 0).
    """
    input, layout = _prepared(input)
    grad_output = _same_layout(grad_output, input)
    channels, plane = _channels_and_plane(input)
    key0, key1, threshold, drop = _dropout_key(p, seed)
    act = cpu.ACTIVATIONS[activation]
    coefs = _coefs(mean, invstd, weight, bias)
    dy, x = _flat(grad_output, layout), _flat(input, layout)
    tail = (_kernel_params(input.dtype, negative_slope, p), key0, key1, offset, threshold)
    _launching()
    if training or need_sums:
        kernel = cpu.reduce_kernel(layout, act, drop)
        sum_g, sum_h = kernel(dy, x, channels, plane, coefs, *tail)
        sum_g = torch.from_numpy(sum_g)
        sum_gxhat = torch.from_numpy(sum_h) * invstd.detach().double()
    else:
        sum_g = torch.zeros(channels, dtype=torch.float64)
        sum_gxhat = torch.zeros(channels, dtype=torch.float64)
    if training:
        count = input.numel() // channels
        coefs[4] = (sum_g / count).numpy()
        coefs[5] = (sum_gxhat / count).numpy()
    grad_input = torch.empty_like(input)
    kernel = cpu.apply_kernel(layout, act, drop)
    kernel(dy, x, _flat(grad_input, layout), channels, plane, coefs, training, *tail)
    return grad_input, sum_gxhat.to(input.dtype), sum_g.to(input.dtype)


_bn_act_dropout_backward_op = torch.library.custom_op(
    "normdrop::bn_act_dropout_backward", mutates_args=()
)(_bn_act_dropout_backward)


@_bn_act_dropout_backward_op.register_fake
def _(
    grad_output,
    input,
    weight,
    bias,
    mean,
    invstd,
    training,
    activation,
    negative_slope,
    p,
    seed,
    offset,
    need_sums,
):
    channels = input.shape[1]
    return torch.empty_like(input), input.new_empty(channels), input.new_empty(channels)


def dropout_factor(like: Tensor, p: float, seed: Tensor, offset: int = 0) -> Tensor:
    """The dropout factor tensor (``1 / (1 - p)`` or 0) that the kernels apply to ``like``."""
    return dropout(torch.ones_like(like), p, seed, offset)


def reference_bn_act_dropout(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    eps: float,
    activation: str,
    negative_slope: float,
    p: float,
    seed: Tensor | None,
    offset: int,
) -> Tensor:
    """The fused op written with :mod:`normdrop.functional` and torch ops (differentiable
    twice): in training the statistics are recomputed from ``input``, as functions of it."""
    if training:
        z = F.batch_norm(input, None, None, weight, bias, True, 0.0, eps)
    else:
        z = F._normalize(input, weight, bias, mean, invstd)
    output = activate(z, activation, negative_slope)
    if p > 0 and seed is not None:
        output = output * dropout_factor(input, p, seed, offset)
    return output


def _setup_bn_act_dropout(ctx, inputs, output) -> None:
    input, weight, bias, mean, invstd, training, eps, activation, slope, p, seed, offset = inputs
    ctx.save_for_backward(input, weight, bias, mean, invstd, seed)
    ctx.config = (training, eps, activation, slope, p, offset)


def _differentiable_grads(grad_output, saved, config) -> tuple[Tensor | None, ...]:
    """First-order gradients built by autograd over the reference, so they have a graph."""
    input, weight, bias, mean, invstd, seed = saved
    training, eps, activation, slope, p, offset = config
    targets = [t for t in (input, weight, bias) if t is not None and t.requires_grad]
    if not targets:
        return None, None, None
    with torch.enable_grad():
        output = reference_bn_act_dropout(
            input, weight, bias, mean, invstd, training, eps, activation, slope, p, seed, offset
        )
        grads = iter(torch.autograd.grad(output, targets, grad_output, create_graph=True))
    return tuple(
        next(grads) if t is not None and t.requires_grad else None for t in (input, weight, bias)
    )


def _backward_bn_act_dropout(ctx, grad_output):
    input, weight, bias, mean, invstd, seed = ctx.saved_tensors
    training, _, activation, slope, p, offset = ctx.config
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled():
        grad_input, grad_weight, grad_bias = _differentiable_grads(
            grad_output, ctx.saved_tensors, ctx.config
        )
    else:
        backward = (
            _bn_act_dropout_backward if _eager(grad_output, input) else _bn_act_dropout_backward_op
        )
        grad_input, grad_weight, grad_bias = backward(
            grad_output,
            input,
            weight,
            bias,
            mean,
            invstd,
            training,
            activation,
            slope,
            p,
            seed,
            offset,
            bool(needs[1] or needs[2]),
        )
    return (
        grad_input if needs[0] else None,
        grad_weight if weight is not None and needs[1] else None,
        grad_bias if bias is not None and needs[2] else None,
        *([None] * 9),
    )


_bn_act_dropout_op.register_autograd(_backward_bn_act_dropout, setup_context=_setup_bn_act_dropout)


class _BnActDropoutFunction(torch.autograd.Function):
    """The eager twin of the op: same implementation, setup and backward, less dispatch."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _bn_act_dropout(*inputs)
        _setup_bn_act_dropout(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        return _backward_bn_act_dropout(ctx, grad_output)


def bn_act_dropout(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    training: bool,
    eps: float,
    activation: str,
    negative_slope: float,
    p: float,
    seed: Tensor | None,
    offset: int,
) -> Tensor:
    """The ``normdrop::bn_act_dropout`` op (through an equivalent autograd.Function in eager
    mode, where the op's dispatch would cost more than the kernel on small inputs)."""
    args = (input, weight, bias, mean, invstd, training, eps, activation, negative_slope, p)
    if _eager(input, weight, bias, mean, invstd, seed):
        return _BnActDropoutFunction.apply(*args, seed, offset)
    return _bn_act_dropout_op(*args, seed, offset)


# --------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------


def _dropout_into(source: Tensor, target: Tensor, p: float, seed: Tensor, offset: int) -> None:
    """``target = source * factor`` over flat memory; both dense with the same strides."""
    key0, key1, threshold, _ = _dropout_key(p, seed)
    params = _kernel_params(source.dtype, 0.0, p)
    src = _dense_order(source.detach()).reshape(-1).numpy()
    dst = _dense_order(target.detach()).reshape(-1).numpy()
    _launching()
    cpu.dropout_flat(src, dst, params, key0, key1, offset, threshold)


def _dropout(input: Tensor, p: float, seed: Tensor, offset: int) -> Tensor:
    """``input * factor``: element ``i`` (memory order) kept iff Philox says so, scaled by
    ``1 / (1 - p)``."""
    if _dense_order(input) is None:
        input = input.contiguous()
    output = torch.empty_like(input)
    _dropout_into(input, output, p, seed, offset)
    return output


_dropout_op = torch.library.custom_op("normdrop::dropout", mutates_args=())(_dropout)


@_dropout_op.register_fake
def _(input, p, seed, offset):
    return torch.empty_like(input)


def _setup_dropout(ctx, inputs, output) -> None:
    _, p, seed, offset = inputs
    ctx.save_for_backward(seed)
    ctx.config = (p, offset, tuple(output.shape), tuple(output.stride()))


def _backward_dropout(ctx, grad_output):
    (seed,) = ctx.saved_tensors
    p, offset, shape, strides = ctx.config
    if tuple(grad_output.stride()) != strides:
        # The mask follows memory order: the gradient must be laid out as the output was.
        grad_output = torch.empty_strided(
            shape, strides, dtype=grad_output.dtype, device=grad_output.device
        ).copy_(grad_output)
    return dropout(grad_output, p, seed, offset), None, None, None


_dropout_op.register_autograd(_backward_dropout, setup_context=_setup_dropout)


class _DropoutFunction(torch.autograd.Function):
    """The eager twin of the op: same implementation, setup and backward, less dispatch."""

    @staticmethod
    def forward(ctx, input, p, seed, offset):
        output = _dropout(input, p, seed, offset)
        _setup_dropout(ctx, (input, p, seed, offset), output)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        return _backward_dropout(ctx, grad_output)


def dropout(input: Tensor, p: float, seed: Tensor, offset: int) -> Tensor:
    """The ``normdrop::dropout`` op (an equivalent autograd.Function in eager mode)."""
    if _eager(input, seed):
        return _DropoutFunction.apply(input, p, seed, offset)
    return _dropout_op(input, p, seed, offset)


def _dropout_inplace(input: Tensor, p: float, seed: Tensor, offset: int) -> None:
    if _dense_order(input) is None:
        input.copy_(_dropout(input, p, seed, offset))
    else:
        _dropout_into(input, input, p, seed, offset)


_dropout_inplace_op = torch.library.custom_op("normdrop::dropout_", mutates_args=("input",))(
    _dropout_inplace
)


@_dropout_inplace_op.register_fake
def _(input, p, seed, offset) -> None:
    return None


def dropout_(input: Tensor, p: float, seed: Tensor, offset: int) -> None:
    """In-place :func:`dropout` (no autograd: for inference and ``torch.no_grad``)."""
    if _eager(input, seed):
        _dropout_inplace(input, p, seed, offset)
    else:
        _dropout_inplace_op(input, p, seed, offset)
