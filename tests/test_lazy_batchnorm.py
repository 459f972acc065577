"""LazyBatchNorm{1,2,3}d: num_features from the first input, then normdrop's BatchNorm;
oracle: torch.nn.LazyBatchNorm{1,2,3}d on the same inputs."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normdrop
from normdrop.errors import InputError, InputTypeError

pytestmark = pytest.mark.filterwarnings("ignore:Lazy modules are a new feature")

SHAPES = {1: [(2,), (2, 3)], 2: [(2, 2)], 3: [(2, 2, 2)]}  # spatial dims per class


def _pair(rank: int, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = getattr(normdrop.nn, f"LazyBatchNorm{rank}d")(**kwargs)
        theirs = getattr(torch.nn, f"LazyBatchNorm{rank}d")(**kwargs)
    return ours, theirs


@settings(max_examples=30, deadline=None)
@given(
    rank=st.sampled_from([1, 2, 3]),
    spatial_choice=st.integers(0, 1),
    batch=st.integers(2, 6),
    channels=st.integers(1, 6),
    momentum=st.sampled_from([0.1, 0.7, None]),
    affine=st.booleans(),
    bias=st.booleans(),
    track=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_matches_torch_lazy_batchnorm(
    rank, spatial_choice, batch, channels, momentum, affine, bias, track, seed
):
    spatial = SHAPES[rank][spatial_choice % len(SHAPES[rank])]
    kwargs = {"momentum": momentum, "affine": affine, "track_running_stats": track}
    if not bias:
        kwargs["bias"] = False
    ours, theirs = _pair(rank, **kwargs)
    ours.double()  # a lazy module takes its dtype before it is sized, as torch's does
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, channels, *spatial[: len(spatial) if rank > 1 else spatial_choice])
    for step in range(3):
        if step == 2:
            ours.eval()
            theirs.eval()
        x = torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 2
        x_ours, x_theirs = x.clone().requires_grad_(), x.float().requires_grad_()
        y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
        grad = torch.randn(shape, generator=generator, dtype=torch.float64)
        y_ours.backward(grad)
        y_theirs.backward(grad.float())
        torch.testing.assert_close(y_ours, y_theirs.double(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(x_ours.grad, x_theirs.grad.double(), rtol=1e-3, atol=1e-4)
    # both became plain BatchNorms with the same configuration and state_dict keys
    assert type(ours) is getattr(normdrop.nn, f"BatchNorm{rank}d")
    assert isinstance(ours, getattr(torch.nn, f"BatchNorm{rank}d"))
    assert ours.num_features == channels
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for name, value in theirs.state_dict().items():
        torch.testing.assert_close(
            ours.state_dict()[name].to(value.dtype), value, rtol=1e-4, atol=1e-5
        )


def test_first_forward_is_normdrops_own(monkeypatch):
    calls = []
    original = normdrop.kernels.dispatch.batch_norm

    def recording(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(normdrop.kernels.dispatch, "batch_norm", recording)
    lazy, _ = _pair(2)
    lazy(torch.randn(3, 4, 5, 5))
    assert calls == [torch.Size([3, 4, 5, 5])]


def test_loading_a_state_dict_sizes_the_module():
    source = normdrop.nn.BatchNorm2d(4)
    source.running_mean.fill_(3.0)
    lazy, _ = _pair(2)
    lazy.load_state_dict(source.state_dict())
    y = lazy.eval()(torch.full((2, 4, 3, 3), 3.0))
    assert type(lazy) is normdrop.nn.BatchNorm2d and lazy.num_features == 4
    torch.testing.assert_close(y, torch.zeros_like(y) + source.bias.detach().view(1, 4, 1, 1))
    again, _ = _pair(2)
    again.load_state_dict(source.state_dict())
    with pytest.raises(InputError, match=r"num_features=4\) got input with 3 channels"):
        again(torch.randn(2, 3, 3, 3))


def test_without_parameters_or_buffers_it_takes_the_inputs_channels():
    lazy, theirs = _pair(1, affine=False, track_running_stats=False)
    x = torch.randn(5, 3)
    torch.testing.assert_close(lazy(x), theirs(x))
    assert lazy.num_features == 3
    with pytest.raises(InputError, match="got input with 4 channels"):
        lazy(torch.randn(5, 4))


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (torch.randn(3), InputError, r"expects input of shape \(N, C, H, W\), got 1-D"),
        (torch.randn(2, 3, 4), InputError, r"got 3-D input"),
        ([1.0, 2.0], InputTypeError, "input must be a torch.Tensor, got list"),
    ],
)
def test_bad_first_input_is_named_before_anything_is_sized(value, error, message):
    lazy, _ = _pair(2)
    with pytest.raises(error, match=message):
        lazy(value)
    assert lazy.has_uninitialized_params()  # still lazy: a good input sizes it later
    lazy(torch.randn(2, 3, 4, 4))
    assert lazy.num_features == 3


def test_a_first_input_without_channels_is_refused_and_the_module_stays_lazy():
    lazy, _ = _pair(2)
    with pytest.raises(InputError, match="first input, which has none"):
        lazy(torch.randn(2, 0, 4, 4))
    lazy(torch.randn(2, 3, 4, 4))
    assert type(lazy) is normdrop.nn.BatchNorm2d and lazy.num_features == 3


def test_tracing_before_the_first_batch_says_what_to_do():
    lazy, _ = _pair(2)
    with pytest.raises(InputTypeError, match="run one batch through the model before tracing"):
        torch.fx.symbolic_trace(torch.nn.Sequential(lazy))
    lazy(torch.randn(2, 3, 4, 4))
    traced = torch.fx.symbolic_trace(torch.nn.Sequential(lazy))
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(traced(x), lazy(x))


def test_constructor_checks_its_arguments():
    with pytest.raises(InputError, match="momentum"):
        normdrop.nn.LazyBatchNorm2d(momentum=1.5)
    with pytest.raises(InputTypeError, match="eps"):
        normdrop.nn.LazyBatchNorm1d(eps="small")


def test_sized_module_copies_and_keeps_its_class():
    lazy, _ = _pair(3)
    lazy(torch.randn(2, 2, 2, 3, 3))
    twin = copy.deepcopy(lazy)
    assert type(twin) is normdrop.nn.BatchNorm3d and twin.num_features == 2
