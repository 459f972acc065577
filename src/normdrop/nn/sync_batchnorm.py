r"""Synchronized Batch Normalization: one set of batch statistics across processes.

With data parallelism each of the ``R`` processes sees ``n_r`` of the batch's values per
channel. SyncBatchNorm normalizes every process's slice with the statistics of the *whole*
batch, so R processes with batches of ``B / R`` train like one process with batch ``B``.

Forward, per channel. Each rank computes its local mean and biased variance (Welford,
:func:`normdrop.functional.batch_statistics`), the ranks all-gather ``(mean_r, var_r, n_r)``,
and every rank combines them with the parallel formula of Chan, Golub & LeVeque (1979)::

    n    = sum_r n_r
    mean = sum_r n_r mean_r / n
    var  = sum_r n_r (var_r + (mean_r - mean)^2) / n          biased, normalizes the batch

A rank with an empty batch sends ``n_r = 0`` and weighs nothing, so uneven and empty local
batches are exact. The combination runs in float64: it costs ``2C + 1`` numbers. The running
variance moves towards the unbiased ``var * n / (n - 1)`` of the global batch
(:func:`normdrop.functional._update_running_stats`).

Backward: the gradient of BatchNorm needs two per-channel sums over the batch, ``sum(dy)`` and
``sum(dy * xhat)`` (see :class:`normdrop.functional._BatchNormFunction`). Each rank sums its
slice and ONE all-reduce adds them across ranks; ``dL/dgamma`` and ``dL/dbeta`` stay local,
since ``DistributedDataParallel`` averages parameter gradients itself.

Unlike ``torch.nn.SyncBatchNorm``, this works on CPU tensors with the gloo backend as well as on
CUDA with NCCL (it only uses ``all_gather`` and ``all_reduce``). It deliberately does NOT subclass
``torch.nn.SyncBatchNorm``: ``DistributedDataParallel`` refuses any module that is an instance of
that class on CPU ("SyncBatchNorm layers only work with GPU modules"). It does subclass
``torch.nn.modules.batchnorm._BatchNorm``, so ``state_dict`` keys and every BatchNorm
``isinstance`` check are PyTorch's.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor, fx
from torch.autograd.function import once_differentiable

from normdrop.errors import InputError, InputTypeError
from normdrop.functional import (
    _compute_dtype,
    _input_grad_batch_stats,
    _normalize,
    _per_channel,
    _reduction_dims,
    _update_running_stats,
    _values_per_channel,
    batch_statistics,
)
from normdrop.nn.batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNorm
from normdrop.nn.swap import swap_layers
from normdrop.nn.tracing import record_call

__all__ = [
    "SyncBatchNorm",
    "combine_batch_statistics",
    "convert_sync_batchnorm",
    "revert_sync_batchnorm",
]


def combine_batch_statistics(
    means: Tensor, variances: Tensor, counts: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and biased variance of the union of ``R`` batches, from their own statistics.

    Chan, Golub & LeVeque's parallel formula in its R-way form: the variance of the union is
    the count-weighted mean of each part's variance plus the spread of the part means around
    the global mean. Only deviations from the global mean enter, never ``E[x^2] - E[x]^2``.

    Args:
        means, variances: ``(R, C)`` per-part means and biased variances.
        counts: ``(R,)`` values per channel in each part; parts with count 0 are ignored,
            whatever their mean and variance hold (NaN included).

    Returns:
        ``(mean, var, total)``: two ``(C,)`` float64 tensors and the total count (0-D float64).
        With ``total == 0`` the statistics are NaN.
    """
    counts = counts.to(torch.float64)
    total = counts.sum()
    weights = (counts / total).unsqueeze(1)
    means, variances = means.to(torch.float64), variances.to(torch.float64)
    present = counts.unsqueeze(1) > 0
    # An empty part's statistics are not read at all: 0 * NaN would still be NaN.
    means = torch.where(present, means, 0.0)
    variances = torch.where(present, variances, 0.0)
    mean = (weights * means).sum(0)
    var = (weights * (variances + (means - mean) ** 2)).sum(0)
    return mean, var, total


def _gather_statistics(
    mean: Tensor, var: Tensor, count: int, group: dist.ProcessGroup | None
) -> tuple[Tensor, Tensor, int]:
    """All-gather every rank's ``(mean, var, count)`` and combine them (float64)."""
    count_tensor = torch.tensor([count], dtype=torch.float64, device=mean.device)
    packed = torch.cat([mean.to(torch.float64), var.to(torch.float64), count_tensor])
    gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    # all_gather, not all_reduce: the counts differ between ranks, so sums of means would be
    # wrong. The list form is the one gloo implements.
    dist.all_gather(gathered, packed, group=group)
    table = torch.stack(gathered)
    channels = mean.shape[0]
    means, variances, counts = table[:, :channels], table[:, channels:-1], table[:, -1]
    global_mean, global_var, total = combine_batch_statistics(means, variances, counts)
    return global_mean, global_var, int(total.item())


class _SyncBatchNormFunction(torch.autograd.Function):
    """``y = (x - mean) * invstd * weight + bias`` with global statistics, and its backward.

    ``mean`` and ``invstd`` are the global batch statistics, constants to autograd; the
    backward accounts for their dependence on every rank's input through the all-reduced sums::

        dL/dx = weight * invstd * (dy - S(dy) / n - xhat * S(dy * xhat) / n)

    where ``S`` sums over the global batch and ``n`` is the global count. No double backward:
    the all-reduce is not differentiable.
    """

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        total: int,
        group: dist.ProcessGroup | None,
    ) -> Tensor:
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.total, ctx.group = total, group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _normalize(input, weight, bias, mean, invstd)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        input, weight, mean, invstd = ctx.saved_tensors
        x = input.to(_compute_dtype(input))
        grad = grad_output.to(x.dtype)
        dims, ndim = _reduction_dims(x), x.dim()
        xhat = (x - _per_channel(mean, ndim)) * _per_channel(invstd, ndim)
        # Sums over an empty local batch are zeros: an empty rank still joins the all-reduce.
        sum_grad = grad.sum(dims)
        sum_grad_xhat = (grad * xhat).sum(dims)

        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_grad, sum_grad_xhat]).to(torch.float64)
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
            global_sum_grad, global_sum_grad_xhat = sums.to(x.dtype).chunk(2)
            scale = invstd if weight is None else invstd * weight.to(x.dtype)
            grad_input = _input_grad_batch_stats(
                grad, xhat, scale, global_sum_grad, global_sum_grad_xhat, ctx.total
            ).to(input.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_grad_xhat.to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_grad.to(ctx.bias_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None


def _check_companions(input: Tensor, **tensors: Tensor | None) -> None:
    """The rule of :func:`normdrop.functional.batch_norm`: buffers and parameters live on the
    input's device, in its dtype (or float32 for float16/bfloat16 input)."""
    allowed = {input.dtype, _compute_dtype(input)}
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.device != input.device:
            raise InputError(
                f"SyncBatchNorm: {name} is on {tensor.device} but input is on {input.device}; "
                "move them to the same device"
            )
        if tensor.dtype not in allowed:
            raise InputTypeError(
                f"SyncBatchNorm: {name} has dtype {tensor.dtype} but input has dtype "
                f"{input.dtype}; convert the module with .to({input.dtype}) or the input"
            )


def _sync_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    group: dist.ProcessGroup | None,
) -> Tensor:
    """Training-mode BatchNorm of the local slice ``input`` with the global batch statistics."""
    _check_companions(input, running_mean=running_mean, running_var=running_var, weight=weight)
    if not eps > 0:  # every rank has the same eps, so every rank raises before the collective
        raise InputError(f"SyncBatchNorm: eps must be positive during training, got {eps}")
    count = _values_per_channel(input)
    with torch.no_grad():
        if count > 0:
            mean, var = batch_statistics(input)
        else:  # empty local batch: it still has to join the collective
            mean = var = torch.zeros(input.shape[1], device=input.device)
        mean, var, total = _gather_statistics(mean, var, count, group)
    if total == 1:
        # Every rank sees the same total, so every rank raises: no rank is left waiting.
        raise InputError(
            "SyncBatchNorm: expected more than 1 value per channel when training, got 1 value "
            f"per channel across {dist.get_world_size(group)} processes (local input size "
            f"{tuple(input.shape)})"
        )
    if running_mean is not None and total > 1:
        _update_running_stats(running_mean, running_var, mean, var, total, momentum)
    compute = _compute_dtype(input)
    invstd = torch.rsqrt(var + eps).to(compute)
    return _SyncBatchNormFunction.apply(
        input, weight, bias, mean.to(compute), invstd, max(total, 1), group
    )


class SyncBatchNorm(_BatchNorm):
    r"""BatchNorm over an ``(N, C, *)`` input whose statistics span every process of a group.

    In training, when ``torch.distributed`` is initialized and the group has more than one
    process, the mean and variance are those of the union of the local batches (see the module
    docstring); otherwise it is exactly :class:`normdrop.nn.BatchNorm1d` / ``2d`` / ``3d``.
    Evaluation uses the running statistics, which every rank updates identically.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias: as for
            :class:`normdrop.nn.BatchNorm2d`.
        process_group: the group to synchronize over; ``None`` is the default (world) group.

    Local batches may differ in size and may be empty (``N = 0``) on some ranks; every rank
    must call forward (and backward) the same number of times, as with any collective.
    """

    _input_ranks = range(2, 65)  # (N, C, *): any rank from 2
    _input_shapes = "(N, C, *)"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        super()._check_input_dim(input)
        if not input.is_floating_point():  # the synchronized path skips functional's checks
            raise InputTypeError(
                f"SyncBatchNorm: input must be a floating-point tensor, got dtype {input.dtype}"
            )

    def _synchronizes(self) -> bool:
        return (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return record_call(self, input)
        if not self._synchronizes():
            return super().forward(input)
        self._check_input_dim(input)
        # Training (see _synchronizes): the buffers are passed only when tracked, for updating.
        running_mean, running_var, weight, bias, _, momentum = self._call_arguments()
        self._count_batch()
        return _sync_batch_norm(
            input, running_mean, running_var, weight, bias, momentum, self.eps, self.process_group
        )

    @classmethod
    def convert_sync_batchnorm(
        cls, module: torch.nn.Module, process_group: dist.ProcessGroup | None = None
    ) -> torch.nn.Module:
        """See :func:`convert_sync_batchnorm`."""
        return convert_sync_batchnorm(module, process_group)


# Exactly these classes become SyncBatchNorm. A subclass may change the forward (ghost
# batches, renormalization, a fused activation): converting it would silently drop that.
_PLAIN_BATCHNORMS = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
)


# Module's per-instance hook tables (the *_with_kwargs / always_called ones are flags keyed by
# hook id and must travel with their hooks).
_HOOK_TABLES = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
# What a SyncBatchNorm holds that a single-process layer made from it must not.
_SYNC_ONLY = frozenset({"process_group", "_unsynced_class"})


def _move_state(source: torch.nn.Module, target: torch.nn.Module) -> torch.nn.Module:
    """Hand ``source``'s parameters, buffers, hooks, mode and other attributes to ``target``:
    the same objects, not copies.

    Sharing keeps every optimizer that already holds the parameters valid, and the hook tables
    themselves travel so that the handles a user holds still remove their hooks. The parameter
    and buffer tables are taken whole, so what ``torch.nn.utils.prune`` leaves (``weight`` a
    plain attribute beside the parameter ``weight_orig``, a ``weight_mask`` buffer, the
    pre-hook that recomputes ``weight``) works as before, under the same state_dict keys.
    """
    for hooks in _HOOK_TABLES:
        if hasattr(source, hooks):
            setattr(target, hooks, getattr(source, hooks))
    # Which kind of backward hook the table holds (full, or the deprecated one): without it,
    # torch never calls them.
    target._is_full_backward_hook = getattr(source, "_is_full_backward_hook", None)
    # A load_state_dict pre-hook holds its module (by weak reference): point it at the target.
    table = target._load_state_dict_pre_hooks
    for key, hook in table.items():
        if getattr(hook, "with_module", False) and hook.module() is source:
            table[key] = type(hook)(hook.hook, target)
    target._parameters = dict(source._parameters)
    target._buffers = dict(source._buffers)
    target._non_persistent_buffers_set = set(source._non_persistent_buffers_set)
    sync_only = () if isinstance(target, SyncBatchNorm | torch.nn.SyncBatchNorm) else _SYNC_ONLY
    for name, value in vars(source).items():
        if name not in sync_only:
            vars(target).setdefault(name, value)  # a user's or a framework's attributes
    target.train(source.training)
    return target


def convert_sync_batchnorm(
    module: torch.nn.Module, process_group: dist.ProcessGroup | None = None
) -> torch.nn.Module:
    """Replace every plain BatchNorm in ``module`` by a normdrop :class:`SyncBatchNorm`.

    Plain means ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm`` and their normdrop
    counterparts, matched by exact type: a subclass with its own forward (ghost, renorm, a fused
    activation) is left alone. Parameters and buffers are shared, not copied. Like PyTorch's
    function it works in place and returns ``module``, or the new layer when ``module`` is
    itself a BatchNorm; a layer held under several names becomes one SyncBatchNorm under all of
    them. :func:`revert_sync_batchnorm` undoes it.
    """

    left: list[str] = []

    def synced(layer: torch.nn.Module, path: str) -> torch.nn.Module | None:
        if type(layer) not in _PLAIN_BATCHNORMS:
            batch_statistics = isinstance(layer, torch.nn.modules.batchnorm._BatchNorm)
            if batch_statistics and not isinstance(layer, SyncBatchNorm):
                left.append(f"'{path or '<model>'}' ({type(layer).__name__})")
            return None
        converted = SyncBatchNorm(
            layer.num_features,
            layer.eps,
            layer.momentum,
            layer.affine,
            layer.track_running_stats,
            process_group,
            bias=not layer.affine or layer.bias is not None,
        )
        converted._unsynced_class = type(layer)
        return _move_state(layer, converted)

    converted = swap_layers(module, synced)
    if left:
        warnings.warn(
            f"convert_sync_batchnorm: left {len(left)} BatchNorm subclass(es) unsynchronized, "
            f"whose own forward a SyncBatchNorm would drop: {', '.join(left)}; their batch "
            "statistics stay per process (torch.nn.SyncBatchNorm.convert_sync_batchnorm would "
            "replace them by plain SyncBatchNorm, losing what they add)",
            UserWarning,
            stacklevel=2,
        )
    return converted


def revert_sync_batchnorm(
    module: torch.nn.Module, cls: type[torch.nn.Module] | None = None
) -> torch.nn.Module:
    """Replace every normdrop :class:`SyncBatchNorm` by a single-process BatchNorm.

    A layer made by :func:`convert_sync_batchnorm` gets back its original class. One built
    directly as ``SyncBatchNorm`` has no such class: pass ``cls`` (e.g.
    ``normdrop.nn.BatchNorm2d``). Parameters and buffers are shared, not copied. If some layer
    cannot be reverted, nothing is.
    """

    def reverted(layer: torch.nn.Module, path: str) -> torch.nn.Module | None:
        if not isinstance(layer, SyncBatchNorm):
            return None
        target = cls or getattr(layer, "_unsynced_class", None)
        if target is None:
            raise InputError(
                "revert_sync_batchnorm: this SyncBatchNorm was not made by "
                "convert_sync_batchnorm, so its original class is unknown; pass cls="
                "normdrop.nn.BatchNorm1d, BatchNorm2d or BatchNorm3d"
            )
        extra = {} if not layer.affine or layer.bias is not None else {"bias": False}
        new = target(
            layer.num_features,
            layer.eps,
            layer.momentum,
            layer.affine,
            layer.track_running_stats,
            **extra,
        )
        return _move_state(layer, new)

    return swap_layers(module, reverted)
