"""The eager fast path of the ``normdrop.nn`` BatchNorm modules, lean enough for small inputs.

On a 1 MiB input a BatchNorm training step spends as long around the kernels as in them:
argument checks, layout tests, numpy views of four ``(C,)`` tensors, a dozen autograd.Function
arguments. A module therefore keeps a :class:`ModuleCache` of what its last fast call found:
the input's shape, strides and dtype, the parameter and buffer tensors it was given (the same
objects, over the same memory) and, for them, the checks passed, the layout, the kernels and
the numpy views of the ``(C,)`` tensors. A call that matches reuses all of it; what it checks
itself is what can change between two calls with the same tensors: the backend, the device,
the tensor type, autograd's and the tracers' state. Anything else takes the general path of
:mod:`normdrop.kernels.dispatch` (which refills the cache), so a cached call computes exactly
what an uncached one does: the same kernel calls with the same arguments.

Per training step (forward and backward) this leaves one ``torch.empty_like`` per pass, the
input/output views, one kernel call per pass, and the autograd.Function machinery.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from normdrop import functional as F
from normdrop.backend import get_backend
from normdrop.kernels import compile_ahead, cpu, ops

__all__ = ["ModuleCache", "batch_norm", "remember", "run"]

_PLAIN = ops._PLAIN
_NUMPY = ops._NUMPY


class ModuleCache:
    """What a BatchNorm module's fast calls share (see the module docstring).

    One tuple ``(key, tensors, pointers, entry)``, replaced whole and read once per call, so
    that two threads calling one module with different inputs never pair one call's key with
    the other's entry. Copies and pickles of a module start empty: the entry holds views of
    the original's tensors, which a copy must not use (the identity checks would refuse them
    anyway).
    """

    __slots__ = ("state",)

    def __init__(self) -> None:
        self.state: tuple | None = None

    def __deepcopy__(self, memo: dict) -> ModuleCache:
        return ModuleCache()

    def __reduce__(self):
        return ModuleCache, ()

    def __repr__(self) -> str:
        return f"ModuleCache(key={None if self.state is None else self.state[0]})"


class _Entry:
    """A call's fixed arguments: layout, sizes, kernels, numpy views of the (C,) tensors."""

    __slots__ = (
        "backward",
        "bias",
        "buffers",
        "channels",
        "count",
        "dtype",
        "eps",
        "forward",
        "grad_layout",
        "layout",
        "like_input",
        "numel",
        "params",
        "plane",
        "running_mean",
        "running_var",
        "training",
        "weight",
        "weight_at",
        "what",
    )


def _pointer(tensor: Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def remember(
    cache: ModuleCache,
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    eps: float,
) -> _Entry:
    """Fill ``cache`` for calls like this one, which passed every check of the fast path; returns
    the entry (for :func:`run`)."""
    dtype = input.dtype
    entry = _Entry()
    entry.channels = int(input.shape[1])
    entry.plane = math.prod(input.shape[2:])
    entry.numel = input.numel()
    entry.count = entry.numel // entry.channels
    layout = cpu.kernel_layout(
        ops.layout_of(input), entry.numel, entry.channels, entry.plane, cpu.IDENTITY, False
    )
    entry.layout = layout
    # The layout questions of ops._eager_forward and _BatchNormActFunction, answered once.
    entry.like_input = ops._empty_like_is_atens(input)
    entry.grad_layout = not F._has_new_contiguous_strides(input)
    entry.dtype = _NUMPY[dtype]
    entry.forward = cpu.forward_kernel(layout)
    entry.backward = cpu.backward_kernel(layout)
    entry.training = bool(training)
    entry.what = cpu.STATS_APPLY if training else cpu.APPLY_RUNNING
    entry.eps = float(eps)
    entry.params, _ = ops._kernel_params(dtype, "identity", 0.0, 0.0)
    entry.weight = ops._vector(weight, dtype)
    entry.bias = ops._vector(bias, dtype)
    entry.running_mean = ops._vector(running_mean, dtype)
    entry.running_var = ops._vector(running_var, dtype)
    entry.buffers = (running_mean, running_var)
    key = (input.shape, input.stride(), dtype, entry.training, eps)
    tensors = (weight, bias, running_mean, running_var)
    entry.weight_at = _pointer(weight)
    cache.state = (key, tensors, tuple(_pointer(t) for t in tensors), entry)
    return entry


def _lookup(cache, input, running_mean, running_var, weight, bias, training, eps):
    """The cache's entry if this call matches it and may run the kernels eagerly, else None."""
    state = cache.state
    if (
        state is None
        or state[0] != (input.shape, input.stride(), input.dtype, training, eps)
        or type(input) not in _PLAIN
        or not input.is_cpu
        or input.is_neg()
        or get_backend() != "fast"
        or not ops.usable()
        or ops.under_transform(input)
    ):
        return None
    _, tensors, pointers, entry = state
    if (
        weight is not tensors[0]
        or bias is not tensors[1]
        or running_mean is not tensors[2]
        or running_var is not tensors[3]
    ):
        return None
    # The same objects, but maybe over new memory (``param.data = ...``, ``module.to(...)``),
    # resized or re-strided in place (``resize_``, ``set_``: the same memory, other values) or
    # a lazily negated view (``torch._neg_view``): the entry's numpy views would misread them.
    channels = entry.channels
    for tensor, pointer in zip(tensors, pointers, strict=True):
        if tensor is not None and (
            tensor.data_ptr() != pointer
            or tensor.numel() != channels
            or tensor.stride() != (1,)
            or tensor.is_neg()
        ):
            return None
    return entry


def _forward(entry: _Entry, input: Tensor, momentum: float):
    """Statistics, running averages and output in one kernel call: ``(output, stats)``."""
    output = ops._new_output(input, entry.like_input)
    stats = np.empty((3, entry.channels), entry.dtype)
    ops._launching()
    finite = entry.forward(
        entry.what,
        input.data_ptr(),
        output.data_ptr(),
        entry.numel,
        entry.channels,
        entry.plane,
        entry.running_mean,
        entry.running_var,
        momentum,
        entry.eps,
        stats,
        entry.weight,
        entry.bias,
        entry.params,
        cpu.IDENTITY,
        0,
        0,
        0,
        0,
        False,
    )
    if not finite:  # a NaN/Inf channel: the reference skips it and warns
        mean, var = torch.from_numpy(stats[0]), torch.from_numpy(stats[2])
        F._update_running_stats(*entry.buffers, mean, var, entry.count, momentum)
    return output, stats


def _backward(
    entry: _Entry, grad_output: Tensor, input: Tensor, weight_now: np.ndarray, stats, needs
):
    """``(grad_input, grad_weight, grad_bias)`` in one kernel call, with the weight as it is
    now (``weight_now``, see :func:`_weight_now`); None for what ``needs``
    (``ctx.needs_input_grad``) does not ask for."""
    given = grad_output
    grad_output = ops._same_layout(grad_output, input)
    channels, dtype = entry.channels, input.dtype
    grad_input = torch.empty_like(input) if needs[0] else None
    grad_weight = torch.empty(channels, dtype=dtype) if needs[1] else None
    grad_bias = torch.empty(channels, dtype=dtype) if needs[2] else None
    compile_ahead.wait(entry.layout, entry.dtype)
    ops._launching()
    entry.backward(
        entry.training or needs[1] or needs[2],
        grad_output.data_ptr(),
        input.data_ptr(),
        0 if grad_input is None else grad_input.data_ptr(),
        entry.numel,
        channels,
        entry.plane,
        stats[0],
        stats[1],
        weight_now,
        entry.bias,
        entry.params,
        cpu.IDENTITY,
        0,
        0,
        0,
        0,
        False,
        entry.training,
        0 if grad_weight is None else grad_weight.data_ptr(),
        0 if grad_bias is None else grad_bias.data_ptr(),
    )
    if entry.grad_layout and grad_input is not None:
        grad_input = F._in_input_grad_layout(grad_input, input, given)
    return grad_input, grad_weight, grad_bias


def _weight_now(entry: _Entry, weight: Tensor | None) -> np.ndarray | None:
    """The weight for the backward kernel: the forward's view, unless ``weight.data = ...``
    gave the parameter other memory since (autograd's version check does not see that; the
    backward must use the weight as it is now, as torch's does); None where it no longer has
    one value per channel (the general path then fails as torch does)."""
    if weight is None or weight.data_ptr() == entry.weight_at:
        return entry.weight
    if (
        _NUMPY.get(weight.dtype) != entry.dtype
        or weight.numel() != entry.channels
        or not weight.is_contiguous()
        or not weight.is_cpu
    ):
        return None
    return weight.detach().numpy()


class _BatchNormFunction(torch.autograd.Function):
    """BatchNorm training or inference step on the kernels: one kernel call forward, one
    backward. Saves the input and weight (so autograd's version checks apply) and the
    ``(3, C)`` statistics as numpy (tensors only for a double backward). Not the bias: no
    gradient depends on its value, and, as with torch's BatchNorm, it may change in place
    before the backward."""

    @staticmethod
    def forward(ctx, input, weight, bias, entry, momentum):
        output, stats = _forward(entry, input, momentum)
        ctx.save_for_backward(input, weight)
        ctx.bias, ctx.entry, ctx.stats = bias, entry, stats
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        bias, entry, stats = ctx.bias, ctx.entry, ctx.stats
        needs = ctx.needs_input_grad
        weight_now = _weight_now(entry, weight)
        if (
            weight_now is None
            or torch.is_grad_enabled()
            or type(grad_output) not in _PLAIN
            or ops.under_transform(grad_output)
        ):
            # A double backward (autograd over the reference formulas), a tensor subclass or a
            # vmap's batched gradient that the kernels cannot read: the general path of ops.
            mean, invstd = torch.from_numpy(stats[0]), torch.from_numpy(stats[1])
            saved = (input, weight, bias, mean, invstd, None)
            ctx.config = (entry.training, entry.eps, "identity", 0.0, 0.0, 0)
            grads = ops._grads(ctx, grad_output, saved)
            return (*ops._needed(ctx, weight, bias, grads), None, None)
        # _backward leaves None where needs says no (and a None weight or bias needs nothing)
        return (*_backward(entry, grad_output, input, weight_now, stats, needs), None, None)


_apply = ops.direct_apply(_BatchNormFunction)


def batch_norm(
    cache: ModuleCache,
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> Tensor | None:
    """The BatchNorm call (arguments as :func:`normdrop.functional.batch_norm`) on the cached
    fast path, or None when ``cache`` does not cover it (the caller then takes the general
    path). Not for torch.compile or torch.jit.trace, which record the registered ops: the caller
    (:func:`normdrop.kernels.dispatch.batch_norm`) passes no cache there."""
    entry = _lookup(cache, input, running_mean, running_var, weight, bias, training, eps)
    if entry is None:
        return None
    return run(entry, input, running_mean, weight, bias, training, momentum)


def run(
    entry: _Entry,
    input: Tensor,
    running_mean: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
) -> Tensor:
    """The call on the kernels with ``entry``'s arguments: one kernel call without autograd,
    else through :class:`_BatchNormFunction`."""
    if training and running_mean is not None:
        F._check_momentum(momentum)
        momentum = float(momentum)
    else:
        momentum = 0.0
    if not (
        torch.is_grad_enabled()
        and (
            input.requires_grad
            or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)
        )
    ):
        return _forward(entry, input, momentum)[0]
    compile_ahead.start(entry.layout, entry.dtype)  # a backward is coming
    return _apply(input, weight, bias, entry, momentum)
