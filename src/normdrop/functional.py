r"""The math of Batch Normalization and Dropout: one readable reference implementation.

Every other path in normdrop (the fast kernels, the modules) is tested against this file, and this
file is tested against ``torch.nn.functional`` and float64 math. Semantics follow PyTorch exactly;
where they differ it is on purpose and documented here (see ``batch_norm`` on non-finite input).

Batch Normalization, for an input of shape ``(N, C, *)`` and one channel ``c``, with
``m = N * prod(*)`` values per channel (Ioffe & Szegedy 2015, Algorithm 1 and 2)::

    training:  mu   = mean(x)                       over every dim but 1
               var  = mean((x - mu)^2)              biased: it normalizes the batch
               y    = gamma * (x - mu) / sqrt(var + eps) + beta
               running_mean <- (1 - momentum) * running_mean + momentum * mu
               running_var  <- (1 - momentum) * running_var  + momentum * var * m / (m - 1)
    inference: y    = gamma * (x - running_mean) / sqrt(running_var + eps) + beta

Dropout (inverted, Srivastava et al. 2014 with the scaling moved to training time)::

    training:  y = x * b / (1 - p),   b ~ Bernoulli(1 - p), one draw per element
                                      (per (sample, channel) for the channel-wise variants)
    inference: y = x
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from normdrop.errors import InputError, InputTypeError

__all__ = [
    "alpha_dropout",
    "batch_norm",
    "batch_statistics",
    "dropout",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "feature_alpha_dropout",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)

# SELU's negative saturation value, -scale * alpha (Klambauer et al. 2017), as ATen spells it.
_SELU_SATURATION = 1.7580993408473766


# --------------------------------------------------------------------------------------------
# Shapes and dtypes
# --------------------------------------------------------------------------------------------


def _reduction_dims(input: Tensor) -> list[int]:
    """Every dim but the channel dim 1: statistics are per channel."""
    return [0, *range(2, input.dim())]


def _per_channel(values: Tensor, ndim: int) -> Tensor:
    """View a (C,) tensor as (1, C, 1, ..., 1) so it broadcasts against an ndim-D input."""
    return values.reshape(1, -1, *([1] * (ndim - 2)))


def _compute_dtype(input: Tensor) -> torch.dtype:
    """float16/bfloat16 inputs are normalized in float32, as PyTorch does."""
    return torch.float32 if input.dtype in _LOW_PRECISION else input.dtype


def _strides_like_channels_last(input: Tensor) -> bool:
    """ATen's test whether a 4-D/5-D tensor's strides look channels-last (dense or not):
    the strides grow from the channel dim through the spatial dims, last to first, to the batch
    dim; ambiguous cases (a trivial channel stride, size-1 dims sharing a stride) are not."""
    sizes, strides = input.shape, input.stride()
    if strides[1] == 0:
        return False
    smallest = 0
    for d in (1, *range(input.dim() - 1, 1, -1), 0):
        if sizes[d] == 0 or strides[d] < smallest or (d == 0 and smallest == strides[1]):
            return False
        smallest = strides[d] * sizes[d] if sizes[d] > 1 else strides[d]
    return True


def suggest_memory_format(input: Tensor) -> torch.memory_format:
    """ATen's ``Tensor::suggest_memory_format()``: channels_last (3d) for 4-D (5-D) inputs
    whose strides look like it, else contiguous. (``torch._prims_common`` has one too, but it
    fails under ``torch.jit.trace``.)"""
    if input.dim() in (4, 5) and _strides_like_channels_last(input):
        return torch.channels_last if input.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def _dense_format(input: Tensor) -> torch.memory_format | None:
    """The memory format ``input`` is contiguous in, contiguous first (ATen's
    ``suggest_memory_format_contig``), or None. Unlike :func:`suggest_memory_format` it ignores
    the strides of size-1 dims: a permuted ``(1, C, H, 1)`` can be channels_last here and
    contiguous there."""
    if input.is_contiguous():
        return torch.contiguous_format
    if input.dim() == 4 and input.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if input.dim() == 5 and input.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return None


def _output_format(input: Tensor) -> torch.memory_format:
    """The memory format of BatchNorm's output in ATen: the one the input is contiguous in, if
    any (channels_last for channels_last images), else the input's suggested one (a transposed
    ``(N, L, C)`` sequence fed as ``(N, C, L)`` comes back contiguous, so ``.view`` works on it
    as after ``torch.nn``)."""
    return _dense_format(input) or suggest_memory_format(input)


def _format_strides(shape: torch.Size, memory_format: torch.memory_format) -> tuple[int, ...]:
    """The strides ATen gives a new tensor of ``shape`` in ``memory_format`` (contiguous,
    channels_last or channels_last_3d), those of size-1 dims included."""
    rank = len(shape)
    if memory_format == torch.contiguous_format:
        order = range(rank - 1, -1, -1)
    else:
        order = (1, *range(rank - 1, 1, -1), 0)
    strides, step = [0] * rank, 1
    for d in order:
        strides[d] = step
        step *= max(int(shape[d]), 1)
    return tuple(strides)


def _is_wrapped_tensor(tensor: Tensor) -> bool:
    """A tensor a ``torch.func`` transform wrapped, or one the legacy vmap batched (gradcheck's
    batched gradients): its memory is not a plain tensor's."""
    functorch = torch._C._functorch
    return functorch.is_functorch_wrapped_tensor(tensor) or functorch.is_legacy_batchedtensor(
        tensor
    )


def _wrapped(tensor: Tensor) -> bool:
    """:func:`_is_wrapped_tensor`, whose memory format cannot be asked for (and does not show);
    not asked under torch.compile, which cannot trace the question."""
    return not torch.compiler.is_compiling() and _is_wrapped_tensor(tensor)


def _has_new_contiguous_strides(input: Tensor) -> bool:
    """Whether ``input`` has the strides of a new contiguous tensor, size-1 dims included. Then
    BatchNorm's input gradient is contiguous whatever the output gradient's layout; otherwise
    :func:`_input_grad_format` decides."""
    if not input.is_contiguous():
        return False
    return 1 not in input.shape or input.stride() == _format_strides(
        input.shape, torch.contiguous_format
    )


def _in_format(result: Tensor, memory_format: torch.memory_format) -> Tensor:
    """``result`` with the strides ATen gives a new tensor in ``memory_format``: a copy only when
    they differ, size-1 dims included (later choices of memory format read those too)."""
    if _wrapped(result):
        return result.contiguous() if memory_format == torch.contiguous_format else result
    if result.stride() == _format_strides(result.shape, memory_format):
        return result
    return result.clone(memory_format=memory_format)


def _in_layout_of(result: Tensor, input: Tensor) -> Tensor:
    """``result`` in the memory format of BatchNorm's output for ``input``."""
    return _in_format(result, _output_format(input))


def _in_layout(input: Tensor) -> bool:
    """True when ``input`` is already in the memory format of :func:`_in_layout_of`."""
    return input.is_contiguous(memory_format=_output_format(input))


def _input_grad_format(input: Tensor, grad_output: Tensor) -> torch.memory_format:
    """The memory format of BatchNorm's input gradient in ATen: the one the input is contiguous
    in when the input and ``grad_output`` are both contiguous in some format and suggest the
    same one (its contiguous kernels), else the input's suggested format. The two differ only
    where size-1 dims make :func:`suggest_memory_format` read a channels_last input as
    contiguous, or a contiguous one as channels_last."""
    input_format = _dense_format(input)
    suggested = suggest_memory_format(input)
    if (
        input_format is None
        or _dense_format(grad_output) is None
        or suggest_memory_format(grad_output) != suggested
    ):
        return suggested
    return input_format


def _in_input_grad_layout(grad_input: Tensor, input: Tensor, grad_output: Tensor) -> Tensor:
    """``grad_input`` in the memory format of :func:`_input_grad_format`."""
    if _wrapped(grad_output) or _wrapped(grad_input):
        return grad_input  # inside torch.func transforms memory formats do not show
    return _in_format(grad_input, _input_grad_format(input, grad_output))


def _values_per_channel(input: Tensor) -> int:
    """N times the spatial size (PyTorch's ``_verify_batch_size``), also with zero channels."""
    return math.prod((input.shape[0], *input.shape[2:]))


# --------------------------------------------------------------------------------------------
# Batch Normalization
# --------------------------------------------------------------------------------------------


def batch_statistics(input: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of an ``(N, C, *)`` input.

    ``torch.var_mean``: Welford's algorithm, which stays exact for data with a large offset,
    where ``E[x^2] - E[x]^2`` loses every significant digit in float32 (on CPU it accumulates
    float32 in float64). A two-pass formula over float32 means is not enough either: PyTorch's
    mean over several dims (N and L of an ``(N, C, L)`` input) adds up in float32: a constant
    channel of 131072 values at 3e4 gets a mean 15 too low, a two-pass variance of 232 instead
    of 0 (negative in the corrected two-pass form). float16/bfloat16 inputs
    give float32 statistics. Returns two ``(C,)`` tensors.
    """
    x = input.to(_compute_dtype(input))
    var, mean = torch.var_mean(x, _reduction_dims(x), correction=0)
    return mean, var


def _check_batch_size(input: Tensor) -> None:
    """Same rule and message as torch.nn.functional.batch_norm in training: the variance of
    one value is 0 and the output would be all beta."""
    if _values_per_channel(input) == 1:
        raise InputError(
            f"Expected more than 1 value per channel when training, got input size {input.size()}"
        )


def _check_eps(eps: float, training: bool) -> None:
    # eps != eps, not math.isnan: under torch.compile(dynamic=True) eps is a symbolic float
    if not isinstance(eps, numbers.Real) or eps != eps:
        raise InputTypeError(f"batch_norm: eps must be a real number, got {eps!r}")
    if training and eps <= 0:
        raise InputError(f"batch_norm: eps must be positive during training, got {eps}")
    if eps < 0:
        raise InputError(f"batch_norm: eps must be non-negative, got {eps}")


def _check_momentum(momentum: float) -> None:
    """Any real momentum is accepted, as in PyTorch (whose own test samples use -1.0); the
    modules insist on [0, 1] and `normdrop lint` flags odd values. NaN is refused: it would turn
    every running statistic into NaN."""
    if not isinstance(momentum, numbers.Real) or momentum != momentum:
        raise InputTypeError(f"batch_norm: momentum must be a real number, got {momentum!r}")


def _check_batch_norm_args(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> None:
    if not isinstance(input, Tensor):
        raise InputTypeError(
            f"batch_norm: input must be a torch.Tensor, got {type(input).__name__}"
        )
    if input.numel() == 0:
        # As in PyTorch: only the batch size and eps are checked (by its Python layer) before
        # ATen answers an input without values, whatever the other tensors' dtype or size (see
        # _empty_batch_norm); a (1, 0) input is one value per (absent) channel.
        if training and input.dim() >= 2:
            _check_batch_size(input)
        _check_eps(eps, training)
        return
    if not input.is_floating_point():
        raise InputTypeError(
            "batch_norm: input must be a floating-point tensor (float16, bfloat16, float32 or "
            f"float64), got dtype {input.dtype}"
        )
    if input.dim() < 2:
        raise InputError(
            "batch_norm: input must have shape (N, C, *) with at least 2 dims, "
            f"got shape {tuple(input.shape)}"
        )
    channels = input.shape[1]
    named = {
        "running_mean": running_mean,
        "running_var": running_var,
        "weight": weight,
        "bias": bias,
    }
    for name, tensor in named.items():
        if tensor is None:
            continue
        if not isinstance(tensor, Tensor):
            raise InputTypeError(
                f"batch_norm: {name} must be a torch.Tensor or None, got {type(tensor).__name__}"
            )
        if tensor.shape != (channels,):
            raise InputError(
                f"batch_norm: {name} must have shape (C,) = ({channels},) to match "
                f"input.shape[1], got shape {tuple(tensor.shape)}"
            )
        if tensor.device != input.device:
            raise InputError(
                f"batch_norm: {name} is on {tensor.device} but input is on {input.device}; "
                "move them to the same device"
            )
        allowed = {input.dtype, torch.float32} if input.dtype in _LOW_PRECISION else {input.dtype}
        if tensor.dtype not in allowed:
            expected = " or ".join(sorted(str(d) for d in allowed))
            raise InputTypeError(
                f"batch_norm: {name} has dtype {tensor.dtype} but input has dtype {input.dtype}; "
                f"expected {expected}"
            )
    if (running_mean is None) != (running_var is None):
        raise InputError("batch_norm: pass both running_mean and running_var, or neither")
    _check_eps(eps, training)
    if training:
        _check_batch_size(input)
        if running_mean is not None:
            _check_momentum(momentum)
    elif running_mean is None:
        raise InputError(
            "batch_norm: running_mean and running_var are required when training=False "
            "(inference normalizes with them); pass training=True to use batch statistics"
        )


@torch.no_grad()
def _update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    momentum: float,
) -> None:
    """Exponential moving average of the batch statistics, with the unbiased variance.

    A channel whose batch statistics are NaN or Inf keeps its running statistics: one bad batch
    would otherwise poison every later evaluation, silently. The batch output itself still
    carries the NaN, as in PyTorch, so the loss shows it. On CPU a warning names the event.
    """
    if count < 2:  # empty batch: nothing to learn (PyTorch leaves the buffers alone too)
        return
    unbiased_var = var * (count / (count - 1))
    finite = torch.isfinite(mean) & torch.isfinite(unbiased_var)
    new_mean = (1 - momentum) * running_mean + momentum * mean
    new_var = (1 - momentum) * running_var + momentum * unbiased_var
    _store_finite(running_mean, running_var, new_mean, new_var, finite, "batch_norm")


def _store_finite(
    running_mean: Tensor,
    running_var: Tensor,
    new_mean: Tensor,
    new_var: Tensor,
    finite: Tensor,
    who: str,
) -> None:
    """Write the new running statistics of the channels where ``finite``; warn (on CPU) when
    some channel kept its old ones."""
    try:
        running_mean.copy_(torch.where(finite, new_mean, running_mean))
        running_var.copy_(torch.where(finite, new_var, running_var))
    except RuntimeError as error:  # vmap refuses to write batched values into them
        if not torch._C._are_functorch_transforms_active():
            raise
        raise InputError(
            f"{who}: got an input batched by torch.func.vmap while running_mean and "
            "running_var, which training updates in place, are not batched: construct the "
            "layer with track_running_stats=False, vmap over the buffers too, call it in eval "
            "mode, or use torch.func.replace_all_batch_norm_modules_"
        ) from error
    # On an accelerator the check would cost a host sync per layer per step, and a traced or
    # compiled graph cannot branch on data: the buffers are protected either way.
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing()
    if running_mean.device.type == "cpu" and not tracing and not bool(finite.all()):
        warnings.warn(
            f"{who}: non-finite batch statistics (NaN or Inf in the input); the running "
            "statistics of the affected channels were left unchanged",
            RuntimeWarning,
            stacklevel=4,
        )


class _BatchNormFunction(torch.autograd.Function):
    """``y = (x - mean) * invstd * weight + bias`` with BatchNorm's analytic backward.

    ``mean`` and ``invstd`` are constants to autograd. In training they are the batch
    statistics, so the backward adds their dependence on ``x``; with ``xhat = (x - mean) * invstd``
    and ``m`` values per channel (sums over every dim but 1)::

        dL/dx     = weight * invstd * (dy - sum(dy) / m - xhat * sum(dy * xhat) / m)
        dL/dgamma = sum(dy * xhat)
        dL/dbeta  = sum(dy)

    In inference the statistics are fixed and ``dL/dx = weight * invstd * dy``.
    """

    # torch.func transforms (vmap, grad, per-sample gradients) need forward without ctx and a
    # separate setup_context; the forward is plain torch ops, so vmap's rule can be generated.
    generate_vmap_rule = True

    @staticmethod
    def forward(
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        training: bool,
        eps: float,
    ) -> Tensor:
        return _normalize(input, weight, bias, mean, invstd)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        input, weight, bias, mean, invstd, training, eps = inputs
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.training, ctx.eps = training, eps
        ctx.bias_dtype = None if bias is None else bias.dtype

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        input, weight, mean, invstd = ctx.saved_tensors
        x = input.to(_compute_dtype(input))
        grad = grad_output.to(x.dtype)
        dims, ndim = _reduction_dims(x), x.dim()
        if ctx.training and torch.is_grad_enabled():
            # create_graph=True: the statistics must be functions of x for double backward.
            mean = x.mean(dims)
            invstd = torch.rsqrt(x.var(dims, unbiased=False) + ctx.eps)
        xhat = (x - _per_channel(mean, ndim)) * _per_channel(invstd, ndim)
        sum_grad = grad.sum(dims)
        sum_grad_xhat = (grad * xhat).sum(dims)
        scale = invstd if weight is None else invstd * weight.to(x.dtype)

        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if ctx.training:
                count = _values_per_channel(x)
                grad_input = _input_grad_batch_stats(
                    grad, xhat, scale, sum_grad, sum_grad_xhat, count
                )
            else:
                grad_input = grad * _per_channel(scale, ndim)
            grad_input = _in_input_grad_layout(grad_input.to(input.dtype), input, grad_output)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_grad_xhat.to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_grad.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None


class _BatchNormFunctionWithJvp(_BatchNormFunction):
    """:class:`_BatchNormFunction` with a forward-mode rule (``forward_ad``, ``torch.func.jvp``).

    A subclass, not a method of the base: Dynamo refuses to trace any ``autograd.Function`` that
    defines ``jvp``, so compiled code gets the base class (see :func:`_batch_norm_function`).
    """

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _BatchNormFunction.setup_context(ctx, inputs, output)
        input, weight, _, mean, invstd, _, _ = inputs
        ctx.save_for_forward(input, weight, mean, invstd)

    @staticmethod
    def jvp(ctx, input_t, weight_t, bias_t, *_) -> Tensor:
        """Forward mode: the output's tangent. BatchNorm's Jacobian in ``x`` is symmetric, so the
        input's tangent goes through the backward formula; then ``xhat * weight' + bias'``."""
        input, weight, mean, invstd = ctx.saved_tensors
        x = input.to(_compute_dtype(input))
        ndim = x.dim()
        xhat = (x - _per_channel(mean, ndim)) * _per_channel(invstd, ndim)
        scale = invstd if weight is None else invstd * weight.to(x.dtype)
        tangent = torch.zeros_like(xhat)
        if input_t is not None:
            dx = input_t.to(x.dtype)
            if ctx.training:
                dims = _reduction_dims(x)
                sum_dx, sum_dx_xhat = dx.sum(dims), (dx * xhat).sum(dims)
                count = _values_per_channel(x)
                tangent = _input_grad_batch_stats(dx, xhat, scale, sum_dx, sum_dx_xhat, count)
            else:
                tangent = dx * _per_channel(scale, ndim)
        if weight_t is not None:
            tangent = tangent + xhat * _per_channel(weight_t.to(x.dtype), ndim)
        if bias_t is not None:
            tangent = tangent + _per_channel(bias_t.to(x.dtype), ndim)
        return _in_layout_of(tangent.to(input.dtype), input)


def _batch_norm_function() -> type[_BatchNormFunction]:
    """The BatchNorm Function to apply: with ``jvp`` in eager mode, without under Dynamo."""
    if torch.compiler.is_compiling():
        return _BatchNormFunction
    return _BatchNormFunctionWithJvp


def _input_grad_batch_stats(
    grad: Tensor, xhat: Tensor, scale: Tensor, sum_grad: Tensor, sum_grad_xhat: Tensor, count: int
) -> Tensor:
    """``dL/dx = scale * (dy - sum(dy) / m - xhat * sum(dy * xhat) / m)`` for batch statistics.

    ``scale = weight * invstd`` and the ``(C,)`` sums run over the ``m = count`` values of each
    channel (over every process, for SyncBatchNorm).
    """
    ndim = grad.dim()
    centered_grad = (
        grad
        - _per_channel(sum_grad / count, ndim)
        - xhat * _per_channel(sum_grad_xhat / count, ndim)
    )
    return centered_grad * _per_channel(scale, ndim)


def _normalize(
    input: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor
) -> Tensor:
    """``(x - mean) * invstd * weight + bias`` per channel, computed in float32 for half inputs.

    ``x - mean`` comes first: the folded form ``x * scale + shift`` cancels catastrophically
    when the data carry a large offset.
    """
    x = input.to(_compute_dtype(input))
    ndim = x.dim()
    scale = invstd if weight is None else invstd * weight.to(x.dtype)
    out = (x - _per_channel(mean, ndim)) * _per_channel(scale, ndim)
    if bias is not None:
        out = out + _per_channel(bias.to(x.dtype), ndim)
    return _in_layout_of(out.to(input.dtype), input)


def _has_tangent(tensor: Tensor | None) -> bool:
    return tensor is not None and _forward_ad.unpack_dual(tensor).tangent is not None


def _check_no_running_tangents(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
) -> None:
    """Forward-mode AD in inference, as PyTorch: the output's tangent would need the running
    statistics' tangents, which BatchNorm does not differentiate, so they are refused (with
    torch's message) whenever an input, weight or bias tangent asks for a forward derivative."""
    if (_has_tangent(running_mean) or _has_tangent(running_var)) and (
        _has_tangent(input) or _has_tangent(weight) or _has_tangent(bias)
    ):
        raise InputError(
            "batch_norm is not differentiable wrt running_mean and running_var, they cannot "
            "have forward grad defined (running statistics are buffers: pass them detached)"
        )


def _empty_batch_norm(input: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """ATen's answer for an input without values (``_batch_norm_impl_index``): a copy of it,
    times ``weight[0]`` plus ``bias[0]``, so that the parameters stay in the graph (with zero
    gradients); the running statistics are left alone."""
    output = input.clone()
    if weight is not None:
        output = output * weight[0]
    if bias is not None:
        output = output + bias[0]
    return output


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    r"""Batch Normalization of an ``(N, C, *)`` input, per channel; same contract as
    :func:`torch.nn.functional.batch_norm`.

    Args:
        input: ``(N, C, *)``, floating point. float16/bfloat16 are normalized in float32.
        running_mean, running_var: ``(C,)`` buffers, or both ``None``. Updated in place when
            ``training``; used for normalization when not.
        weight, bias: ``(C,)`` affine parameters gamma and beta, or ``None`` (1 and 0).
        training: normalize with the batch statistics (and update the running ones) if True,
            with the running statistics if False.
        momentum: weight of the new batch in the running averages; any real number, as
            torch's (the modules require [0, 1], see docs/math.md).
        eps: added to the variance before the square root; positive in training, >= 0 in
            evaluation.

    Returns:
        A tensor of the input's shape, dtype and memory format.

    Deviation from PyTorch, on purpose: a channel whose batch statistics are NaN or Inf does not
    update its running statistics (PyTorch writes the NaN into them). The output still shows the
    NaN. See ``_update_running_stats``.
    """
    _check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if input.numel() == 0:
        return _empty_batch_norm(input, weight, bias)
    if not training and running_mean is not None and _forward_ad._current_level >= 0:
        _check_no_running_tangents(input, running_mean, running_var, weight, bias)
    if training:
        with torch.no_grad():
            mean, var = batch_statistics(input)
        if running_mean is not None:
            _update_running_stats(
                running_mean, running_var, mean, var, _values_per_channel(input), momentum
            )
    else:
        mean, var = running_mean, running_var
    compute = _compute_dtype(input)
    invstd = torch.rsqrt(var.detach().to(compute) + eps)
    mean = mean.detach().to(compute)
    return _batch_norm_function().apply(input, weight, bias, mean, invstd, training, eps)


# --------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------


def _check_dropout_p(name: str, p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise InputTypeError(f"{name}: p must be a number in [0, 1], got {p!r}")
    if not 0.0 <= p <= 1.0:  # also rejects NaN
        raise InputError(f"{name}: dropout probability p has to be between 0 and 1, but got {p}")


def _check_dropout_args(name: str, input: Tensor, p: float, training: bool = True) -> None:
    """The input must be floating point only where a mask scales it (training, ``0 < p <
    1``, not empty): otherwise PyTorch returns the input itself, or multiplies it by zero (``p =
    1``), whatever its dtype."""
    if not isinstance(input, Tensor):
        raise InputTypeError(f"{name}: input must be a torch.Tensor, got {type(input).__name__}")
    _check_dropout_p(name, p)
    if training and 0 < p < 1 and input.numel() > 0 and not input.is_floating_point():
        raise InputTypeError(
            f"{name}: input must be a floating-point tensor, got dtype {input.dtype}"
        )


def _feature_noise_shape(input: Tensor) -> tuple[int, ...]:
    """One mask value per (sample, channel): (N, C, 1, ..., 1)."""
    return (input.shape[0], input.shape[1], *([1] * (input.dim() - 2)))


def _dropout(
    name: str,
    input: Tensor,
    p: float,
    training: bool,
    inplace: bool,
    generator: torch.Generator | None,
    channelwise: bool,
    alpha: bool,
) -> Tensor:
    """The one dropout formula behind every public variant.

    The keep mask is ``Bernoulli(1 - p)`` drawn with ``bernoulli_`` in the input's dtype, exactly
    as ATen draws it on CPU, so the same seed gives the same mask as ``torch.nn``.
    """
    if p == 0 or not training or input.numel() == 0:
        return input
    if _needs_atens_dropout(input, generator):
        return _atens_dropout(input, p, inplace, channelwise, alpha)
    if p == 1:  # input * 0, not zeros: NaN stays NaN, as in PyTorch
        return input.mul_(0) if inplace else input * 0
    if channelwise and input.dim() < 2:
        # Only now, as in PyTorch: in eval mode, or with p = 0 or 1, any rank passes.
        raise InputError(
            f"{name}: channel-wise dropout needs an input of shape (N, C, *) with at least 2 "
            f"dims, got shape {tuple(input.shape)}"
        )
    keep = 1.0 - p
    # As ATen: element-wise noise in the input's memory format (bernoulli_ fills it in memory
    # order), channel-wise noise contiguous.
    noise = input.new_empty(_feature_noise_shape(input)) if channelwise else torch.empty_like(input)
    noise.bernoulli_(keep, generator=generator)
    if not alpha:
        noise.div_(keep)
        return input.mul_(noise) if inplace else input * noise
    # Alpha dropout: dropped units take SELU's saturation value -alpha', then the affine map
    # a * x + b restores zero mean and unit variance (Klambauer et al. 2017, eq. 9-10).
    a = 1.0 / math.sqrt((_SELU_SATURATION**2 * p + 1) * keep)
    shift = (noise - 1) * (_SELU_SATURATION * a) + _SELU_SATURATION * a * p
    noise.mul_(a)
    return input.mul_(noise).add_(shift) if inplace else input * noise + shift


def _needs_atens_dropout(input: Tensor, generator: torch.Generator | None) -> bool:
    """Sparse and nested (jagged) tensors have no ``empty_like(...).bernoulli_``, and under
    ``torch.func.vmap(randomness="different")`` a tensor the function closes over (a weight)
    cannot take in-place noise: ATen's dropout ops have rules for both, and draw the same mask
    as :func:`_dropout` (the same ``bernoulli_``). They take no generator."""
    special = input.layout != torch.strided or input.is_nested
    return generator is None and (special or torch._C._are_functorch_transforms_active())


def _atens_dropout(
    input: Tensor, p: float, inplace: bool, channelwise: bool, alpha: bool
) -> Tensor:
    name = ("feature_" if channelwise else "") + ("alpha_dropout" if alpha else "dropout")
    return getattr(torch, name + ("_" if inplace else ""))(input, p, True)


def dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by ``1 / (1 - p)``.

    Same contract as :func:`torch.nn.functional.dropout`; ``generator`` draws the mask (the
    global generator when ``None``). In eval mode, or with ``p == 0``, the input itself is
    returned.
    """
    _check_dropout_args("dropout", input, p, training)
    return _dropout("dropout", input, p, training, inplace, generator, False, alpha=False)


def _warn(message: str) -> None:
    """A UserWarning at the caller of the public function; none inside a graph torch.compile
    traces (dynamo cannot trace ``warnings.warn`` there: fullgraph would fail)."""
    if not torch.compiler.is_compiling():
        warnings.warn(message, UserWarning, stacklevel=3)


def _channelwise_dropout(
    name: str,
    input: Tensor,
    p: float,
    training: bool,
    inplace: bool,
    generator: torch.Generator | None,
    batched_rank: int,
) -> Tensor:
    """Channel-wise dropout of a ``batched_rank``-D input, or of one rank less (no batch dim)."""
    batched = input.dim() == batched_rank
    if not batched:
        input = input.unsqueeze_(0) if inplace else input.unsqueeze(0)
    result = _dropout(name, input, p, training, inplace, generator, channelwise=True, alpha=False)
    if not batched:
        result = result.squeeze_(0) if inplace else result.squeeze(0)
    return result


def dropout1d(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Zero whole channels of an ``(N, C, L)`` or ``(C, L)`` input with probability ``p``."""
    _check_dropout_args("dropout1d", input, p, training)
    if input.dim() not in (2, 3):
        raise InputError(
            f"dropout1d: Expected 2D or 3D input, but received a {input.dim()}D input (shape "
            f"{tuple(input.shape)}): it takes (N, C, L) or (C, L); use dropout for element-wise "
            "dropout"
        )
    return _channelwise_dropout("dropout1d", input, p, training, inplace, generator, 3)


def dropout2d(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Zero whole channels of an ``(N, C, H, W)`` input with probability ``p``.

    As in PyTorch, a 3-D input is read as ``(N, C, L)`` (channel-wise 1-D dropout) with a
    warning, and other ranks are accepted with a deprecation warning.
    """
    _check_dropout_args("dropout2d", input, p, training)
    if input.dim() not in (3, 4):
        _warn(
            f"dropout2d: Received a {input.dim()}-D input to dropout2d, which is deprecated; it "
            "expects (N, C, H, W). Use dropout for element-wise dropout."
        )
    if input.dim() == 3:
        _warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise 1D "
            "dropout behavior is desired: read it as (N, C, L), dropping whole channels as "
            "dropout1d does (PyTorch's behaviour); use dropout1d to say so"
        )
    return _dropout("dropout2d", input, p, training, inplace, generator, True, alpha=False)


def dropout3d(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Zero whole channels of an ``(N, C, D, H, W)`` or ``(C, D, H, W)`` input, each with
    probability ``p``."""
    _check_dropout_args("dropout3d", input, p, training)
    if input.dim() not in (4, 5):
        _warn(
            f"dropout3d: Received a {input.dim()}-D input to dropout3d, which is deprecated; it "
            "expects (N, C, D, H, W) or (C, D, H, W). Use dropout for element-wise dropout."
        )
    return _channelwise_dropout("dropout3d", input, p, training, inplace, generator, 5)


def alpha_dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = False,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Dropout for self-normalizing (SELU) networks: keeps zero mean and unit variance.

    Dropped elements are set to SELU's saturation value and the result is mapped by ``a x + b``
    so that a standard-normal input keeps mean 0 and variance 1. ``training`` defaults to False,
    as in PyTorch.
    """
    _check_dropout_args("alpha_dropout", input, p, training)
    return _dropout("alpha_dropout", input, p, training, inplace, generator, False, alpha=True)


def feature_alpha_dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = False,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Alpha dropout of whole channels of an ``(N, C, *)`` input."""
    _check_dropout_args("feature_alpha_dropout", input, p, training)
    return _dropout("feature_alpha_dropout", input, p, training, inplace, generator, True, True)
