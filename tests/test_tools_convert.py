"""convert(): torch.nn <-> normdrop.nn, keeping tensors, modes, hooks, device and dtype."""

from __future__ import annotations

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
    assert type(convert(model)[0]) is MyBatchNorm
    with pytest.warns(UserWarning, match=r"1 \(GhostBatchNorm1d\), 2 \(DropPath\)"):
        back = convert(model, to="torch")
    assert type(back[1]) is ndnn.GhostBatchNorm1d
    with pytest.raises(InputError, match="to must be one of"):
        convert(model, to="keras")
