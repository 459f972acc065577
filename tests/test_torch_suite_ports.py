"""PyTorch's own unit tests for BatchNorm and Dropout, ported to normdrop's modules.

Each test names the test of PyTorch's suite it ports (``test/test_nn.py``,
``test/nn/test_dropout.py``, ``test/nn/test_load_state_dict.py``, and the BatchNorm entries that
``torch.testing._internal.common_nn`` carried before they moved to ``module_db``) and checks
what that test checks, on normdrop's classes, on both backends where the backend can matter.
Where PyTorch compares its module with a reference of its own, the reference here is
``torch.nn``. CUDA-only tests whose property holds on CPU (mixed-precision modules, SyncBatchNorm
conversion) run on CPU. ``module_db`` and the OpInfo samples run in ``test_batchnorm.py`` and
``test_dropout.py``; they are not repeated here.
"""

from __future__ import annotations

import copy
import itertools
import math
import random

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.testing._internal.common_utils import (
    freeze_rng_state,
    gradcheck,
    gradgradcheck,
)

import normdrop
from normdrop import functional as NF
from normdrop.backend import BACKENDS
from normdrop.kernels import dispatch

BN = {1: normdrop.nn.BatchNorm1d, 2: normdrop.nn.BatchNorm2d, 3: normdrop.nn.BatchNorm3d}
TORCH_BN = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}


def _forward_backward(module, x, grad):
    """``(output, input gradient)`` of ``module`` on a fresh leaf copy of ``x`` (strides kept)."""
    leaf = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
    output = module(leaf)
    output.backward(grad)
    return output, leaf.grad


def _torchs_forward_backward(module, x, grad):
    """:func:`_forward_backward` of a torch.nn module as the oracle, in the dtypes under test;
    but with half-precision input and parameters, torch rounds the batch mean and 1/std to the
    half dtype and its results are less accurate than normdrop's (docs/math.md, Half
    precision): there the oracle is the module in float32 on the same values, its results
    rounded to the half dtype (the module stays in float32)."""
    if x.dtype == module.weight.dtype and x.dtype in (torch.bfloat16, torch.float16):
        output, grad_in = _forward_backward(module.float(), x.float(), grad.float())
        return output.to(x.dtype), grad_in.to(x.dtype)
    return _forward_backward(module, x, grad)


# ============================================================================== BatchNorm


# test_nn.py TestNN.test_batchnorm_nhwc_cpu: the same shapes, dtypes and mixed-dtype case.
NHWC_SHAPES = [(4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1)]
NHWC_DTYPES = {  # name: (input and parameter dtype, parameters converted to float32 after)
    "float32": (torch.float32, False),
    "bfloat16": (torch.bfloat16, False),
    "bfloat16 input, float32 parameters": (torch.bfloat16, True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype_case", sorted(NHWC_DTYPES))
@pytest.mark.parametrize("shape", NHWC_SHAPES, ids=str)
def test_batchnorm_nhwc_cpu(shape, dtype_case, backend):
    """A channels_last input gives a channels_last output and the values and gradients of a
    contiguous input: of the same class (PyTorch's check) and of torch.nn's BatchNorm2d."""
    dtype, mixed = NHWC_DTYPES[dtype_case]
    channels = shape[1]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape, generator=generator).to(dtype)
    grad = grad.contiguous(memory_format=torch.channels_last)
    ours = normdrop.nn.BatchNorm2d(channels).to(dtype)
    with torch.no_grad():
        ours.weight.uniform_(generator=generator)
        ours.bias.uniform_(generator=generator)
    ours_contiguous = copy.deepcopy(ours)
    theirs = torch.nn.BatchNorm2d(channels).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    if mixed:
        for module in (ours, ours_contiguous, theirs):
            module.float()
    with normdrop.use_backend(backend):
        out, grad_in = _forward_backward(ours, x, grad)
        out_c, grad_in_c = _forward_backward(ours_contiguous, x.contiguous(), grad.contiguous())
    out_t, grad_in_t = _torchs_forward_backward(theirs, x.contiguous(), grad.contiguous())

    assert out.is_contiguous(memory_format=torch.channels_last)
    assert grad_in.is_contiguous(memory_format=torch.channels_last)
    assert out_c.is_contiguous()
    for actual, expected in [
        (out, out_c),
        (grad_in, grad_in_c),
        (ours.weight.grad, ours_contiguous.weight.grad),
        (ours.bias.grad, ours_contiguous.bias.grad),
    ]:
        torch.testing.assert_close(actual, expected)
    for actual, expected in [
        (out, out_t),
        (grad_in, grad_in_t),
        (ours.weight.grad, theirs.weight.grad),
        (ours.bias.grad, theirs.bias.grad),
    ]:
        torch.testing.assert_close(actual, expected.to(actual.dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchnorm_non_contig_cpu(backend):
    """TestNN.test_batchnorm_non_contig_cpu: a permuted (1, 2, 3, 1) input, channels_last in
    memory though its strides suggest the contiguous format (size-1 dims), gives a
    channels_last output in eval, with the values of torch.nn on a contiguous copy."""
    x = torch.arange(6, dtype=torch.float).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    ours = normdrop.nn.BatchNorm2d(2).eval()
    with torch.no_grad():
        ours.weight.uniform_()
        ours.bias.uniform_()
    theirs = torch.nn.BatchNorm2d(2).eval()
    theirs.load_state_dict(ours.state_dict())
    with normdrop.use_backend(backend):
        output = ours(x)
    assert output.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(output, theirs(x.contiguous()))


def _layout(tensor):
    """A tensor's strides, but those of its size-1 dims (which no memory layout depends on)."""
    return tuple(s if n > 1 else None for s, n in zip(tensor.stride(), tensor.shape, strict=True))


# Shapes whose size-1 dims make ATen's memory-format choices differ from the suggested format.
AMBIGUOUS_SHAPES = [(1, 2, 3, 1), (1, 2, 1, 3), (2, 3, 1, 1), (1, 2, 1, 3, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", AMBIGUOUS_SHAPES, ids=str)
def test_batchnorm_output_and_input_gradient_layouts_are_atens(shape, training, backend):
    """The rule behind test_batchnorm_non_contig_cpu, over dense dim orders of shapes with size-1
    dims: the output and the input gradient are laid out as torch.nn lays them out. ATen
    writes the output channels_last when the input is channels_last-contiguous, and the input
    gradient so only when the gradient of the output suggests the input's format too; else
    both follow the input's suggested format."""
    rank = len(shape)
    orders = list(itertools.permutations(range(rank)))
    for order in orders[:: len(orders) // 8]:  # every third of 24, every fifteenth of 120
        x = torch.randn([shape[d] for d in order]).permute([order.index(d) for d in range(rank)])
        layouts = []
        for cls in (BN[rank - 2], TORCH_BN[rank - 2]):
            module = cls(shape[1]).train(training)
            leaf = x.detach().requires_grad_()
            with normdrop.use_backend(backend):
                output = module(leaf)
                grads = [
                    torch.autograd.grad(output, leaf, torch.ones_like(like), retain_graph=True)[0]
                    for like in (output, x.contiguous())
                ]
            layouts.append([_layout(output)] + [_layout(grad) for grad in grads])
        assert layouts[0] == layouts[1], (order, x.stride())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(1, 2, 3, 1), (2, 3, 1, 1), (2, 3, 4, 5), (3, 4, 5)], ids=str)
def test_batchnorm_act_layouts_and_values_are_the_torch_chains(shape, training, backend):
    """The same rule for the fused BatchNormAct (BN -> ReLU, p = 0) against torch.nn's
    BatchNorm -> ReLU, over dense dim orders: the output's values and layout, the input
    gradient's values for an output gradient laid out like the output and for a contiguous one,
    and its layout for the first. (For the second, the chain's BatchNorm receives ReLU's
    gradient, whose layout TensorIterator picks from both operands; the fused op follows the
    BatchNorm rule for the gradient it is given. The two differ only for size-1 dims.)"""
    rank = len(shape)
    orders = list(itertools.permutations(range(rank)))
    fused_class = normdrop.nn.BatchNormAct2d if rank == 4 else normdrop.nn.BatchNormAct1d
    for order in orders[:: max(len(orders) // 8, 1)]:
        x = torch.randn([shape[d] for d in order]).permute([order.index(d) for d in range(rank)])
        results = []
        for module in (
            fused_class(shape[1], "relu", p=0.0),
            torch.nn.Sequential(TORCH_BN[rank - 2](shape[1]), torch.nn.ReLU()),
        ):
            module.train(training)
            leaf = x.detach().requires_grad_()
            with normdrop.use_backend(backend):
                output = module(leaf)
                grads = [
                    torch.autograd.grad(output, leaf, like, retain_graph=True)[0]
                    for like in (torch.ones_like(output), torch.ones(output.shape))
                ]
            results.append((output, grads))
        (ours, our_grads), (theirs, their_grads) = results
        assert _layout(ours) == _layout(theirs), (order, x.stride())
        torch.testing.assert_close(ours, theirs)
        assert _layout(our_grads[0]) == _layout(their_grads[0]), (order, x.stride())
        for a, b in zip(our_grads, their_grads, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_batchnorm_nhwc_cuda(dtype, backend):
    """TestNN.test_batchnorm_nhwc_cuda (CUDA-only in PyTorch), on CPU: in eval mode a
    channels_last input gives exactly (bit for bit) the output of the same values contiguous."""
    n, c, h, w = 2, 64, 50, 50
    module = normdrop.nn.BatchNorm2d(c).eval()
    generator = torch.Generator().manual_seed(13)
    with torch.no_grad():  # buffers and parameters that are not the identity
        module.running_mean.uniform_(-1, 1, generator=generator)
        module.running_var.uniform_(0.5, 2, generator=generator)
        module.weight.uniform_(generator=generator)
        module.bias.uniform_(generator=generator)
    module.to(dtype)
    x = torch.randn(n, c, h, w, generator=generator).to(dtype)
    with normdrop.use_backend(backend):
        contiguous = module(x)
        channels_last = module(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(contiguous, channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_batchnorm_nonaffine_cuda_half_input(dtype, backend):
    """TestNN.test_batchnorm_nonaffine_cuda_half_input (CUDA-only in PyTorch), on CPU: half
    input to a float32 module without affine parameters gives half output, in training and in
    eval mode; the values are torch.nn's."""
    x = torch.randn(16, 3, 24, 24, generator=torch.Generator().manual_seed(14)).to(dtype)
    ours = normdrop.nn.BatchNorm2d(3, affine=False).float()
    theirs = torch.nn.BatchNorm2d(3, affine=False).float()
    for training in (True, False):
        ours.train(training)
        theirs.train(training)
        with normdrop.use_backend(backend):
            output = ours(x)
        assert output.dtype == dtype
        torch.testing.assert_close(output, theirs(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_batchnorm_large_batch(dtype, backend):
    """TestNNDeviceType.test_batchnorm_large_batch (CUDA-only in PyTorch, a check of 32-bit
    indexing), on CPU: 880801 values of one channel, forward and backward. The oracle is
    torch.nn in float64: its float32 CPU kernel is off by 1e-4 on this many values, normdrop's
    by 2e-7."""
    module = normdrop.nn.BatchNorm2d(1).to(dtype)
    data = torch.rand(880801, 1, 1, 1, generator=torch.Generator().manual_seed(15)).to(dtype)
    grad = torch.ones_like(data)  # test_batchnorm_large_batch's .sum().backward()
    with normdrop.use_backend(backend):
        actual = _forward_backward(module, data, grad)
    expected = _forward_backward(torch.nn.BatchNorm2d(1).double(), data.double(), grad.double())
    torch.testing.assert_close(actual, tuple(t.to(dtype) for t in expected))


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchnorm_raises_error_if_less_than_one_value_per_channel(backend):
    """TestNN.test_batchnorm_raises_error_if_less_than_one_value_per_channel: a ValueError."""
    x = torch.rand(10)[None, :, None]
    with normdrop.use_backend(backend), pytest.raises(ValueError):
        normdrop.nn.BatchNorm1d(10)(x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wrong", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("size", [9, 11])
def test_batchnorm_raises_error_if_tensor_is_not_same_size_as_input(size, wrong, backend):
    """TestNN.test_batchnorm_raises_error_if_{running_mean,running_var,weight,bias}_is_not_same_
    size_as_input: a RuntimeError from the functional, as from torch's."""
    arguments = {
        "running_mean": torch.rand(10),
        "running_var": torch.rand(10),
        "weight": torch.nn.Parameter(torch.rand(10)),
        "bias": torch.nn.Parameter(torch.rand(10)),
    }
    arguments[wrong] = torch.rand(size)
    x = torch.rand(2, 10)
    with pytest.raises(RuntimeError):
        torch.nn.functional.batch_norm(x, **arguments)
    with normdrop.use_backend(backend):
        for batch_norm in (NF.batch_norm, dispatch.batch_norm):
            with pytest.raises(RuntimeError):
                batch_norm(x, **arguments)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize(
    "duals", [(0,), (1,), (1, 2), (0, 1), (0, 2), (0, 1, 2), (3,), (1, 3), (2, 4)], ids=str
)
def test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad(
    duals, training, backend
):
    """TestNN.test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad, and
    the module's call: in eval, a tangent on a running statistic is refused with torch's message
    when the input, weight or bias has one too (otherwise no forward derivative is computed);
    in training the running statistics do not enter the output and nothing is refused."""
    primals = [torch.randn(3, 2, 5), torch.randn(2), torch.rand(2) + 0.5]
    primals += [torch.rand(2), torch.rand(2)]  # weight, bias
    expected = torch.nn.functional.batch_norm
    refused = not training and bool({1, 2} & set(duals)) and bool({0, 3, 4} & set(duals))
    module = normdrop.nn.BatchNorm1d(2).train(training)
    names = ["running_mean", "running_var", "weight", "bias"]
    with normdrop.use_backend(backend), fwAD.dual_level():
        args = [
            fwAD.make_dual(p, torch.rand_like(p)) if i in duals else p
            for i, p in enumerate(primals)
        ]
        for function in (
            lambda: expected(*args[:3], *args[3:], training=training),
            lambda: NF.batch_norm(*args[:3], *args[3:], training=training),
            lambda: dispatch.batch_norm(*args[:3], *args[3:], training=training),
            lambda: torch.func.functional_call(
                module, dict(zip(names, args[1:], strict=True)), (args[0],)
            ),
        ):
            if refused:
                with pytest.raises(RuntimeError, match="not differentiable wrt running_mean"):
                    function()
            else:
                function()


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchnorm_buffer_update_when_stats_are_not_tracked(backend):
    """TestNN.test_batchnorm_buffer_update_when_stats_are_not_tracked: with
    ``track_running_stats`` switched off after construction, training uses the batch statistics
    and leaves all three buffers as they were."""
    bn = normdrop.nn.BatchNorm1d(4, track_running_stats=True)
    bn.track_running_stats = False
    before = {name: buffer.clone() for name, buffer in bn.named_buffers()}
    x = torch.rand(32, 4) * 3 + 1
    with normdrop.use_backend(backend):
        y = bn(x)
    for name, buffer in bn.named_buffers():
        assert torch.equal(buffer, before[name]), name
    torch.testing.assert_close(y.mean(0), torch.zeros(4), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_BatchNorm_empty(backend):
    """TestNNDeviceType.test_BatchNorm_empty: a float32 module on an empty float64 batch gives
    an empty float64 output; the input, weight and bias get zero gradients and the running
    statistics stay at their defaults."""
    module = normdrop.nn.BatchNorm2d(3)
    x = torch.randn(0, 3, 2, 2, dtype=torch.float64)
    with normdrop.use_backend(backend):
        output, grad_in = _forward_backward(module, x, torch.rand(x.shape, dtype=x.dtype))
    assert output.shape == x.shape and output.dtype == torch.float64
    assert grad_in.shape == x.shape
    assert torch.equal(module.running_mean, torch.zeros(3))
    assert torch.equal(module.running_var, torch.ones(3))
    assert torch.equal(module.weight.grad, torch.zeros(3))
    assert torch.equal(module.bias.grad, torch.zeros(3))


EMPTY_CALLS = {  # name: (input, running_mean, running_var, weight, bias, training)
    "float32 companions, float64 input": (
        torch.randn(0, 3, 2, 2, dtype=torch.float64),
        torch.zeros(3),
        torch.ones(3),
        torch.ones(3),
        torch.zeros(3),
        True,
    ),
    "companions of the wrong size": (
        torch.randn(0, 3),
        torch.zeros(4),
        torch.ones(4),
        None,
        None,
        False,
    ),
    "no running statistics in eval": (torch.randn(0, 3, 5), None, None, torch.rand(3), None, False),
    "integer input": (
        torch.zeros(0, 3, dtype=torch.int64),
        torch.zeros(3),
        torch.ones(3),
        None,
        None,
        True,
    ),
    "channels_last": (
        torch.randn(0, 3, 2, 2).contiguous(memory_format=torch.channels_last),
        None,
        None,
        torch.rand(3),
        torch.rand(3),
        True,
    ),
}


@pytest.mark.parametrize("name", sorted(EMPTY_CALLS))
def test_batchnorm_functional_on_an_empty_input_is_torchs(name):
    """The rule behind test_BatchNorm_empty: ATen answers an input without values with a copy
    of it, times ``weight[0]`` plus ``bias[0]``, before looking at the other tensors; the
    functional gives the same tensor (dtype, shape and strides), where torch raises nothing."""
    input, running_mean, running_var, weight, bias, training = EMPTY_CALLS[name]
    arguments = (input, running_mean, running_var, weight, bias, training)
    expected = torch.nn.functional.batch_norm(*arguments)
    actual = NF.batch_norm(*arguments)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert actual.stride() == expected.stride()
    with pytest.raises(ValueError, match="eps must be positive"):  # torch checks eps first
        NF.batch_norm(*arguments[:5], True, 0.1, 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_batchnorm_grad(training, backend):
    """TestNNDeviceType.test_batchnorm_grad: PyTorch's gradcheck and gradgradcheck, batched
    gradients (vmap over the backward) included, of the functional call the modules make, on
    test_batchnorm_grad's arange tensors."""
    batch, channels, length = 4, 5, 6
    base = torch.arange(batch * channels * length, dtype=torch.float64, requires_grad=True)
    input = base.view(batch, channels, length)
    weight = torch.arange(1, channels + 1, dtype=torch.float64, requires_grad=True)
    bias = torch.arange(channels, dtype=torch.float64, requires_grad=True)
    running_mean = 1 - torch.arange(channels, dtype=torch.float64)
    running_var = 2 * torch.arange(channels, dtype=torch.float64)
    arguments = (input, running_mean, running_var, weight, bias, training, 0.1, 1e-4)
    with normdrop.use_backend(backend):
        assert gradcheck(dispatch.batch_norm, arguments)
        assert gradgradcheck(dispatch.batch_norm, arguments)


# TestNNDeviceType.test_batchnorm_{eval,affine,simple_average}: float32 on CPU; their _mixed
# variants (bfloat16/float16 input, float32 module) are CUDA-only in PyTorch and run here on CPU.
MODULE_DTYPES = {
    "float32": (torch.float32, torch.float32),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "bfloat16 input, float32 module": (torch.bfloat16, torch.float32),
    "float16 input, float32 module": (torch.float16, torch.float32),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", sorted(MODULE_DTYPES))
@pytest.mark.parametrize("ndim", [2, 3])
def test_batchnorm_eval(ndim, dtypes, backend):
    """TestNNDeviceType.test_batchnorm_eval and _eval_mixed: two passes in eval mode give the
    same output and input gradient; without running statistics, eval mode gives what training
    mode gave. Outputs and gradients are also torch.nn's."""
    dtype, module_dtype = MODULE_DTYPES[dtypes]
    generator = torch.Generator().manual_seed(1)
    data = torch.rand([3] * ndim, generator=generator).to(dtype)
    grad = torch.rand([3] * ndim, generator=generator).to(dtype)
    ours = normdrop.nn.BatchNorm1d(3).to(module_dtype).eval()
    theirs = torch.nn.BatchNorm1d(3).to(module_dtype).eval()
    with normdrop.use_backend(backend):
        first = _forward_backward(ours, data, grad)
        second = _forward_backward(ours, data, grad)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, _torchs_forward_backward(theirs, data, grad))

    ours = normdrop.nn.BatchNorm1d(3, track_running_stats=False).to(module_dtype)
    data = torch.rand(4, 3, generator=generator).to(dtype)
    grad = torch.rand(4, 3, generator=generator).to(dtype)
    with normdrop.use_backend(backend):
        training = _forward_backward(ours, data, grad)
        ours.eval()
        evaluation = _forward_backward(ours, data, grad)
    torch.testing.assert_close(training, evaluation, rtol=0, atol=0)
    theirs = torch.nn.BatchNorm1d(3, track_running_stats=False).to(module_dtype).eval()
    torch.testing.assert_close(evaluation, _torchs_forward_backward(theirs, data, grad))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", sorted(MODULE_DTYPES))
@pytest.mark.parametrize("ndim", [2, 3])
def test_batchnorm_affine(ndim, dtypes, backend):
    """TestNNDeviceType.test_batchnorm_affine and _affine_mixed: weight 1 and bias 0 give what
    ``affine=False`` gives, output and input gradient."""
    dtype, module_dtype = MODULE_DTYPES[dtypes]
    plain = normdrop.nn.BatchNorm1d(3, affine=False).to(module_dtype)
    affine = normdrop.nn.BatchNorm1d(3, affine=True).to(module_dtype)
    with torch.no_grad():
        affine.weight.fill_(1.0)
        affine.bias.zero_()
    data = torch.rand([3] * ndim, generator=torch.Generator().manual_seed(2)).to(dtype)
    grad = torch.ones_like(data)
    with normdrop.use_backend(backend):
        with_parameters = _forward_backward(affine, data, grad)
        without = _forward_backward(plain, data, grad)
    torch.testing.assert_close(with_parameters, without)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", sorted(MODULE_DTYPES))
def test_batchnorm_simple_average(dtypes, backend):
    """TestNNDeviceType.test_batchnorm_simple_average and _mixed: with ``momentum=None`` the
    running statistics after two batches are the mean of each batch's own, and
    ``reset_running_stats`` restores zeros and ones."""
    dtype, module_dtype = MODULE_DTYPES[dtypes]
    module = normdrop.nn.BatchNorm1d(3, momentum=None).to(module_dtype)
    zeros, ones = torch.zeros(3, dtype=module_dtype), torch.ones(3, dtype=module_dtype)
    generator = torch.Generator().manual_seed(3)
    data1 = torch.rand(4, 3, generator=generator).to(dtype)
    data2 = torch.rand(4, 3, generator=generator).to(dtype)
    singles = []
    with normdrop.use_backend(backend):
        for data in (data1, data2):
            output = module(data)
            mean, var = module.running_mean.clone(), module.running_var.clone()
            assert not torch.equal(mean, zeros) and not torch.equal(var, ones)
            singles.append((output, mean, var))
            module.reset_running_stats()
            assert torch.equal(module.running_mean, zeros)
            assert torch.equal(module.running_var, ones)
        output1, output2 = module(data1), module(data2)
    torch.testing.assert_close(output1, singles[0][0])
    torch.testing.assert_close(output2, singles[1][0])
    torch.testing.assert_close(module.running_mean, (singles[0][1] + singles[1][1]) / 2)
    torch.testing.assert_close(module.running_var, (singles[0][2] + singles[1][2]) / 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchnorm_update_stats(backend):
    """TestNNDeviceType.test_batchnorm_update_stats: training moves both running statistics and
    counts the batch; eval mode changes none of the three."""
    module = normdrop.nn.BatchNorm1d(3)
    data = torch.rand(4, 3, generator=torch.Generator().manual_seed(4))
    with normdrop.use_backend(backend):
        before = [buffer.clone() for buffer in module.buffers()]
        module(data)
        mean, var, count = module.running_mean, module.running_var, module.num_batches_tracked
        assert not torch.equal(before[0], mean) and not torch.equal(before[1], var)
        assert torch.equal(before[2] + 1, count)
        module.eval()
        before = [buffer.clone() for buffer in module.buffers()]
        module(data)
    for old, new in zip(before, module.buffers(), strict=True):
        assert torch.equal(old, new)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("kind", sorted(BN))
def test_load_state_dict_BC(kind, swap):
    """test_load_state_dict.py test_load_state_dict_BC: a checkpoint of version 1 or without a
    version, from before ``num_batches_tracked``, loads with the counter at 0 (int64), with
    either setting of ``swap_module_params_on_conversion``."""
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        bn = BN[kind](3)
        state = bn.state_dict()
        del state["num_batches_tracked"]
        state._metadata[""]["version"] = 1
        bn.load_state_dict(state)
        assert bn.num_batches_tracked.dtype == torch.long and bn.num_batches_tracked.item() == 0
        del state._metadata[""]["version"]
        bn.load_state_dict(state)
        assert bn.num_batches_tracked.dtype == torch.long and bn.num_batches_tracked.item() == 0
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


# The BatchNorm entries of common_nn's module_tests (torch <= 2.5; the wheel in use has none):
# (kind, constructor arguments, input size, desc).
COMMON_NN_ENTRIES = [
    (1, (10,), (4, 10), "affine"),
    (1, (5,), (4, 5, 3), "3d_input"),
    (1, (10, 1e-3, None), (4, 10), "affine_simple_average"),
    (1, (10, 1e-3, 0.3, False), (4, 10), "not_affine"),
    (1, (10, 1e-3, 0.3, True, False), (4, 10), "not_tracking_stats"),
    (1, (5, 1e-3, 0.3, False), (4, 5, 3), "3d_input_not_affine"),
    (1, (5, 1e-3, 0.3, False), (0, 5, 9), "zero_batch"),
    (2, (3,), (2, 3, 6, 6), ""),
    (2, (3, 1e-3, None), (2, 3, 6, 6), "2d_simple_average"),
    (2, (3, 1e-3, 0.8), (2, 3, 6, 6), "momentum"),
    (2, (3, 1e-3, 0.8, False), (2, 3, 6, 6), "not_affine"),
    (2, (3, 1e-3, 0.8, True, False), (2, 3, 6, 6), "not_tracking_stats"),
    (2, (5, 1e-3, 0.3, False), (0, 5, 2, 2), "zero_batch"),
    (3, (3,), (2, 3, 4, 4, 4), ""),
    (3, (3, 1e-3, None), (2, 3, 4, 4, 4), "3d_simple_average"),
    (3, (3, 1e-3, 0.7), (2, 3, 4, 4, 4), "momentum"),
    (3, (3, 1e-3, 0.7, False), (2, 3, 4, 4, 4), "not_affine"),
    (3, (3, 1e-3, 0.7, True, False), (2, 3, 4, 4, 4), "not_tracking_stats"),
    (3, (5, 1e-3, 0.3, False), (0, 5, 2, 2, 2), "zero_batch"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "entry",
    COMMON_NN_ENTRIES,
    ids=[f"BatchNorm{e[0]}d_{e[3] or 'plain'}" for e in COMMON_NN_ENTRIES],
)
def test_common_nn_batchnorm_entries(entry, training, backend):
    """What NewModuleTest checks of each entry, in training and (check_eval) eval mode: gradcheck
    and gradgradcheck in float64 (batched gradients included), the module again in float32, and
    the output, gradients and buffers of torch.nn's class built with the same arguments."""
    kind, arguments, size, _ = entry
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(size, dtype=torch.float64, generator=generator)
    ours = BN[kind](*arguments).double().train(training)
    theirs = TORCH_BN[kind](*arguments).double().train(training)
    with normdrop.use_backend(backend):
        if x.numel():
            probe = copy.deepcopy(ours)
            names = [name for name, _ in probe.named_parameters()]

            def forward(input, *parameters):
                return torch.func.functional_call(
                    probe, dict(zip(names, parameters, strict=True)), (input,)
                )

            inputs = (x.clone().requires_grad_(), *probe.parameters())
            assert gradcheck(forward, inputs)
            assert gradgradcheck(forward, inputs)
        for dtype in (torch.float32, torch.float64):
            ours.to(dtype).zero_grad()
            theirs.to(dtype).zero_grad()
            grad = torch.randn(size, dtype=dtype, generator=generator)
            actual = _forward_backward(ours, x.to(dtype), grad)
            expected = _forward_backward(theirs, x.to(dtype), grad)
            torch.testing.assert_close(actual, expected)
            for name, value in theirs.named_parameters():
                torch.testing.assert_close(dict(ours.named_parameters())[name].grad, value.grad)
            for name, value in theirs.state_dict().items():
                torch.testing.assert_close(ours.state_dict()[name], value)
    if not x.numel():  # zero_batch: shape kept, every gradient zero, buffers untouched
        assert actual[0].shape == size and not actual[1].any()
        assert all(not p.grad.any() for p in ours.parameters())


@pytest.mark.parametrize("training", [True, False])
def test_sync_batchnorm_in_one_process_is_torchs(training):
    """Without a process group (and on CPU, where torch.nn.SyncBatchNorm is single-process),
    SyncBatchNorm gives torch.nn.SyncBatchNorm's output, gradients and buffers."""
    generator = torch.Generator().manual_seed(6)
    ours = normdrop.nn.SyncBatchNorm(3, momentum=0.3).train(training)
    theirs = torch.nn.SyncBatchNorm(3, momentum=0.3).train(training)
    for step in range(2):
        x = torch.randn(4, 3, 5, generator=generator) * 2 + step
        grad = torch.randn(4, 3, 5, generator=generator)
        torch.testing.assert_close(
            _forward_backward(ours, x, grad), _forward_backward(theirs, x, grad)
        )
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value)
    with pytest.raises(ValueError):  # torch: "expected at least 2D input"
        ours(torch.randn(3))


def test_convert_sync_batchnorm():
    """TestNN.test_convert_sync_batchnorm (CUDA-only in PyTorch): the BatchNorm becomes a
    SyncBatchNorm with the same state on the same device, the InstanceNorm is left alone."""
    module = torch.nn.Sequential(torch.nn.BatchNorm1d(100), torch.nn.InstanceNorm1d(100))
    module[0](torch.randn(8, 100))  # buffers that are not the defaults
    reference = copy.deepcopy(module)
    converted = normdrop.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    children = list(converted.children())
    assert children[0].__class__ is normdrop.nn.SyncBatchNorm
    assert children[1].__class__ is torch.nn.InstanceNorm1d
    for layer, converted_layer in zip(reference.children(), converted.children(), strict=True):
        for key, value in layer.state_dict().items():
            assert converted_layer.state_dict()[key].device == value.device
            assert torch.equal(converted_layer.state_dict()[key], value)


# ================================================================================ Dropout


def _check_dropout(cls, input, memory_format=torch.contiguous_format):
    """TestDropoutNNDeviceType._test_dropout: on an input of 1 - p, the output and the input
    gradient average 1 - p, keep the input's memory format, also in place; eval mode returns
    the input unchanged; repr and str work.

    PyTorch allows the mean 0.05 of slack; where a channel-wise mask has too few draws for that
    to be a 99.9% bound (Dropout1d's 100 to 225 channels), the 99.9% binomial bound is used."""
    p = 0.2
    input = input.fill_(1 - p)
    channelwise = cls in (normdrop.nn.Dropout1d, normdrop.nn.Dropout2d, normdrop.nn.Dropout3d)
    draws = input.shape[0] * input.shape[1] if channelwise else input.numel()
    slack = max(0.05, 3.29 * math.sqrt(p * (1 - p) / draws))
    for inplace in (False, True):
        module = cls(p, inplace)
        leaf = input.clone(memory_format=memory_format).requires_grad_()
        output = module(leaf + 0 if inplace else leaf)
        assert output.is_contiguous(memory_format=memory_format)
        assert abs(output.mean().item() - (1 - p)) < slack
        output.backward(input)
        assert leaf.grad.is_contiguous(memory_format=memory_format)
        assert abs(leaf.grad.mean().item() - (1 - p)) < slack
    for inplace in (True, False):
        module = cls(p, inplace).eval()
        assert torch.equal(input, module(input))
    assert repr(module) and str(module)


def _check_dropout_stride_mean_preserve(cls):
    """TestDropoutNNDeviceType._test_dropout_stride_mean_preserve: for every permutation of the
    dims and offsets into the first two, the output keeps the input's dim order and mean; a p
    of 1e-10 changes nothing."""
    ones = torch.ones(2, 3, 4, 5)
    for perm in itertools.permutations(range(4)):
        inverse = [perm.index(d) for d in range(4)]
        for shift, p in itertools.product([(0, 0), (1, 0), (0, 1), (1, 1)], [1e-10, 0.3, 0.7]):
            x = ones.permute(perm).contiguous().permute(inverse)[shift[0] :, shift[1] :]
            output = cls(p=p)(x)
            assert output.permute(perm).is_contiguous(), (perm, shift, p)
            torch.testing.assert_close(ones.mean(), output.mean(), rtol=0.5, atol=0.5)
            assert torch.equal(x, output) == (p == 1e-10), (perm, shift, p)


@pytest.mark.parametrize("backend", BACKENDS)
def test_Dropout(backend):
    """TestDropoutNNDeviceType.test_Dropout, in float32 and bfloat16; the non-dense layouts in
    test_dropout_keeps_the_memory_format_of_an_input_that_is_not_dense."""
    with normdrop.use_backend(backend):
        _check_dropout(normdrop.nn.Dropout, torch.empty(1000))
        _check_dropout(normdrop.nn.Dropout, torch.empty(1000).bfloat16())


def _check_dropout_discontiguous(cls, memory_format):
    """TestDropoutNNDeviceType._test_dropout_discontiguous: on a sliced (not dense) input, p = 0
    and p = 1e-10 change no value, and with p > 0 the output is dense in the input's format."""
    for p in [0, 1e-10]:
        x = torch.empty(2, 3, 3, 6, memory_format=memory_format)[..., ::2]
        x.copy_(torch.ones(2, 3, 3, 3))
        output = cls(p=p)(x)
        if p != 0:  # p = 0 returns the input itself
            assert output.is_contiguous(memory_format=memory_format)
        assert torch.equal(x, output)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "cls",
    [normdrop.nn.Dropout, normdrop.nn.Dropout2d, normdrop.nn.Dropout3d],
    ids=lambda cls: cls.__name__,
)
def test_dropout_keeps_the_memory_format_of_an_input_that_is_not_dense(cls, backend):
    """The rest of TestDropoutNNDeviceType.test_Dropout, test_Dropout2d and test_Dropout3d:
    _test_dropout_discontiguous in the contiguous and channels_last formats, and for Dropout
    _test_dropout_stride_mean_preserve; each output laid out as torch.nn's."""
    with normdrop.use_backend(backend):
        for memory_format in (torch.contiguous_format, torch.channels_last):
            _check_dropout_discontiguous(cls, memory_format)
        if cls is normdrop.nn.Dropout:
            _check_dropout_stride_mean_preserve(cls)
        x = torch.randn(2, 3, 4, 6).contiguous(memory_format=torch.channels_last)[..., ::2]
        for input in (x, x.transpose(0, 2)[1:]):
            torchs = getattr(torch.nn, cls.__name__)(0.5)
            assert _layout(cls(0.5)(input)) == _layout(torchs(input))


def _check_no_batch_dim(dropout, input):
    """TestDropoutNNDeviceType._test_dropoutNd_no_batch: an input without batch dim gets the
    mask of the same input with a batch dim of one, from the same RNG state."""
    batched = input.clone().unsqueeze(0)
    with freeze_rng_state():
        unbatched_result = dropout(input)
    with freeze_rng_state():
        batched_result = dropout(batched).squeeze(0)
    assert torch.equal(unbatched_result, batched_result)


def _check_whole_channels(dropout, input):
    """TestDropoutNNDeviceType._test_dropoutNd_channel_zero: on an all-ones input, each channel
    has no zero or only zeros."""
    result = dropout(input)
    per_channel = result[0, 0].numel()
    nonzero = result.flatten(2).count_nonzero(-1)
    assert ((nonzero == 0) | (nonzero == per_channel)).all()
    assert (nonzero == 0).any() and (nonzero == per_channel).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_Dropout1d(backend):
    """TestDropoutNNDeviceType.test_Dropout1d: statistics and layout, the RuntimeError (with
    torch's text) for 4-D and 1-D input, no-batch-dim input, whole channels dropped."""
    random.seed(0)
    with normdrop.use_backend(backend):
        n, c, length = (random.randint(10, 15) for _ in range(3))
        _check_dropout(normdrop.nn.Dropout1d, torch.empty(n, c, length, dtype=torch.float64))
        for shape in [(1, 2, 2, 2), (2,)]:
            expected = f"Expected 2D or 3D input, but received a {len(shape)}D input"
            with pytest.raises(RuntimeError, match=expected):
                normdrop.nn.Dropout1d(p=0.5)(torch.rand(shape))
        for inplace in (False, True):
            _check_no_batch_dim(normdrop.nn.Dropout1d(p=0.5, inplace=inplace), torch.rand(50, 2))
            _check_whole_channels(normdrop.nn.Dropout1d(0.5, inplace), torch.ones(10, 4, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_Dropout2d(backend):
    """TestDropoutNNDeviceType.test_Dropout2d: statistics and layouts, the warnings (with
    torch's texts) for 5-D, 2-D and 3-D input, whole channels dropped; without the non-dense
    layouts (see test_dropout_keeps_the_memory_format_of_an_input_that_is_not_dense)."""
    random.seed(0)
    with normdrop.use_backend(backend):
        b, w, h = (random.randint(1, 5) for _ in range(3))
        x = torch.empty(1000, b, w, h)
        _check_dropout(normdrop.nn.Dropout2d, x)
        _check_dropout(normdrop.nn.Dropout2d, x, memory_format=torch.channels_last)
        for shape, expected in [
            ((1, 2, 2, 2, 2), "Received a 5-D input to dropout2d"),
            ((1, 2), "Received a 2-D input to dropout2d"),
            ((1, 2, 2), "assuming that channel-wise 1D dropout behavior is desired"),
        ]:
            with pytest.warns(UserWarning, match=expected):
                normdrop.nn.Dropout2d(p=0.5)(torch.rand(shape))
        for inplace in (False, True):
            _check_whole_channels(normdrop.nn.Dropout2d(0.5, inplace), torch.ones(10, 4, 2, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_Dropout3d(backend):
    """TestDropoutNNDeviceType.test_Dropout3d: statistics, the warnings (with torch's texts) for
    6-D and 3-D input, no-batch-dim input, whole channels dropped; without the non-dense layouts
    (as for test_Dropout2d)."""
    random.seed(0)
    with normdrop.use_backend(backend):
        b, w, h, d = (*(random.randint(1, 5) for _ in range(3)), random.randint(1, 2))
        _check_dropout(normdrop.nn.Dropout3d, torch.empty(1000, b, d, w, h))
        for shape in [(1, 2, 2, 2, 2, 2), (1, 2, 2)]:
            expected = f"Received a {len(shape)}-D input to dropout3d"
            with pytest.warns(UserWarning, match=expected):
                normdrop.nn.Dropout3d(p=0.5)(torch.rand(shape))
        for inplace in (False, True):
            dropout = normdrop.nn.Dropout3d(p=0.5, inplace=inplace)
            _check_no_batch_dim(dropout, torch.rand(50, 2, 2, 2))
            _check_whole_channels(dropout, torch.ones(10, 4, 2, 2, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_dropout(backend):
    """TestDropoutNNDeviceType.test_empty_dropout: an empty input keeps its size."""
    x = torch.tensor([])
    with normdrop.use_backend(backend):
        assert NF.dropout(x).size() == x.size()
        assert dispatch.dropout(x).size() == x.size()
        assert normdrop.nn.Dropout()(x).size() == x.size()


def test_invalid_dropout_p():
    """TestDropoutNN.test_invalid_dropout_p: p outside [0, 1] is a ValueError, at construction
    and in the functional."""
    for cls in (
        normdrop.nn.Dropout,
        normdrop.nn.Dropout1d,
        normdrop.nn.Dropout2d,
        normdrop.nn.Dropout3d,
    ):
        for p in (-0.1, 1.1):
            with pytest.raises(ValueError):
                cls(p)
    for p in (-0.1, 1.1):
        with pytest.raises(ValueError):
            NF.dropout(torch.ones(1), p)


def _check_alpha_dropout(cls, input):
    """TestDropoutNN._test_alpha_dropout: mean and standard deviation within 0.1 of the
    input's, for p in 0.2, 0.5, 0.8, and a backward that runs."""
    mean, std = input.mean(), input.std()
    for p in [0.2, 0.5, 0.8]:
        leaf = input.detach().clone().requires_grad_()
        output = cls(p)(leaf)
        assert abs(output.mean() - mean) < 0.1, p
        assert abs(output.std() - std) < 0.1, p
        output.backward(input)
        assert leaf.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_AlphaDropout(backend):
    """TestDropoutNN.test_AlphaDropout."""
    with normdrop.use_backend(backend):
        _check_alpha_dropout(normdrop.nn.AlphaDropout, torch.randn(5000))


@pytest.mark.parametrize("backend", BACKENDS)
def test_FeatureAlphaDropout(backend):
    """TestDropoutNN.test_FeatureAlphaDropout: a 5-D input, then a 4-D one."""
    random.seed(0)
    b, w, h, d = (*(random.randint(1, 5) for _ in range(3)), random.randint(1, 2))
    with normdrop.use_backend(backend):
        _check_alpha_dropout(normdrop.nn.FeatureAlphaDropout, torch.randn(1000, b, d, w, h))
        _check_alpha_dropout(normdrop.nn.FeatureAlphaDropout, torch.randn(50, 20, 64, 64))


DROPOUT_PAIRS = {  # name: (ours, torch's, an input shape)
    "Dropout": (normdrop.nn.Dropout, torch.nn.Dropout, (6, 5, 4, 3)),
    "Dropout1d": (normdrop.nn.Dropout1d, torch.nn.Dropout1d, (6, 5, 4)),
    "Dropout2d": (normdrop.nn.Dropout2d, torch.nn.Dropout2d, (6, 5, 4, 3)),
    "Dropout3d": (normdrop.nn.Dropout3d, torch.nn.Dropout3d, (6, 5, 4, 3, 2)),
    "AlphaDropout": (normdrop.nn.AlphaDropout, torch.nn.AlphaDropout, (6, 5, 4, 3)),
    "FeatureAlphaDropout": (
        normdrop.nn.FeatureAlphaDropout,
        torch.nn.FeatureAlphaDropout,
        (6, 5, 4, 3),
    ),
}
LAYOUTS = {
    "contiguous": lambda x: x,
    "channels_last": lambda x: (
        x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x.transpose(1, -1)
    ),
    "sliced": lambda x: x[..., ::2],
}


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", sorted(DROPOUT_PAIRS))
def test_reference_masks_are_torchs_in_the_settings_of_the_dropout_tests(name, layout, inplace):
    """The oracle for the statistics checked above: on the reference backend, the same seed
    gives torch.nn's output and input gradient exactly, in each layout the tests use."""
    ours_cls, torch_cls, shape = DROPOUT_PAIRS[name]
    x = LAYOUTS[layout](torch.randn(shape, generator=torch.Generator().manual_seed(8)))
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    results = []
    for module in (ours_cls(0.4, inplace), torch_cls(0.4, inplace)):
        leaf = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        torch.manual_seed(10)
        with normdrop.use_backend("reference"):
            output = module(leaf + 0 if inplace else leaf)
        output.backward(grad)
        results.append((output, leaf.grad))
    (output, grad_in), (expected, expected_grad) = results
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad_in, expected_grad, rtol=0, atol=0)
    assert output.stride() == expected.stride()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(DROPOUT_PAIRS))
def test_dropout_grad_and_gradgrad_with_batched_gradients(name, backend):
    """NewModuleTest's _assertGradAndGradgradChecks for the dropout modules: PyTorch's gradcheck
    and gradgradcheck, batched gradients (vmap over the backward) included, with the mask fixed
    by reseeding before every call."""
    ours_cls, _, shape = DROPOUT_PAIRS[name]
    module = ours_cls(0.3)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)

    def forward(input):
        torch.manual_seed(12)
        return module(input)

    with normdrop.use_backend(backend):
        assert gradcheck(forward, (x,))
        assert gradgradcheck(forward, (x,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("p", [0.0, 1.0])
def test_native_dropout_corner_case(p, training, backend):
    """TestDropoutNN.test_native_dropout_corner_case (CUDA-only in PyTorch), on CPU: with p 0
    or 1, in training and eval, output and input gradient are those of torch's dropout."""
    x = torch.randn(5)
    results = []
    for dropout in (normdrop.nn.Dropout(p), torch.nn.Dropout(p)):
        dropout.train(training)
        leaf = x.clone().requires_grad_()
        with normdrop.use_backend(backend):
            output = dropout(leaf)
        output.sum().backward()
        results.append((output, leaf.grad))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
