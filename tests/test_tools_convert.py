"""convert(): torch.nn <-> normdrop.nn, keeping tensors, modes, hooks, device and dtype."""

from __future__ import annotations

import warnings

import pytest
import torch

import normdrop
import normdrop.nn as ndnn
from normdrop.errors import InputError
from normdrop.tools import convert


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, bias=False),
            torch.nn.BatchNorm2d(4, momentum=None),
            torch.nn.ReLU(),
            torch.nn.Dropout2d(0.2),
            torch.nn.Conv3d(1, 1, 1),
        )
        self.bn1d = torch.nn.BatchNorm1d(8, affine=False)
        self.bn3d = torch.nn.BatchNorm3d(2, track_running_stats=False)
        self.nobias = torch.nn.BatchNorm1d(8, bias=False)
        self.sync = torch.nn.SyncBatchNorm(8)
        self.drops = torch.nn.ModuleList(
            [torch.nn.Dropout(0.3), torch.nn.Dropout1d(0.1), torch.nn.Dropout3d(0.4, inplace=True),
             torch.nn.AlphaDropout(0.2), torch.nn.FeatureAlphaDropout(0.1)]
        )  # fmt: skip
        self.head = torch.nn.Linear(4, 8)

    def forward(self, x):
        h = self.features[:4](x).mean((2, 3))
        h = self.head(h)
        h = self.nobias(self.bn1d(h))
        for drop in self.drops[:2]:
            h = drop(h.unsqueeze(-1)).squeeze(-1)
        return h


def _net():
    torch.manual_seed(0)
    net = Net().double()
    with torch.no_grad():
        for module in net.modules():
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.num_batches_tracked.fill_(3)
    net.features[1].train(False)  # mixed modes must survive
    net.drops[2].train(False)
    return net


def _types(model):
    return [type(m) for m in model.modules()]


def test_to_normdrop_swaps_every_layer_and_keeps_state_modes_and_outputs():
    net = _net()
    converted = convert(net, to="normdrop")
    assert converted is not net and type(net.bn1d) is torch.nn.BatchNorm1d  # a copy
    pairs = {
        "features.1": ndnn.BatchNorm2d, "features.3": ndnn.Dropout2d, "bn1d": ndnn.BatchNorm1d,
        "bn3d": ndnn.BatchNorm3d, "nobias": ndnn.BatchNorm1d, "sync": ndnn.SyncBatchNorm,
        "drops.0": ndnn.Dropout, "drops.1": ndnn.Dropout1d, "drops.2": ndnn.Dropout3d,
        "drops.3": ndnn.AlphaDropout, "drops.4": ndnn.FeatureAlphaDropout,
    }  # fmt: skip
    for path, cls in pairs.items():
        assert type(converted.get_submodule(path)) is cls, path
    assert converted.features[1].momentum is None and converted.nobias.bias is None
    assert converted.drops[2].inplace and converted.drops[3].p == 0.2
    assert [m.training for m in converted.modules()] == [m.training for m in net.modules()]
    assert converted.state_dict().keys() == net.state_dict().keys()
    for key, value in net.state_dict().items():
        assert converted.state_dict()[key].dtype == value.dtype
        assert torch.equal(converted.state_dict()[key], value)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    net.eval(), converted.eval()
    torch.testing.assert_close(converted(x), net(x))


def test_training_outputs_agree_under_the_reference_backend():
    """With the reference math the dropout masks are torch's own for the same seed."""
    net = _net().train()
    converted = convert(net)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    with normdrop.use_backend("reference"):
        torch.manual_seed(5)
        ours = converted(x)
    torch.manual_seed(5)
    torch.testing.assert_close(ours, net(x))
    torch.testing.assert_close(converted.bn1d.running_var, net.bn1d.running_var)


def test_round_trip_is_the_identity_and_inplace_shares_tensors():
    net = _net()
    parameters = [id(p) for p in net.parameters()]
    back = convert(convert(net, to="normdrop", inplace=True), to="torch", inplace=True)
    assert back is net
    assert _types(back) == _types(_net())
    assert [id(p) for p in back.parameters()] == parameters
    for key, value in _net().state_dict().items():
        assert torch.equal(back.state_dict()[key], value)


def test_hooks_travel_and_a_bare_layer_is_converted():
    calls = []
    bn = torch.nn.BatchNorm1d(3)
    bn.register_forward_hook(lambda m, a, out: calls.append(type(m)))
    converted = convert(bn)
    converted(torch.randn(4, 3))
    assert calls == [ndnn.BatchNorm1d]


def test_layers_without_counterpart_and_user_subclasses_stay():
    class MyBatchNorm(torch.nn.BatchNorm1d):
        pass

    model = torch.nn.Sequential(
        MyBatchNorm(3), ndnn.GhostBatchNorm1d(3, virtual_batch_size=2), ndnn.DropPath(0.1)
    )
    with pytest.warns(UserWarning, match=r"not exactly torch.nn's.*MyBatchNorm x1 \('0'\)"):
        assert type(convert(model)[0]) is MyBatchNorm
    with pytest.warns(UserWarning, match=r"1 \(GhostBatchNorm1d\), 2 \(DropPath\)"):
        back = convert(model, to="torch")
    assert type(back[1]) is ndnn.GhostBatchNorm1d
    with pytest.raises(InputError, match="to must be one of"):
        convert(model, to="keras")


class _Block(torch.nn.Module):
    """torchvision's ResNet BasicBlock: conv-bn-relu-conv-bn, in-place residual add."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c_out)
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv2 = torch.nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c_out, eps=0.0)  # eps=0: valid in eval, as in torch
        self.down = torch.nn.Sequential(
            torch.nn.Conv2d(c_in, c_out, 1, stride, bias=False), torch.nn.BatchNorm2d(c_out)
        )

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += self.down(x)
        return self.relu(out)


def _third_party_style():
    torch.manual_seed(1)
    return torch.nn.Sequential(
        _Block(3, 8, 2),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 16),
        torch.nn.BatchNorm1d(16),
        torch.nn.ReLU(inplace=True),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(16, 3),
    )


def test_third_party_style_model_converts_and_serializes(tmp_path):
    """A torchvision-style network with an eps=0 BatchNorm converts (torch allows eps=0 in
    eval); trained eval outputs agree; pickle, jit.trace and torch.export of the converted
    model in eval mode compute the same."""
    import copy
    import pickle

    reference = _third_party_style()
    reference.train()
    reference[0].bn2.eps = 1e-5  # eps=0 is refused in training, by torch and by us
    with torch.no_grad():
        reference(torch.randn(8, 3, 9, 9))  # non-trivial running statistics
    reference[0].bn2.eps = 0.0
    converted = convert(reference).eval()
    reference.eval()
    assert type(converted[0].bn2) is ndnn.BatchNorm2d and converted[0].bn2.eps == 0.0
    x = torch.randn(4, 3, 9, 9)
    expected = reference(x)
    torch.testing.assert_close(converted(x), expected)
    torch.testing.assert_close(copy.deepcopy(converted)(x), expected)
    torch.testing.assert_close(pickle.loads(pickle.dumps(converted))(x), expected)
    traced = torch.jit.trace(converted, x)
    other = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(traced(other), reference(other))
    exported = torch.export.export(converted, (x,))
    torch.testing.assert_close(exported.module()(x), expected)
    torch.save(converted, tmp_path / "model.pt")
    torch.testing.assert_close(torch.load(tmp_path / "model.pt", weights_only=False)(x), expected)


@pytest.mark.parametrize("backend", normdrop.backend.BACKENDS)
def test_training_mode_trace_uses_each_batchs_own_statistics(backend):
    """jit.trace in training mode must record the statistics computation, not bake in the
    example batch's (at commit dce2dad the fast path did: silently wrong on any other batch)."""
    import copy

    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).train()
    converted = convert(reference)
    with normdrop.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python values
        traced = torch.jit.trace(copy.deepcopy(converted), torch.randn(2, 3, 8, 8))
        other = torch.randn(5, 3, 8, 8) * 3 + 1
        torch.testing.assert_close(traced(other), reference(other))


def test_backward_hooks_fire_and_handles_still_remove_hooks_after_convert():
    calls = []
    bn = torch.nn.BatchNorm2d(3)
    bn.register_full_backward_hook(lambda *args: calls.append("full"))
    dropout = torch.nn.Dropout(0.5)
    dropout.register_backward_hook(lambda *args: calls.append("old"))  # the deprecated kind
    model = torch.nn.Sequential(bn, dropout)
    handle = model[0].register_forward_hook(lambda *args: calls.append("forward"))
    converted = convert(model, inplace=True)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    converted(x).sum().backward()
    assert sorted(calls) == ["forward", "full", "old"]
    handle.remove()  # the handle of the torch.nn layer removes the hook from its twin
    calls.clear()
    converted(x)
    assert calls == []


def test_a_layer_shared_by_two_parents_stays_one_layer():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(3)
            self.alias = self.bn
            self.block = torch.nn.Sequential(self.bn, torch.nn.Dropout(0.1))
            self.block_again = self.block

    ours = convert(Shared())
    assert isinstance(ours.bn, ndnn.BatchNorm2d)
    assert ours.bn is ours.alias is ours.block[0] and ours.block is ours.block_again
    back = convert(ours, "torch")
    assert type(back.bn) is torch.nn.BatchNorm2d
    assert back.bn is back.alias is back.block[0] and back.block is back.block_again


class _StateDictExtra:
    """A state_dict post-hook adding a key (picklable, so a deep copy has its own)."""

    def __call__(self, module, state_dict, prefix, local_metadata):
        state_dict[prefix + "extra"] = torch.zeros(1)


class _Record(list):
    """A load_state_dict pre- or post-hook recording the class of the module it ran on."""

    def __call__(self, module, *args):
        self.append(type(module))
        if len(args) > 1:  # pre-hook: (state_dict, prefix, ...)
            args[0].pop(args[1] + "extra", None)


@pytest.mark.parametrize("inplace", [False, True])
def test_instance_attributes_and_state_dict_hooks_travel(inplace):
    """Only the forward/backward hook tables and the registered tensors travelled: a user's
    attributes, transformers' ``_is_hf_initialized``, state_dict and load_state_dict hooks were
    lost (and a load pre-hook holds its module: it must be the twin, not the dead layer)."""
    bn = torch.nn.BatchNorm2d(3)
    bn.tag, bn._is_hf_initialized = "keep", True
    bn.register_state_dict_post_hook(_StateDictExtra())
    bn.register_load_state_dict_pre_hook(_Record())
    bn.register_load_state_dict_post_hook(_Record())
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), bn)
    ours = convert(model, inplace=inplace)
    del model, bn
    twin = ours[1]
    assert isinstance(twin, ndnn.BatchNorm2d)
    assert twin.tag == "keep" and twin._is_hf_initialized is True
    assert "1.extra" in ours.state_dict()
    ours.load_state_dict(ours.state_dict())
    (pre,) = twin._load_state_dict_pre_hooks.values()
    (post,) = twin._load_state_dict_post_hooks.values()
    assert pre.hook == post == [ndnn.BatchNorm2d]


def test_a_pruned_batchnorm_converts_with_its_mask():
    """torch.nn.utils.prune (network slimming prunes BatchNorm weights) turns ``weight`` into a
    plain attribute recomputed by a pre-hook from ``weight_orig`` and a ``weight_mask`` buffer.
    The mask became a plain attribute and the twin got a fresh ``weight`` parameter: different
    state_dict keys, and the pre-hook raised when it set ``weight``."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    prune.l1_unstructured(model[1], "weight", amount=0.5)
    x = torch.randn(2, 3, 6, 6)
    expected, keys = model(x), list(model.state_dict())
    ours = convert(model, inplace=True)  # deepcopy of a pruned module is torch's limitation
    assert isinstance(ours[1], ndnn.BatchNorm2d) and list(ours.state_dict()) == keys
    torch.testing.assert_close(ours(x), expected)
    back = convert(ours, "torch", inplace=True)
    assert list(back.state_dict()) == keys
    prune.remove(back[1], "weight")
    torch.testing.assert_close(back(x), expected)


def test_a_model_that_cannot_be_copied_gets_a_clear_error_from_convert_and_fold():
    from normdrop.tools import fold_batchnorm

    class Cached(torch.nn.Module):  # keeps a non-leaf tensor, which deepcopy refuses
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.cache = torch.nn.Conv2d(1, 1, 1), torch.nn.BatchNorm2d(1), None

        def forward(self, x):
            y = self.bn(self.conv(x))
            self.cache = y * 2
            return y

    model = Cached()
    model(torch.randn(2, 1, 3, 3))
    with pytest.raises(InputError, match="pass inplace=True"):
        convert(model)
    with pytest.raises(InputError, match="fold_batchnorm works on a deep copy"):
        fold_batchnorm(model.eval())
    assert type(convert(model, inplace=True).bn) is ndnn.BatchNorm2d


class _Positive(torch.nn.Module):
    def forward(self, weight):
        return weight.abs()


def test_layers_convert_leaves_are_named_and_exact_ones_convert_silently():
    """A parametrized BatchNorm is a subclass made on the fly, a lazy one becomes BatchNorm2d
    at its first forward: both stay as they are, named in one warning with the count per
    class; a model of exact classes converts without a word."""
    from torch.nn.utils import parametrize

    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.LazyBatchNorm2d(),
        *[torch.nn.BatchNorm2d(4) for _ in range(4)],
    )
    for layer in model[3:]:
        parametrize.register_parametrization(layer, "weight", _Positive())
    pattern = r"LazyBatchNorm2d x1 \('2'\); ParametrizedBatchNorm2d x4 \('3', '4', '5', \.\.\.\)"
    with pytest.warns(UserWarning, match=pattern):
        convert(model, inplace=True)  # an uninitialized lazy layer cannot be deep-copied
    assert type(model[1]) is ndnn.BatchNorm2d
    assert type(model[2]) is torch.nn.LazyBatchNorm2d
    assert all(type(layer).__name__ == "ParametrizedBatchNorm2d" for layer in model[3:])
    model(torch.randn(2, 3, 5, 5))  # the lazy layer is a BatchNorm2d now
    del model[3:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = convert(model)
    assert type(converted[2]) is ndnn.BatchNorm2d
