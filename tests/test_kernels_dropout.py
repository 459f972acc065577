"""Fast dropout: the Philox mask, exactly as documented, in forward and backward.

Oracle: ``masks.keep_mask`` of the seed that ``torch.manual_seed`` makes the dispatcher draw
(itself checked against a plain-Python Philox in test_kernels_philox.py), applied with the
reference's scaling ``x * (mask / (1 - p))``.
"""

from __future__ import annotations

import math

import numba
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import normdrop
from normdrop import functional as F
from normdrop.kernels import dispatch, masks, ops

pytestmark = pytest.mark.usefixtures("one_numba_thread")


def memory_order(x: torch.Tensor) -> torch.Tensor:
    """The elements of a dense tensor in memory order."""
    return ops._dense_order(x).reshape(-1)


def expected_factor(x: torch.Tensor, p: float, torch_seed: int) -> torch.Tensor:
    """``mask / (1 - p)`` in the layout of ``x``, for the seed drawn after manual_seed."""
    torch.manual_seed(torch_seed)
    seed = int(masks.draw_seed())
    keep = masks.keep_mask(seed, 0, x.numel(), p).to(x.dtype)
    scale = torch.ones((), dtype=x.dtype).div_(1 - p)
    factor = torch.empty_like(x)
    memory_order(factor).copy_(keep * scale)
    return factor


@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    p=st.floats(0.05, 0.95),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    permute=st.booleans(),
    torch_seed=st.integers(0, 1000),
)
def test_module_applies_the_documented_mask(shape, p, dtype, permute, torch_seed):
    x = torch.randn(shape, dtype=dtype)
    if permute and x.dim() > 1:
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    x.requires_grad_()
    module = normdrop.nn.Dropout(p)
    factor = expected_factor(x, p, torch_seed)
    torch.manual_seed(torch_seed)
    y = module(x)
    assert torch.equal(y, x * factor)
    assert y.stride() == x.stride()
    grad = torch.randn(shape, dtype=dtype)  # contiguous, whatever the layout of x
    y.backward(grad)
    assert torch.equal(x.grad, grad * factor)


def test_same_seed_same_mask_other_seed_other_mask():
    x = torch.randn(1000)
    module = normdrop.nn.Dropout(0.5)
    torch.manual_seed(0)
    a = module(x)
    torch.manual_seed(0)
    b = module(x)
    c = module(x)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generator_keyword_governs_the_mask():
    x = torch.randn(5000)
    a = dispatch.dropout(x, 0.3, generator=torch.Generator().manual_seed(5))
    b = dispatch.dropout(x, 0.3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_within_binomial_interval(p):
    n = 200_003
    y = normdrop.nn.Dropout(p)(torch.ones(n))
    kept = int((y != 0).sum())
    half = 3.2905 * math.sqrt(n * p * (1 - p))
    assert n * (1 - p) - half <= kept <= n * (1 - p) + half
    assert torch.all((y == 0) | (y == torch.ones((), dtype=y.dtype).div_(1 - p)))


def test_mask_does_not_depend_on_thread_count():
    assert numba.config.NUMBA_NUM_THREADS >= 2, "needs 2 numba threads to compare"
    x = torch.randn(3, 50_000)
    results = []
    for threads in (1, 2):
        numba.set_num_threads(threads)
        results.append(dispatch.dropout(x, 0.4, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(results[0], results[1])


def test_double_backward_is_the_mask_again():
    x = torch.randn(300, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(4)
    y = dispatch.dropout(x, 0.3)
    (grad,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), x)
    factor = expected_factor(x, 0.3, 4)
    assert torch.equal(second, 2 * factor * factor)


def test_inplace_matches_out_of_place():
    x = torch.randn(7, 9)
    torch.manual_seed(8)
    expected = dispatch.dropout(x, 0.25)
    inplace = x.clone()
    torch.manual_seed(8)
    with torch.no_grad():
        result = normdrop.nn.Dropout(0.25, inplace=True)(inplace)
    assert result is inplace and torch.equal(inplace, expected)
    # With autograd: in place on a non-leaf, gradient through the mask.
    leaf = x.clone().requires_grad_()
    hidden = leaf * 1
    torch.manual_seed(8)
    out = normdrop.nn.Dropout(0.25, inplace=True)(hidden)
    out.sum().backward()
    assert out is hidden and torch.equal(out.detach(), expected)
    assert torch.equal(leaf.grad, expected_factor(x, 0.25, 8))


def test_inplace_kernel_keeps_torchs_inplace_bookkeeping():
    """The kernel writes through numpy; a tensor saved for backward must still be seen as
    modified, and an inference tensor refused, as a torch in-place op would."""
    weight = torch.randn(4, 64, requires_grad=True)
    x = torch.randn(64)
    loss = (weight @ x).sum()  # saves x for the weight's gradient
    version = x._version
    normdrop.nn.Dropout(0.5, inplace=True)(x)
    assert x._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    with torch.inference_mode():
        frozen = torch.ones(64)
        normdrop.nn.Dropout(0.5, inplace=True)(torch.ones(64))  # allowed inside the mode
    with pytest.raises(RuntimeError, match="inference tensor outside InferenceMode"):
        normdrop.nn.Dropout(0.5, inplace=True)(frozen)
    assert torch.equal(frozen, torch.ones(64))


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_edge_probabilities_match_reference(p):
    x = torch.tensor([1.0, -2.0, float("inf"), float("nan")])
    y = normdrop.nn.Dropout(p)(x)
    torch.testing.assert_close(y, F.dropout(x, p), equal_nan=True)


def test_eval_mode_and_channelwise_variants_are_the_reference():
    x = torch.randn(4, 6, 5, 5)
    module = normdrop.nn.Dropout(0.5).eval()
    assert module(x) is x
    for cls, function in [(normdrop.nn.Dropout2d, F.dropout2d), (normdrop.nn.AlphaDropout, None)]:
        torch.manual_seed(2)
        got = cls(0.5).train()(x)
        torch.manual_seed(2)
        expected = function(x, 0.5) if function else F.alpha_dropout(x, 0.5, True)
        assert torch.equal(got, expected)


def test_reference_backend_uses_torch_masks():
    x = torch.randn(1000)
    torch.manual_seed(6)
    with normdrop.use_backend("reference"):
        got = normdrop.nn.Dropout(0.5)(x)
    torch.manual_seed(6)
    assert torch.equal(got, torch.nn.functional.dropout(x, 0.5))


@pytest.mark.parametrize(
    "make_input",
    [lambda: torch.randn(50, dtype=torch.float16), lambda: torch.randn(10, 10)[:, ::3]],
    ids=["float16", "strided"],
)
def test_other_inputs_fall_back_or_copy_correctly(make_input):
    x = make_input()
    torch.manual_seed(3)
    y = normdrop.nn.Dropout(0.5)(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] * 2)
    assert y.shape == x.shape and y.dtype == x.dtype


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_bad_probability_raises_like_the_reference(p):
    with pytest.raises(ValueError, match="between 0 and 1"):
        dispatch.dropout(torch.randn(3), p)


def test_non_float_input_raises_like_the_reference():
    with pytest.raises(TypeError, match="floating-point"):
        dispatch.dropout(torch.arange(4), 0.5)
