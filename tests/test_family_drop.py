"""DropPath, DropBlock2d, DropConnect, GaussianDropout: against torchvision's algorithms written
out here (same seed, same mask), exact float64 formulas, and statistical checks with real
intervals (scipy's binomial and chi-square quantiles, 99.99%)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import normdrop.nn as ndnn
from normdrop.errors import InputError, InputTypeError
from normdrop.nn.drop import (
    block_mask,
    drop_block2d,
    drop_block_gamma,
    drop_path,
    gaussian_dropout,
)

CONFIDENCE = 0.9999


def _generator(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------
# DropPath
# --------------------------------------------------------------------------------------------


def _torchvision_stochastic_depth(x, p, mode, generator, scale=True):
    """torchvision.ops.stochastic_depth, written out (timm's drop_path is the same)."""
    survival = 1.0 - p
    size = [x.shape[0]] + [1] * (x.dim() - 1) if mode == "row" else [1] * x.dim()
    noise = torch.empty(size, dtype=x.dtype).bernoulli_(survival, generator=generator)
    if survival > 0.0 and scale:
        noise.div_(survival)
    return x * noise


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    p=st.sampled_from([0.2, 0.5, 0.9, 1.0]),
    mode=st.sampled_from(["row", "batch"]),
    scale=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_drop_path_equals_torchvision_for_the_same_seed(shape, p, mode, scale, dtype, seed):
    x = torch.randn(shape, dtype=dtype).requires_grad_()
    layer = ndnn.DropPath(p, mode=mode, scale_by_keep=scale, generator=_generator(seed))
    out = layer(x)
    expected = _torchvision_stochastic_depth(x.detach(), p, mode, _generator(seed), scale)
    assert torch.equal(out, expected)
    out.sum().backward()
    assert torch.equal(x.grad, _torchvision_stochastic_depth(torch.ones_like(x), p, mode,
                                                             _generator(seed), scale))  # fmt: skip


def test_drop_path_keep_rate_is_binomial_and_rows_are_whole():
    p, n = 0.3, 20000
    out = drop_path(torch.ones(n, 3, 2), p, generator=_generator(0))
    rows = out.flatten(1)
    assert torch.all((rows == 0).all(1) | (rows == 1 / (1 - p)).all(1))  # whole samples
    kept = int((rows[:, 0] > 0).sum())
    low, high = stats.binom.interval(CONFIDENCE, n, 1 - p)
    assert low <= kept <= high
    batch = drop_path(torch.ones(50, 4), 0.5, mode="batch", generator=_generator(1))
    assert batch.unique().numel() == 1  # one draw for the whole batch


def test_drop_path_identity_cases_and_errors():
    x = torch.randn(4, 3)
    assert ndnn.DropPath(0.5).eval()(x) is x
    assert ndnn.DropPath(0.0)(x) is x
    assert torch.equal(drop_path(torch.full((3, 2), math.nan), 1.0).isnan(), torch.ones(3, 2,
                       dtype=torch.bool))  # fmt: skip  # x * 0: NaN stays NaN
    with pytest.raises(InputError, match="mode"):
        ndnn.DropPath(0.1, mode="sample")
    with pytest.raises(InputError, match="between 0 and 1"):
        ndnn.DropPath(1.5)
    with pytest.raises(InputError, match="batch dimension"):
        drop_path(torch.tensor(1.0), 0.5)
    integers = torch.ones(2, 3, dtype=torch.long)
    assert ndnn.DropPath(0.5).eval()(integers) is integers  # eval is the identity, any dtype
    with pytest.raises(InputTypeError, match="floating-point"):
        ndnn.DropPath(0.5)(integers)
    with pytest.raises(InputTypeError, match="scale_by_keep must be True or False"):
        ndnn.DropPath(0.5, scale_by_keep="no")


# --------------------------------------------------------------------------------------------
# DropBlock
# --------------------------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(
    p=st.floats(0, 1),
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    data=st.data(),
)
def test_gamma_is_the_papers_and_torchvisions_formula(p, height, width, data):
    block = data.draw(st.integers(1, min(height, width)))
    # torchvision.ops.drop_block2d's line, in float64.
    expected = (p * height * width) / ((block**2) * ((height - block + 1) * (width - block + 1)))
    assert drop_block_gamma(p, block, height, width) == pytest.approx(expected, rel=1e-15)
    assert drop_block_gamma(p, block, height, width) <= p + 1e-15  # a valid probability


def _torchvision_drop_block2d(x, p, block, generator, eps=1e-6):
    """torchvision.ops.drop_block2d (odd block sizes), written out."""
    n, c, h, w = x.shape
    gamma = (p * h * w) / ((block**2) * ((h - block + 1) * (w - block + 1)))
    noise = torch.empty((n, c, h - block + 1, w - block + 1), dtype=x.dtype)
    noise.bernoulli_(gamma, generator=generator)
    noise = torch.nn.functional.pad(noise, [block // 2] * 4, value=0)
    noise = torch.nn.functional.max_pool2d(
        noise, stride=(1, 1), kernel_size=(block, block), padding=block // 2
    )
    noise = 1 - noise
    return x * noise * (noise.numel() / (eps + noise.sum()))


@settings(max_examples=25, deadline=None)
@given(
    block=st.sampled_from([1, 3, 5]),
    size=st.tuples(st.integers(5, 9), st.integers(5, 9)),
    p=st.sampled_from([0.1, 0.4, 0.9]),
    seed=st.integers(0, 2**16),
)
def test_per_channel_mask_equals_torchvision_for_the_same_seed(block, size, p, seed):
    x = torch.randn(3, 4, *size, dtype=torch.float64)
    ours = drop_block2d(x, p, block, per_channel=True, generator=_generator(seed))
    expected = _torchvision_drop_block2d(x, p, block, _generator(seed))
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block", [1, 2, 3, 4])
def test_each_seed_clears_exactly_its_block(block):
    """Odd and even sizes: the mask is the union of b x b squares at the seeds (loops)."""
    generator = _generator(block)
    height, width = 9, 7
    seeds = torch.empty(2, 3, height - block + 1, width - block + 1)
    seeds.bernoulli_(0.15, generator=generator)
    expected = torch.zeros(2, 3, height, width)
    for n, c, i, j in seeds.nonzero().tolist():
        expected[n, c, i : i + block, j : j + block] = 1
    assert torch.equal(block_mask(seeds, block), expected)


def test_kept_fraction_matches_the_exact_expectation():
    """P(unit kept) = (1 - gamma)^k, k = number of seed positions whose block covers it."""
    p, block, height, width = 0.25, 4, 10, 9
    gamma = drop_block_gamma(p, block, height, width)
    cover_i = [min(i, height - block) - max(0, i - block + 1) + 1 for i in range(height)]
    cover_j = [min(j, width - block) - max(0, j - block + 1) + 1 for j in range(width)]
    expected = sum((1 - gamma) ** (ki * kj) for ki in cover_i for kj in cover_j)
    expected /= height * width
    x = torch.ones(500, 8, height, width, dtype=torch.float64)
    out = drop_block2d(x, p, block, per_channel=True, generator=_generator(0))
    kept = (out > 0).double().mean(dim=(2, 3)).flatten()  # 4000 independent masks
    z = stats.norm.ppf(0.5 + CONFIDENCE / 2)
    assert abs(kept.mean().item() - expected) <= z * kept.std().item() / math.sqrt(kept.numel())
    # ... and the rescaling keeps the mean of the output at the mean of the input.
    assert out.mean().item() == pytest.approx(1.0, rel=1e-5)


def test_shared_mask_is_the_same_for_every_channel():
    x = torch.randn(4, 6, 8, 8)
    out = ndnn.DropBlock2d(0.5, 3, per_channel=False, generator=_generator(3))(x)
    dropped = out == 0
    assert dropped.any()
    assert torch.equal(dropped, dropped[:, :1].expand_as(dropped))


def test_default_mask_is_per_channel_as_torchvisions():
    """The default draws a mask per (sample, channel), as the paper, torchvision and timm: bit
    for bit torchvision's mask for the same seed (odd block), and channels differ."""
    x = torch.randn(4, 6, 9, 9)
    ours = ndnn.DropBlock2d(0.3, 3, generator=_generator(5))(x)
    assert torch.equal(ours, drop_block2d(x, 0.3, 3, per_channel=True, generator=_generator(5)))
    dropped = ours == 0
    assert not torch.equal(dropped, dropped[:, :1].expand_as(dropped))


def test_drop_block_identity_cases_and_errors():
    x = torch.randn(2, 3, 5, 5)
    assert ndnn.DropBlock2d(0.5, 3).eval()(x) is x
    assert drop_block2d(x, 0.0, 3) is x
    with pytest.raises(InputError, match="block_size=6 is larger than the 5x5 feature map"):
        ndnn.DropBlock2d(0.1, 6)(x)
    # where nothing is dropped (eval, p = 0) any map size is fine: the layer is the identity
    assert ndnn.DropBlock2d(0.1, 6).eval()(x) is x
    assert drop_block2d(x, 0.0, 6) is x
    with pytest.raises(InputError, match=r"\(N, C, H, W\)"):
        ndnn.DropBlock2d(0.1, 3)(torch.randn(3, 5, 5))
    with pytest.raises(InputError, match="block_size must be a positive int"):
        ndnn.DropBlock2d(0.1, 0)
    with pytest.raises(InputTypeError, match="block_size"):
        ndnn.DropBlock2d(0.1, 2.0)
    with pytest.raises(InputError, match="between 0 and 1"):
        drop_block2d(x, -0.1, 3)
    integers = torch.ones(2, 3, 5, 5, dtype=torch.long)
    assert ndnn.DropBlock2d(0.5, 3).eval()(integers) is integers
    with pytest.raises(InputTypeError, match="per_channel must be True or False"):
        ndnn.DropBlock2d(0.1, 3, per_channel="no")
    for eps in (math.nan, -1.0, math.inf):
        with pytest.raises(InputError, match="eps must be a finite real number >= 0"):
            ndnn.DropBlock2d(0.1, 3, eps=eps)
    with pytest.raises(InputTypeError, match="eps"):
        drop_block2d(x, 0.1, 3, eps="1e-6")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_drop_block_with_everything_dropped_gives_zeros_not_nan(dtype):
    # The scale numel / eps overflows float16; the docstring promises finite output anyway.
    x = torch.randn(2, 3, 4, 4, dtype=dtype, requires_grad=True)
    y = drop_block2d(x, 1.0, 4)
    y.sum().backward()
    assert torch.equal(y, torch.zeros_like(y))
    assert torch.equal(x.grad, torch.zeros_like(x.grad))
    kept = drop_block2d(x.detach(), 0.3, 2, generator=_generator(1))  # and survivors scaled
    assert torch.isfinite(kept).all() and (kept != 0).any()


# --------------------------------------------------------------------------------------------
# DropConnect
# --------------------------------------------------------------------------------------------


def _masked_weight(weight, p, seed):
    """Inverted dropout of the weight, as torch draws it: bernoulli_ in the weight's dtype."""
    keep = torch.empty_like(weight).bernoulli_(1 - p, generator=_generator(seed))
    return weight * keep / (1 - p)


@pytest.mark.parametrize(
    ("layer", "shape", "functional"),
    [
        (torch.nn.Linear(6, 4), (5, 6), lambda m, x, w: torch.nn.functional.linear(x, w, m.bias)),
        (torch.nn.Conv2d(3, 4, 3, padding=1), (2, 3, 5, 5),
         lambda m, x, w: torch.nn.functional.conv2d(x, w, m.bias, padding=1)),
        (torch.nn.ConvTranspose1d(3, 2, 3, stride=2), (2, 3, 4),
         lambda m, x, w: torch.nn.functional.conv_transpose1d(x, w, m.bias, stride=2)),
    ],
)  # fmt: skip
def test_drop_connect_runs_the_layer_with_a_masked_weight(layer, shape, functional):
    layer = layer.double()
    wrapped = ndnn.DropConnect(layer, p=0.4, generator=_generator(7))
    x = torch.randn(shape, dtype=torch.float64)
    out = wrapped(x)
    weight = layer.weight.detach().clone().requires_grad_()
    expected = functional(layer, x, _masked_weight(weight, 0.4, 7))
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(layer.weight.grad, weight.grad)  # only kept weights learn
    assert (layer.weight.grad == 0).any()
    wrapped.eval()
    torch.testing.assert_close(wrapped(x), layer(x))
    assert list(wrapped.state_dict()) == [f"module.{k}" for k in layer.state_dict()]


@pytest.mark.parametrize("parametrization", ["weight_norm", "spectral_norm"])
def test_drop_connect_masks_a_parametrized_weight_without_touching_its_parameters(
    parametrization,
):
    """A weight_norm / spectral_norm layer: the mask applies to the effective weight, the
    parametrization's parameters keep their values and get their gradients. functional_call
    wrote the masked weight back through right_inverse: spectral_norm's parameter changed and
    weight_norm's backward failed ("modified by an inplace operation")."""
    wrap = getattr(torch.nn.utils.parametrizations, parametrization)
    layer = wrap(torch.nn.Linear(6, 4)).double()
    reference = copy.deepcopy(layer)  # same power-iteration state for spectral_norm
    before = {name: p.detach().clone() for name, p in layer.named_parameters()}
    x = torch.randn(5, 6, dtype=torch.float64)
    wrapped = ndnn.DropConnect(layer, p=0.4, generator=_generator(3))
    out = wrapped(x)
    out.square().sum().backward()
    expected = torch.nn.functional.linear(
        x, _masked_weight(reference.weight, 0.4, 3), reference.bias
    )
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for name, p in layer.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
    for ours, theirs in zip(layer.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-12, atol=1e-12)
    assert len(layer.parametrizations.weight) == 1  # the mask left the chain
    assert layer.state_dict().keys() == reference.state_dict().keys()


@pytest.mark.parametrize("hook", ["prune", "weight_norm (hook-based)"])
def test_drop_connect_masks_a_weight_that_a_forward_pre_hook_makes(hook):
    """prune and the old weight_norm recompute .weight in a forward pre-hook, which wrote over
    the masked weight: the layer ran undropped. The mask now goes on after their hook, their
    parameters get the gradients, and the layer's weight is theirs again after the call."""
    import warnings

    import torch.nn.utils.prune

    layer = torch.nn.Linear(6, 4).double()
    reference = copy.deepcopy(layer)  # before the hook: weight_norm's layers do not deep-copy
    for module in (layer, reference):
        if hook == "prune":
            torch.nn.utils.prune.l1_unstructured(module, "weight", amount=0.5)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # deprecated: parametrizations
                torch.nn.utils.weight_norm(module)
    sources = ["weight_orig"] if hook == "prune" else ["weight_g", "weight_v"]
    x = torch.randn(5, 6, dtype=torch.float64)
    wrapped = ndnn.DropConnect(layer, p=0.9, generator=_generator(5))
    out = wrapped(x)
    reference(x)  # its pre-hook makes its weight from its parameters, with a graph
    expected = torch.nn.functional.linear(
        x, _masked_weight(reference.weight, 0.9, 5), reference.bias
    )
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(out, reference(x))  # something was dropped
    out.square().sum().backward()
    expected.square().sum().backward()
    for name in sources:
        torch.testing.assert_close(
            getattr(layer, name).grad, getattr(reference, name).grad, rtol=1e-12, atol=1e-12
        )
    torch.testing.assert_close(layer.weight, reference.weight)  # undropped again
    wrapped.eval()
    torch.testing.assert_close(wrapped(x), reference(x))


def test_drop_connect_errors():
    with pytest.raises(InputTypeError, match="Linear, Conv1d/2d/3d"):
        ndnn.DropConnect(torch.nn.ReLU())
    with pytest.raises(InputError, match="between 0 and 1"):
        ndnn.DropConnect(torch.nn.Linear(2, 2), p=2)


# --------------------------------------------------------------------------------------------
# Gaussian dropout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_gaussian_noise_has_mean_one_and_variance_p_over_one_minus_p(p):
    n = 200_000
    noise = gaussian_dropout(torch.ones(n, dtype=torch.float64), p, generator=_generator(5))
    variance = p / (1 - p)
    z = stats.norm.ppf(0.5 + CONFIDENCE / 2)
    assert abs(noise.mean().item() - 1) <= z * math.sqrt(variance / n)
    low, high = stats.chi2.interval(CONFIDENCE, n - 1)
    assert low <= (n - 1) * noise.var().item() / variance <= high
    # Normal, not just the right moments: a Kolmogorov-Smirnov test.
    sample = ((noise[:5000] - 1) / math.sqrt(variance)).numpy()
    assert stats.kstest(sample, "norm").pvalue > 1 - CONFIDENCE


def test_gaussian_dropout_identity_cases_gradient_and_errors():
    x = torch.randn(3, 4, requires_grad=True)
    assert ndnn.GaussianDropout(0.5).eval()(x) is x
    assert ndnn.GaussianDropout(0.0)(x) is x
    out = ndnn.GaussianDropout(0.5, generator=_generator(1))(x)
    out.sum().backward()
    noise = gaussian_dropout(torch.ones(3, 4), 0.5, generator=_generator(1))
    torch.testing.assert_close(x.grad, noise)
    torch.testing.assert_close(out, x * noise)
    with pytest.raises(InputError, match="p must be < 1"):
        ndnn.GaussianDropout(1.0)
    with pytest.raises(InputError, match="between 0 and 1"):
        gaussian_dropout(x, -0.5)
    integers = torch.ones(2, 3, dtype=torch.long)
    assert ndnn.GaussianDropout(0.5).eval()(integers) is integers


def test_same_global_seed_same_noise_for_every_layer():
    x = torch.randn(4, 3, 6, 6)
    for layer in (ndnn.DropPath(0.5), ndnn.DropBlock2d(0.3, 3), ndnn.GaussianDropout(0.3),
                  ndnn.DropConnect(torch.nn.Conv2d(3, 3, 1))):  # fmt: skip
        torch.manual_seed(11)
        first = layer(x)
        torch.manual_seed(11)
        assert torch.equal(layer(x), first)
        assert not torch.equal(layer(x), first)  # and the stream moves on


def test_noise_does_not_depend_on_the_thread_count():
    x = torch.randn(32, 8, 16, 16)
    draws = []
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            draws.append(
                (
                    drop_block2d(x, 0.3, 5, per_channel=True, generator=_generator(0)),
                    drop_block2d(x, 0.3, 4, generator=_generator(0)),
                    gaussian_dropout(x, 0.3, generator=_generator(0)),
                    drop_path(x, 0.3, generator=_generator(0)),
                )
            )
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*draws, strict=True):
        assert torch.equal(one, two)


@pytest.mark.parametrize(
    "make",
    [
        lambda g: ndnn.DropPath(0.2, generator=g),
        lambda g: ndnn.DropBlock2d(0.2, 3, generator=g),
        lambda g: ndnn.DropConnect(torch.nn.Linear(3, 3), 0.2, generator=g),
        lambda g: ndnn.GaussianDropout(0.2, generator=g),
    ],
)
def test_a_generator_that_is_not_one_is_named_at_construction(make):
    """Not at the first training forward, by torch's bernoulli_ or normal_."""
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator or None, got int"):
        make(0)
    make(torch.Generator().manual_seed(0))
