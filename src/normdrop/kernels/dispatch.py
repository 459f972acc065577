"""Per call, the fast kernels or the reference math of :mod:`normdrop.functional`.

The fast path runs when every condition holds, and the reference otherwise, silently:

* ``normdrop.get_backend() == "fast"``, numba imported, and not in a process forked after its
  parent ran the (OpenMP) kernels;
* a CPU tensor of dtype float32 or float64, not empty, outside ``torch.func`` transforms and
  not wrapped by one (nor batched by the legacy vmap of gradcheck's batched gradients; their
  backwards, too, take the reference formulas);
* BatchNorm: parameters and buffers of the input's dtype and device, and an input whose memory
  the kernels read as it is (contiguous, or channels_last / channels_last_3d);
* Dropout: element-wise dropout in training with ``0 < p <= 1 - 2^-10``
  (:data:`normdrop.kernels.masks.MIN_KEEP`: closer to 1, the float32 uniforms would miss the
  keep rate).

Arguments are validated by :mod:`normdrop.functional`'s own checks on both paths, so bad input
raises the same error whichever path runs. Under ``normdrop.use_backend("reference")`` every
call is exactly the reference call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from normdrop import functional as F
from normdrop.backend import get_backend
from normdrop.kernels.activations import ACTIVATION_NAMES, activate, check_activation

try:
    from normdrop.kernels import eager, masks, ops
except ImportError:  # numba missing or broken: everything takes the reference path
    eager = masks = ops = None

__all__ = [
    "ACTIVATION_NAMES",
    "batch_norm",
    "batch_norm_act_dropout",
    "dropout",
    "fast_path_available",
    "module_dropout",
    "reference_batch_norm_act_dropout",
]

_FAST_DTYPES = (torch.float32, torch.float64)


def fast_path_available() -> bool:
    """True when the kernels can run at all (numba imported)."""
    return ops is not None


def _fast_tensor(input: object) -> bool:
    return (
        get_backend() == "fast"
        and ops is not None
        and ops.usable()
        and isinstance(input, Tensor)
        and input.layout == torch.strided  # not sparse, not a jagged nested tensor
        and not input.is_nested
        and input.is_cpu
        and input.dtype in _FAST_DTYPES
        and input.numel() > 0
        and not _memory_unlike_values(input)
    )


def _memory_unlike_values(tensor: Tensor) -> bool:
    """Memory the kernels would misread: a ``torch.func`` wrapper
    (:func:`normdrop.kernels.ops.under_transform`) or a lazily negated view
    (``torch._neg_view``, whose memory holds ``-x``). Not asked under torch.compile, which
    cannot trace the questions: its fake tensors are neither, and the ops handle them."""
    return not torch.compiler.is_compiling() and (tensor.is_neg() or ops.under_transform(tensor))


def _in_torchs_layout(input: Tensor) -> Tensor:
    """A channel-fastest input that ATen would not answer in its own layout (a transposed
    ``(N, L, C)`` sequence fed as ``(N, C, L)``), as a contiguous copy; any other input as is.

    The kernels write the output (and the input's gradient) in the input's memory order, ATen in
    the format of :func:`normdrop.functional._in_layout_of`. Through the copy, both come out
    contiguous, as from ATen, still on the kernels."""
    if (
        ops is not None
        and isinstance(input, Tensor)
        and input.dim() >= 2
        and not input.is_contiguous()  # contiguous is always in ATen's output format
        and ops.layout_of(input) == ops.ROWS
        and not F._in_layout(input)
    ):
        return input.contiguous()
    return input


def _fast_batch_norm(input: Tensor, *tensors: Tensor | None) -> bool:
    if not (_fast_tensor(input) and input.dim() >= 2):
        return False
    # Callers pass the input through _in_torchs_layout first: every layout left is ATen's own.
    if ops.layout_of(input) is None:
        return False
    dtype = input.dtype
    for tensor in tensors:  # a loop, not all(...): a generator costs ~1 us, every call
        if tensor is not None and not (
            isinstance(tensor, Tensor)
            and tensor.dtype == dtype
            and tensor.is_cpu
            # the kernels take dense (C,) arrays: a strided one would compile a variant of them
            and tensor.is_contiguous()
            and not _memory_unlike_values(tensor)
        ):
            return False
    return True


def reference_batch_norm_act_dropout(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "relu",
    negative_slope: float = 0.01,
    p: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The unfused chain: ``functional.batch_norm``, the activation, ``functional.dropout``."""
    output = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    output = activate(output, activation, negative_slope)
    if p > 0:
        output = F.dropout(output, p, True, False, generator=generator)
    return output


def batch_norm_act_dropout(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "relu",
    negative_slope: float = 0.01,
    p: float = 0.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""``dropout(act(batch_norm(input)), p)``, fused on the fast path.

    BatchNorm arguments as :func:`normdrop.functional.batch_norm` (``training`` selects batch
    statistics); ``activation`` is one of ``"relu"``, ``"leaky_relu"`` (slope
    ``negative_slope``), ``"identity"``, ``"gelu"`` (exact, erf form); dropout applies when
    ``p > 0`` (pass ``p=0`` in evaluation), its mask drawn from the Philox stream of a seed taken
    from ``generator`` (the global torch generator when None). Shapes: ``(N, C, *)`` in and out.
    """
    check_activation("batch_norm_act_dropout", activation, negative_slope)
    F._check_dropout_p("batch_norm_act_dropout", p)
    input = _in_torchs_layout(input)
    if not _fast_batch_norm(input, running_mean, running_var, weight, bias) or (
        p > 1 - masks.MIN_KEEP
    ):
        return reference_batch_norm_act_dropout(
            input,
            running_mean,
            running_var,
            weight,
            bias,
            training,
            momentum,
            eps,
            activation,
            negative_slope,
            p,
            generator,
        )
    return _fast_batch_norm_act(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        activation,
        float(negative_slope),
        float(p),
        generator,
    )


def _fast_batch_norm_act(
    input,
    running_mean,
    running_var,
    weight,
    bias,
    training,
    momentum,
    eps,
    activation,
    negative_slope,
    p,
    generator,
) -> Tensor:
    """The kernels' call, after :func:`normdrop.functional.batch_norm`'s own argument checks."""
    F._check_batch_norm_args(
        input, running_mean, running_var, weight, bias, training, momentum, eps
    )
    momentum = float(momentum) if training and running_mean is not None else 0.0
    seed = masks.draw_seed(generator) if p > 0 else None
    return ops.batch_norm_act(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        bool(training),
        momentum,
        float(eps),
        activation,
        negative_slope,
        p,
        seed,
    )


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    cache: eager.ModuleCache | None = None,
) -> Tensor:
    """:func:`normdrop.functional.batch_norm`, on the kernels when they apply.

    ``cache`` (a module's :class:`normdrop.kernels.eager.ModuleCache`) lets repeated eager calls
    with the same tensors skip the checks they already passed.
    """
    if cache is not None and (
        eager is None or torch.compiler.is_compiling() or torch.jit.is_tracing()
    ):
        # compile and export record the registered ops; jit.trace records them too, and its
        # sizes are tensors: nothing to remember
        cache = None
    if cache is not None:
        output = eager.batch_norm(
            cache, input, running_mean, running_var, weight, bias, training, momentum, eps
        )
        if output is not None:
            return output
    input = _in_torchs_layout(input)
    if not _fast_batch_norm(input, running_mean, running_var, weight, bias):
        return F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if cache is not None and ops._eager(input, running_mean, running_var, weight, bias):
        F._check_batch_norm_args(
            input, running_mean, running_var, weight, bias, training, momentum, eps
        )
        entry = eager.remember(cache, input, running_mean, running_var, weight, bias, training, eps)
        return eager.run(entry, input, running_mean, weight, bias, training, momentum)
    return _fast_batch_norm_act(
        input,
        running_mean,
        running_var,
        weight,
        bias,
        training,
        momentum,
        eps,
        "identity",
        0.0,
        0.0,
        None,
    )


def dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """:func:`normdrop.functional.dropout`, on the Philox kernel when it applies.

    The mask differs from torch's for the same seed (another generator) but is just as
    reproducible: ``torch.manual_seed`` (or ``generator``) fixes the seed the kernel uses.
    """
    F._check_dropout_args("dropout", input, p, training)
    if not (_fast_tensor(input) and training and 0 < p <= 1 - masks.MIN_KEEP):
        return F.dropout(input, p, training, inplace, generator=generator)
    seed = masks.draw_seed(generator)
    if not inplace:
        return ops.dropout(input, p, seed, 0)
    if torch.is_grad_enabled() and input.requires_grad:
        return input.copy_(ops.dropout(input, p, seed, 0))
    ops.dropout_(input, p, seed, 0)
    return input


def module_dropout(
    function: Callable[..., Tensor], input: Tensor, p: float, training: bool, inplace: bool
) -> Tensor:
    """What a ``normdrop.nn`` dropout module runs: the kernel for element-wise dropout, the
    module's reference ``function`` for every other variant."""
    if function is F.dropout:
        return dropout(input, p, training, inplace)
    return function(input, p, training, inplace)
