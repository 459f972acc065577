"""Model specs and where each variant puts BatchNorm and Dropout."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import normdrop
import normdrop.nn
from normdrop.errors import InputError
from normdrop.lab.config import VARIANTS, Variant
from normdrop.lab.models import build_model, last_activation, parse_model_spec
from normdrop.lab.norms import BN_CLASSES, norm_factory
from normdrop.lab.seed import SimpleNet

BN = torch.nn.modules.batchnorm._BatchNorm


@pytest.fixture(autouse=True)
def _reference_math():
    # These tests are about structure; the reference math keeps them independent of kernel
    # compilation time.
    with normdrop.use_backend("reference"):
        yield


def _layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not isinstance(m, nn.Sequential)]


def _check_placement(model: nn.Module, variant: Variant) -> None:
    layers = _layers(model)
    kinds = [type(m) for m in layers]
    assert any(isinstance(m, BN) for m in layers) == variant.batch_norm
    assert any(isinstance(m, nn.Dropout | nn.Dropout2d) for m in layers) == variant.dropout
    for i, layer in enumerate(layers):
        if isinstance(layer, BN):
            # BN follows its Linear/Conv directly, which has no bias; the activation follows BN.
            assert isinstance(layers[i - 1], nn.Linear | nn.Conv2d), kinds
            assert layers[i - 1].bias is None
            assert isinstance(layers[i + 1], nn.ReLU), kinds
        if isinstance(layer, nn.Dropout | nn.Dropout2d):
            assert isinstance(layers[i - 1], nn.ReLU | nn.MaxPool2d), kinds
            # Never feeding a BN, directly or through a Linear/Conv (Li et al. 2019).
            assert not any(isinstance(m, BN) for m in layers[i + 1 :]), kinds
    if not variant.batch_norm:
        assert all(m.bias is not None for m in layers if isinstance(m, nn.Linear | nn.Conv2d))
    assert isinstance(layers[-1], nn.Linear) and layers[-1].bias is not None


@given(
    depth=st.integers(1, 4),
    width=st.integers(1, 40),
    features=st.integers(1, 30),
    outputs=st.integers(1, 5),
    variant=st.sampled_from(VARIANTS),
)
@settings(max_examples=40, deadline=None)
def test_mlp_placement_and_shapes(depth, width, features, outputs, variant):
    v = Variant.parse(variant)
    model = build_model(f"mlp:{depth}x{width}", v, (features,), outputs, 0.3)
    _check_placement(model, v)
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == depth + 1
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    # Dropout after every hidden activation without BN; only after the last one with BN.
    assert len(dropouts) == (0 if not v.dropout else 1 if v.batch_norm else depth)
    assert all(m.p == 0.3 for m in dropouts)
    assert model(torch.randn(3, features)).shape == (3, outputs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_layers_are_normdrops(variant):
    model = build_model("mlp:2x8", Variant.parse(variant), (5,), 3)
    for m in model.modules():
        if isinstance(m, BN):
            assert type(m) is normdrop.nn.BatchNorm1d
        if isinstance(m, nn.Dropout):
            assert type(m) is normdrop.nn.Dropout


def test_simplenet_has_the_seeds_topology():
    seed = SimpleNet(in_features=10, hidden=50, out_features=1, batch_norm=True, dropout=0.5)
    ours = build_model("simplenet", Variant(True, True), (10,), 1, 0.5)
    expected = [type(m) for m in (seed.fc1, seed.bn1, nn.ReLU(), seed.dropout1, seed.fc2)]
    assert [type(m) for m in _layers(ours)] == expected
    shapes = [(m.in_features, m.out_features) for m in ours if isinstance(m, nn.Linear)]
    assert shapes == [(10, 50), (50, 1)]
    assert ours[1].num_features == seed.bn1.num_features and ours[3].p == seed.dropout1.p
    # The one difference, by design: no bias before BN (BN's beta takes its place).
    assert ours[0].bias is None and seed.fc1.bias is not None


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (1, 28, 28)])
def test_cnn_on_images(variant, shape):
    v = Variant.parse(variant)
    model = build_model("cnn:small", v, shape, 10, 0.25)
    _check_placement(model, v)
    assert model(torch.randn(4, *shape)).shape == (4, 10)
    conv_dropout = [m for m in model.modules() if isinstance(m, nn.Dropout2d)]
    assert len(conv_dropout) == (2 if v.dropout and not v.batch_norm else 0)
    bns = [m for m in model.modules() if isinstance(m, BN)]
    if v.batch_norm:
        assert [type(m) for m in bns] == [normdrop.nn.BatchNorm2d] * 2 + [normdrop.nn.BatchNorm1d]


def test_mlp_flattens_images():
    model = build_model("mlp:1x4", Variant(False, False), (1, 8, 8), 10)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize(
    "spec", ["mlp", "mlp:0x5", "mlp:2x0", "mlp:2by5", "cnn:big", "resnet", "mlp:99x5"]
)
def test_bad_model_specs(spec):
    with pytest.raises(InputError, match="--model"):
        parse_model_spec(spec)


def test_cnn_needs_images():
    with pytest.raises(InputError, match=r"cnn:small needs image data.*\(13,\)"):
        build_model("cnn:small", Variant(True, False), (13,), 3)
    # The message gives the accepted shapes in the terms of docs/lab.md: NPZ X of 3 or 4 dims.
    with pytest.raises(InputError) as raised:
        build_model("cnn:small", Variant(True, False), (32, 32, 3), 3)  # channels last
    message = str(raised.value)
    assert "(samples, height, width)" in message and "(samples, channels, height, width)" in message
    assert "channels first" in message and "got samples of shape (32, 32, 3)" in message


def test_last_activation_sees_the_last_hidden_preactivation():
    model = build_model("mlp:2x6", Variant(True, True), (4,), 2)
    seen = []
    last_activation(model).register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0]))
    model.eval()
    x = torch.randn(5, 4)
    model(x)
    expected = model[4](model[3](model[2](model[1](model[0](x)))))  # the BN of layer 2
    torch.testing.assert_close(seen[0], expected)


def test_bn_momentum_reaches_the_layers():
    norm = norm_factory("batchnorm", momentum=0.37)
    model = build_model("mlp:2x4", Variant(True, False), (3,), 2, norm=norm)
    assert [m.momentum for m in model.modules() if isinstance(m, BN)] == [0.37, 0.37]


def test_missing_bn_family_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(BN_CLASSES, "ghost", ("NoSuchNorm1d", "NoSuchNorm2d"))
    make = norm_factory("ghost")
    with pytest.raises(
        InputError, match=r"--bn-type ghost: normdrop.nn.NoSuchNorm1d is not available"
    ):
        make(4, False)


@pytest.mark.parametrize(
    ("bn_type", "extra"), [("ghost", {"virtual_batch_size": 4}), ("renorm", {})]
)
def test_bn_families(bn_type, extra):
    names = BN_CLASSES[bn_type]
    if not all(hasattr(normdrop.nn, name) for name in names):
        pytest.skip(f"normdrop.nn has no {names}: that BN family is not in this tree yet")
    norm = norm_factory(bn_type, momentum=0.2, **extra)
    model = build_model("mlp:2x8", Variant(True, True), (5,), 3, norm=norm)
    layers = [m for m in model.modules() if type(m).__name__ == names[0]]
    assert len(layers) == 2 and all(m.momentum == 0.2 for m in layers)
    if extra:
        assert all(m.virtual_batch_size == 4 for m in layers)
    model.train()
    assert model(torch.randn(16, 5)).shape == (16, 3)
    cnn = build_model("cnn:small", Variant(True, False), (1, 8, 8), 3, norm=norm)
    assert sum(type(m).__name__ == names[1] for m in cnn.modules()) == 2
    assert cnn(torch.randn(16, 1, 8, 8)).shape == (16, 3)
