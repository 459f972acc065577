r"""The fast kernels as ``torch.library`` custom ops, so autograd, ``torch.compile`` and
``torch.export`` see them as single operators, and their eager twins.

Ops (namespace ``normdrop``):

* ``batch_norm_stats(input, running_mean!, running_var!, momentum, eps, plain) -> (mean, invstd)``:
  the training statistics, ``(C,)`` each; the running buffers (optional) are updated in place,
  as :func:`normdrop.functional._update_running_stats` updates them.
* ``bn_act_dropout(input, weight, bias, mean, invstd, training, eps, activation,
  negative_slope, p, seed, offset) -> output``: ``dropout(act((x - mean) * invstd * weight +
  bias))``, differentiable in ``input``, ``weight`` and ``bias``; ``mean`` and ``invstd`` are
  constants, and in training the backward adds their dependence on ``input`` (as
  ``functional._BatchNormFunction`` does). Saved for backward: the input, the ``(C,)`` vectors
  and the seed, nothing of the input's size.
* ``bn_act_dropout_backward(...) -> (grad_input, grad_weight, grad_bias)``.
* ``dropout(input, p, seed, offset) -> output`` and the in-place ``dropout_``; the backward of
  ``dropout`` is ``dropout`` of the gradient with the same seed, so it is twice differentiable.

``seed`` is a 0-dim int64 tensor (see :func:`normdrop.kernels.masks.draw_seed`); element ``i``
(in memory order) uses Philox stream element ``offset + i``. Inputs whose memory is neither
planar (contiguous) nor rows (channels_last) are copied to contiguous first; the dispatcher
only sends tensors that need no copy.

Eager mode (plain CPU tensors, not tracing) skips the custom-op dispatch, which would cost more
than the kernels on small inputs: :func:`batch_norm_act` runs the statistics and the forward in
one ``torch.autograd.Function`` (:class:`_BatchNormActFunction`) whose backward is one kernel
call, and :func:`dropout` runs :class:`_DropoutFunction`. They call the same kernels, with the
same arguments, as the ops.

Double backward: when the backward itself is differentiated (``create_graph=True``), it is
computed by autograd over the reference formulas of :mod:`normdrop.functional`, so gradient
penalties work; the kernels only serve first-order gradients.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import numba
import numba.np.ufunc.parallel
import numpy as np
import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from normdrop import functional as F
from normdrop.kernels import compile_ahead, cpu, philox
from normdrop.kernels.activations import activate

__all__ = [
    "PLANAR",
    "ROWS",
    "batch_norm_act",
    "batch_norm_stats",
    "bn_act_dropout",
    "dropout",
    "dropout_",
    "layout_of",
    "reference_bn_act_dropout",
    "usable",
]

PLANAR = cpu.PLANAR
ROWS = cpu.ROWS


# --------------------------------------------------------------------------------------------
# Fork safety
# --------------------------------------------------------------------------------------------

# GNU OpenMP (numba's "omp" threading layer here) cannot run in a child forked after the parent
# started it: numba terminates such a child at its first parallel kernel. A process forked
# after kernels ran therefore takes the reference path (spawned processes are unaffected).
_launched = False
_forked_after_openmp = False
# The thread count each calling thread last gave numba (numba's setting is per thread).
_threads = threading.local()


def _launching() -> None:
    """Before each kernel call: the kernels run on as many threads as torch's ops
    (``torch.set_num_threads``, ``OMP_NUM_THREADS``), up to numba's pool. numba's OpenMP pool
    starts at the first call and sets the process's OpenMP thread count, which torch reads as
    its own, to the size of the pool (the CPU count): torch's count is put back."""
    global _launched
    wanted = torch.get_num_threads()
    if not _launched:
        numba.np.ufunc.parallel._launch_threads()
        torch.set_num_threads(wanted)
        _launched = True
    if getattr(_threads, "count", 0) != wanted:
        numba.set_num_threads(min(wanted, numba.config.NUMBA_NUM_THREADS))
        _threads.count = wanted


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

_PLAIN = frozenset((Tensor, torch.nn.Parameter))


def direct_apply(function: type[torch.autograd.Function]) -> Callable[..., Any]:
    """``function.apply`` without the Python layer of ``autograd.Function.apply`` (about 1.2 us
    a call, ``benchmarks/breakdown.py``): it binds default arguments (for Functions with a
    ``setup_context``) and maps a pytree over the arguments to unwrap dead ``torch.func``
    wrappers. The kernels' Functions define no ``setup_context``, and their eager callers pass
    no ``torch.func``-wrapped tensor (the dispatch sends those to the reference), so neither
    step changes anything there. Under active ``torch.func`` transforms, or on a torch without
    the C entry point, it is the full ``apply``."""
    base = getattr(torch._C, "_FunctionBase", None)
    raw = None if base is None else base.__dict__.get("apply")
    if raw is None or not hasattr(raw, "__get__"):
        return function.apply
    bound, full = raw.__get__(None, function), function.apply
    transforms_active = torch._C._are_functorch_transforms_active

    def apply(*args: Any) -> Any:
        return full(*args) if transforms_active() else bound(*args)

    return apply


def under_transform(tensor: Tensor) -> bool:
    """True inside a ``torch.func`` transform (vmap, grad, jvp...), for a tensor one wrapped (a
    parameter under ``grad``, a dead wrapper) or batched by the legacy vmap (gradcheck's
    batched-gradient check runs the backward under it), or inside ``torch.autograd.forward_ad``'s
    ``dual_level()``: the kernels have no functorch or forward-mode rules and read plain memory
    (inside a transform even plain tensors come back wrapped: ``detach()``, the gradients
    reaching backward), so such calls take the reference, whose formulas have them."""
    return (
        torch._C._are_functorch_transforms_active()
        or F._is_wrapped_tensor(tensor)
        or _forward_ad._current_level >= 0
    )


def _records_nothing(*tensors: Tensor | None) -> bool:
    """True when neither autograd nor torch.jit.trace would record a call on ``tensors``."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return not torch.jit.is_tracing()


def _eager(*tensors: Tensor | None) -> bool:
    """True for plain CPU tensors outside ``torch.compile``/``torch.export`` tracing.

    Then the public functions below run the kernels through ``torch.autograd.Function``s, which
    saves the custom-op dispatch, tens of microseconds per call; the registered ops serve
    tracing, fake tensors and every other tensor subclass.
    """
    if torch.compiler.is_compiling():
        return False
    for tensor in tensors:  # noqa: SIM110 (a loop: a generator costs ~1 us, every call)
        if tensor is not None and type(tensor) not in _PLAIN:
            return False
    return True


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
    if input.is_contiguous():
        return ROWS if math.prod(input.shape[2:]) == 1 else PLANAR
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


_EMPTY = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64)}
_NUMPY = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


def _vector(tensor: Tensor | None, dtype: torch.dtype) -> np.ndarray:
    """A ``(C,)`` tensor as numpy; None as an empty array (the kernels' "absent"). The kernels
    take dense arrays only (one compiled variant): a dense tensor is its own memory, a strided
    one a copy, so only for what the kernels read (a tensor they write goes through
    :func:`_dense` and back)."""
    return _EMPTY[dtype] if tensor is None else tensor.detach().contiguous().numpy()


def _dense(tensor: Tensor | None) -> Tensor | None:
    """``tensor`` itself where dense, else a dense copy (the caller writes it back)."""
    return tensor if tensor is None or tensor.is_contiguous() else tensor.detach().contiguous()


# --------------------------------------------------------------------------------------------
# Dropout parameters
# --------------------------------------------------------------------------------------------


def _drop_scale(p: float, dtype: torch.dtype) -> float:
    """``1 / (1 - p)`` rounded as ATen's ``noise.div_(1 - p)`` rounds it in ``dtype``."""
    if p >= 1:
        return math.inf
    return float(torch.ones((), dtype=dtype).div_(1.0 - p))


def _drops(p: float, seed: Tensor | None) -> bool:
    """Whether a kernel call applies dropout (a seed is given for ``p > 0`` in training)."""
    return p > 0 and seed is not None


def _dropout_key(p: float, seed: Tensor | None) -> tuple[int, int, int, bool]:
    """``(key0, key1, threshold, drop)`` for the kernels."""
    if not _drops(p, seed):
        return 0, 0, 0, False
    key0, key1 = philox.split_seed(int(seed))
    return key0, key1, philox.keep_threshold(p), True


@functools.lru_cache(maxsize=64)
def _kernel_params(dtype: torch.dtype, activation: str, negative_slope: float, p: float):
    """``(params, act)``: the kernels' scalar array and activation code."""
    slope = 1.0 if activation == "identity" else negative_slope
    return cpu.make_params(_NUMPY[dtype], slope, _drop_scale(p, dtype)), cpu.ACTIVATIONS[activation]


# --------------------------------------------------------------------------------------------
# The kernel calls, shared by the ops and the eager functions
# --------------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    """What a call's kernels need besides the tensors; made once per forward, kept for the
    backward."""

    layout: str
    numel: int
    channels: int
    plane: int
    params: np.ndarray
    act: int
    key0: int
    key1: int
    offset: int
    threshold: int
    drop: bool


def _plan(
    input: Tensor, activation: str, negative_slope: float, p: float, seed: Tensor | None, offset
) -> _Plan:
    """The plan of a call on ``input``, which must be planar or rows (see :func:`layout_of`)."""
    params, act = _kernel_params(input.dtype, activation, negative_slope, p)
    key0, key1, threshold, drop = _dropout_key(p, seed)
    shape = input.shape  # int(): under torch.jit.trace, sizes and their products are tensors
    numel, channels, plane = int(input.numel()), int(shape[1]), int(math.prod(shape[2:]))
    return _Plan(
        cpu.kernel_layout(layout_of(input), numel, channels, plane, act, drop),
        numel,
        channels,
        plane,
        params,
        act,
        key0,
        key1,
        offset,
        threshold,
        drop,
    )


def _run_forward(
    what: int,
    input: Tensor,
    output: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    stats: np.ndarray,
    weight: Tensor | None,
    bias: Tensor | None,
    plan: _Plan,
) -> None:
    """One forward kernel call; see :func:`normdrop.kernels.cpu.forward_kernel`.

    ``cpu.STATS`` fills ``stats`` (3, C: mean, invstd, var) from the batch: sums about a center
    near the mean, in runs added up in float64 (see the module docstring of ``cpu``; Chan's
    merge across pieces), rounded to the input's dtype as
    :func:`normdrop.functional.batch_norm` rounds them, and updates the running buffers;
    ``cpu.STATS_APPLY`` also writes ``output``, as do ``cpu.APPLY`` (statistics given) and
    ``cpu.APPLY_RUNNING`` (from the running buffers).
    """
    dtype = input.dtype
    x_at = input.data_ptr()  # dense memory in the plan's layout: see cpu._memory
    if what == cpu.STATS:  # the statistics op of a traced training graph: a backward follows
        compile_ahead.start(plan.layout, plan.params.dtype)
    # The kernels write the running buffers through dense arrays: a strided buffer (the
    # modules' dispatcher sends those to the reference, batch_norm_stats does not) is updated
    # through a dense copy, written back below.
    dense_mean, dense_var = _dense(running_mean), _dense(running_var)
    _launching()
    finite = cpu.forward_kernel(plan.layout)(
        what,
        x_at,
        x_at if output is None else output.data_ptr(),
        plan.numel,
        plan.channels,
        plan.plane,
        _vector(dense_mean, dtype),
        _vector(dense_var, dtype),
        momentum,
        eps,
        stats,
        _vector(weight, dtype),
        _vector(bias, dtype),
        plan.params,
        plan.act,
        plan.key0,
        plan.key1,
        plan.offset,
        plan.threshold,
        plan.drop,
    )
    if not finite:  # a NaN/Inf channel: the reference skips it and warns
        mean, var = torch.from_numpy(stats[0]), torch.from_numpy(stats[2])
        count = plan.numel // plan.channels
        F._update_running_stats(running_mean, running_var, mean, var, count, momentum)
    elif what <= cpu.STATS_APPLY:
        for buffer, dense in ((running_mean, dense_mean), (running_var, dense_var)):
            if dense is not buffer:
                buffer.copy_(dense)


def _run_backward(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: np.ndarray,
    invstd: np.ndarray,
    training: bool,
    need_sums: bool,
    plan: _Plan,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(grad_input, grad_weight, grad_bias)`` in one kernel call (the sums, then dx); the last
    two are ``sum(g * xhat)`` and ``sum(g)`` (zeros in inference without ``need_sums``).
    ``input`` is as the plan was made for."""
    grad_output = _same_layout(grad_output, input)
    dtype = input.dtype
    grad_input = torch.empty_like(input)
    grad_weight = torch.zeros(plan.channels, dtype=dtype)
    grad_bias = torch.zeros(plan.channels, dtype=dtype)
    compile_ahead.wait(plan.layout, plan.params.dtype)
    _launching()
    cpu.backward_kernel(plan.layout)(
        training or need_sums,
        grad_output.data_ptr(),
        input.data_ptr(),
        grad_input.data_ptr(),
        plan.numel,
        plan.channels,
        plan.plane,
        mean,
        invstd,
        _vector(weight, dtype),
        _vector(bias, dtype),
        plan.params,
        plan.act,
        plan.key0,
        plan.key1,
        plan.offset,
        plan.threshold,
        plan.drop,
        training,
        grad_weight.data_ptr(),
        grad_bias.data_ptr(),
    )
    return grad_input, grad_weight, grad_bias


# --------------------------------------------------------------------------------------------
# BatchNorm statistics and running averages
# --------------------------------------------------------------------------------------------


def _batch_norm_stats(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    plain: bool = True,
) -> tuple[Tensor, Tensor]:
    """Training statistics of ``(N, C, *)`` input: ``(mean, invstd)``, ``(C,)`` each.

    Mean and biased variance are accumulated in float64 (two passes per block, Chan's merge
    across blocks); ``invstd = rsqrt(var + eps)`` in the input's dtype, as the reference. The
    running buffers, when given, are updated as
    :func:`normdrop.functional._update_running_stats` updates them. ``plain``: the op that
    follows applies no activation or dropout; the statistics then come from the kernels it
    will run (``cpu.kernel_layout``), so that one pair compiles, and the helper compiles its
    backward. Both pairs give the same bits.
    """
    input, _ = _prepared(input)
    plan = _plan(input, "identity", 0.0, 0.0, None, 0)
    if not plain:  # the fused op's kernels: those of the layout itself
        plan = plan._replace(layout=layout_of(input))
    stats = torch.empty((3, plan.channels), dtype=input.dtype)
    _run_forward(
        cpu.STATS,
        input,
        None,
        running_mean,
        running_var,
        float(momentum),
        float(eps),
        stats.numpy(),
        None,
        None,
        plan,
    )
    return stats[0].clone(), stats[1].clone()


_batch_norm_stats_op = torch.library.custom_op(
    "normdrop::batch_norm_stats", mutates_args=("running_mean", "running_var")
)(_batch_norm_stats)


@_batch_norm_stats_op.register_fake
def _(input, running_mean, running_var, momentum, eps, plain=True):
    channels = input.shape[1]
    return input.new_empty(channels), input.new_empty(channels)


def batch_norm_stats(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    plain: bool = True,
) -> tuple[Tensor, Tensor]:
    """The ``normdrop::batch_norm_stats`` op (its implementation directly in eager mode)."""
    if _eager(input, running_mean, running_var):
        return _batch_norm_stats(input, running_mean, running_var, momentum, eps, plain)
    return _batch_norm_stats_op(input, running_mean, running_var, momentum, eps, plain)


# --------------------------------------------------------------------------------------------
# Fused BatchNorm -> activation -> Dropout
# --------------------------------------------------------------------------------------------


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
    input, _ = _prepared(input)
    plan = _plan(input, activation, negative_slope, p, seed, offset)
    stats = torch.empty((3, plan.channels), dtype=input.dtype)
    stats[0] = mean.detach()
    stats[1] = invstd.detach()
    output = _op_output(input)
    _run_forward(
        cpu.APPLY, input, output, None, None, 0.0, float(eps), stats.numpy(), weight, bias, plan
    )
    return output


_bn_act_dropout_op = torch.library.custom_op("normdrop::bn_act_dropout", mutates_args=())(
    _bn_act_dropout
)


@_bn_act_dropout_op.register_fake
def _(
    input, weight, bias, mean, invstd, training, eps, activation, negative_slope, p, seed, offset
):
    return _op_output(_prepared(input)[0])


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
    input, _ = _prepared(input)
    plan = _plan(input, activation, negative_slope, p, seed, offset)
    return _run_backward(
        grad_output,
        input,
        weight,
        bias,
        mean.detach().numpy(),
        invstd.detach().numpy(),
        bool(training),
        bool(need_sums),
        plan,
    )


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
    grad_input = torch.empty_like(_prepared(input)[0])  # as _run_backward allocates it
    return grad_input, input.new_empty(channels), input.new_empty(channels)


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


def _needed(ctx, weight, bias, grads) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    grad_input, grad_weight, grad_bias = grads
    needs = ctx.needs_input_grad
    return (
        grad_input if needs[0] else None,
        grad_weight if weight is not None and needs[1] else None,
        grad_bias if bias is not None and needs[2] else None,
    )


def _grads(ctx, grad_output, saved) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The op's backward: ``saved`` = (input, weight, bias, mean, invstd, seed),
    ``ctx.config`` = (training, eps, activation, slope, p, offset)."""
    input, weight, bias, mean, invstd, seed = saved
    training, _, activation, slope, p, offset = ctx.config
    if torch.is_grad_enabled() or under_transform(grad_output):
        # a double backward, or a backward under vmap (batched gradients): the kernels read
        # plain memory, the reference formulas have every rule
        return _needed(ctx, weight, bias, _differentiable_grads(grad_output, saved, ctx.config))
    needs = ctx.needs_input_grad
    backward = _bn_act_dropout_backward if _eager(grad_output) else _bn_act_dropout_backward_op
    grads = backward(
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
    return _needed(ctx, weight, bias, grads)


def _backward_bn_act_dropout(ctx, grad_output):
    return (*_grads(ctx, grad_output, ctx.saved_tensors), *([None] * 9))


_bn_act_dropout_op.register_autograd(_backward_bn_act_dropout, setup_context=_setup_bn_act_dropout)


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
    """The ``normdrop::bn_act_dropout`` op: given the statistics, normalize, activate, drop."""
    return _bn_act_dropout_op(
        input,
        weight,
        bias,
        mean,
        invstd,
        training,
        eps,
        activation,
        negative_slope,
        p,
        seed,
        offset,
    )


def _empty_like_is_atens(input: Tensor) -> bool:
    """Whether ``empty_like(input)`` (which keeps the input's strides) has the strides ATen gives
    BatchNorm's output: a new tensor in the input's output format
    (:func:`normdrop.functional._output_format`), whose memory order, the one the kernels
    write, is the input's. Size-1 dims can have any stride: only then are the strides compared."""
    output_format = F._output_format(input)
    if 1 not in input.shape:
        return input.is_contiguous(memory_format=output_format)
    return input.stride() == F._format_strides(input.shape, output_format)


def _op_output(input: Tensor) -> Tensor:
    """The fused op's output for a prepared ``input``, as ATen lays out BatchNorm's (also in
    the op's fake, so that compiled graphs see the strides the op returns)."""
    return _new_output(input, _empty_like_is_atens(input))


def _new_output(input: Tensor, like_input: bool) -> Tensor:
    """BatchNorm's output for ``input`` as ATen allocates it; ``like_input`` is
    :func:`_empty_like_is_atens` (the cheaper call where it holds)."""
    if like_input:
        return torch.empty_like(input)
    return torch.empty(input.shape, dtype=input.dtype, memory_format=F._output_format(input))


def _eager_forward(
    input,
    weight,
    bias,
    running_mean,
    running_var,
    training,
    momentum,
    eps,
    activation,
    negative_slope,
    p,
    seed,
    *,
    backward_follows: bool = False,
) -> tuple[Tensor, np.ndarray, _Plan]:
    """Output, ``(3, C)`` statistics (numpy) and plan of one eager call: one kernel call.
    ``backward_follows``: autograd records the call, so the backward kernel will be wanted
    (:func:`normdrop.kernels.compile_ahead.start`)."""
    plan = _plan(input, activation, negative_slope, p, seed, 0)
    if backward_follows:
        compile_ahead.start(plan.layout, plan.params.dtype)
    output = _new_output(input, _empty_like_is_atens(input))
    stats = np.empty((3, plan.channels), plan.params.dtype)
    what = cpu.STATS_APPLY if training else cpu.APPLY_RUNNING
    _run_forward(
        what, input, output, running_mean, running_var, momentum, eps, stats, weight, bias, plan
    )
    return output, stats, plan


class _BatchNormActFunction(torch.autograd.Function):
    """Eager BatchNorm -> activation -> Dropout: statistics, running averages and output in one
    kernel call, the backward in one.

    The same kernels and the same saved tensors as ``batch_norm_stats`` followed by
    ``bn_act_dropout``, without the op dispatch or any intermediate torch op; mean and invstd
    stay numpy arrays on ``ctx`` (tensors only for a double backward).
    """

    @staticmethod
    def forward(
        ctx,
        input,
        weight,
        bias,
        running_mean,
        running_var,
        training,
        momentum,
        eps,
        activation,
        negative_slope,
        p,
        seed,
    ):
        output, stats, plan = _eager_forward(
            input,
            weight,
            bias,
            running_mean,
            running_var,
            training,
            momentum,
            eps,
            activation,
            negative_slope,
            p,
            seed,
            backward_follows=True,
        )
        # The identity's gradients do not depend on the bias's value: as torch's BatchNorm,
        # it may then change in place before the backward. The other activations recompute
        # their input from it, so autograd's version check guards it.
        ctx.save_for_backward(input, weight, None if activation == "identity" else bias)
        ctx.bias = bias
        ctx.stats, ctx.plan, ctx.seed = stats, plan, seed
        ctx.config = (training, eps, activation, negative_slope, p, 0)
        # the kernels write the input gradient in the input's memory order; ATen's may differ
        ctx.grad_layout = not F._has_new_contiguous_strides(input)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, saved_bias = ctx.saved_tensors
        bias = ctx.bias if saved_bias is None else saved_bias
        stats = ctx.stats
        if torch.is_grad_enabled() or under_transform(grad_output):  # see _grads
            mean, invstd = torch.from_numpy(stats[0]), torch.from_numpy(stats[1])
            saved = (input, weight, bias, mean, invstd, ctx.seed)
            grads = _differentiable_grads(grad_output, saved, ctx.config)
        else:
            needs = ctx.needs_input_grad
            grads = _run_backward(
                grad_output,
                input,
                weight,
                bias,
                stats[0],
                stats[1],
                ctx.config[0],
                needs[1] or needs[2],
                ctx.plan,
            )
            if ctx.grad_layout and grads[0] is not None:
                grads = (F._in_input_grad_layout(grads[0], input, grad_output), *grads[1:])
        return (*_needed(ctx, weight, bias, grads), *([None] * 9))


_apply_bn_act = direct_apply(_BatchNormActFunction)


def batch_norm_act(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
    negative_slope: float,
    p: float,
    seed: Tensor | None,
) -> Tensor:
    """``dropout(act(batch_norm(input)), p)`` on the kernels, arguments already checked.

    Eager: :class:`_BatchNormActFunction`. Traced: the ``batch_norm_stats`` op (training) and
    the ``bn_act_dropout`` op, which ``torch.compile`` and ``torch.export`` keep in the graph.
    """
    if _eager(input, weight, bias, running_mean, running_var):
        args = (
            input,
            weight,
            bias,
            running_mean,
            running_var,
            training,
            momentum,
            eps,
            activation,
            negative_slope,
            p,
            seed,
        )
        if _records_nothing(input, weight, bias):
            return _eager_forward(*args)[0]  # skip autograd.Function: nothing to record
        return _apply_bn_act(*args)
    if training:
        plain = activation == "identity" and not _drops(p, seed)
        mean, invstd = batch_norm_stats(
            input.detach(), running_mean, running_var, momentum, eps, plain
        )
    else:
        mean, invstd = running_mean.detach(), torch.rsqrt(running_var.detach() + eps)
    return bn_act_dropout(
        input, weight, bias, mean, invstd, training, eps, activation, negative_slope, p, seed, 0
    )


# --------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------


def _memory(tensor: Tensor) -> np.ndarray:
    """A dense tensor's memory as a flat numpy array (no copy)."""
    return _dense_order(tensor.detach()).numpy().reshape(-1)


def _dropout_into(source: Tensor, target: Tensor, p: float, seed: Tensor, offset: int) -> None:
    """``target = source * factor`` over flat memory; both dense with the same strides."""
    key0, key1, threshold, _ = _dropout_key(p, seed)
    params, _ = _kernel_params(source.dtype, "identity", 0.0, p)
    _launching()
    cpu.dropout_flat(_memory(source), _memory(target), params, key0, key1, offset, threshold)


def _dropout(input: Tensor, p: float, seed: Tensor, offset: int) -> Tensor:
    """``input * factor``: element ``i`` (memory order) kept iff Philox says so, scaled by
    ``1 / (1 - p)``. The output is laid out as ATen's ``empty_like`` lays it out: the input's
    strides, or for an input that is not dense (sliced), dense strides in its dim order."""
    if not input.is_contiguous() and _dense_order(input) is None:
        input = torch.empty_like(input).copy_(input)
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


def _dropout_grad(ctx, grad_output, seed):
    p, offset, shape, strides = ctx.config
    if under_transform(grad_output):
        # a backward under vmap (batched gradients): the kernels read plain memory, so the
        # factor is drawn on a plain tensor laid out as the output was (the mask follows memory
        # order) and applied by a multiplication, which has every rule
        like = torch.empty_strided(shape, strides, dtype=grad_output.dtype)
        return grad_output * _dropout(like.fill_(1), p, seed, offset)
    if tuple(grad_output.stride()) != strides:
        # The mask follows memory order: the gradient must be laid out as the output was.
        grad_output = torch.empty_strided(
            shape, strides, dtype=grad_output.dtype, device=grad_output.device
        ).copy_(grad_output)
    if not torch.is_grad_enabled() and _eager(grad_output):
        return _dropout(grad_output, p, seed, offset)
    return dropout(grad_output, p, seed, offset)  # differentiable: double backward


def _backward_dropout(ctx, grad_output):
    (seed,) = ctx.saved_tensors
    return _dropout_grad(ctx, grad_output, seed), None, None, None


_dropout_op.register_autograd(_backward_dropout, setup_context=_setup_dropout)


class _DropoutFunction(torch.autograd.Function):
    """The eager twin of the op: same implementation and backward, less dispatch."""

    @staticmethod
    def forward(ctx, input, p, seed, offset):
        output = _dropout(input, p, seed, offset)
        ctx.seed = seed  # a 0-dim int64 tensor without history
        ctx.config = (p, offset, tuple(output.shape), tuple(output.stride()))
        return output

    @staticmethod
    def backward(ctx, grad_output):
        return _dropout_grad(ctx, grad_output, ctx.seed), None, None, None


_apply_dropout = direct_apply(_DropoutFunction)


def dropout(input: Tensor, p: float, seed: Tensor, offset: int) -> Tensor:
    """The ``normdrop::dropout`` op (an equivalent autograd.Function in eager mode)."""
    if _eager(input, seed):
        return _apply_dropout(input, p, seed, offset)
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
    """In-place :func:`dropout` (no autograd: for inference and ``torch.no_grad``).

    The kernel writes the memory through numpy, past torch's in-place bookkeeping, so what an
    in-place torch op does is done here: an inference tensor outside inference mode is refused
    (torch's message) and the version counter is bumped, so that a backward that saved the
    tensor raises instead of using the dropped values."""
    if _eager(input, seed):
        if input.is_inference() and not torch.is_inference_mode_enabled():
            raise RuntimeError(
                "Inplace update to inference tensor outside InferenceMode is not allowed. You "
                "can make a clone to get a normal tensor before doing inplace update."
            )
        _dropout_inplace(input, p, seed, offset)
        torch.autograd.graph.increment_version(input)
    else:
        _dropout_inplace_op(input, p, seed, offset)
