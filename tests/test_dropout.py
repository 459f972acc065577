"""Dropout family: masks equal torch.nn's for the same seed (reference backend), statistics of
the mask within binomial intervals (every backend), scaling, channel-wise structure, errors."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import normdrop
from normdrop import functional as NF
from normdrop.backend import BACKENDS

# (ours, torch's, input ranks it is meant for)
FUNCTIONS = {
    "dropout": (NF.dropout, torch.nn.functional.dropout, (1, 2, 3, 4)),
    "dropout1d": (NF.dropout1d, torch.nn.functional.dropout1d, (2, 3)),
    "dropout2d": (NF.dropout2d, torch.nn.functional.dropout2d, (4,)),
    "dropout3d": (NF.dropout3d, torch.nn.functional.dropout3d, (4, 5)),
    "alpha_dropout": (NF.alpha_dropout, torch.nn.functional.alpha_dropout, (1, 2, 3)),
    "feature_alpha_dropout": (
        NF.feature_alpha_dropout,
        torch.nn.functional.feature_alpha_dropout,
        (2, 3, 4, 5),
    ),
}
MODULES = {
    "Dropout": (normdrop.nn.Dropout, torch.nn.Dropout, (1, 2, 3, 4)),
    "Dropout1d": (normdrop.nn.Dropout1d, torch.nn.Dropout1d, (2, 3)),
    "Dropout2d": (normdrop.nn.Dropout2d, torch.nn.Dropout2d, (4,)),
    "Dropout3d": (normdrop.nn.Dropout3d, torch.nn.Dropout3d, (4, 5)),
    "AlphaDropout": (normdrop.nn.AlphaDropout, torch.nn.AlphaDropout, (1, 2, 3)),
    "FeatureAlphaDropout": (
        normdrop.nn.FeatureAlphaDropout,
        torch.nn.FeatureAlphaDropout,
        (2, 3, 4, 5),
    ),
}
CHANNELWISE = {"dropout1d", "dropout2d", "dropout3d", "Dropout1d", "Dropout2d", "Dropout3d"}


def _shape(draw, rank):
    return tuple(draw(st.integers(1, 7)) for _ in range(rank))


@given(data=st.data())
def test_functional_masks_equal_torchs_for_the_same_seed(data):
    name = data.draw(st.sampled_from(sorted(FUNCTIONS)))
    ours, reference, ranks = FUNCTIONS[name]
    shape = _shape(data.draw, data.draw(st.sampled_from(ranks)))
    p = data.draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]))
    seed = data.draw(st.integers(0, 2**31))
    x = torch.randn(shape, dtype=dtype) + 0.5
    torch.manual_seed(seed)
    expected = reference(x.clone(), p, True)
    with normdrop.use_backend("reference"):
        torch.manual_seed(seed)
        actual = ours(x.clone(), p, True)
        generator = torch.Generator().manual_seed(seed)
        from_generator = ours(x.clone(), p, True, generator=generator)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    torch.testing.assert_close(from_generator, expected, rtol=0, atol=0)


@given(data=st.data())
def test_modules_equal_torchs_including_gradients_and_inplace(data):
    name = data.draw(st.sampled_from(sorted(MODULES)))
    ours_cls, torch_cls, ranks = MODULES[name]
    shape = _shape(data.draw, data.draw(st.sampled_from(ranks)))
    p = data.draw(st.sampled_from([0.2, 0.5, 0.8]))
    inplace = data.draw(st.booleans())
    seed = data.draw(st.integers(0, 2**31))
    ours, reference = ours_cls(p, inplace), torch_cls(p, inplace)
    assert isinstance(ours, torch_cls) and repr(ours) == repr(reference)

    x = torch.randn(shape, requires_grad=True)
    results = []
    for module in (ours, reference):
        torch.manual_seed(seed)
        source = x * 1.0  # a non-leaf, so inplace is legal
        with normdrop.use_backend("reference"):
            y = module(source)
        y.backward(torch.ones_like(y))
        results.append((y.detach().clone(), x.grad.clone()))
        x.grad = None
    (y_ours, g_ours), (y_ref, g_ref) = results
    torch.testing.assert_close(y_ours, y_ref, rtol=0, atol=0)
    torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_keep_rate_within_binomial_interval_and_kept_values_scaled(backend, p):
    n = 1_000_003  # odd on purpose
    x = torch.rand(n) + 1.0  # never zero, so a zero output means dropped
    with normdrop.use_backend(backend):
        y = normdrop.nn.Dropout(p)(x)
    kept = y != 0
    # 99.9% interval of Binomial(n, 1-p): z = 3.29
    expected = n * (1 - p)
    half_width = 3.29 * math.sqrt(n * p * (1 - p))
    assert abs(kept.sum().item() - expected) < half_width
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1.2e-7, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("cls", "shape", "batched"),
    [
        (normdrop.nn.Dropout1d, (64, 32, 9), True),
        (normdrop.nn.Dropout2d, (64, 32, 5, 3), True),
        (normdrop.nn.Dropout3d, (32, 16, 3, 2, 3), True),
        (normdrop.nn.Dropout1d, (32, 9), False),  # (C, L)
        (normdrop.nn.Dropout3d, (16, 3, 2, 3), False),  # (C, D, H, W)
    ],
)
def test_channelwise_masks_zero_whole_channels(backend, cls, shape, batched):
    p = 0.5
    x = torch.rand(shape) + 1.0
    with normdrop.use_backend(backend):
        y = cls(p)(x)
    units = shape[0] * shape[1] if batched else shape[0]  # one mask value per (sample, channel)
    outputs, inputs = y.reshape(units, -1), x.reshape(units, -1)
    dropped = (outputs == 0).all(1)
    kept = torch.isclose(outputs, inputs / (1 - p), rtol=1e-6, atol=0).all(1)
    assert (dropped | kept).all(), "every channel is either kept whole or dropped whole"
    rate = dropped.float().mean().item()
    assert abs(rate - p) < 3.29 * math.sqrt(p * (1 - p) / units)


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_generator_seed_same_mask_and_different_seeds_differ(backend):
    x = torch.randn(256, 64)
    with normdrop.use_backend(backend):
        first = NF.dropout(x, 0.5, generator=torch.Generator().manual_seed(7))
        again = NF.dropout(x, 0.5, generator=torch.Generator().manual_seed(7))
        other = NF.dropout(x, 0.5, generator=torch.Generator().manual_seed(8))
        torch.manual_seed(3)
        module_first = normdrop.nn.Dropout(0.5)(x)
        torch.manual_seed(3)
        module_again = normdrop.nn.Dropout(0.5)(x)
    assert torch.equal(first, again) and torch.equal(module_first, module_again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_eval_mode_and_p_zero_return_the_input(name):
    ours_cls, _, ranks = MODULES[name]
    x = torch.randn((3,) * ranks[-1])
    assert ours_cls(0.5).eval()(x) is x
    assert ours_cls(0.0)(x) is x


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_p_one_gives_zeros_and_keeps_nan_like_torch(name):
    ours, reference, ranks = FUNCTIONS[name]
    x = torch.randn((3,) * ranks[-1])
    x.view(-1)[0] = float("nan")
    expected = reference(x, 1.0, True)
    actual = ours(x, 1.0, True)
    torch.testing.assert_close(actual, expected, equal_nan=True, rtol=0, atol=0)
    assert (actual.view(-1)[1:] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("feature", [False, True])
def test_alpha_dropout_keeps_zero_mean_unit_variance(backend, p, feature):
    """For a standard-normal input, alpha dropout's output has mean 0 and variance 1."""
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(1000, 100, 10, generator=generator)
    function = NF.feature_alpha_dropout if feature else NF.alpha_dropout
    with normdrop.use_backend(backend):
        y = function(x, p, True)
    # The mean's standard error here is ~0.003 (feature: masks shared by 10 values); a scale or
    # shift error of a few percent fails these bounds.
    assert abs(y.mean().item()) < 0.02
    assert abs(y.var().item() - 1) < 0.03
    # Dropped units all take one value, a * (-alpha') + b = -a * alpha' * (1 - p).
    alpha = 1.7580993408473766
    a = 1 / math.sqrt((alpha**2 * p + 1) * (1 - p))
    dropped = torch.isclose(y, torch.tensor(-a * alpha * (1 - p)), rtol=0, atol=1e-6)
    units = x.shape[0] * x.shape[1] if feature else x.numel()
    if feature:
        dropped = dropped.all(-1)
    assert abs(dropped.float().mean().item() - p) < 3.29 * math.sqrt(p * (1 - p) / units) + 1e-3


def test_module_inplace_modifies_input_and_alpha_ignores_inplace_like_torch():
    x = torch.randn(100) + 5
    normdrop.nn.Dropout(0.5, inplace=True)(x)
    assert (x == 0).any()
    y = torch.randn(100)
    before = y.clone()
    normdrop.nn.AlphaDropout(0.5, inplace=True)(y)
    assert torch.equal(y, before)


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_p_outside_unit_interval_names_p(p):
    with pytest.raises(ValueError, match="dropout probability p has to be between 0 and 1"):
        normdrop.nn.Dropout(p)
    with pytest.raises(ValueError, match="dropout2d: dropout probability p"):
        NF.dropout2d(torch.randn(2, 3, 4, 4), p)


def test_p_must_be_a_number():
    with pytest.raises(TypeError, match="p must be a number"):
        normdrop.nn.Dropout(True)
    with pytest.raises(TypeError, match="p must be a number"):
        NF.dropout(torch.randn(3), "0.5")


def test_integer_input_is_refused_only_where_values_would_change():
    with pytest.raises(TypeError, match="dropout: input must be a floating-point tensor"):
        NF.dropout(torch.ones(4, dtype=torch.int64))
    # As in PyTorch: in eval mode, with p = 0 or on an empty tensor the input itself comes back.
    for name, (ours, reference, ranks) in FUNCTIONS.items():
        x = torch.arange(2 * 3 * 2 ** (max(ranks) - 2)).reshape(2, 3, *[2] * (max(ranks) - 2))
        for p, training in ((0.5, False), (0.0, True)):
            assert ours(x, p, training) is x, name
            assert reference(x, p, training) is x, name
        # p = 1 multiplies by zero, which any dtype can: zeros of the input's dtype, as torch's
        zeros = ours(x, 1.0, True)
        assert zeros.dtype == x.dtype and torch.equal(zeros, reference(x, 1.0, True)), name
        assert not zeros.any(), name


@pytest.mark.parametrize("name", sorted(set(FUNCTIONS) - {"dropout1d"}))  # 4-D inputs
@pytest.mark.parametrize(
    "layout",
    [
        lambda x: x.to(memory_format=torch.channels_last),
        lambda x: x.transpose(1, 3),
        lambda x: x[:, :, ::2],
    ],
    ids=["channels_last", "transposed", "strided"],
)
def test_masks_equal_torchs_for_inputs_not_contiguous(name, layout):
    # The element-wise noise follows the input's memory format, as ATen's empty_like does, so
    # bernoulli_ fills it in the same order.
    ours, reference, _ = FUNCTIONS[name]
    x = layout(torch.randn(2, 3, 6, 5))
    torch.manual_seed(7)
    expected = reference(x, 0.5, True)
    with normdrop.use_backend("reference"):
        torch.manual_seed(7)
        actual = ours(x, 0.5, True)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert actual.stride() == expected.stride()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: normdrop.nn.Dropout(0.5), (4, 8, 16)),
        (lambda: normdrop.nn.Dropout1d(0.5), (4, 8, 16)),
        (lambda: normdrop.nn.Dropout2d(0.5), (4, 8, 5, 5)),
        (lambda: normdrop.nn.Dropout3d(0.5), (4, 8, 2, 3, 3)),
        (lambda: normdrop.nn.DropPath(0.5), (4, 8, 16)),
        (lambda: normdrop.nn.DropBlock2d(0.5, 3), (4, 2, 3, 8, 8)),
    ],
)
def test_vmap_with_different_randomness_draws_a_mask_per_sample(backend, make, shape):
    module = make()
    x = torch.randn(shape) + 3  # no zero but the dropped ones
    with normdrop.use_backend(backend):
        y = torch.func.vmap(module, randomness="different")(x)
        same = torch.func.vmap(module, randomness="same")(x)
    kept = y != 0
    assert y.shape == x.shape
    assert any(not torch.equal(kept[0], kept[i]) for i in range(1, shape[0]))
    assert all(torch.equal(same[0] != 0, same[i] != 0) for i in range(1, shape[0]))
    for i in range(shape[0]):  # in each sample, what is kept is scaled by one factor
        ratio = y[i][kept[i]] / x[i][kept[i]]
        torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()))


def test_dropout1d_wrong_rank_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"dropout1d: Expected 2D or 3D input, .* it takes \(N, C, L\) or \(C, L\)"
    ):
        normdrop.nn.Dropout1d()(torch.randn(2, 3, 4, 5))
    with pytest.raises(RuntimeError):  # torch raises RuntimeError here; ours is both
        normdrop.nn.Dropout1d()(torch.randn(2, 3, 4, 5))


def test_dropout2d_on_3d_input_warns_like_torch():
    with pytest.warns(UserWarning, match=r"read it as \(N, C, L\)"):
        y = normdrop.nn.Dropout2d(0.5)(torch.ones(4, 8, 10))
    assert ((y == 0).all(2) | (y == 2).all(2)).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normdrop.nn.Dropout2d(0.5)(torch.ones(4, 8, 10, 10))


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("dropout2d", ()),
        ("dropout2d", (5,)),
        ("dropout3d", ()),  # (5,) is read as an unbatched (C,) and is fine
        ("feature_alpha_dropout", ()),
        ("feature_alpha_dropout", (5,)),
    ],
)
def test_channelwise_rank_is_checked_only_when_a_mask_is_drawn(name, shape):
    """PyTorch passes any rank through in eval mode or with p = 0; only drawing a channel mask
    needs (N, C, *). Its own OpInfo samples rely on this."""
    ours, reference, _ = FUNCTIONS[name]
    x = torch.randn(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for training, p in ((False, 0.5), (True, 0.0), (True, 1.0)):
            torch.testing.assert_close(ours(x, p, training), reference(x, p, training))
        with pytest.raises(RuntimeError, match=rf"{name}: channel-wise dropout needs"):
            ours(x, 0.5, True)


OPINFO_NAMES = {
    "nn.functional.dropout": "dropout",
    "nn.functional.dropout2d": "dropout2d",
    "nn.functional.dropout3d": "dropout3d",
    "nn.functional.alpha_dropout": "alpha_dropout",
    "nn.functional.feature_alpha_dropout": "feature_alpha_dropout",
}


def _opinfo_samples():
    """Every sample of PyTorch's own OpInfos for the dropout functions (all their variants)."""
    methods = pytest.importorskip(
        "torch.testing._internal.common_methods_invocations", reason="needs the dev extra"
    )
    infos = [info for info in methods.op_db if info.name in OPINFO_NAMES]
    assert len(infos) == 6  # feature_alpha_dropout has a training and an eval variant
    for info in infos:
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for sample in info.sample_inputs("cpu", dtype, requires_grad=True):
                yield OPINFO_NAMES[info.name], sample


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_opinfo_samples_match_torch(backend):
    """PyTorch's OpInfo samples (0-d to 5-D, p in {0, 0.5, 1}, training on and off, default
    arguments): for the same seed, the output and the input gradient equal torch's bit for bit,
    except where the fast path draws its own (Philox) mask: element-wise dropout in training
    with 0 < p < 1 on float32/float64, where every element is dropped (0, gradient 0) or kept
    (x / (1 - p), gradient 1 / (1 - p)), and some of each are."""
    checked = philox = 0
    for name, sample in _opinfo_samples():
        ours, reference = FUNCTIONS[name][:2]
        x = sample.input.detach()
        p, training = sample.kwargs.get("p", 0.5), sample.kwargs.get("training", True)
        own_mask = (
            backend == "fast"
            and name == "dropout"
            and training
            and 0 < p < 1
            and x.dtype != torch.bfloat16
        )
        results = []
        for function in (ours, reference):
            leaf = x.clone().requires_grad_(True)
            torch.manual_seed(11)
            with warnings.catch_warnings(), normdrop.use_backend(backend):
                warnings.simplefilter("ignore")  # dropout2d's 3-D warning, tested elsewhere
                y = function(leaf, *sample.args, **sample.kwargs)
            (grad,) = torch.autograd.grad(y.sum(), leaf)
            results.append((y.detach(), grad))
        (y_ours, g_ours), (y_ref, g_ref) = results
        assert y_ours.shape == y_ref.shape and y_ours.dtype == y_ref.dtype
        if own_mask:
            philox += 1
            kept = y_ours != 0
            assert not x[~kept].eq(0).any()  # zeros in y are dropped elements, not zero inputs
            scale = 1.0 / (1.0 - p)
            torch.testing.assert_close(y_ours[kept], x[kept] * scale, rtol=0, atol=0)
            torch.testing.assert_close(g_ours, kept.to(x.dtype) * scale, rtol=0, atol=0)
            if x.numel() >= 25:
                assert 0 < int(kept.sum()) < x.numel()
        else:
            torch.testing.assert_close(y_ours, y_ref, rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(g_ours, g_ref, rtol=0, atol=0, equal_nan=True)
        checked += 1
    assert checked >= 150
    assert philox >= (4 if backend == "fast" else 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad_tangent_is_the_masked_tangent(backend):
    import torch.autograd.forward_ad as fwAD

    x, tangent = torch.randn(300, 50) + 5, torch.randn(300, 50)
    with normdrop.use_backend(backend), fwAD.dual_level():
        y, y_t = fwAD.unpack_dual(normdrop.nn.Dropout(0.4)(fwAD.make_dual(x, tangent)))
    torch.testing.assert_close(y_t, tangent * (y / x))
    assert 0.5 < (y != 0).float().mean() < 0.7


@pytest.mark.parametrize("module", [False, True])
def test_p_too_close_to_one_for_the_fast_masks_takes_torchs_bernoulli(module):
    # Within 2^-10 of 1 the float32 uniforms would miss the keep rate: the fast backend then
    # draws torch's mask (bit-equal for the same seed); at the bound it still runs the kernel.
    from normdrop.kernels import dispatch, masks

    x = torch.randn(64, 1024)
    for p, torchs in ((1 - masks.MIN_KEEP / 2, True), (1 - masks.MIN_KEEP, False)):
        torch.manual_seed(3)
        expected = torch.nn.functional.dropout(x, p)
        torch.manual_seed(3)
        with normdrop.use_backend("fast"):
            actual = normdrop.nn.Dropout(p)(x) if module else dispatch.dropout(x, p)
        assert torch.equal(actual, expected) == torchs
        assert ((actual == 0) | torch.isclose(actual, x / (1 - p))).all()


def test_the_fast_keep_rate_bound_quoted_in_the_docs():
    # docs/kernels.md: within MIN_KEEP of 1 the float32 uniforms miss 1 - p by more than 1e-4 of
    # itself (p = 1 - 1e-7 keeps about 0.3 of what it should); at the bound they do not.
    from normdrop.kernels.masks import MIN_KEEP
    from normdrop.kernels.philox import keep_threshold

    def kept(p):  # a word f (31 bits, uniform) is kept iff f > keep_threshold(p)
        return (2**31 - 1 - keep_threshold(p)) / 2**31

    assert abs(kept(1 - MIN_KEEP) / MIN_KEEP - 1) < 1e-4
    assert 0.25 < kept(1 - 1e-7) / 1e-7 < 0.35


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_weight_under_vmap_with_different_randomness_gets_a_mask_per_sample(backend):
    """Dropout of a tensor the vmapped function closes over (a weight, as DropConnect drops):
    torch's batching rule gives each sample its own mask; in-place noise on the unbatched
    tensor was refused by vmap."""
    weight = torch.randn(64)
    with normdrop.use_backend(backend):
        for function in (NF.dropout, NF.alpha_dropout):
            out = torch.func.vmap(
                lambda x, f=function: f(weight, 0.5, True) + 0 * x, randomness="different"
            )(torch.randn(4, 64))
            masks = out != (out[0] if function is NF.alpha_dropout else 0)
            assert not all(torch.equal(masks[0], m) for m in masks[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_torch_func_the_mask_is_torchs_for_the_seed(backend):
    x = torch.ones(1000)
    torch.manual_seed(0)
    expected = torch.nn.functional.dropout(x, 0.5)
    with normdrop.use_backend(backend):
        torch.manual_seed(0)
        grad = torch.func.grad(lambda x: NF.dropout(x, 0.5).sum())(x)
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jagged_nested_and_sparse_inputs_behave_as_in_torch(backend):
    nested = torch.nested.nested_tensor(
        [torch.randn(2, 300), torch.randn(4, 300)], layout=torch.jagged
    )
    with normdrop.use_backend(backend):
        torch.manual_seed(0)
        ours = normdrop.nn.Dropout(0.5)(nested)
        sparse = torch.randn(4, 4).to_sparse()
        with pytest.raises(NotImplementedError, match="Sparse"):  # torch's own error
            normdrop.nn.Dropout(0.5)(sparse)
    torch.manual_seed(0)
    theirs = torch.nn.Dropout(0.5)(nested)
    assert ours.is_nested and torch.equal(ours.values(), theirs.values())
    with pytest.raises(NotImplementedError, match="Sparse"):
        torch.nn.Dropout(0.5)(sparse)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("cls", "shape"), [("Dropout2d", (4, 8, 3)), ("Dropout2d", (4, 8)), ("Dropout3d", (8, 3, 2))]
)
def test_inputs_that_warn_compile_with_fullgraph(backend, cls, shape):
    """dynamo cannot trace warnings.warn in our code: the warning is skipped in the graph."""
    torch._dynamo.reset()
    module = getattr(normdrop.nn, cls)(0.5)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    with normdrop.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the same ranks
        assert compiled(torch.randn(shape)).shape == shape
