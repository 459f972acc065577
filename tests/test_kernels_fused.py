"""Fused BatchNorm -> activation -> Dropout: BatchNormAct modules and the custom op.

Oracle: the unfused chain of normdrop.functional (BatchNorm), torch.nn.functional (activation)
and the documented Philox mask (dropout), in float64 where the kernels run in float64;
gradcheck and gradgradcheck in float64; saved bytes measured with saved_tensors_hooks.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normdrop
from normdrop import functional as F
from normdrop.kernels import dispatch, masks, ops
from normdrop.nn.batchnorm import _BatchNorm

from _helpers import assert_close_scaled, tolerance

# (activation, p, channels_last, dtype): few combinations, since each compiles its own kernels.
CASES = [
    ("relu", 0.3, False, torch.float32),
    ("relu", 0.3, True, torch.float32),
    ("gelu", 0.2, False, torch.float64),
    ("leaky_relu", 0.25, True, torch.float64),
    ("identity", 0.5, False, torch.float64),
    ("relu", 0.0, True, torch.float64),
]
# float32 GELU runs the kernels' own erf and exp (not libm): against the chain, not gradcheck
GELU32 = ("gelu", 0.2, True, torch.float32)
ACTIVATIONS = {
    "relu": torch.nn.functional.relu,
    "gelu": torch.nn.functional.gelu,
    "leaky_relu": lambda z: torch.nn.functional.leaky_relu(z, 0.05),
    "identity": lambda z: z,
}


pytestmark = pytest.mark.usefixtures("one_numba_thread")


def channels_last(x: torch.Tensor) -> torch.Tensor:
    order = (0, *range(2, x.dim()), 1)
    inverse = [order.index(d) for d in range(x.dim())]
    return x.permute(order).contiguous().permute(inverse)


def philox_factor(x: torch.Tensor, p: float, torch_seed: int) -> torch.Tensor:
    """The dropout factor (``1 / (1 - p)`` or 0) the kernel uses, in the layout of ``x``."""
    if p == 0:
        return torch.ones_like(x)
    torch.manual_seed(torch_seed)
    keep = masks.keep_mask(int(masks.draw_seed()), 0, x.numel(), p).to(x.dtype)
    factor = torch.empty_like(x)
    ops._dense_order(factor).reshape(-1).copy_(keep * torch.ones((), dtype=x.dtype).div_(1 - p))
    return factor


def make_module(cls, channels, activation, p, dtype, **kwargs):
    module = cls(channels, activation, p, negative_slope=0.05, dtype=dtype, **kwargs)
    with torch.no_grad():
        if module.weight is not None:
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-0.5, 0.5)
    return module


def oracle(module, x, factor):
    """BatchNorm (reference, buffers of a copy), activation, then the mask."""
    with normdrop.use_backend("reference"):
        z = _BatchNorm.forward(module, x)
    return ACTIVATIONS[module.activation](z) * factor


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture], max_examples=12)
@given(
    case=st.sampled_from([*CASES, GELU32]),
    batch=st.integers(2, 9),
    channels=st.integers(1, 5),
    size=st.integers(1, 9),
    two_d=st.booleans(),
    momentum=st.sampled_from([0.1, None]),
    torch_seed=st.integers(0, 100),
)
def test_module_matches_unfused_chain(case, batch, channels, size, two_d, momentum, torch_seed):
    shape = (batch, channels, size, size + 2) if two_d else (batch, channels, size + 1)
    check_against_unfused_chain(case, shape, momentum, torch_seed)


@pytest.mark.parametrize("case", [CASES[1], CASES[3], GELU32])
@pytest.mark.parametrize("shape", [(4, 24, 30, 30), (3, 5, 101, 103), (5000, 24)])
def test_many_blocks_of_wide_rows_match_unfused_chain(case, shape):
    """Channel-fastest inputs large enough for parallel blocks, their rows grouped into wide
    rows (24 channels: 80 rows per wide row, or 50 of the 5000 rows of an (N, C) batch; 5
    channels over 3 maps of 101 * 103: 309 = 3 * 103)."""
    check_against_unfused_chain(case, shape, 0.1, 7)


def check_against_unfused_chain(case, shape, momentum, torch_seed):
    activation, p, last, dtype = case
    channels = shape[1]
    cls = normdrop.nn.BatchNormAct2d if len(shape) == 4 else normdrop.nn.BatchNormAct1d
    module = make_module(cls, channels, activation, p, dtype, momentum=momentum)
    reference = copy.deepcopy(module)
    generator = torch.Generator().manual_seed(torch_seed)
    for step in range(3):
        if step == 2:
            module.eval()
            reference.eval()
        x = torch.randn(shape, dtype=dtype, generator=generator) * 3 + 1
        x = channels_last(x) if last else x
        grad = torch.randn(shape, dtype=dtype, generator=generator)
        # A channel-fastest (N, C, L) runs as a contiguous copy (docs/kernels.md): its mask
        # follows the copy's memory order, and its output is contiguous, as torch's is.
        kernel_input = x if len(shape) == 4 else x.contiguous()
        factor = philox_factor(kernel_input, p if module.training else 0.0, torch_seed + step)
        x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(torch_seed + step)
        y = module(x_fast)
        expected = oracle(reference, x_ref, factor)
        y.backward(grad)
        expected.backward(grad)
        rtol = tolerance(dtype)
        assert_close_scaled(y, expected, rtol)
        assert y.stride() == kernel_input.stride()
        assert_close_scaled(x_fast.grad, x_ref.grad, rtol)
        for got, want in zip(module.parameters(), reference.parameters(), strict=True):
            assert_close_scaled(got.grad, want.grad, rtol)
            got.grad = want.grad = None
        for got, want in zip(module.buffers(), reference.buffers(), strict=True):
            assert_close_scaled(got, want, rtol)


@pytest.mark.parametrize(("activation", "p", "last", "dtype"), CASES[2:])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_and_gradgradcheck(activation, p, last, dtype, training):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 3, 5, dtype=dtype, generator=generator)
    x = (channels_last(x) if last else x).requires_grad_()
    weight = torch.rand(4, dtype=dtype, generator=generator).add_(0.5).requires_grad_()
    bias = torch.randn(4, dtype=dtype, generator=generator).requires_grad_()
    running_mean = torch.randn(4, dtype=dtype, generator=generator)
    running_var = torch.rand(4, dtype=dtype, generator=generator) + 0.5

    def fused(x, weight, bias):
        return dispatch.batch_norm_act_dropout(
            x,
            None if training else running_mean,
            None if training else running_var,
            weight,
            bias,
            training,
            0.1,
            1e-5,
            activation,
            0.05,
            p,
            generator=torch.Generator().manual_seed(1),
        )

    assert torch.autograd.gradcheck(fused, (x, weight, bias))
    assert torch.autograd.gradgradcheck(fused, (x, weight, bias))


def test_saved_tensors_are_the_input_the_channel_vectors_and_the_seed():
    shape = (8, 16, 12, 12)
    x = torch.randn(shape, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    module = normdrop.nn.BatchNormAct2d(16, "relu", p=0.3)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    chain = torch.nn.Sequential(torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.Dropout(0.3))
    chain_saved = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: chain_saved.append(t.numel() * t.element_size()) or t, lambda t: t
    ):
        chain(x)
    input_bytes = x.numel() * x.element_size()
    assert max(saved) == input_bytes and sorted(saved)[-2] <= 16 * 4
    assert sum(saved) <= input_bytes + 5 * 16 * 4 + 8
    assert sum(saved) <= sum(chain_saved) / 2


def test_state_dict_moves_between_batchnorm_and_batchnormact():
    plain = torch.nn.BatchNorm2d(5)
    plain(torch.randn(4, 5, 3, 3))
    fused = normdrop.nn.BatchNormAct2d(5, "gelu", p=0.1)
    fused.load_state_dict(plain.state_dict())
    assert fused.state_dict().keys() == plain.state_dict().keys()
    back = normdrop.nn.BatchNorm2d(5)
    back.load_state_dict(fused.state_dict())
    for name, tensor in plain.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor)
    assert isinstance(fused, torch.nn.modules.batchnorm._BatchNorm)
    assert isinstance(fused, normdrop.nn.BatchNorm2d)
    assert isinstance(normdrop.nn.BatchNormAct1d(3), torch.nn.BatchNorm1d)


def test_reference_backend_is_the_torch_chain():
    x = torch.randn(6, 4, 5, 5)
    fused = normdrop.nn.BatchNormAct2d(4, "relu", p=0.4)
    chain = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Dropout(0.4))
    torch.manual_seed(9)
    with normdrop.use_backend("reference"):
        got = fused(x)
    torch.manual_seed(9)
    expected = chain(x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(fused.running_var, chain[0].running_var)


def test_eval_mode_drops_nothing_and_uses_running_statistics():
    module = normdrop.nn.BatchNormAct2d(3, "relu", p=0.9)
    module(torch.randn(10, 3, 4, 4) * 2 + 1)
    module.eval()
    x = torch.randn(2, 3, 4, 4)
    expected = torch.relu(
        F.batch_norm(x, module.running_mean, module.running_var, module.weight, module.bias)
    )
    torch.testing.assert_close(module(x), expected)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"activation": "tanh"}, ValueError, "activation must be one of"),
        ({"p": 1.5}, ValueError, "between 0 and 1"),
        ({"negative_slope": "x"}, TypeError, "negative_slope"),
        ({"negative_slope": float("nan")}, ValueError, "negative_slope must be finite"),
        ({"negative_slope": float("inf")}, ValueError, "negative_slope must be finite"),
        ({"momentum": 2.0}, ValueError, "momentum"),
    ],
)
def test_bad_configuration_is_rejected(kwargs, error, match):
    with pytest.raises(error, match=match):
        normdrop.nn.BatchNormAct2d(3, **kwargs)


def test_bad_input_is_rejected_with_the_batchnorm_messages():
    module = normdrop.nn.BatchNormAct2d(3, p=0.2)
    with pytest.raises(ValueError, match=r"expects input of shape \(N, C, H, W\)"):
        module(torch.randn(4, 3, 5))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module(torch.randn(1, 3, 1, 1))
