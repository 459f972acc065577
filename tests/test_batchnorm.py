"""BatchNorm: normdrop against torch.nn (the oracle) and float64 math, on generated cases."""

from __future__ import annotations

import copy
import functools
import re
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import normdrop
from normdrop import functional as NF
from normdrop.backend import BACKENDS
from normdrop.errors import InputError, InputTypeError
from normdrop.kernels import dispatch

from _helpers import assert_close_scaled, tolerance

PAIRS = {
    1: (normdrop.nn.BatchNorm1d, torch.nn.BatchNorm1d),
    2: (normdrop.nn.BatchNorm2d, torch.nn.BatchNorm2d),
    3: (normdrop.nn.BatchNorm3d, torch.nn.BatchNorm3d),
}


@st.composite
def bn_cases(draw):
    """A layer kind, an input shape it takes (batch 2..64, odd sizes) and its settings."""
    kind = draw(st.sampled_from([1, 1, 2, 3]))
    channels = draw(st.integers(1, 6))
    batch = draw(st.integers(2, 64))
    spatial_rank = {1: draw(st.sampled_from([0, 1])), 2: 2, 3: 3}[kind]
    budget = max(1, 4096 // (batch * channels))  # keeps each case small
    spatial = []
    for _ in range(spatial_rank):
        size = draw(st.integers(1, max(1, min(9, int(budget ** (1 / spatial_rank))))))
        spatial.append(size)
    shape = (batch, channels, *spatial)
    return {
        "kind": kind,
        "shape": shape,
        "momentum": draw(st.sampled_from([0.1, 0.5, None])),
        "affine": draw(st.booleans()),
        "track": draw(st.booleans()),
        "dtype": draw(st.sampled_from([torch.float32, torch.float64])),
        "channels_last": kind >= 2 and draw(st.booleans()),
        "backend": draw(st.sampled_from(BACKENDS)),
        "offset": draw(st.sampled_from([0.0, 3.0])),
    }


def _make_pair(case):
    ours_cls, torch_cls = PAIRS[case["kind"]]
    kwargs = {
        "momentum": case["momentum"],
        "affine": case["affine"],
        "track_running_stats": case["track"],
        "dtype": case["dtype"],
    }
    channels = case["shape"][1]
    ours, reference = ours_cls(channels, **kwargs), torch_cls(channels, **kwargs)
    if case["affine"]:  # non-trivial affine parameters, the same in both
        with torch.no_grad():
            reference.weight.uniform_(0.5, 1.5)
            reference.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(reference.state_dict())
    return ours, reference


def _input(case, generator):
    x = torch.randn(case["shape"], dtype=case["dtype"], generator=generator) * 2 + case["offset"]
    if case["channels_last"]:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    return x


def _step(module, x, grad):
    x = x.clone().requires_grad_(True)
    y = module(x)
    y.backward(grad)
    return y, x.grad


def _assert_same_state(ours, reference, rtol):
    for name, expected in reference.state_dict().items():
        actual = ours.state_dict()[name]
        if expected.dtype == torch.long:
            assert torch.equal(actual, expected), name
        else:
            assert_close_scaled(actual, expected, rtol)


@given(bn_cases())
def test_modules_match_torch_over_steps_and_modes(case):
    """Outputs, input/weight/bias gradients and every buffer agree with torch.nn after three
    training steps and in eval mode, for every rank, setting, dtype, layout and backend."""
    generator = torch.Generator().manual_seed(hash(str(case)) % 2**31)
    ours, reference = _make_pair(case)
    rtol = tolerance(case["dtype"])
    with normdrop.use_backend(case["backend"]):
        for training in (True, True, True, False):
            ours.train(training)
            reference.train(training)
            x = _input(case, generator)
            grad = torch.randn(x.shape, dtype=x.dtype, generator=generator)
            y_ours, gx_ours = _step(ours, x, grad)
            y_ref, gx_ref = _step(reference, x, grad)
            assert y_ours.dtype == y_ref.dtype and y_ours.shape == y_ref.shape
            assert_close_scaled(y_ours, y_ref, rtol)
            assert_close_scaled(gx_ours, gx_ref, rtol)
            if case["affine"]:
                assert_close_scaled(ours.weight.grad, reference.weight.grad, rtol)
                assert_close_scaled(ours.bias.grad, reference.bias.grad, rtol)
            _assert_same_state(ours, reference, rtol)
            if case["channels_last"]:
                fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
                assert y_ours.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_float64(training, affine):
    """The analytic backward equals finite differences, in training and in eval mode, and the
    double backward (gradient penalties) too."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    weight = torch.rand(3, dtype=torch.float64, generator=generator) + 0.5
    bias = torch.randn(3, dtype=torch.float64, generator=generator)
    weight.requires_grad_(affine)
    bias.requires_grad_(affine)
    running_mean = torch.randn(3, dtype=torch.float64, generator=generator)
    running_var = torch.rand(3, dtype=torch.float64, generator=generator) + 0.5

    def fn(x, weight, bias):
        return NF.batch_norm(
            x, running_mean.clone(), running_var.clone(), weight, bias, training=training
        )

    assert torch.autograd.gradcheck(fn, (x, weight, bias))
    assert torch.autograd.gradgradcheck(fn, (x, weight, bias))


def test_analytic_backward_is_not_autograd_through_statistics():
    """The training backward is our autograd.Function, not a graph of mean/var ops."""
    x = torch.randn(4, 3, requires_grad=True)
    y = NF.batch_norm(x, None, None, training=True)
    assert type(y.grad_fn).__name__ == "_BatchNormFunctionWithJvpBackward"


def test_functional_matches_torch_functional():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(8, 4, 5, generator=generator)
    weight, bias = torch.rand(4, generator=generator), torch.randn(4, generator=generator)
    for training in (True, False):
        stats_ours = (torch.randn(4, generator=generator), torch.rand(4, generator=generator) + 1)
        stats_ref = tuple(s.clone() for s in stats_ours)
        ours = NF.batch_norm(x, *stats_ours, weight, bias, training, 0.3, 1e-3)
        ref = torch.nn.functional.batch_norm(x, *stats_ref, weight, bias, training, 0.3, 1e-3)
        assert_close_scaled(ours, ref, 1e-5)
        for a, b in zip(stats_ours, stats_ref, strict=True):
            assert_close_scaled(a, b, 1e-6)
    # training without buffers: batch statistics only
    assert_close_scaled(
        NF.batch_norm(x, None, None, training=True),
        torch.nn.functional.batch_norm(x, None, None, training=True),
        1e-5,
    )


def test_running_variance_is_unbiased_and_batch_is_normalized_with_biased():
    """Float64 oracle written out: the batch uses var/m, the running estimate var/(m-1)."""
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    running_mean, running_var = (
        torch.zeros(2, dtype=torch.float64),
        torch.ones(2, dtype=torch.float64),
    )
    y = NF.batch_norm(x, running_mean, running_var, training=True, momentum=1.0, eps=1e-5)
    values = x.transpose(0, 1).reshape(2, -1)
    m = values.shape[1]
    mean = values.sum(1) / m
    biased = ((values - mean[:, None]) ** 2).sum(1) / m
    torch.testing.assert_close(running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(running_var, biased * m / (m - 1), rtol=1e-12, atol=1e-12)
    expected = (x - mean[None, :, None]) / torch.sqrt(biased[None, :, None] + 1e-5)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def test_momentum_none_is_cumulative_average():
    bn = normdrop.nn.BatchNorm1d(3, momentum=None, dtype=torch.float64)
    batches = [torch.randn(7, 3, dtype=torch.float64) * (i + 1) + i for i in range(5)]
    for batch in batches:
        bn(batch)
    torch.testing.assert_close(bn.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([b.var(0) for b in batches]).mean(0))
    assert bn.num_batches_tracked.item() == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_exact_for_large_offsets(backend):
    """x = 1e4 + randn in float32: the naive E[x^2] - E[x]^2 would lose every digit of the
    variance; two passes keep it, against a float64 computation on the same float32 values."""
    generator = torch.Generator().manual_seed(2)
    x = 1e4 + torch.randn(64, 8, 16, 16, generator=generator)
    mean, var = NF.batch_statistics(x)
    x64 = x.double()
    torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False), rtol=1e-4, atol=0)
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), rtol=1e-7, atol=0)

    naive = (x * x).mean((0, 2, 3)) - x.mean((0, 2, 3)) ** 2  # what not to do
    assert (naive.double() - x64.var((0, 2, 3), unbiased=False)).abs().max() > 0.1

    bn = normdrop.nn.BatchNorm2d(8)
    with normdrop.use_backend(backend):
        y = bn(x)
    expected = (x64 - x64.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        x64.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5
    )
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=2e-3)  # ulp(1e4) ~ 1e-3
    unbiased = x64.var((0, 2, 3), unbiased=True)
    torch.testing.assert_close(bn.running_var.double(), 0.9 + 0.1 * unbiased, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.full((65536, 2, 2), 30000.0, dtype=torch.float16),  # constant channels
        lambda: torch.full((65536, 2, 4), 96984.346)[:, :, ::2],  # strided: the reference
        lambda: (
            96984.35 + 0.5 * torch.randn(65536, 2, 2, generator=torch.Generator().manual_seed(3))
        ),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_of_many_values_at_a_large_offset(make, backend):
    """(N, C, L) with N * L = 131072 values a channel at 3e4-1e5: float32 means over N and L
    add up in float32 in PyTorch, and a two-pass formula built on them gave a negative
    variance for constant channels (NaN output, running_var pulled below 0.9) and a variance
    6% low on noisy ones; the statistics must equal float64 math on the same values."""
    x = make()
    x64 = x.double()
    mean, var = NF.batch_statistics(x)
    torch.testing.assert_close(mean.double(), x64.mean((0, 2)), rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), x64.var((0, 2), unbiased=False), rtol=1e-4, atol=1e-6)
    bn = normdrop.nn.BatchNorm1d(2, momentum=1.0).to(x.dtype)
    with normdrop.use_backend(backend):
        y = bn(x)
    assert torch.isfinite(y).all()
    unbiased = x64.var((0, 2), unbiased=True)
    torch.testing.assert_close(bn.running_var.double(), unbiased, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_input_with_float32_parameters(dtype, backend):
    """float16/bfloat16 input, float32 parameters and statistics: output in the input dtype,
    statistics in float32 and equal to the float32 computation on the same values."""
    x = (torch.randn(16, 4, 5, 5) * 3 + 100).to(dtype)
    ours, reference = normdrop.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    with normdrop.use_backend(backend):
        y = ours(x.clone().requires_grad_())
    y_ref = reference(x.clone().requires_grad_())
    assert y.dtype == dtype and ours.running_mean.dtype == torch.float32
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=1e-2)
    x32 = x.float()
    expected_mean = 0.9 * 0 + 0.1 * x32.mean((0, 2, 3))
    torch.testing.assert_close(ours.running_mean, expected_mean, rtol=1e-6, atol=1e-6)
    y.float().sum().backward()  # the backward runs in float32 and returns the input dtype


def test_half_parameters_work_like_torch():
    x = torch.randn(8, 3).half()
    ours, reference = normdrop.nn.BatchNorm1d(3).half(), torch.nn.BatchNorm1d(3).half()
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours.running_var, reference.running_var, rtol=1e-3, atol=1e-3)


def _half_errors(offset: float, seed: int, backend: str) -> tuple[float, float]:
    """Mean absolute error against float64 of our float16 BatchNorm1d (half parameters) over
    torch.nn's: ``(output ratio, input-gradient ratio)``."""
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(256, 16, generator=generator) + offset).half()
    grad = torch.randn(256, 16, generator=generator).half()
    weight, bias = torch.rand(16, generator=generator) + 0.5, torch.randn(16, generator=generator)
    results = []
    for module, dtype in (
        (normdrop.nn.BatchNorm1d(16), torch.float16),
        (torch.nn.BatchNorm1d(16), torch.float16),
        (torch.nn.BatchNorm1d(16), torch.float64),  # the oracle
    ):
        with torch.no_grad():
            module.weight.copy_(weight)
            module.bias.copy_(bias)
        module.to(dtype)
        leaf = x.to(dtype).requires_grad_()
        with normdrop.use_backend(backend):
            y = module(leaf)
        (gx,) = torch.autograd.grad(y, leaf, grad.to(dtype))
        results.append((y.double(), gx.double()))
    (y_ours, g_ours), (y_torch, g_torch), (y_64, g_64) = results

    def ratio(ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor) -> float:
        return ((ours - exact).abs().mean() / (theirs - exact).abs().mean()).item()

    return ratio(y_ours, y_torch, y_64), ratio(g_ours, g_torch, g_64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_parameters_are_closer_to_float64_than_torch(backend):
    """docs/math.md's figures: PyTorch rounds the batch mean and 1/std to float16 with half
    parameters, we keep them in float32. Mean absolute error against float64, ours over
    torch's, seeds 0-3: on standard-normal data at most 0.95 (output and gradient); with a mean
    of 20 against a spread of 1, at most 0.15 in the output and 0.7 in the gradient."""
    for seed in range(4):
        output, gradient = _half_errors(0.0, seed, backend)
        assert output < 0.95 and gradient < 0.95
        output, gradient = _half_errors(20.0, seed, backend)
        assert output < 0.15 and gradient < 0.7


def test_track_running_stats_false_uses_batch_statistics_in_eval():
    x = torch.randn(10, 3) * 4 + 2
    ours = normdrop.nn.BatchNorm1d(3, track_running_stats=False).eval()
    reference = torch.nn.BatchNorm1d(3, track_running_stats=False).eval()
    assert ours.running_mean is None
    assert_close_scaled(ours(x), reference(x), 1e-5)
    assert ours(x).mean(0).abs().max() < 1e-5  # normalized with its own statistics


def test_bias_false_learns_scale_only():
    ours, reference = normdrop.nn.BatchNorm1d(3, bias=False), torch.nn.BatchNorm1d(3, bias=False)
    assert ours.bias is None and set(ours.state_dict()) == set(reference.state_dict())
    x = torch.randn(6, 3)
    assert_close_scaled(ours(x), reference(x), 1e-5)


def test_empty_batch_like_torch():
    ours, reference = normdrop.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    x = torch.randn(0, 3, requires_grad=True)
    y = ours(x)
    assert y.shape == reference(x).shape == (0, 3)
    _assert_same_state(ours, reference, 0)
    y.sum().backward()
    assert x.grad.shape == (0, 3)


def test_empty_batch_with_other_channels_is_refused_where_torch_answers():
    """Stricter than torch.nn on purpose (docs/math.md): a module's channel count is checked
    even on an empty batch; the functional form answers as ATen does."""
    x = torch.randn(0, 4)
    assert torch.nn.BatchNorm1d(3)(x).shape == (0, 4)
    with pytest.raises(InputError, match=r"got input with 4 channels \(dim 1\)"):
        normdrop.nn.BatchNorm1d(3)(x)
    assert NF.batch_norm(x, torch.zeros(3), torch.ones(3), training=True).shape == (0, 4)


# ---------------------------------------------------------------------------------- ecosystem


def test_isinstance_and_state_dict_round_trip():
    for ours_cls, torch_cls in PAIRS.values():
        ours, reference = ours_cls(5), torch_cls(5)
        assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)
        assert isinstance(ours, torch_cls)
        assert list(ours.state_dict()) == list(reference.state_dict())
        assert repr(ours) == repr(reference)
        trained = torch_cls(5)
        shape = (
            (4, 5)
            if torch_cls is torch.nn.BatchNorm1d
            else (4, 5) + (3,) * (2 if torch_cls is torch.nn.BatchNorm2d else 3)
        )
        trained(torch.randn(shape) + 1)  # non-default buffers
        ours.load_state_dict(trained.state_dict())  # torch -> normdrop
        back = torch_cls(5)
        back.load_state_dict(ours.state_dict())  # normdrop -> torch
        for key, value in trained.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key
        x = torch.randn(shape)
        torch.testing.assert_close(ours.eval()(x), trained.eval()(x))


def test_checkpoint_without_num_batches_tracked_loads():
    """Checkpoints from before PyTorch 0.4.1 lack num_batches_tracked; torch's loader fills it."""
    state = torch.nn.BatchNorm1d(3).state_dict()
    del state["num_batches_tracked"]
    state._metadata = {"": {"version": 1}}
    bn = normdrop.nn.BatchNorm1d(3)
    bn.load_state_dict(state)
    assert bn.num_batches_tracked.item() == 0


def test_whole_model_checkpoint_both_ways(tmp_path):
    def model(bn, drop):
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), bn(4), torch.nn.ReLU(), drop(0.2), torch.nn.Flatten()
        )

    reference = model(torch.nn.BatchNorm2d, torch.nn.Dropout)
    reference(torch.randn(8, 3, 6, 6))
    torch.save(reference.state_dict(), tmp_path / "model.pt")
    ours = model(normdrop.nn.BatchNorm2d, normdrop.nn.Dropout)
    ours.load_state_dict(torch.load(tmp_path / "model.pt"))
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(ours.eval()(x), reference.eval()(x))


def test_update_bn_from_torch_works_on_our_modules():
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(4, 6), normdrop.nn.BatchNorm1d(6))
    reference = copy.deepcopy(ours)
    reference[1] = torch.nn.BatchNorm1d(6)
    reference[1].load_state_dict(ours[1].state_dict())
    loader = [torch.randn(8, 4) + 2 for _ in range(5)]
    torch.optim.swa_utils.update_bn(loader, ours)
    torch.optim.swa_utils.update_bn(loader, reference)
    assert ours[1].momentum == 0.1 and ours[1].num_batches_tracked.item() == 5
    _assert_same_state(ours[1], reference[1], 1e-5)
    assert ours[1].running_mean.abs().sum() > 0


def test_convert_sync_batchnorm_accepts_our_modules():
    model = torch.nn.Sequential(normdrop.nn.BatchNorm2d(3))
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[0], torch.nn.SyncBatchNorm)


def test_weight_decay_filter_recognizes_our_modules():
    """The common 'no weight decay on norm layers' filter, as timm and many trainers write it."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), normdrop.nn.BatchNorm1d(4))
    norm_params = [
        p
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        for p in m.parameters()
    ]
    assert len(norm_params) == 2


def test_deepcopy_pickle_and_compile():
    bn = normdrop.nn.BatchNorm1d(3)
    clone = copy.deepcopy(bn)
    x = torch.randn(5, 3)
    torch.testing.assert_close(clone(x), bn(x))


# ---------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("layer", "shape", "expected"),
    [
        (
            normdrop.nn.BatchNorm2d(3),
            (4, 3, 5),
            r"BatchNorm2d expects input of shape \(N, C, H, W\), got 3-D",
        ),
        (
            normdrop.nn.BatchNorm1d(3),
            (4, 3, 5, 5),
            r"BatchNorm1d expects .*\(N, C\) or \(N, C, L\)",
        ),
        (normdrop.nn.BatchNorm3d(3), (3, 5), r"BatchNorm3d expects .*got 2-D"),
        (normdrop.nn.BatchNorm1d(3), (4, 5), r"num_features=3.*5 channels"),
    ],
)
def test_wrong_rank_or_channels_names_the_problem(layer, shape, expected):
    with pytest.raises(ValueError, match=expected):
        layer(torch.randn(shape))


def test_batch_of_one_in_training_has_torchs_message():
    x = torch.randn(1, 3)
    with pytest.raises(ValueError) as ours:
        normdrop.nn.BatchNorm1d(3)(x)
    with pytest.raises(ValueError) as reference:
        torch.nn.BatchNorm1d(3)(x)
    assert str(ours.value) == str(reference.value)
    assert "Expected more than 1 value per channel when training" in str(ours.value)
    bn, theirs = normdrop.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    for module in (bn, theirs):
        with pytest.raises(ValueError):
            module(x)
    # torch.nn counts before its checks (see test_refused_training_call_still_counts_the_batch)
    assert bn.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 1
    normdrop.nn.BatchNorm1d(3).eval()(x)  # one sample is fine in eval mode
    normdrop.nn.BatchNorm1d(3)(torch.randn(1, 3, 2))  # two values per channel is enough


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"eps": float("nan")}, "eps must be a real number"),
        ({"momentum": 1.5}, r"momentum must be a number in \[0, 1\] or None"),
        ({"momentum": -0.1}, "momentum"),
        ({"num_features": 0}, "num_features must be a positive int"),
    ],
)
def test_bad_constructor_arguments(kwargs, expected):
    kwargs = {"num_features": 3, **kwargs}
    with pytest.raises(ValueError, match=expected):
        normdrop.nn.BatchNorm1d(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "cls",
    [
        normdrop.nn.BatchNorm1d,
        functools.partial(normdrop.nn.GhostBatchNorm1d, virtual_batch_size=2),
        normdrop.nn.BatchRenorm1d,
    ],
)
def test_eps_sign_is_checked_by_forward_as_torch_does(cls, backend):
    """torch.nn builds BatchNorm(eps=0) and BatchNorm(eps=-1) and refuses them in forward
    ("eps must be positive" in training); eps = 0 is valid in eval. Same contract here, so a
    model built for inference with eps=0 converts, and torch's own module tests pass."""
    x = torch.randn(4, 3)
    with normdrop.use_backend(backend):
        for eps in (0.0, -1.0):
            bn, theirs = cls(3, eps=eps), torch.nn.BatchNorm1d(3, eps=eps)
            with pytest.raises(ValueError, match="eps must be positive"):
                bn(x)
            with pytest.raises(ValueError, match="eps must be positive"):
                theirs(x)
            # BatchNorm counts before the checks, as torch.nn counts; a ghost batch counts after
            counted = 1 if cls is normdrop.nn.BatchNorm1d else 0
            assert bn.num_batches_tracked.item() == counted
            assert theirs.num_batches_tracked.item() == 1
        with pytest.raises(ValueError, match="eps must be non-negative"):
            cls(3, eps=-1.0).eval()(x)
        ours, reference = cls(3, eps=0.0).eval(), torch.nn.BatchNorm1d(3, eps=0.0).eval()
        assert_close_scaled(ours(x), reference(x), 1e-5)


def test_num_features_must_be_an_int():
    with pytest.raises(TypeError, match="num_features must be a positive int"):
        normdrop.nn.BatchNorm1d(3.0)
    with pytest.raises(TypeError, match="eps must be a real number"):
        normdrop.nn.BatchNorm1d(3, eps="1e-5")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
def test_integer_input_is_refused(dtype):
    with pytest.raises(TypeError, match="floating-point"):
        normdrop.nn.BatchNorm1d(3)(torch.zeros(4, 3, dtype=dtype))


def test_dtype_and_device_mismatch():
    x = torch.randn(4, 3)
    with pytest.raises(
        TypeError, match=r"running_mean has dtype torch.float64 but input has dtype torch.float32"
    ):
        normdrop.nn.BatchNorm1d(3, dtype=torch.float64)(x)
    with pytest.raises(ValueError, match=r"running_mean is on cpu but input is on meta"):
        NF.batch_norm(torch.empty(4, 3, device="meta"), torch.zeros(3), torch.ones(3))


def test_functional_argument_checks():
    x = torch.randn(4, 3)
    with pytest.raises(InputError, match=r"running_mean must have shape \(C,\) = \(3,\)"):
        NF.batch_norm(x, torch.zeros(4), torch.ones(4))
    with pytest.raises(InputError, match="required when training=False"):
        NF.batch_norm(x, None, None, training=False)
    with pytest.raises(InputError, match="both running_mean and running_var"):
        NF.batch_norm(x, torch.zeros(3), None, training=True)
    with pytest.raises(InputError, match="at least 2 dims"):
        NF.batch_norm(torch.randn(3), None, None, training=True)
    with pytest.raises(InputError, match="eps must be positive during training"):
        NF.batch_norm(x, None, None, training=True, eps=0.0)
    with pytest.raises(InputTypeError, match=r"input must be a torch\.Tensor"):
        NF.batch_norm([[1.0]], None, None, training=True)
    # errors are also RuntimeErrors, as torch's own are: existing except clauses still work
    with pytest.raises(RuntimeError):
        NF.batch_norm(x, torch.zeros(4), torch.ones(4))


def test_nan_propagates_but_does_not_poison_running_statistics():
    """Decision (docs/math.md): a channel with NaN in the batch keeps its running statistics;
    the output shows the NaN exactly where torch's does; the other channels update as torch."""
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    ours, reference = normdrop.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with pytest.warns(RuntimeWarning, match="non-finite batch statistics"):
        y = ours(x)
    y_ref = reference(x)
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    assert torch.isnan(y[:, 1]).all()
    assert torch.isfinite(ours.running_mean).all() and torch.isfinite(ours.running_var).all()
    assert ours.running_mean[1] == 0 and ours.running_var[1] == 1
    keep = [0, 2]
    assert_close_scaled(ours.running_mean[keep], reference.running_mean[keep], 1e-6)
    assert_close_scaled(ours.running_var[keep], reference.running_var[keep], 1e-6)
    x[2, 1] = float("inf")
    with pytest.warns(RuntimeWarning):
        ours(x)
    assert ours.running_var[1] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours(torch.randn(8, 3))  # finite batches stay silent


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients_with_torch_func(backend):
    """torch.func (vmap over grad, as Opacus-style per-sample gradients do) works in eval mode,
    and vmap over groups of batches works in training without running statistics."""
    from torch.func import functional_call, grad, vmap

    def per_sample_grads(model, x):
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def loss(p, sample):
            return functional_call(model, (p, buffers), (sample.unsqueeze(0),)).pow(2).sum()

        return vmap(grad(loss), in_dims=(None, 0))(params, x)

    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(4, 3), normdrop.nn.BatchNorm1d(3))
    reference = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    reference.load_state_dict(ours.state_dict())
    batch = torch.randn(16, 4) + 1
    for model in (ours, reference):
        model(batch)  # non-trivial running statistics, the same in both
        model.eval()
    x = torch.randn(5, 4)
    with normdrop.use_backend(backend):
        actual = per_sample_grads(ours, x)
    expected = per_sample_grads(reference, x)
    for name in expected:
        assert_close_scaled(actual[name], expected[name], 1e-5)

    groups = torch.randn(4, 6, 3)
    with normdrop.use_backend(backend):
        actual = vmap(normdrop.nn.BatchNorm1d(3, track_running_stats=False))(groups)
    expected = vmap(torch.nn.BatchNorm1d(3, track_running_stats=False))(groups)
    assert_close_scaled(actual, expected, 1e-5)


# ------------------------------------------------------------- PyTorch's own module test samples


def _torch_module_infos():
    """torch's ModuleInfo entries for nn.BatchNorm1d/2d/3d (their samples and error inputs)."""
    common_modules = pytest.importorskip(
        "torch.testing._internal.common_modules", reason="needs expecttest (the dev extra)"
    )
    infos = [info for info in common_modules.module_db if info.module_cls in TORCH_TO_OURS]
    assert len(infos) == 3
    return common_modules, infos


TORCH_TO_OURS = {theirs: ours for ours, theirs in PAIRS.values()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_module_db_samples_match_torch(dtype, backend):
    """Every sample torch's own test suite feeds nn.BatchNorm1d/2d/3d (zero batch, bias=False,
    momentum=None, not affine, not tracking, ...), in training and eval: outputs, input and
    parameter gradients and buffers equal torch's over three steps."""
    _, infos = _torch_module_infos()
    rtol = tolerance(dtype)
    with normdrop.use_backend(backend):
        for info, training in ((i, t) for i in infos for t in (True, False)):
            samples = info.module_inputs_func(
                info, device="cpu", dtype=dtype, requires_grad=True, training=training
            )
            for sample in samples:
                args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
                reference = info.module_cls(*args, **kwargs).to(dtype).train(training)
                ours = TORCH_TO_OURS[info.module_cls](*args, **kwargs).to(dtype).train(training)
                x = sample.forward_input.args[0].detach()
                for _ in range(3):
                    grad = torch.randn(x.shape, dtype=dtype)
                    y_ours, gx_ours = _step(ours, x, grad)
                    y_ref, gx_ref = _step(reference, x, grad)
                    assert_close_scaled(y_ours, y_ref, rtol)
                    assert_close_scaled(gx_ours, gx_ref, rtol)
                for p_ours, p_ref in zip(ours.parameters(), reference.parameters(), strict=True):
                    assert_close_scaled(p_ours.grad, p_ref.grad, rtol)
                _assert_same_state(ours, reference, rtol)


def test_torch_module_db_error_inputs():
    """torch's error inputs for BatchNorm (eps = 0 and eps < 0: constructed, then refused by
    forward with "eps must be positive"), run exactly as torch's test_modules runs them."""
    common_modules, infos = _torch_module_infos()
    checked = 0
    for info in infos:
        error_inputs = info.module_error_inputs_func(
            info, device="cpu", dtype=torch.float32, requires_grad=False, training=True
        )
        for error_input in error_inputs:
            sample = error_input.module_error_input
            args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
            ours_cls = TORCH_TO_OURS[info.module_cls]
            match = error_input.error_regex
            if error_input.error_on == common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR:
                with pytest.raises(error_input.error_type, match=match):
                    ours_cls(*args, **kwargs)
            else:
                module = ours_cls(*args, **kwargs)
                with pytest.raises(error_input.error_type, match=match):
                    module(*sample.forward_input.args, **sample.forward_input.kwargs)
            checked += 1
    assert checked >= 6


def test_torch_opinfo_corner_samples():
    """Samples from PyTorch's own OpInfo for batch_norm: any real momentum (it uses -1.0) and an
    empty 1-D input without statistics."""
    x = torch.randn(3, 2, 3, 4)
    stats_ours = (torch.zeros(2), torch.ones(2))
    stats_ref = (torch.zeros(2), torch.ones(2))
    ours = NF.batch_norm(x, *stats_ours, training=True, momentum=-1.0, eps=0.5)
    ref = torch.nn.functional.batch_norm(x, *stats_ref, training=True, momentum=-1.0, eps=0.5)
    assert_close_scaled(ours, ref, 1e-5)
    for a, b in zip(stats_ours, stats_ref, strict=True):
        assert_close_scaled(a, b, 1e-5)
    empty = torch.empty(0)
    assert NF.batch_norm(empty, None, None, training=True).shape == (0,)
    with pytest.raises(TypeError, match="momentum must be a real number"):
        NF.batch_norm(x, torch.zeros(2), torch.ones(2), training=True, momentum="0.1")


def _detached_copy(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    return value


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_opinfo_samples_match_torch(dtype, backend):
    """Every sample of PyTorch's OpInfos for nn.functional.batch_norm (with and without cudnn:
    0-d to 5-D, statistics or None, training or not, momentum and eps): output, updated
    buffers, and the gradients of every input that requires one equal torch's."""
    methods = pytest.importorskip(
        "torch.testing._internal.common_methods_invocations", reason="needs the dev extra"
    )
    infos = [info for info in methods.op_db if info.name == "nn.functional.batch_norm"]
    assert len(infos) == 2
    rtol, checked = tolerance(dtype), 0
    for info in infos:
        for sample in info.sample_inputs("cpu", dtype, requires_grad=True):
            results = []
            for function in (NF.batch_norm, torch.nn.functional.batch_norm):
                x = _detached_copy(sample.input)
                args = [_detached_copy(a) for a in sample.args]
                with normdrop.use_backend(backend):
                    y = function(x, *args, **sample.kwargs)
                leaves = [t for t in (x, *args) if isinstance(t, torch.Tensor) and t.requires_grad]
                grad = torch.linspace(-1, 1, y.numel(), dtype=dtype).reshape(y.shape)
                grads = torch.autograd.grad(y, leaves, grad) if y.numel() else ()
                buffers = [a for a in args if isinstance(a, torch.Tensor) and not a.requires_grad]
                results.append((y, buffers, grads))
            (y_ours, b_ours, g_ours), (y_ref, b_ref, g_ref) = results
            assert_close_scaled(y_ours, y_ref, rtol)
            for actual, expected in zip((*b_ours, *g_ours), (*b_ref, *g_ref), strict=True):
                assert_close_scaled(actual, expected, rtol)
            checked += 1
    assert checked >= 20


def test_export_in_training_mode_on_the_reference_backend():
    """The non-finite check of the running statistics must not branch on data under tracing."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), normdrop.nn.BatchNorm2d(4)).train()
    x = torch.randn(2, 3, 8, 8)
    with normdrop.use_backend("reference"):
        exported = torch.export.export(model, (x,))
    other = torch.randn(2, 3, 8, 8) + 3
    expected = copy.deepcopy(model)(other)
    assert_close_scaled(exported.module()(other), expected, 1e-5)


def test_torchscript_gives_a_clear_error_and_the_way_out():
    from normdrop.tools import convert

    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), normdrop.nn.BatchNorm1d(4), normdrop.nn.Dropout(0.2)
    )
    with pytest.raises(RuntimeError, match=r"cannot be compiled by torch\.jit\.script"):
        torch.jit.script(model)
    scripted = torch.jit.script(convert(model, to="torch").eval())
    x = torch.randn(5, 3)
    torch.testing.assert_close(scripted(x), model.eval()(x))


class _Exp(torch.nn.Module):
    def forward(self, log_scale):
        return log_scale.exp()


@pytest.mark.parametrize("backend", BACKENDS)
def test_parametrized_weight_and_plain_attribute_match_torch(backend):
    """The forward reads parameters and buffers from the module's registries (nn.Module's
    __getattr__ is slow): a parametrized weight (a property of a generated class) and a weight
    deleted and set back as a plain tensor attribute are still read, as torch reads them."""
    from torch.nn.utils import parametrize

    generator = torch.Generator().manual_seed(5)
    x = torch.randn(16, 3, 4, generator=generator) + 2.0
    grad = torch.randn(x.shape, generator=generator)
    ours, reference = normdrop.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    for module in (ours, reference):
        with torch.no_grad():
            module.weight.copy_(torch.tensor([-0.5, 0.0, 0.3]))  # logs of the scales
        parametrize.register_parametrization(module, "weight", _Exp())
    with normdrop.use_backend(backend):
        for _ in range(2):
            y_ours, gx_ours = _step(ours, x, grad)
            y_ref, gx_ref = _step(reference, x, grad)
            assert_close_scaled(y_ours, y_ref, 1e-5)
            assert_close_scaled(gx_ours, gx_ref, 1e-5)
        log_ours = ours.parametrizations.weight.original
        log_ref = reference.parametrizations.weight.original
        assert_close_scaled(log_ours.grad, log_ref.grad, 1e-5)
        _assert_same_state(ours, reference, 1e-5)

        plain_ours, plain_ref = normdrop.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
        for module in (plain_ours, plain_ref):
            del module.weight
            module.weight = torch.tensor([2.0, -1.0, 0.5])  # now a plain attribute
        assert_close_scaled(plain_ours(x), plain_ref(x), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_call_uses_the_given_tensors(backend):
    """torch.func.functional_call swaps parameters and buffers for one call: the output and
    gradients follow the given tensors, the given buffers are updated in place as torch updates
    them, and the module's own tensors are left alone."""
    from torch.func import functional_call

    generator = torch.Generator().manual_seed(6)
    x = torch.randn(32, 4, generator=generator) * 3 + 1
    results = []
    for cls in (normdrop.nn.BatchNorm1d, torch.nn.BatchNorm1d):
        module = cls(4)
        own = copy.deepcopy(module.state_dict())
        weight = torch.linspace(0.5, 2.0, 4).requires_grad_(True)
        tensors = {
            "weight": weight,
            "bias": torch.linspace(-1.0, 1.0, 4),
            "running_mean": torch.full((4,), 0.5),
            "running_var": torch.full((4,), 2.0),
            "num_batches_tracked": torch.tensor(3),
        }
        with normdrop.use_backend(backend):
            for _ in range(2):  # the second call may take a cached fast path
                y = functional_call(module, tensors, (x,))
        (grad_weight,) = torch.autograd.grad(y.square().sum(), weight)
        for name, value in module.state_dict().items():
            assert torch.equal(value, own[name]), name
        results.append((y, grad_weight, {k: v.detach().clone() for k, v in tensors.items()}))
    (y_ours, g_ours, t_ours), (y_ref, g_ref, t_ref) = results
    assert_close_scaled(y_ours, y_ref, 1e-5)
    assert_close_scaled(g_ours, g_ref, 1e-5)
    for name in t_ref:
        assert_close_scaled(t_ours[name].double(), t_ref[name].double(), 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_tensors_inside_torch_func_transforms_match_torch(backend):
    """Inside grad and vmap, with a plain input and plain parameters (the transform is over a
    scale of the output), and with the module's fast-path cache filled by a call outside: the
    kernels would get wrapped tensors back (detach, the gradients), so the calls take the
    reference, with torch's results; Dropout's mask is then torch's for the same seed."""
    from torch.func import grad, vmap

    generator = torch.Generator().manual_seed(9)
    x = torch.randn(16, 3, generator=generator) + 1.0
    pairs = (
        (normdrop.nn.BatchNorm1d(3).eval(), torch.nn.BatchNorm1d(3).eval()),
        (
            normdrop.nn.BatchNorm1d(3, track_running_stats=False),
            torch.nn.BatchNorm1d(3, track_running_stats=False),
        ),
        (
            normdrop.nn.BatchNormAct1d(3, activation="relu").eval(),
            torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.ReLU()).eval(),
        ),
    )
    scales = torch.tensor([0.5, 1.0, 2.0])
    for ours, reference in pairs:
        results = []
        for module in (ours, reference):
            with normdrop.use_backend(backend):
                module(x)  # fills our module's cache outside the transforms

                def loss(scale, module=module):
                    return (module(x) * scale).pow(2).sum()

                results.append((grad(loss)(torch.tensor(1.5)), vmap(loss)(scales)))
        for actual, expected in zip(*results, strict=True):
            assert_close_scaled(actual, expected, 1e-5)
    dropped = []
    for module in (normdrop.nn.Dropout(0.5), torch.nn.Dropout(0.5)):
        torch.manual_seed(4)
        with normdrop.use_backend(backend):
            dropped.append(
                grad(lambda scale, m=module: (m(x) * scale).pow(2).sum())(torch.ones(()))
            )
    torch.testing.assert_close(dropped[0], dropped[1], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("training", "track"), [(True, False), (False, True)])
def test_torch_func_grad_over_parameters_matches_torch(training, track, backend):
    """torch.func.grad with respect to the parameters, the input a plain tensor: the wrapped
    parameters send the call to the reference (the kernels cannot read them), for BatchNorm and
    the fused BatchNormAct, with torch's gradients."""
    from torch.func import functional_call, grad

    generator = torch.Generator().manual_seed(8)
    x = torch.randn(8, 3, 5, generator=generator) + 1.0
    plain = functools.partial(torch.nn.BatchNorm1d, 3, track_running_stats=track)
    pairs = (
        (normdrop.nn.BatchNorm1d(3, track_running_stats=track), plain()),
        (
            normdrop.nn.BatchNormAct1d(3, activation="relu", track_running_stats=track),
            torch.nn.Sequential(plain(), torch.nn.ReLU()),
        ),
    )
    for ours, reference in pairs:
        grads = []
        for module in (ours, reference):
            module.train(training)
            params = {k: v.detach() for k, v in module.named_parameters()}

            def loss(p, module=module):
                return functional_call(module, p, (x,)).pow(3).sum()

            with normdrop.use_backend(backend):
                grads.append(grad(loss)(params))
        assert len(grads[0]) == len(grads[1]) == 2
        for g_ours, g_ref in zip(grads[0].values(), grads[1].values(), strict=True):
            assert_close_scaled(g_ours, g_ref, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("training", "affine"), [(True, True), (True, False), (False, True)])
def test_forward_mode_ad_matches_torch(training, affine, backend):
    # Tangents on the input and the parameters, through the module (the fast path's Functions
    # have no jvp: dual levels take the reference) and through torch.func.jvp.
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    x, x_t = torch.randn(64, 5, 3, dtype=torch.float64) + 4, torch.randn(64, 5, 3).double()
    ours = normdrop.nn.BatchNorm1d(5, affine=affine).double().train(training)
    theirs = torch.nn.BatchNorm1d(5, affine=affine).double().train(training)
    if affine:
        for module in (ours, theirs):
            module.weight.data = torch.linspace(0.5, 2, 5, dtype=torch.float64)
            module.bias.data = torch.linspace(-1, 1, 5, dtype=torch.float64)
    tangents = {"weight": torch.randn(5).double(), "bias": torch.randn(5).double()}
    outputs = []
    with normdrop.use_backend(backend):
        for module in (ours, theirs):
            params = {n: p.detach() for n, p in module.named_parameters()}
            with fwAD.dual_level():
                duals = {n: fwAD.make_dual(p, tangents[n]) for n, p in params.items()}
                out = torch.func.functional_call(module, duals, (fwAD.make_dual(x, x_t),))
                outputs.append(fwAD.unpack_dual(out))
            # torch.func refuses the in-place running-stat update (torch.nn's too): in training
            # the transformed module tracks none
            plain = copy.deepcopy(module)
            plain.track_running_stats = not training
            _, jvp_out = torch.func.jvp(
                lambda t, m=plain, ps=params: torch.func.functional_call(m, ps, (t,)),
                (x,),
                (x_t,),
            )
            outputs.append((None, jvp_out))
    (y, y_t), (_, jvp_ours), (expected, expected_t), (_, jvp_theirs) = outputs
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(y_t, expected_t)
    torch.testing.assert_close(jvp_ours, jvp_theirs)
    assert ours.running_mean.abs().sum() > 0 or not training  # the running statistics moved


LAYOUTS = {
    "transposed sequence": lambda: torch.randn(4, 7, 3).transpose(1, 2),
    "channels_last": lambda: torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
    "permuted image": lambda: torch.randn(2, 4, 3, 5).transpose(1, 2),
    "swapped spatial": lambda: torch.randn(2, 3, 4, 5).permute(0, 1, 3, 2),
    "strided rows": lambda: torch.randn(6, 3)[::2],
    "transposed (N, C)": lambda: torch.randn(3, 6).t(),
    "channels_last_3d": lambda: torch.randn(2, 3, 2, 3, 4).to(memory_format=torch.channels_last_3d),
    "bfloat16 channels_last": lambda: (
        torch.randn(2, 3, 4, 5).bfloat16().to(memory_format=torch.channels_last)
    ),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_output_and_input_gradient_have_torchs_memory_format(layout, training, backend):
    # ATen writes both in the input's suggested format, not in its strides: after a
    # transposed sequence, .view works on the output.
    x = LAYOUTS[layout]()
    ours, theirs = PAIRS[max(1, x.dim() - 2)]
    results = []
    for module in (ours(x.shape[1]), theirs(x.shape[1])):
        module.to(x.dtype).train(training)
        leaf = x.detach().requires_grad_()
        with normdrop.use_backend(backend):
            y = module(leaf)
            (grad,) = torch.autograd.grad(y, leaf, torch.ones(y.shape, dtype=y.dtype))
        results.append((y, grad))
    (y, grad), (expected, expected_grad) = results
    assert y.stride() == expected.stride() and grad.stride() == expected_grad.stride()
    tol = tolerance(x.dtype)
    torch.testing.assert_close(y, expected, atol=tol, rtol=tol)
    torch.testing.assert_close(grad, expected_grad, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refused_training_call_still_counts_the_batch_like_torch(backend):
    # torch.nn counts before F.batch_norm's checks; with momentum=None the averages depend on it.
    ours, theirs = normdrop.nn.BatchNorm1d(3, momentum=None), torch.nn.BatchNorm1d(3, momentum=None)
    x = torch.randn(8, 3) * 2 + 1
    with normdrop.use_backend(backend):
        for module in (ours, theirs):
            with pytest.raises(ValueError, match="more than 1 value per channel"):
                module(torch.randn(1, 3))
            module(x)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 2
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [None, 0.3])
def test_counter_set_to_none_is_skipped_like_torch(momentum, backend):
    ours = normdrop.nn.BatchNorm2d(3, momentum=momentum)
    theirs = torch.nn.BatchNorm2d(3, momentum=momentum)
    x = torch.randn(4, 3, 2, 2) + 2
    with normdrop.use_backend(backend):
        for module in (ours, theirs):
            module.num_batches_tracked = None
            module(x)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


@pytest.mark.parametrize(
    ("backend", "dtype"),
    [("reference", torch.float32), ("fast", torch.bfloat16)],
)
def test_compile_fullgraph_where_the_reference_math_runs(backend, dtype):
    # The Function with a jvp is kept out of Dynamo's way (it refuses to trace one).
    module = normdrop.nn.BatchNorm2d(3)
    x = torch.randn(8, 3, 4, 4).to(dtype)
    with normdrop.use_backend(backend):
        compiled = torch.compile(copy.deepcopy(module), fullgraph=True, backend="aot_eager")
        tol = tolerance(dtype)
        torch.testing.assert_close(compiled(x), module(x), atol=tol, rtol=tol)


@given(data=st.data())
def test_suggested_memory_format_is_atens(data):
    # Oracle: torch's own Python port (which fails under jit.trace, hence ours).
    from torch._prims_common import suggest_memory_format as torchs

    rank = data.draw(st.sampled_from([2, 3, 4, 5]))
    sizes = [data.draw(st.integers(0, 4)) for _ in range(rank)]
    x = torch.randn([max(1, s) * 2 for s in sizes])
    x = x.permute(data.draw(st.permutations(range(rank))))
    x = x[tuple(slice(0, s, data.draw(st.sampled_from([1, 2]))) for s in sizes)]
    if rank > 3 and data.draw(st.booleans()):
        x = x.contiguous(memory_format=torch.channels_last if rank == 4 else torch.channels_last_3d)
    assert NF.suggest_memory_format(x) == torchs(x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_variance_that_overflows_gives_torchs_zeros_not_nan(backend):
    # Finite float32 values whose squares overflow: the variance is inf, the output 0 (invstd 0)
    x = torch.tensor([[2.7e29], [6.2e29], [-1.7e29], [3.8e29], [-5.6e29], [-5.8e28]])
    ours, theirs = normdrop.nn.BatchNorm1d(1), torch.nn.BatchNorm1d(1)
    with normdrop.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the running statistics are skipped, with a warning
        torch.testing.assert_close(ours(x), theirs(x))
    mean, var = NF.batch_statistics(x)
    assert torch.isfinite(mean).all() and torch.isinf(var).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_in_training_with_unbatched_running_stats_is_named(backend):
    """As torch's message: the in-place update of unbatched buffers cannot take a batched
    input (vmap's own error asked the user to file a bug report)."""
    with normdrop.use_backend(backend):
        with pytest.raises(InputError, match=r"batched by torch\.func\.vmap.*track_running_stats"):
            torch.func.vmap(normdrop.nn.BatchNorm2d(3))(torch.randn(5, 2, 3, 4, 4))
        layer = normdrop.nn.BatchNorm2d(3, track_running_stats=False)
        x = torch.randn(5, 2, 3, 4, 4)
        torch.testing.assert_close(torch.func.vmap(layer)(x), torch.stack([layer(b) for b in x]))


def test_a_negated_view_is_read_as_its_values():
    """torch._neg_view's memory holds -x: the kernels, which read memory, must not take it."""
    x = torch._neg_view(torch.randn(2, 3, 4, 4) + 1)
    ours, theirs = normdrop.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    weight = torch._neg_view(torch.full((3,), -2.0))  # a (C,) one: .numpy() refused it
    plain = x.resolve_neg()
    expected = torch.nn.functional.batch_norm(plain, None, None, weight.clone(), training=True)
    ours = dispatch.batch_norm(plain, None, None, weight, None, True, 0.1, 1e-5)  # the modules'
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("shape", [(4, 5, 3, 3), (2, 3, 3)])  # wrong channels / wrong rank
def test_a_refused_input_counts_a_batch_exactly_when_torch_counts_it(shape):
    """torch.nn checks the rank, counts the batch, then F.batch_norm refuses the channels."""
    ours, theirs = normdrop.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    for module in (ours, theirs):
        with pytest.raises((ValueError, RuntimeError)):
            module(torch.randn(shape))
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item()
    assert theirs.num_batches_tracked.item() == (1 if len(shape) == 4 else 0)


@pytest.mark.parametrize("shape", [(1, 0), (1, 0, 5), (2, 0), (0, 3)])
def test_empty_inputs_in_training_follow_torchs_batch_size_rule(shape):
    """torch checks N times the spatial size before ATen answers an empty input: (1, 0) is a
    batch of one value per channel, (1, 0, 5) and (2, 0) are not."""
    x = torch.randn(shape)
    try:
        expected = torch.nn.functional.batch_norm(x, None, None, training=True)
    except ValueError as error:
        with pytest.raises(InputError, match=re.escape(str(error))):
            NF.batch_norm(x, None, None, training=True)
    else:
        assert NF.batch_norm(x, None, None, training=True).shape == expected.shape
