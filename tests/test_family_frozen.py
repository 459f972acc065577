"""FrozenBatchNorm against torch.nn.BatchNorm in eval mode, and freeze/unfreeze round trips."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normdrop.nn as ndnn
from normdrop.errors import InputError, InputTypeError


def _trained_batchnorm(cls, channels, affine=True, seed=0):
    """A BatchNorm with non-trivial statistics and affine."""
    generator = torch.Generator().manual_seed(seed)
    bn = cls(channels, affine=affine, dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(channels, generator=generator, dtype=torch.float64) + 0.1)
        bn.num_batches_tracked.fill_(7)
        if affine:
            bn.weight.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
            bn.bias.copy_(torch.randn(channels, generator=generator, dtype=torch.float64))
    return bn


RANKS = {
    1: (torch.nn.BatchNorm1d, ndnn.FrozenBatchNorm1d, (3,)),
    2: (torch.nn.BatchNorm2d, ndnn.FrozenBatchNorm2d, (3, 4)),
    3: (torch.nn.BatchNorm3d, ndnn.FrozenBatchNorm3d, (2, 3, 2)),
}


@settings(max_examples=20, deadline=None)
@given(
    rank=st.sampled_from([1, 2, 3]),
    affine=st.booleans(),
    training=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_equals_batchnorm_in_eval_mode_in_either_mode(rank, affine, training, seed):
    torch_cls, frozen_cls, spatial = RANKS[rank]
    bn = _trained_batchnorm(torch_cls, 4, affine, seed).eval()
    frozen = frozen_cls.from_batchnorm(bn).train(training)
    x = torch.randn(5, 4, *spatial, dtype=torch.float64)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = frozen(a)
    torch.testing.assert_close(out, bn(b))
    grad = torch.randn_like(x)
    out.backward(grad)
    bn(b).backward(grad)
    torch.testing.assert_close(a.grad, b.grad)
    assert list(frozen.parameters()) == []  # nothing to learn
    assert torch.equal(frozen.running_mean, bn.running_mean)  # and nothing moved


def test_state_dict_is_batchnorms_both_ways():
    bn = _trained_batchnorm(torch.nn.BatchNorm2d, 3)
    frozen = ndnn.FrozenBatchNorm2d(3, dtype=torch.float64)
    frozen.load_state_dict(bn.state_dict())
    assert list(frozen.state_dict()) == list(bn.state_dict())
    fresh = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    fresh.load_state_dict(frozen.state_dict())
    for key, value in bn.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value)
    # torchvision's FrozenBatchNorm2d saves no num_batches_tracked.
    legacy = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
    ndnn.FrozenBatchNorm2d(3, dtype=torch.float64).load_state_dict(legacy)


@pytest.mark.parametrize("options", [{"bias": False}, {"affine": False}, {}])
def test_a_frozen_layer_has_the_keys_of_the_layer_it_was_frozen_from(options):
    """bias=False (torch 2.13) leaves no bias key, affine=False neither weight nor bias: the
    frozen layer's checkpoint loads into the model it came from, and back."""
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(3, **options))
    frozen = ndnn.freeze_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3, **options)))
    assert list(frozen.state_dict()) == list(model.state_dict())
    frozen.load_state_dict(model.state_dict())
    model.load_state_dict(frozen.state_dict())


def test_tools_that_find_batchnorms_by_isinstance_leave_it_frozen():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), ndnn.FrozenBatchNorm1d(3))
    with torch.no_grad():
        model[1].running_mean.fill_(2.0)
    torch.optim.swa_utils.update_bn([torch.randn(8, 4)], model)
    assert torch.all(model[1].running_mean == 2.0)
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], ndnn.FrozenBatchNorm1d)


def _model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 1),
        _trained_batchnorm(torch.nn.BatchNorm2d, 3, seed=1),
        ndnn.GhostBatchNorm2d(3, virtual_batch_size=2, dtype=torch.float64),
        torch.nn.Flatten(),
        _trained_batchnorm(ndnn.BatchNorm1d, 12, affine=False, seed=2),
        torch.nn.Unflatten(1, (3, 2, 2, 1)),
        _trained_batchnorm(torch.nn.BatchNorm3d, 3, seed=3),
    ).double()


def test_freeze_then_unfreeze_round_trips_and_keeps_eval_outputs():
    model = _model()
    model[4].momentum = 0.3
    x = torch.randn(4, 2, 2, 2, dtype=torch.float64)
    expected = model.eval()(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}

    frozen = ndnn.freeze_batchnorm(model.train())
    assert [type(m).__name__ for m in frozen][1:7:1] == [
        "FrozenBatchNorm2d", "FrozenBatchNorm2d", "Flatten", "FrozenBatchNorm1d", "Unflatten",
        "FrozenBatchNorm3d",
    ]  # fmt: skip
    assert all(m.training for m in frozen)  # modes kept
    torch.testing.assert_close(frozen(x), expected)  # even in training mode
    assert frozen.state_dict().keys() == state.keys()  # the affine=False layer's keys too
    # checkpoints move both ways, the affine=False layer's included
    ndnn.freeze_batchnorm(_model().train()).load_state_dict(state)
    _model().load_state_dict(frozen.state_dict())

    thawed = ndnn.unfreeze_batchnorm(frozen)
    # the layers that were frozen come back, classes and settings
    assert type(thawed[1]) is torch.nn.BatchNorm2d and type(thawed[4]) is ndnn.BatchNorm1d
    assert type(thawed[2]) is ndnn.GhostBatchNorm2d and thawed[2].virtual_batch_size == 2
    assert type(thawed[6]) is torch.nn.BatchNorm3d
    assert thawed[4].momentum == 0.3 and not thawed[4].affine
    assert thawed.state_dict().keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(thawed.state_dict()[key], value)
    torch.testing.assert_close(thawed.eval()(x), expected)
    assert all(p.requires_grad for p in thawed.parameters())


def test_unfreeze_gives_back_the_frozen_layer_in_its_device_and_dtype_without_hooks():
    bn = _trained_batchnorm(torch.nn.BatchNorm1d, 3)
    seen = []
    bn.register_forward_hook(lambda module, args, output: seen.append(type(module)))
    frozen = ndnn.freeze_batchnorm(bn).float()  # converted after freezing
    with torch.no_grad():
        frozen.running_mean.add_(1.0)  # changed after freezing: the thawed layer has it
    frozen.eps = 1e-3
    pickle.loads(pickle.dumps(frozen))  # the original's lambda hook does not travel with it
    thawed = ndnn.unfreeze_batchnorm(frozen)
    assert type(thawed) is torch.nn.BatchNorm1d and thawed.running_mean.dtype == torch.float32
    assert thawed.eps == 1e-3 and thawed.weight.requires_grad
    torch.testing.assert_close(thawed.running_mean, frozen.running_mean)
    torch.testing.assert_close(thawed.weight, frozen.weight)
    thawed(torch.randn(4, 3))
    assert seen == []  # hooks are not kept: the frozen layer never ran them either
    assert ndnn.unfreeze_batchnorm(frozen) is not thawed  # a fresh layer each time
    # a frozen layer built directly thaws to normdrop's BatchNorm of its rank
    assert type(ndnn.unfreeze_batchnorm(ndnn.FrozenBatchNorm2d(3))) is ndnn.BatchNorm2d


def test_a_parametrized_batchnorm_thaws_to_normdrops_with_the_frozen_values():
    bn = torch.nn.BatchNorm2d(3)
    torch.nn.utils.parametrize.register_parametrization(bn, "weight", torch.nn.Identity())
    frozen = ndnn.freeze_batchnorm(bn)
    with torch.no_grad():
        frozen.weight.fill_(7.0)
    thawed = ndnn.unfreeze_batchnorm(frozen)
    assert type(thawed) is ndnn.BatchNorm2d
    assert torch.equal(thawed.weight, torch.full((3,), 7.0))


def test_an_affine_false_frozen_checkpoint_with_weight_and_bias_still_loads():
    """Before weight and bias left an affine=False frozen layer's state_dict, its checkpoints
    held them (ones and zeros): they load; other values are refused as unexpected keys."""
    frozen = ndnn.freeze_batchnorm(_trained_batchnorm(torch.nn.BatchNorm2d, 3, affine=False))
    old = {**frozen.state_dict(), "weight": torch.ones(3), "bias": torch.zeros(3)}
    ndnn.freeze_batchnorm(torch.nn.BatchNorm2d(3, affine=False)).load_state_dict(old)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        frozen.load_state_dict({**old, "weight": torch.full((3,), 2.0)})


def test_freeze_refuses_what_it_cannot_freeze():
    with pytest.raises(InputError, match="track_running_stats=False"):
        ndnn.freeze_batchnorm(torch.nn.BatchNorm1d(2, track_running_stats=False))

    class WithActivation(ndnn.BatchNorm1d):
        def forward(self, input):
            return torch.relu(super().forward(input))

    model = torch.nn.Sequential(WithActivation(2))
    with pytest.warns(UserWarning, match=r"left these BatchNorms unfrozen .*: 0$"):
        ndnn.freeze_batchnorm(model)
    assert type(model[0]) is WithActivation
    with pytest.raises(InputError, match="num_features=2"):
        ndnn.FrozenBatchNorm1d(2)(torch.randn(3, 4))
    with pytest.raises(InputError, match=r"\(N, C, H, W\)"):
        ndnn.FrozenBatchNorm2d(2)(torch.randn(3, 2))


def test_eps_zero_freezes_like_torchs_eval_and_negative_eps_is_refused():
    """torch.nn allows eps = 0 in eval mode (the only mode a frozen layer has); eps < 0 never."""
    bn = torch.nn.BatchNorm2d(3, eps=0.0).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 4, 4)
    frozen = ndnn.freeze_batchnorm(bn)
    assert isinstance(frozen, ndnn.FrozenBatchNorm2d) and frozen.eps == 0.0
    torch.testing.assert_close(frozen(x), bn(x))
    with pytest.raises(InputError, match=r"eps must be non-negative, got -1\.0"):
        ndnn.FrozenBatchNorm2d(3, eps=-1.0)


def test_a_subclass_that_keeps_batchnorms_forward_is_frozen():
    """Only a subclass with its own forward is left unfrozen (documented); one that changes a
    default or the initialization evaluates as BatchNorm and is frozen. It was left, with a
    warning calling its forward "not plain BatchNorm"."""

    class OtherEps(torch.nn.BatchNorm2d):
        def __init__(self, channels, **options):
            super().__init__(channels, eps=1e-3, **options)

    class CheckedInput(ndnn.BatchNorm1d):
        def _check_input_dim(self, input):
            super()._check_input_dim(input)

    model = torch.nn.Sequential(
        _trained_batchnorm(OtherEps, 3, seed=4),
        torch.nn.Flatten(),
        _trained_batchnorm(CheckedInput, 12, seed=5),
    ).eval()
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left unfrozen
        frozen = ndnn.freeze_batchnorm(model)
    assert [type(m).__name__ for m in frozen] == [
        "FrozenBatchNorm2d", "Flatten", "FrozenBatchNorm1d",
    ]  # fmt: skip
    assert frozen[0].eps == 1e-3
    torch.testing.assert_close(frozen(x), expected)


@pytest.mark.parametrize(
    ("frozen_cls", "shape"),
    [
        (ndnn.FrozenBatchNorm1d, (5, 3)),
        (ndnn.FrozenBatchNorm1d, (5, 3, 4)),
        (ndnn.FrozenBatchNorm2d, (2, 3, 4, 5)),
        (ndnn.FrozenBatchNorm3d, (2, 3, 2, 3, 2)),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_scripted_frozen_layer_computes_and_checks_what_the_eager_one_does(
    frozen_cls, shape, dtype
):
    torch_cls = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
    bn = _trained_batchnorm(torch_cls[frozen_cls._input_ranks[-1] - 2], 3, seed=4)
    frozen = frozen_cls.from_batchnorm(bn).to(dtype if dtype != torch.float16 else torch.float32)
    scripted = torch.jit.script(frozen)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 300).to(dtype)  # an offset: x - mean first
    torch.testing.assert_close(scripted(x), frozen(x), rtol=0, atol=0)
    with pytest.raises(torch.jit.Error, match=r"expects input of shape .*got 6-D"):
        scripted(x.reshape(*x.shape, *[1] * (6 - x.dim())))
    wrong = torch.randn(shape[0], 4, *shape[2:], dtype=dtype)
    with pytest.raises(torch.jit.Error, match=r"\(num_features=3\) got input with 4 channels"):
        scripted(wrong)
    # a layer pickled before the scripted forward's name attribute existed scripts too
    old = frozen.__reduce_ex__(2)
    state = {k: v for k, v in old[2].items() if k != "_name"}
    revived = old[0](*old[1])
    revived.__setstate__(state)
    torch.testing.assert_close(torch.jit.script(revived)(x), frozen(x), rtol=0, atol=0)
    other = torch.float64 if dtype != torch.float64 else torch.float32
    for bad in (x.to(other), x.to(torch.uint8)):  # as the eager forward, which raises too
        with pytest.raises(InputTypeError):
            frozen(bad)
        with pytest.raises(torch.jit.Error, match=r"InputTypeError.*dtype"):
            scripted(bad)


class _AliasedBatchNorm(torch.nn.Module):
    """One BatchNorm under two names of one parent; the forward uses the second."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.norms = torch.nn.ModuleDict({"main": self.bn})

    def forward(self, x):
        return self.norms["main"](self.conv(x))


def test_freeze_replaces_a_layer_under_every_name_and_a_shared_layer_by_one():
    aliased = ndnn.freeze_batchnorm(_AliasedBatchNorm().train())
    assert isinstance(aliased.norms["main"], ndnn.FrozenBatchNorm2d)
    assert aliased.bn is aliased.norms["main"]
    before = aliased.bn.running_mean.clone()
    aliased(torch.randn(4, 3, 5, 5))
    assert torch.equal(aliased.norms["main"].running_mean, before)  # frozen where it runs

    bn = torch.nn.BatchNorm2d(4)
    shared = torch.nn.Sequential(
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), bn),
        torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), bn),
    )
    ndnn.freeze_batchnorm(shared)
    assert isinstance(shared[0][1], ndnn.FrozenBatchNorm2d) and shared[0][1] is shared[1][1]
    ndnn.unfreeze_batchnorm(shared)
    assert type(shared[0][1]) is torch.nn.BatchNorm2d and shared[0][1] is shared[1][1]


def test_freeze_that_raises_leaves_the_model_as_it_was():
    model = torch.nn.Sequential(
        torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4, track_running_stats=False)
    )
    first = model[0]
    with pytest.raises(InputError):
        ndnn.freeze_batchnorm(model)
    assert model[0] is first and type(model[1]) is torch.nn.BatchNorm2d
