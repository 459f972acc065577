"""Fast BatchNorm kernels against the reference (normdrop.functional, itself tested against torch).

Every case runs one module on the fast backend and a copy on the reference backend, over several
training steps and an evaluation step, and compares outputs, all gradients and the running
buffers (1e-5 relative in float32, 1e-10 in float64). A spy checks the kernels actually ran.
"""

from __future__ import annotations

import copy
import math
import multiprocessing
import subprocess
import sys
import warnings

import numba
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normdrop
from normdrop import functional as F
from normdrop.kernels import cpu, dispatch, ops

from _helpers import assert_close_scaled, record_kernel_calls, tolerance

MODULES = {1: normdrop.nn.BatchNorm1d, 2: normdrop.nn.BatchNorm2d, 3: normdrop.nn.BatchNorm3d}


pytestmark = pytest.mark.usefixtures("one_numba_thread")


@pytest.fixture
def kernel_calls(monkeypatch):
    """The forward kernel calls (the eager path and the ops alike), so a silent fallback
    cannot pass for the fast path."""
    return record_kernel_calls(monkeypatch, "forward_kernel")


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the channel dim fastest in memory (any rank >= 3)."""
    order = (0, *range(2, x.dim()), 1)
    inverse = [order.index(d) for d in range(x.dim())]
    return x.permute(order).contiguous().permute(inverse)


@st.composite
def batchnorm_cases(draw):
    dims = draw(st.sampled_from([(1, 2), (1, 3), (2, 4), (3, 5)]))
    spatial = draw(st.lists(st.integers(1, 7), min_size=dims[1] - 2, max_size=dims[1] - 2))
    shape = (draw(st.integers(2, 64)), draw(st.integers(1, 6)), *spatial)
    return {
        "kind": dims[0],
        "shape": shape,
        "channels_last": dims[1] >= 3 and draw(st.booleans()),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "affine": draw(st.booleans()),
        "track": draw(st.booleans()),
        "momentum": draw(st.sampled_from([0.1, 0.5, None])),
        "steps": draw(st.integers(1, 3)),
        "offset": draw(st.sampled_from([0.0, 50.0])),
    }


def _input(case: dict, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(case["shape"], dtype=case["dtype"], generator=generator) * 2 + case["offset"]
    return channels_last(x) if case["channels_last"] else x


def _step(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, backend: str):
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    with normdrop.use_backend(backend):
        y = module(x)
    y.backward(grad)
    grads = [x.grad] + [p.grad for p in module.parameters()]
    return y, grads


def _compare(fast, reference, dtype):
    rtol = tolerance(dtype)
    for a, b in zip(fast, reference, strict=True):
        if b is None:
            assert a is None
        else:
            assert_close_scaled(a, b, rtol)


def run_against_reference(case: dict) -> None:
    module = MODULES[case["kind"]](
        case["shape"][1],
        momentum=case["momentum"],
        affine=case["affine"],
        track_running_stats=case["track"],
        dtype=case["dtype"],
    )
    if case["affine"]:
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-1, 1)
    reference = copy.deepcopy(module)
    generator = torch.Generator().manual_seed(sum(case["shape"]))
    for step in range(case["steps"] + 1):
        if step == case["steps"]:
            module.eval()
            reference.eval()
        x = _input(case, generator)
        grad = torch.randn(x.shape, dtype=x.dtype, generator=generator)
        y_fast, grads_fast = _step(module, x, grad, "fast")
        y_ref, grads_ref = _step(reference, x, grad, "reference")
        _compare([y_fast, *grads_fast], [y_ref, *grads_ref], case["dtype"])
        assert y_fast.is_contiguous(memory_format=torch.channels_last) == y_ref.is_contiguous(
            memory_format=torch.channels_last
        )
        _compare(list(module.buffers()), list(reference.buffers()), case["dtype"])


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=batchnorm_cases())
def test_modules_match_reference(case, kernel_calls):
    kernel_calls.clear()
    run_against_reference(case)
    assert len(kernel_calls) == case["steps"] + 1


@pytest.mark.parametrize(
    ("shape", "channels_last_input"),
    [
        ((3, 5, 67, 71), False),
        ((2, 37, 29, 31), True),
        ((4100, 6), False),
        ((9, 3, 5000), False),
        ((4, 64, 32, 32), True),  # rows grouped 32 to a wide row
        ((1, 3, 257, 263), True),  # 263 rows to a wide row (257 * 263 rows)
        ((65537, 2), False),  # a prime number of rows: one row per wide row
    ],
)
def test_many_blocks_match_reference(shape, channels_last_input, kernel_calls):
    run_against_reference(_two_steps_case(shape, channels_last_input))
    assert len(kernel_calls) == 3


def _two_steps_case(shape: tuple[int, ...], channels_last_input: bool = False) -> dict:
    """A float32 affine BatchNorm with running statistics: two training steps, then eval."""
    return {
        "kind": len(shape) - 2 if len(shape) > 3 else 1,
        "shape": shape,
        "channels_last": channels_last_input,
        "dtype": torch.float32,
        "affine": True,
        "track": True,
        "momentum": 0.1,
        "steps": 2,
        "offset": 3.0,
    }


@pytest.mark.parametrize("channels_last_input", [False, True])
def test_statistics_are_exact_for_offset_data(channels_last_input):
    generator = torch.Generator().manual_seed(0)
    x = 1e4 + torch.randn(16, 8, 30, 30, generator=generator)
    if channels_last_input:
        x = x.to(memory_format=torch.channels_last)
    mean, invstd = ops.batch_norm_stats(x, None, None, 0.0, 0.0)
    x64 = x.double()
    expected_var = x64.var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), rtol=1e-7, atol=0)
    torch.testing.assert_close((1 / invstd.double() ** 2), expected_var, rtol=1e-5, atol=0)
    # The running variance (unbiased) too, through the module.
    module = normdrop.nn.BatchNorm2d(8, momentum=1.0)
    module(x)
    m = x.numel() // 8
    torch.testing.assert_close(
        module.running_var.double(), expected_var * m / (m - 1), rtol=1e-5, atol=0
    )


def _fast_train_step(x, grad, threads):
    numba.set_num_threads(threads)
    module = normdrop.nn.BatchNorm2d(x.shape[1])
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(grad)
    return [
        y,
        x.grad,
        module.weight.grad,
        module.bias.grad,
        module.running_mean,
        module.running_var,
    ]


@pytest.mark.parametrize(
    ("shape", "channels_last_input"),
    [
        ((6, 7, 61, 67), False),  # the planar kernels (7 channels)
        ((6, 7, 61, 67), True),  # the rows kernels
        ((3, 11, 61, 67), False),  # the channel kernels
    ],
)
def test_results_do_not_depend_on_thread_count(shape, channels_last_input):
    assert numba.config.NUMBA_NUM_THREADS >= 2, "needs 2 numba threads to compare"
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=generator) + 5
    if channels_last_input:
        x = channels_last(x)
    grad = torch.randn(x.shape, generator=generator)
    one = _fast_train_step(x, grad, 1)
    two = _fast_train_step(x, grad, 2)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_kernels_read_the_memory_in_place():
    x = channels_last(torch.randn(2, 3, 4, 5))
    assert ops.layout_of(x) == ops.ROWS
    assert ops._prepared(x)[0] is x  # no copy: the kernels get x.data_ptr()
    y = torch.randn(2, 3, 4, 5)
    assert ops.layout_of(y) == ops.PLANAR
    assert ops._prepared(y)[0] is y
    assert ops.layout_of(torch.randn(4, 3)) == ops.ROWS
    strided = torch.randn(2, 3, 4, 5)[..., ::2]
    assert ops.layout_of(strided) is None
    copied, layout = ops._prepared(strided)
    assert layout == ops.PLANAR and copied.is_contiguous() and torch.equal(copied, strided)


@pytest.mark.parametrize(
    "make_input",
    [
        lambda: torch.randn(4, 3, 5, 5, dtype=torch.float16),
        lambda: torch.randn(4, 3, 5, 5, dtype=torch.bfloat16),
        lambda: torch.randn(4, 3, 5, 10)[..., ::2],
    ],
    ids=["float16", "bfloat16", "strided"],
)
def test_unsupported_inputs_fall_back_to_the_reference(make_input, kernel_calls):
    x = make_input()
    fast, reference = normdrop.nn.BatchNorm2d(3), normdrop.nn.BatchNorm2d(3)
    y = fast(x)
    with normdrop.use_backend("reference"):
        expected = reference(x)
    assert kernel_calls == []
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(fast.running_var, reference.running_var, rtol=0, atol=0)


def test_reference_backend_never_calls_the_kernels(kernel_calls):
    with normdrop.use_backend("reference"):
        normdrop.nn.BatchNorm2d(3)(torch.randn(4, 3, 5, 5))
    assert kernel_calls == []


@pytest.mark.parametrize(
    ("shape", "layout"),
    [((8, 3, 4, 4), "planar"), ((8, 3, 4, 4), "channels_last"), ((40, 3), "rows")],
)
def test_non_finite_channel_keeps_its_running_statistics(shape, layout):
    x = torch.randn(shape)
    x[2, 1] = float("nan")
    if layout == "channels_last":
        x = channels_last(x)
    cls = MODULES[len(shape) - 2] if len(shape) > 2 else MODULES[1]
    fast, reference = cls(3), cls(3)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        y = fast(x)
    with normdrop.use_backend("reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        expected = reference(x)
    assert fast.running_mean[1] == 0 and fast.running_var[1] == 1
    torch.testing.assert_close(fast.running_mean, reference.running_mean)
    torch.testing.assert_close(fast.running_var, reference.running_var)
    torch.testing.assert_close(y, expected, equal_nan=True)
    assert torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, [0, 2]]).all()


BAD_CALLS = [
    lambda f: f(torch.randn(1, 3), None, None, training=True),
    lambda f: f(torch.randn(4), None, None, training=True),
    lambda f: f(torch.randn(4, 3), torch.zeros(2), torch.ones(2), training=True),
    lambda f: f(torch.randn(4, 3), torch.zeros(3), None, training=True),
    lambda f: f(torch.randn(4, 3), None, None, torch.ones(3, dtype=torch.float64), training=True),
    lambda f: f(
        torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=float("nan")
    ),
    lambda f: f(torch.randn(4, 3), None, None, training=True, eps=0.0),
    lambda f: f(torch.randn(4, 3), None, None, training=False),
]


@pytest.mark.parametrize("call", BAD_CALLS)
def test_bad_input_raises_what_the_reference_raises(call):
    with pytest.raises(Exception) as expected:  # the reference must refuse it, or the case is moot
        call(F.batch_norm)
    with pytest.raises(type(expected.value)) as got:
        call(dispatch.batch_norm)
    assert str(got.value) == str(expected.value)


def _exact_channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Mean and biased variance per channel with exactly rounded sums (math.fsum)."""
    means, variances = [], []
    for channel in x.transpose(0, 1).reshape(x.shape[1], -1).tolist():
        mean = math.fsum(channel) / len(channel)
        means.append(mean)
        variances.append(math.fsum((v - mean) ** 2 for v in channel) / len(channel))
    return means, variances


def test_float64_statistics_keep_float64_precision():
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(64, 5, 9, 9, dtype=torch.float64, generator=generator) * 1e-3 + 1e6
    mean, invstd = ops.batch_norm_stats(x, None, None, 0.0, 0.0)
    expected_mean, expected_var = _exact_channel_stats(x)
    assert mean.dtype == invstd.dtype == torch.float64
    torch.testing.assert_close(
        mean, torch.tensor(expected_mean, dtype=torch.float64), rtol=1e-15, atol=0
    )
    torch.testing.assert_close(
        1 / invstd**2, torch.tensor(expected_var, dtype=torch.float64), rtol=1e-10, atol=0
    )


def _child_forward(queue, module, x):
    queue.put(module(x).tolist())  # plain data: tensors would travel as file descriptors


def test_a_process_forked_after_the_kernels_ran_takes_the_reference():
    # GNU OpenMP would abort the child at its first parallel kernel.
    module = normdrop.nn.BatchNorm2d(3).eval()
    x = torch.randn(4, 3, 5, 5)
    module.train()(x)
    module.eval()
    expected = module(x)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_forward, args=(queue, module, x))
    child.start()
    got = queue.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0
    torch.testing.assert_close(torch.tensor(got), expected)


@st.composite
def running_update_cases(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    channels = draw(st.integers(1, 40))
    values = st.floats(-1e4, 1e4, allow_nan=False, width=32)
    special = st.sampled_from([float("nan"), float("inf"), -float("inf")])
    mean = draw(
        st.lists(
            values | special if draw(st.booleans()) else values,
            min_size=channels,
            max_size=channels,
        )
    )
    var = draw(st.lists(st.floats(0, 1e4, width=32), min_size=channels, max_size=channels))
    return {
        "dtype": dtype,
        "mean": torch.tensor(mean, dtype=dtype),
        "var": torch.tensor(var, dtype=dtype),
        "running_mean": torch.tensor(
            draw(st.lists(values, min_size=channels, max_size=channels)), dtype=dtype
        ),
        "running_var": torch.tensor(var[::-1], dtype=dtype) + 0.5,
        "count": draw(st.integers(1, 10**7)),
        "momentum": draw(st.floats(-2, 2)),  # any real momentum, as torch accepts
    }


@given(case=running_update_cases())
def test_running_average_twin_equals_the_reference(case):
    """cpu.update_running_stats is functional._update_running_stats, bit for bit; for
    non-finite statistics it leaves the buffers alone and says so (the caller then runs the
    reference, which warns)."""
    fast_mean, fast_var = case["running_mean"].clone(), case["running_var"].clone()
    updated = cpu.update_running_stats(
        fast_mean.numpy(),
        fast_var.numpy(),
        case["mean"].numpy(),
        case["var"].numpy(),
        case["count"],
        case["momentum"],
    )
    ref_mean, ref_var = case["running_mean"].clone(), case["running_var"].clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        F._update_running_stats(
            ref_mean, ref_var, case["mean"], case["var"], case["count"], case["momentum"]
        )
    warned = any("non-finite" in str(w.message) for w in caught)
    assert updated == (not warned)
    if updated:
        assert torch.equal(fast_mean, ref_mean) and torch.equal(fast_var, ref_var)
    else:
        assert torch.equal(fast_mean, case["running_mean"])
        assert torch.equal(fast_var, case["running_var"])


@pytest.mark.parametrize("shape", [(700, 5), (64, 3, 40)])
def test_running_averages_equal_the_reference_update_of_the_same_statistics(shape):
    """Through the module: the buffers equal the reference update applied to the statistics
    the kernel computed (so only the statistics themselves may differ, by rounding)."""
    generator = torch.Generator().manual_seed(3)
    module = MODULES[1](shape[1], momentum=0.3)
    x = torch.randn(shape, generator=generator) * 3 + 7
    stats = np.empty((3, shape[1]), np.float32)
    expected_mean, expected_var = module.running_mean.clone(), module.running_var.clone()
    plan = ops._plan(x, "identity", 0.0, 0.0, None, 0)
    ops._run_forward(cpu.STATS, x, None, None, None, 0.0, 1e-5, stats, None, None, plan)
    count = x.numel() // shape[1]
    F._update_running_stats(
        expected_mean,
        expected_var,
        torch.from_numpy(stats[0]),
        torch.from_numpy(stats[2]),
        count,
        0.3,
    )
    module(x)
    assert torch.equal(module.running_mean, expected_mean)
    assert torch.equal(module.running_var, expected_var)


@pytest.mark.parametrize("outlier", [0.0, 300.0])
def test_rows_statistics_are_exact_for_offset_data_and_outlying_first_rows(outlier):
    """The rows layout sums values shifted by the channel's first value in one pass: exact
    for a large offset, and still to float32 rounding when that first value is an outlier."""
    generator = torch.Generator().manual_seed(4)
    x = 1e4 + torch.randn(4096, 6, generator=generator)
    x[0] += outlier
    mean, invstd = ops.batch_norm_stats(x, None, None, 0.0, 0.0)
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean(0), rtol=1e-7, atol=0)
    torch.testing.assert_close(
        1 / invstd.double() ** 2, x64.var(0, unbiased=False), rtol=1e-5, atol=0
    )


def test_rows_statistics_near_the_float32_limit():
    """The rows layout's center (a mean of sampled rows, summed in float32) must not overflow
    where the values themselves are finite: 16 rows of 3e38 add up past float32's maximum.
    The variance (about 1e72) does overflow float32, as in torch: invstd = rsqrt(inf) = 0."""
    generator = torch.Generator().manual_seed(5)
    x = 3e38 * (1 + 0.01 * torch.randn(512, 8, generator=generator)).clamp(0.9, 1.1)
    mean, invstd = ops.batch_norm_stats(x, None, None, 0.0, 0.0)
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean(0), rtol=1e-6, atol=0)
    assert torch.isinf(torch.var(x, 0, unbiased=False)).all()
    assert torch.equal(invstd, torch.zeros(8))


@pytest.mark.parametrize(
    ("shape", "channels_last_input"),
    [((64, 3), False), ((64, 3, 5), False), ((4, 3, 8, 8), False), ((4, 3, 8, 8), True),
     ((3, 5, 67, 71), False), ((4100, 6), False)],
)  # fmt: skip
def test_float64_variance_that_overflows_gives_the_references_zeros(
    shape, channels_last_input, kernel_calls
):
    """Finite float64 values near 1e300: their squares overflow, so the variance is inf and the
    output and gradients are zeros, as the reference gives (the kernels gave NaN: inf - inf in
    the moments, 0 * inf in the merge of the first piece), on every layout and block count."""
    generator = torch.Generator().manual_seed(7)
    x = 1e300 * torch.randn(shape, dtype=torch.float64, generator=generator)
    if channels_last_input:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(shape, dtype=torch.float64, generator=generator)
    module = MODULES[len(shape) - 2 if len(shape) > 3 else 1](shape[1], dtype=torch.float64)
    reference = copy.deepcopy(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inf variance: the running statistics are skipped
        y_fast, grads_fast = _step(module, x, grad, "fast")
        y_ref, grads_ref = _step(reference, x, grad, "reference")
    assert kernel_calls
    for fast, ref in zip([y_fast, *grads_fast], [y_ref, *grads_ref], strict=True):
        assert not fast.isnan().any()
        torch.testing.assert_close(fast, ref)
    _compare(list(module.buffers()), list(reference.buffers()), torch.float64)


def test_module_cache_follows_every_change_a_user_makes(kernel_calls):
    """The eager path caches what a module's last call found (kernels.eager.ModuleCache): every
    change below must be seen, step after step, in lockstep with torch.nn."""
    ours = normdrop.nn.BatchNorm2d(3)
    theirs = torch.nn.BatchNorm2d(3)
    generator = torch.Generator().manual_seed(0)

    def step(shape=(4, 3, 5, 5), dtype=torch.float32, layout=torch.contiguous_format):
        x = torch.randn(shape, dtype=dtype, generator=generator).to(memory_format=layout)
        grad = torch.randn(shape, dtype=dtype, generator=generator)
        results = []
        for module in (ours, theirs):
            xi = x.clone().requires_grad_()
            y = module(xi)
            params = [p for p in module.parameters() if p.requires_grad]
            grads = torch.autograd.grad(y, [xi, *params], grad) if y.requires_grad else ()
            results.append((y, grads, [b.clone() for b in module.buffers()]))
        rtol = tolerance(dtype)
        (y1, g1, b1), (y2, g2, b2) = results
        assert_close_scaled(y1, y2, rtol)
        for a, b in zip([*g1, *b1], [*g2, *b2], strict=True):
            assert_close_scaled(a.to(b.dtype), b, rtol)

    step()
    step()  # a cached call
    with torch.no_grad():  # an optimizer's in-place update of the same memory
        for module in (ours, theirs):
            module.weight.mul_(2).add_(0.5)
            module.bias.sub_(1)
    step()
    for module in (ours, theirs):  # new memory under the same Parameter object
        module.weight.data = torch.full((3,), 3.0)
    step()
    for module in (ours, theirs):  # a new buffer tensor
        module.running_var = torch.full((3,), 4.0)
    step()
    state = {k: v * 1.5 for k, v in theirs.state_dict().items() if v.is_floating_point()}
    for module in (ours, theirs):
        module.load_state_dict(state, strict=False)
    step()
    for module in (ours, theirs):
        module.eps = 1e-1
    step()
    for module in (ours, theirs):
        module.momentum = 0.5
    step()
    step(shape=(6, 3, 2, 7))
    step(layout=torch.channels_last)
    for module in (ours, theirs):
        module.double()
    ours.load_state_dict(theirs.state_dict())  # float32 rounding differences end here
    step(dtype=torch.float64)
    for module in (ours, theirs):
        module.eval()
    step(dtype=torch.float64)
    for module in (ours, theirs):
        module.train()
        module.weight.requires_grad_(False)
    step(dtype=torch.float64)
    with torch.no_grad():
        step(dtype=torch.float64)
    assert len(kernel_calls) >= 11


def test_backward_uses_the_weight_as_it_is_at_backward_time(kernel_calls):
    """``weight.data = ...`` between forward and backward does not bump autograd's version
    counter; torch's backward reads the parameter as it is then, and so must the kernels'."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=generator)
    grad = torch.randn(3, 4, 5, 5, generator=generator)
    results = []
    for module in (normdrop.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)):
        xi = x.clone().requires_grad_()
        y = module(xi)
        module.weight.data = torch.full((8,), 5.0)[::2]  # other memory, strided
        results.append(torch.autograd.grad(y, [xi, module.weight], grad))
    for ours, theirs in zip(*results, strict=True):
        assert_close_scaled(ours, theirs, tolerance(torch.float32))
    assert kernel_calls
    # the strided weight reached the backward kernel as a dense copy: no variant compiled for it
    dense = {cpu.backward_signature(np.dtype(d)) for d in ("float32", "float64")}
    layout = cpu.kernel_layout(cpu.PLANAR, x.numel(), x.shape[1], 25, cpu.IDENTITY, False)
    assert set(cpu.backward_kernel(layout).signatures) <= dense


def test_strided_parameters_and_buffers_take_the_reference(kernel_calls):
    """The kernels take dense (C,) arrays; strided parameters or buffers (views of larger
    tensors) run the reference, with the same results and running averages as torch."""
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, 9, 9, generator=generator)
    grad = torch.randn(x.shape, generator=generator)
    results = []
    for module in (normdrop.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)):
        module.weight.data = torch.linspace(0.5, 2.0, 8)[::2]
        module.running_var = torch.ones(8)[::2]
        xi = x.clone().requires_grad_()
        y = module(xi)
        results.append([y, *torch.autograd.grad(y, [xi, module.weight], grad), module.running_var])
    for ours, theirs in zip(*results, strict=True):
        assert_close_scaled(ours, theirs, tolerance(torch.float32))
    assert not kernel_calls


def test_cached_calls_check_what_can_change_between_calls():
    """A module's cached eager call refuses what its first call refuses."""
    module = normdrop.nn.BatchNorm1d(3)
    x = torch.randn(5, 3)
    module(x)
    module.momentum = float("nan")
    with pytest.raises(TypeError, match="momentum must be a real number"):
        module(x)
    module.momentum = 0.1
    module.eval()
    module(x)
    with torch.no_grad():
        module.running_var.resize_(2)  # the same memory, one value fewer
    with pytest.raises(RuntimeError):
        module(x)


def test_cached_calls_see_parameters_restrided_or_negated_in_place():
    """``set_`` can give a parameter or buffer other strides over the same memory, and
    ``torch._neg_view`` a view whose memory holds the negated values: a cached call must read
    the values, as the first call and torch do."""
    x = torch.randn(4, 3, 5, 5)
    ours, theirs = normdrop.nn.BatchNorm2d(3).eval(), torch.nn.BatchNorm2d(3).eval()
    for module in (ours, theirs):
        with torch.no_grad():
            module.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
            module.running_mean.copy_(torch.tensor([0.5, -0.5, 1.0]))
    torch.testing.assert_close(ours(x), theirs(x))  # fills the cache
    for module in (ours, theirs):
        with torch.no_grad():  # every channel now reads weight[0], running_mean[0]
            module.weight.set_(module.weight.untyped_storage(), 0, (3,), (0,))
            module.running_mean.set_(module.running_mean.untyped_storage(), 0, (3,), (0,))
    torch.testing.assert_close(ours(x), theirs(x))
    negated = torch._neg_view(-x)  # holds -x, reads as x
    ours(x)  # the cache holds x's entry
    torch.testing.assert_close(ours(negated), theirs(x))


@pytest.mark.parametrize(
    "module", [normdrop.nn.BatchNorm2d(3), normdrop.nn.BatchNormAct2d(3, "identity", p=0.0)]
)
def test_bias_changed_in_place_before_the_backward(kernel_calls, module):
    """torch's BatchNorm does not save the bias (no gradient depends on its value): an
    optimizer step on it before the backward is allowed, and the gradients are those of the
    forward. The same with normdrop's, the identity included."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 5, 5, generator=generator)
    grad = torch.randn(x.shape, generator=generator)
    results = []
    for layer in (module, torch.nn.BatchNorm2d(3)):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        with torch.no_grad():
            layer.bias.add_(1.0)
        results.append(torch.autograd.grad(y, [xi, layer.weight, layer.bias], grad))
    assert kernel_calls
    for ours, theirs in zip(*results, strict=True):
        assert_close_scaled(ours, theirs, tolerance(torch.float32))


def test_an_activation_guards_the_bias_it_recomputes_from(kernel_calls):
    """The fused backward recomputes the activation's input from the bias: a bias changed in
    place before it is refused by autograd's version check, not read silently."""
    module = normdrop.nn.BatchNormAct2d(3, "relu")
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    y = module(x)
    with torch.no_grad():
        module.bias.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    assert kernel_calls


def test_module_cache_refilled_during_a_lookup(monkeypatch):
    """The module cache is one snapshot, read once per call: another thread refilling it with
    another shape in the middle of a call (simulated here, deterministically, from inside the
    lookup) must not hand this call the other shape's kernel arguments."""
    from normdrop.kernels import eager

    module = normdrop.nn.BatchNorm1d(16, track_running_stats=False)
    small, large = torch.randn(64, 16), torch.randn(512, 16, 3)
    with torch.no_grad():
        module(small)  # the cache now holds the small input's entry
    original = eager.get_backend
    interrupted = []

    def refilled_by_another_thread() -> str:
        if not interrupted:
            interrupted.append(True)
            with torch.no_grad():
                module(large)  # refills the cache for the large input
        return original()

    monkeypatch.setattr(eager, "get_backend", refilled_by_another_thread)
    with torch.no_grad():
        out = module(small)
    assert interrupted
    expected = torch.nn.functional.batch_norm(small, None, None, training=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# --- plain BatchNorm channel by channel (the CHANNELS kernels) -------------------------------


def _forward_call(layout, what, x, stats, running, weight, bias):
    """One forward kernel call of ``layout`` on ``x`` (a dense planar tensor); returns the
    output (None for STATS) and whether the statistics were finite."""
    y = torch.empty_like(x)
    params, act = ops._kernel_params(x.dtype, "identity", 0.0, 0.0)
    finite = cpu.forward_kernel(layout)(
        what, x.data_ptr(), y.data_ptr(), x.numel(), x.shape[1], math.prod(x.shape[2:]),
        running[0], running[1], 0.3, 1e-5, stats, weight, bias, params, act, 0, 0, 0, 0, False,
    )  # fmt: skip
    return (None if what == cpu.STATS else y), finite


def _backward_call(layout, sums, with_dx, training, dy, x, stats, weight, bias):
    dx = torch.empty_like(x)
    grad_weight = torch.zeros(x.shape[1], dtype=x.dtype)
    grad_bias = torch.zeros(x.shape[1], dtype=x.dtype)
    params, act = ops._kernel_params(x.dtype, "identity", 0.0, 0.0)
    cpu.backward_kernel(layout)(
        sums, dy.data_ptr(), x.data_ptr(), dx.data_ptr() if with_dx else 0, x.numel(),
        x.shape[1], math.prod(x.shape[2:]), stats[0], stats[1], weight, bias, params, act,
        0, 0, 0, 0, False, training, grad_weight.data_ptr(), grad_bias.data_ptr(),
    )  # fmt: skip
    return [dx if with_dx else None, grad_weight, grad_bias]


@st.composite
def channel_kernel_cases(draw):
    rank = draw(st.integers(3, 5))
    # planes up to 2 * cpu.BLOCK + 1: some cross block boundaries, so pieces are split
    plane_sizes = {3: st.integers(1, 2 * cpu.BLOCK + 1), 4: st.integers(1, 130)}
    spatial = [draw(plane_sizes[3 if rank == 3 else 4]) for _ in range(rank - 2)]
    return {
        "shape": (draw(st.integers(1, 5)), draw(st.integers(1, 9)), *spatial),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "affine": draw(st.booleans()),
        "track": draw(st.booleans()),
        "offset": draw(st.sampled_from([0.0, 1e4])),
        "seed": draw(st.integers(0, 2**16)),
    }


@settings(max_examples=40, deadline=None)
@given(case=channel_kernel_cases())
def test_channel_kernels_equal_the_blocked_kernels_bit_for_bit(case):
    """The CHANNELS kernels merge the blocked kernels' pieces in the same order: every output,
    statistic, running average and gradient is the same, to the bit, in every mode."""
    generator = torch.Generator().manual_seed(case["seed"])
    dtype, channels = case["dtype"], case["shape"][1]
    x = torch.randn(case["shape"], dtype=dtype, generator=generator) * 3 + case["offset"]
    dy = torch.randn(case["shape"], dtype=dtype, generator=generator)
    vector = np.empty(0, ops._NUMPY[dtype])

    def parameters():
        if not case["affine"]:
            return vector, vector
        weight = torch.rand(channels, dtype=dtype, generator=generator) + 0.5
        return weight.numpy(), torch.randn(channels, dtype=dtype, generator=generator).numpy()

    def running():
        if not case["track"]:
            return [vector, vector]
        return [np.zeros(channels, vector.dtype) + 0.5, np.ones(channels, vector.dtype)]

    weight, bias = parameters()
    given_stats = np.stack([x.mean((0, *range(2, x.dim()))).numpy()] * 3)
    given_stats[1] = 0.7
    for what in (cpu.STATS, cpu.STATS_APPLY, cpu.APPLY, cpu.APPLY_RUNNING):
        results = []
        for layout in (cpu.PLANAR, cpu.CHANNELS):
            stats = given_stats.copy()
            buffers = running()
            y, finite = _forward_call(layout, what, x, stats, buffers, weight, bias)
            results.append((y, finite, stats, buffers))
        (y0, finite0, stats0, buffers0), (y1, finite1, stats1, buffers1) = results
        assert finite0 == finite1
        assert (y0 is None and y1 is None) or torch.equal(y0, y1)
        np.testing.assert_array_equal(stats0, stats1)
        for a, b in zip(buffers0, buffers1, strict=True):
            np.testing.assert_array_equal(a, b)
    for sums, with_dx, training in [
        (True, True, True),
        (True, False, True),
        (True, True, False),
        (False, True, False),
    ]:
        planar, channel = (
            _backward_call(layout, sums, with_dx, training, dy, x, stats0, weight, bias)
            for layout in (cpu.PLANAR, cpu.CHANNELS)
        )
        for a, b in zip(planar, channel, strict=True):
            assert (a is None and b is None) or torch.equal(a, b)


def test_kernel_layout_takes_the_channel_kernels_for_plain_planar_batchnorm():
    big, channels, plane = cpu.SERIAL_BELOW, cpu.CHANNEL_MAJOR, cpu.CHANNEL_MAJOR_PLANE
    plain = (cpu.IDENTITY, False)
    layout = cpu.kernel_layout
    assert layout(cpu.PLANAR, big, channels, plane, *plain) == cpu.CHANNELS
    assert layout(cpu.PLANAR, big - 1, 1, 2, *plain) == cpu.CHANNELS  # small: any shape
    assert layout(cpu.PLANAR, big, channels - 1, plane, *plain) == cpu.PLANAR
    assert layout(cpu.PLANAR, big, channels, plane - 1, *plain) == cpu.PLANAR
    assert layout(cpu.PLANAR, big, channels, plane, cpu.RELU, False) == cpu.PLANAR
    assert layout(cpu.PLANAR, big - 1, channels, plane, cpu.IDENTITY, True) == cpu.PLANAR
    assert layout(cpu.ROWS, big, channels, plane, *plain) == cpu.ROWS


@pytest.mark.parametrize(
    "shape",
    [
        (3, 9, 67, 71),
        (2, 8, 130, 130),  # planes of more than cpu.BLOCK values: pieces across blocks
        (256, 16, 4, 4),  # the smallest planes a large input runs channel by channel
        (3, 5, 17, 19),  # small inputs run channel by channel whatever their shape
        (2, 8, 16, 16, 17),
        (16, 8, 600),
    ],
)
def test_channel_kernels_match_reference_in_modules(shape, kernel_calls):
    run_against_reference(_two_steps_case(shape))
    assert kernel_calls == [cpu.CHANNELS] * 3


def test_statistics_op_updates_strided_running_buffers():
    """``ops.batch_norm_stats`` takes any running buffers; strided ones are updated through a
    dense copy, written back, as torch updates them."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(8, 3, 10, 10, generator=generator) + 2
    ours = torch.zeros(6)[::2], torch.ones(6)[::2]
    theirs = torch.zeros(3), torch.ones(3)
    ops.batch_norm_stats(x, *ours, 0.1, 1e-5)
    torch.nn.functional.batch_norm(x, *theirs, training=True, momentum=0.1, eps=1e-5)
    for got, want in zip(ours, theirs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


_THREADS = """
import numba, torch
import normdrop.nn as nd
torch.set_num_threads(1)
# numba's OpenMP pool starts at the first call, inside a compiled graph here, where its start-up
# set the OpenMP thread count (torch's) to the pool's size and the next call recompiled
compiled = torch.compile(nd.BatchNormAct2d(4, p=0.2), backend="aot_eager", fullgraph=True)
for _ in range(2):
    compiled(torch.randn(2, 4, 3, 3)).sum().backward()
print(torch.get_num_threads(), numba.get_num_threads())
print(torch._dynamo.utils.counters["stats"]["unique_graphs"])
torch.set_num_threads(2)
nd.Dropout(0.3)(torch.randn(70000))  # over SERIAL_BELOW: a parallel launch
print(torch.get_num_threads(), numba.get_num_threads())
"""


def test_the_kernels_keep_and_follow_torchs_thread_count():
    """A fresh process (numba's pool not started): after torch.set_num_threads(1) the first
    kernel call leaves torch at 1 thread (numba's start-up had set it to the CPU count, and a
    compiled module then compiled again) and runs on 1; later calls follow torch's count."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 CPUs to tell 1 thread from the pool's size")
    done = subprocess.run(
        [sys.executable, "-c", _THREADS], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1", "1", "2", "2"]
