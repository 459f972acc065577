"""The family against oracles written here in plain float64 torch, over drawn shapes and layouts.

Each oracle is the paper's definition spelled out, not another library: Ghost BatchNorm as
per-chunk statistics and sequential moving averages (Hoffer et al. 2017), DropBlock as the union
of ``b x b`` squares at Bernoulli seeds (Ghiasi et al. 2018), BatchNormAct as BN -> activation ->
inverted dropout, and torchvision's ``FrozenBatchNorm2d`` copied out. Plus what every layer
must survive: deep copy, pickle, dtype moves and batches without values.
"""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import normdrop.nn as ndnn
from normdrop.nn.drop import drop_block2d

from _helpers import TorchvisionFrozenBatchNorm2d

F = torch.nn.functional


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other element of a wider tensor
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def _per_channel(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view(1, -1, *([1] * (ndim - 2)))


# --------------------------------------------------------------------------------------------
# GhostBatchNorm: statistics per virtual batch, one running update per ghost batch
# --------------------------------------------------------------------------------------------


def _ghost_oracle(x, virtual, gamma, beta, eps, state, momentum):
    """Hoffer et al. 2017, Algorithm 1: each chunk of ``virtual`` samples normalized by its
    own mean and biased variance; the running statistics (unbiased variance) move towards each
    chunk in turn. ``state`` holds mean, var and the step count; updated in place."""
    dims = [0, *range(2, x.dim())]
    outputs = []
    for chunk in x.split(virtual):
        mu = chunk.mean(dims)
        centered = chunk - _per_channel(mu, x.dim())
        var = centered.square().mean(dims)
        y = centered / _per_channel(torch.sqrt(var + eps), x.dim())
        outputs.append(y * _per_channel(gamma, x.dim()) + _per_channel(beta, x.dim()))
        m = chunk.numel() // chunk.shape[1]
        factor = 1 / (state["steps"] + 1) if momentum is None else momentum
        with torch.no_grad():
            state["mean"] = (1 - factor) * state["mean"] + factor * mu
            state["var"] = (1 - factor) * state["var"] + factor * var * m / (m - 1)
        state["steps"] += 1
    return torch.cat(outputs)


@settings(max_examples=25, deadline=None)
@given(
    ghosts=st.integers(1, 3),
    virtual=st.integers(1, 4),
    channels=st.integers(1, 3),
    spatial=st.sampled_from([(), (1,), (5,), (3, 2), (1, 4)]),
    layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
    momentum=st.sampled_from([0.1, 0.9, None]),
    eps=st.sampled_from([1e-5, 0.5]),
    seed=st.integers(0, 2**16),
)
def test_ghost_batchnorm_is_per_chunk_batchnorm_with_sequential_running_updates(
    ghosts, virtual, channels, spatial, layout, momentum, eps, seed
):
    if virtual * math.prod(spatial) < 2:
        return  # one value per channel and ghost batch: refused (tested elsewhere)
    generator = torch.Generator().manual_seed(seed)
    cls = ndnn.GhostBatchNorm2d if len(spatial) == 2 else ndnn.GhostBatchNorm1d
    layer = cls(channels, virtual, eps=eps, momentum=momentum, dtype=torch.float64)
    gamma = torch.rand(channels, generator=generator, dtype=torch.float64) + 0.5
    beta = torch.randn(channels, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.copy_(gamma)
        layer.bias.copy_(beta)
    gamma.requires_grad_(), beta.requires_grad_()
    state = {
        "mean": torch.zeros(channels, dtype=torch.float64),
        "var": torch.ones(channels, dtype=torch.float64),
        "steps": 0,
    }
    for step in range(2):
        shape = (ghosts * virtual, channels, *spatial)
        x = torch.randn(shape, generator=generator, dtype=torch.float64) * (step + 2) + 10
        grad = torch.randn(shape, generator=generator, dtype=torch.float64)
        ours = _layout(x.clone(), layout).requires_grad_()
        theirs = x.clone().requires_grad_()
        layer.zero_grad()
        gamma.grad = beta.grad = None
        out = layer(ours)
        expected = _ghost_oracle(theirs, virtual, gamma, beta, eps, state, momentum)
        out.backward(grad)
        expected.backward(grad)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(layer.weight.grad, gamma.grad, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(layer.bias.grad, beta.grad, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(layer.running_mean, state["mean"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.running_var, state["var"], rtol=1e-10, atol=1e-10)
        assert int(layer.num_batches_tracked) == state["steps"] == (step + 1) * ghosts
        if layout == "channels_last" and x.dim() == 4:
            assert out.is_contiguous(memory_format=torch.channels_last)
    # Eval: BatchNorm with the running statistics, any batch size (here 1).
    layer.eval()
    probe = x[:1]
    scale = _per_channel(gamma / torch.sqrt(state["var"] + eps), x.dim())
    expected = (probe - _per_channel(state["mean"], x.dim())) * scale
    expected = expected + _per_channel(beta, x.dim())
    torch.testing.assert_close(layer(probe), expected, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------------
# DropBlock: the union of b x b squares at the seeds, rescaled by the kept fraction
# --------------------------------------------------------------------------------------------


def _drop_block_oracle(x, p, block, per_channel, seed, eps=1e-6):
    """Seeds drawn as the layer draws them (bernoulli_ in the input's dtype on the grid of
    valid block corners), the mask built by loops, in float64."""
    n, c, height, width = x.shape
    gamma = p * height * width / (block**2 * (height - block + 1) * (width - block + 1))
    grid = (n, c if per_channel else 1, height - block + 1, width - block + 1)
    seeds = torch.empty(grid, dtype=x.dtype)
    seeds.bernoulli_(gamma, generator=torch.Generator().manual_seed(seed))
    dropped = torch.zeros(n, grid[1], height, width, dtype=torch.float64)
    for i, k, row, col in seeds.nonzero().tolist():
        dropped[i, k, row : row + block, col : col + block] = 1
    keep = 1 - dropped
    return x.double() * keep * (keep.numel() / (eps + keep.sum()))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(1, 3),
    height=st.integers(1, 9),
    width=st.integers(1, 9),
    p=st.sampled_from([0.05, 0.3, 0.7, 1.0]),
    per_channel=st.booleans(),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]),
    layout=st.sampled_from(["contiguous", "channels_last", "strided"]),
    data=st.data(),
)
def test_drop_block_is_the_union_of_squares_at_the_seeds(
    n, c, height, width, p, per_channel, dtype, layout, data
):
    block = data.draw(st.integers(1, min(height, width)))
    seed = data.draw(st.integers(0, 2**16))
    x = _layout(torch.randn(n, c, height, width, dtype=torch.float64).to(dtype), layout)
    generator = torch.Generator().manual_seed(seed)
    out = drop_block2d(x, p, block, per_channel=per_channel, generator=generator)
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    expected = _drop_block_oracle(x, p, block, per_channel, seed)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)


def test_shared_mask_drops_the_expected_fraction():
    """per_channel=False: P(unit kept) = (1 - gamma)^k as for the per-channel mask (k seed
    positions cover the unit), over 3,000 independent masks, and channels share the mask."""
    p, block, height, width = 0.3, 3, 8, 11
    gamma = p * height * width / (block**2 * (height - block + 1) * (width - block + 1))
    cover_i = [min(i, height - block) - max(0, i - block + 1) + 1 for i in range(height)]
    cover_j = [min(j, width - block) - max(0, j - block + 1) + 1 for j in range(width)]
    expected = sum((1 - gamma) ** (a * b) for a in cover_i for b in cover_j) / (height * width)
    x = torch.ones(3000, 2, height, width, dtype=torch.float64)
    out = drop_block2d(x, p, block, per_channel=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, 0], out[:, 1])
    kept = (out[:, 0] > 0).double().mean(dim=(1, 2))
    z = stats.norm.ppf(0.99995)
    assert abs(kept.mean().item() - expected) <= z * kept.std().item() / math.sqrt(kept.numel())


# --------------------------------------------------------------------------------------------
# BatchNormAct: BN -> activation -> inverted dropout
# --------------------------------------------------------------------------------------------

_ACTIVATIONS = {
    "identity": lambda t, slope: t,
    "relu": lambda t, slope: F.relu(t),
    "leaky_relu": lambda t, slope: F.leaky_relu(t, slope),
    "gelu": lambda t, slope: F.gelu(t),
}


@settings(max_examples=25, deadline=None)
@given(
    activation=st.sampled_from(sorted(_ACTIVATIONS)),
    slope=st.sampled_from([0.01, 0.2, 1.5]),
    p=st.sampled_from([0.0, 0.25, 0.6]),
    spatial=st.sampled_from([(), (4,), (3, 5)]),
    training=st.booleans(),
    track=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_batchnorm_act_is_batchnorm_then_activation_then_dropout(
    activation, slope, p, spatial, training, track, seed
):
    """p = 0: exactly BN -> act (outputs, gradients, running statistics). p > 0: every
    output is 0 or act(bn(x)) / (1 - p), and the gradient is the chain's with that mask
    (identity, leaky_relu and gelu are almost surely nonzero, so the zeros are the mask)."""
    generator = torch.Generator().manual_seed(seed)
    channels = 3
    cls = ndnn.BatchNormAct2d if len(spatial) == 2 else ndnn.BatchNormAct1d
    options = {"track_running_stats": track, "dtype": torch.float64}
    fused = cls(channels, activation, p, negative_slope=slope, **options).train(training)
    plain_cls = torch.nn.BatchNorm2d if len(spatial) == 2 else torch.nn.BatchNorm1d
    plain = plain_cls(channels, **options).train(training)
    with torch.no_grad():
        fused.weight.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
        fused.bias.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
        if track:
            fused.running_mean.uniform_(-1, 1, generator=generator)
            fused.running_var.uniform_(0.5, 2, generator=generator)
    plain.load_state_dict(fused.state_dict())  # same keys both ways
    shape = (6, channels, *spatial)
    x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1
    grad = torch.randn(shape, generator=generator, dtype=torch.float64)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = fused(ours)
    expected = _ACTIVATIONS[activation](plain(theirs), slope)
    dropping = training and p > 0
    if dropping and activation != "relu":
        keep = (out != 0).double()
        expected = expected * keep / (1 - p)
    if dropping and activation == "relu":  # a zero may be ReLU's: compare where kept
        kept = out != 0
        torch.testing.assert_close(out[kept], expected[kept] / (1 - p), rtol=1e-10, atol=1e-10)
        return
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(fused.weight.grad, plain.weight.grad, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(fused.bias.grad, plain.bias.grad, rtol=1e-8, atol=1e-8)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, rtol=1e-12, atol=1e-12)


def test_batchnorm_act_keeps_a_binomial_share_per_element():
    p, shape = 0.3, (400, 5, 10)
    layer = ndnn.BatchNormAct1d(5, "identity", p)
    dropped = layer(torch.randn(shape)) == 0
    low, high = stats.binom.interval(0.9999, dropped.numel(), p)
    assert low <= int(dropped.sum()) <= high
    # Element-wise, not per channel or per sample: pairs drop independently.
    both = int((dropped[:, 0] & dropped[:, 1]).sum())
    low, high = stats.binom.interval(0.9999, dropped[:, 0].numel(), p * p)
    assert low <= both <= high
    assert not (layer.eval()(torch.randn(shape)) == 0).any()  # no dropout in eval


# --------------------------------------------------------------------------------------------
# FrozenBatchNorm2d against torchvision's
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [1e-5, 1e-3])
def test_frozen_batchnorm_loads_from_and_into_torchvisions(eps):
    generator = torch.Generator().manual_seed(0)
    theirs = TorchvisionFrozenBatchNorm2d(4, eps).double()
    for buffer in theirs.buffers():
        buffer.copy_(torch.rand(4, generator=generator, dtype=torch.float64) + 0.2)
    ours = ndnn.FrozenBatchNorm2d(4, eps, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())  # strict: no num_batches_tracked there
    x = _layout(torch.randn(3, 4, 5, 6, generator=generator, dtype=torch.float64), "strided")
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-12, atol=1e-12)
    back = TorchvisionFrozenBatchNorm2d(4, eps).double()
    back.load_state_dict(ours.state_dict())  # strict: ours has num_batches_tracked
    torch.testing.assert_close(back(x), ours(x), rtol=1e-12, atol=1e-12)
    # And to a trainable BatchNorm and back, counter included.
    with torch.no_grad():
        ours.num_batches_tracked.fill_(9)
    bn = torch.nn.BatchNorm2d(4, eps=eps, dtype=torch.float64)
    bn.load_state_dict(ours.state_dict())
    assert int(bn.num_batches_tracked) == 9
    torch.testing.assert_close(bn.eval()(x), ours(x), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# What every layer survives
# --------------------------------------------------------------------------------------------


def _family():
    """(layer, input shape) for every member, in training mode."""
    return [
        (ndnn.GhostBatchNorm2d(3, 2), (4, 3, 3, 3)),
        (ndnn.GhostBatchNorm1d(3, 2, momentum=None), (4, 3, 5)),
        (ndnn.BatchRenorm2d(3, rmax=2.0, dmax=1.0), (4, 3, 3, 3)),
        (ndnn.BatchRenorm1d(3, momentum=None, warmup_steps=1), (4, 3)),
        (ndnn.FrozenBatchNorm1d(3), (4, 3, 2)),
        (ndnn.FrozenBatchNorm2d(3, eps=1e-3), (4, 3, 3, 3)),
        (ndnn.FrozenBatchNorm3d(3), (4, 3, 2, 2, 2)),
        (ndnn.BatchNormAct1d(3, "leaky_relu", 0.2, negative_slope=0.3), (4, 3)),
        (ndnn.BatchNormAct2d(3, "gelu", 0.2), (4, 3, 3, 3)),
        (ndnn.DropPath(0.4, mode="batch"), (4, 3, 3, 3)),
        (ndnn.DropBlock2d(0.4, 2, per_channel=True), (4, 3, 3, 3)),
        (ndnn.DropConnect(torch.nn.Conv2d(3, 2, 1), 0.4), (4, 3, 3, 3)),
        (ndnn.GaussianDropout(0.4), (4, 3, 3, 3)),
    ]


@pytest.mark.parametrize(("layer", "shape"), _family(), ids=lambda v: type(v).__name__)
def test_copies_reproduce_the_layer(layer, shape):
    """deepcopy and pickle give a layer with the same state: the same outputs from the same
    seed in training (statistics moved alike) and in eval; ``.double()`` runs float64."""
    x = torch.randn(shape)
    layer(x)  # state after one step (and the eager caches) travels too
    for duplicate in (copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))):
        clone = duplicate(layer)
        assert repr(clone) == repr(layer)
        torch.manual_seed(5)
        expected = layer(x)
        torch.manual_seed(5)
        torch.testing.assert_close(clone(x), expected, rtol=0, atol=0)
        for (key, a), b in zip(layer.state_dict().items(), clone.state_dict().values(),
                               strict=True):  # fmt: skip
            assert torch.equal(a, b), key
    layer.eval()
    assert torch.equal(copy.deepcopy(layer)(x), layer(x))
    wide = copy.deepcopy(layer).double()
    assert wide(x.double()).dtype == torch.float64


@pytest.mark.parametrize(("layer", "shape"), _family(), ids=lambda v: type(v).__name__)
def test_a_batch_without_values_gives_an_empty_output_and_zero_gradients(layer, shape):
    if isinstance(layer, ndnn.GhostBatchNorm1d | ndnn.GhostBatchNorm2d):
        layer.eval()  # in training a ghost batch needs samples (documented error)
    x = torch.randn(0, *shape[1:], requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert out.shape[0] == 0 and out.dtype == x.dtype
    for name, parameter in layer.named_parameters():
        assert parameter.grad is not None and torch.equal(
            parameter.grad, torch.zeros_like(parameter)
        ), name
