"""The tools on real architectures, written in plain torch after torchvision's definitions (small
widths): ResNet-18 / ResNet-50-style bottlenecks with downsample branches and a ResNeXt group
conv, MobileNetV2 (depthwise convs, ReLU6, inverted residuals), EfficientNet-B0-style (SiLU,
squeeze-excitation, stochastic depth), DenseNet (pre-activation BN-ReLU-Conv, concatenation),
VGG-BN, a U-Net (reflect padding, dilation, grouped ConvTranspose2d -> BatchNorm), Conv1d/3d and
ConvTranspose1d/3d with BatchNorm, Linear + BatchNorm1d on (N, C) and (N, C, L), a BatchNorm
applied twice and BatchNorms in ModuleDict/ModuleList (one of them under two names).

The oracle is always the torch.nn model itself, with random non-trivial running statistics and
affine parameters. When ``transformers`` is installed, its ResNet, MobileNetV2, EfficientNet and
ConvNeXt models built from small configurations (no weights) are checked as well.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normdrop
import normdrop.nn as ndnn
from normdrop.tools import (
    FoldedBatchNorm,
    convert,
    fold_batchnorm,
    lint,
    mc_dropout,
    mc_predict,
    recalibrate_batchnorm,
)

from _helpers import frozen_batchnorm_2d_in


@pytest.fixture(autouse=True)
def _reference_kernels():
    """normdrop's reference math: the tools are under test here, not the kernels, whose first
    compilation for each layout would take most of this file's time (one test below runs the
    fast kernels)."""
    with normdrop.use_backend("reference"):
        yield


# --------------------------------------------------------------------------------------------
# Models (torchvision's structure, small widths)
# --------------------------------------------------------------------------------------------


def conv_bn(c_in, c_out, k=3, stride=1, groups=1, act=nn.ReLU):
    layers = [
        nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    return nn.Sequential(*layers, act(inplace=True)) if act else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in, c, stride=1, downsample=None, groups=1, width_per_group=64):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in, c, stride=1, downsample=None, groups=1, width_per_group=64):
        super().__init__()
        width = int(c * (width_per_group / 64.0)) * groups
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, block, layers, width=8, groups=1, width_per_group=64, num_classes=5):
        super().__init__()
        self.inplanes, self.groups, self.width_per_group = width, groups, width_per_group
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 4 * block.expansion, num_classes)

    def _make_layer(self, block, c, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != c * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, c * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(c * block.expansion),
            )
        kw = {"groups": self.groups, "width_per_group": self.width_per_group}
        layers = [block(self.inplanes, c, stride, downsample, **kw)]
        self.inplanes = c * block.expansion
        layers += [block(self.inplanes, c, **kw) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18():
    return ResNet(BasicBlock, [2, 2, 2])


def resnet50():
    return ResNet(Bottleneck, [2, 1, 1], width=4)


def resnext():
    return ResNet(Bottleneck, [1, 1, 1], width=4, groups=4, width_per_group=16)


class InvertedResidual(nn.Module):
    def __init__(self, c_in, c_out, stride, expand):
        super().__init__()
        hidden = c_in * expand
        self.use_res_connect = stride == 1 and c_in == c_out
        layers = [conv_bn(c_in, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [
            conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        features, c = [conv_bn(3, 8, 3, 2, act=nn.ReLU6)], 8
        for t, out, n, s in [(1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 1, 1)]:
            for i in range(n):
                features.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        features.append(conv_bn(c, 32, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, num_classes))

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


class SqueezeExcitation(nn.Module):
    def __init__(self, c, squeeze):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)
        self.activation, self.scale_activation = nn.SiLU(), nn.Sigmoid()

    def forward(self, x):
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(scale) * x


class StochasticDepth(nn.Module):
    """torchvision.ops.StochasticDepth(p, mode="row")."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        noise = torch.empty([x.shape[0]] + [1] * (x.ndim - 1), dtype=x.dtype, device=x.device)
        return x * noise.bernoulli_(1 - self.p).div_(1 - self.p)


class MBConv(nn.Module):
    def __init__(self, c_in, c_out, k, stride, expand, drop_path):
        super().__init__()
        self.use_res_connect = stride == 1 and c_in == c_out
        hidden = c_in * expand
        layers = [conv_bn(c_in, hidden, 1, act=nn.SiLU)] if hidden != c_in else []
        layers += [
            conv_bn(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU),
            SqueezeExcitation(hidden, max(1, c_in // 4)),
            conv_bn(hidden, c_out, 1, act=None),
        ]
        self.block = nn.Sequential(*layers)
        self.stochastic_depth = drop_path

    def forward(self, x):
        out = self.block(x)
        if self.use_res_connect:
            out = self.stochastic_depth(out) + x
        return out


class EfficientNet(nn.Module):
    def __init__(self, drop_path=StochasticDepth, num_classes=5):
        super().__init__()
        stages = [(1, 3, 1, 8, 8, 1), (6, 3, 2, 8, 12, 2), (6, 5, 1, 12, 16, 2)]
        layers, i = [conv_bn(3, 8, 3, 2, act=nn.SiLU)], 0
        for expand, k, stride, c_in, c_out, n in stages:
            stage = []
            for j in range(n):
                first = j == 0
                stage.append(
                    MBConv(c_in if first else c_out, c_out, k, stride if first else 1, expand,
                           drop_path(0.2 * i / 5))
                )  # fmt: skip
                i += 1
            layers.append(nn.Sequential(*stage))
        layers.append(conv_bn(16, 32, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True), nn.Linear(32, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class DenseLayer(nn.Module):
    def __init__(self, c_in, growth, drop_rate):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(c_in), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, 2 * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(2 * growth), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False)
        self.drop = nn.Dropout(drop_rate) if drop_rate else nn.Identity()

    def forward(self, features):
        x = torch.cat(features, 1)
        out = self.conv1(self.relu1(self.norm1(x)))  # pre-activation: BN after a concat
        return self.drop(self.conv2(self.relu2(self.norm2(out))))


class DenseBlock(nn.ModuleDict):
    def __init__(self, n, c_in, growth, drop_rate):
        super().__init__()
        for i in range(n):
            self.add_module(f"denselayer{i + 1}", DenseLayer(c_in + i * growth, growth, drop_rate))

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm = nn.BatchNorm2d(c_in)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet(nn.Module):
    def __init__(self, drop_rate=0.0, growth=4, c0=8, num_classes=5):
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("conv0", nn.Conv2d(3, c0, 7, 2, 3, bias=False))
        self.features.add_module("norm0", nn.BatchNorm2d(c0))
        self.features.add_module("relu0", nn.ReLU(inplace=True))
        self.features.add_module("pool0", nn.MaxPool2d(3, 2, 1))
        self.features.add_module("denseblock1", DenseBlock(2, c0, growth, drop_rate))
        self.features.add_module("transition1", Transition(c0 + 2 * growth, 8))
        self.features.add_module("denseblock2", DenseBlock(2, 8, growth, drop_rate))
        self.features.add_module("norm5", nn.BatchNorm2d(8 + 2 * growth))
        self.classifier = nn.Linear(8 + 2 * growth, num_classes)

    def forward(self, x):
        out = F.relu(self.features(x), inplace=True)
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(out, (1, 1)), 1))


def vgg_bn(num_classes=5):
    layers, c = [], 3
    for v in [8, "M", 16, "M", 16, 16, "M"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:  # torchvision's VGG convs keep their bias in front of the BatchNorm
            layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
            c = v
    return nn.Sequential(
        nn.Sequential(*layers),
        nn.AdaptiveAvgPool2d((2, 2)),
        nn.Flatten(),
        nn.Sequential(
            nn.Linear(c * 4, 16), nn.ReLU(True), nn.Dropout(0.5),
            nn.Linear(16, 16), nn.ReLU(True), nn.Dropout(0.5), nn.Linear(16, num_classes),
        ),
    )  # fmt: skip


class DoubleConv(nn.Sequential):
    def __init__(self, c_in, c_out, padding_mode="zeros"):
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False, padding_mode=padding_mode),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=2, dilation=2, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    def __init__(self, c_in, c_out, groups):
        super().__init__()
        self.up = nn.ConvTranspose2d(c_in, c_in // 2, 2, stride=2, groups=groups)
        self.bn = nn.BatchNorm2d(c_in // 2)
        self.conv = DoubleConv(c_in, c_out)

    def forward(self, x1, x2):
        x1 = F.relu(self.bn(self.up(x1)))
        return self.conv(torch.cat([x2, x1], dim=1))


class UNet(nn.Module):
    def __init__(self, w=8):
        super().__init__()
        self.inc = DoubleConv(3, w, padding_mode="reflect")
        self.down1 = nn.Sequential(nn.MaxPool2d(2), DoubleConv(w, 2 * w))
        self.down2 = nn.Sequential(nn.MaxPool2d(2), DoubleConv(2 * w, 4 * w))
        self.up1 = Up(4 * w, 2 * w, groups=2)
        self.up2 = Up(2 * w, w, groups=4)
        self.outc = nn.Conv2d(w, 2, 1)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x = self.up1(self.down2(x2), x2)
        return self.outc(self.up2(x, x1))


class Signals(nn.Module):
    """Conv1d (circular, grouped), ConvTranspose1d -> BatchNorm1d(affine=False), Conv3d,
    grouped ConvTranspose3d, and Linear -> BatchNorm1d on (N, C)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 6, 3, padding=1, padding_mode="circular", groups=3, bias=False)
        self.b1 = nn.BatchNorm1d(6)
        self.ct1 = nn.ConvTranspose1d(6, 6, 3, stride=2, groups=3, bias=False)
        self.bt1 = nn.BatchNorm1d(6, affine=False)
        self.c3 = nn.Conv3d(6, 4, 3, padding=1, bias=False)
        self.b3 = nn.BatchNorm3d(4)
        self.ct3 = nn.ConvTranspose3d(4, 6, 2, stride=2, groups=2, bias=False)
        self.bt3 = nn.BatchNorm3d(6)
        self.lin = nn.Linear(6, 5, bias=False)
        self.bl = nn.BatchNorm1d(5)

    def forward(self, x):  # (N, 3, 5)
        y = torch.relu(self.b1(self.c1(x)))
        y = self.bt1(self.ct1(y))  # (N, 6, 11)
        z = y[:, :, :8].reshape(y.shape[0], 6, 2, 2, 2)
        z = self.bt3(self.ct3(torch.relu(self.b3(self.c3(z)))))
        return self.bl(self.lin(z.mean((2, 3, 4))))


class Tabular(nn.Module):
    """Linear -> BatchNorm1d on (N, C) in an MLP with dropout, and BatchNorm1d on (N, C, L)."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3),
            nn.Linear(8, 8), nn.ReLU(),
        )  # fmt: skip
        self.conv = nn.Conv1d(8, 8, 1, bias=False)
        self.bn = nn.BatchNorm1d(8, momentum=None)

    def forward(self, x):
        h = self.mlp(x).unsqueeze(-1).expand(-1, -1, 3)
        return self.bn(self.conv(h))


class SharedBN(nn.Module):
    """One BatchNorm on two convs' outputs, and one conv applied twice: nothing may fold."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.b = nn.Conv2d(3, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.c = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn_c = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.a(x)) + self.bn(self.b(x))
        return self.bn_c(self.c(y)) + self.c(y)


class Containers(nn.Module):
    """BatchNorms in a ModuleDict (one also registered as ``alias``, the name forward uses)
    after convs in a ModuleList, and one without running statistics."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList(
            [nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Conv2d(4, 4, 3, padding=1, bias=False)]
        )
        self.norms = nn.ModuleDict({"first": nn.BatchNorm2d(4), "second": nn.BatchNorm2d(4)})
        self.alias = self.norms["second"]
        self.extra = nn.BatchNorm2d(4, track_running_stats=False)

    def forward(self, x):
        x = torch.relu(self.norms["first"](self.convs[0](x)))
        return torch.relu(self.extra(torch.relu(self.alias(self.convs[1](x))))) + x


IMAGE, SMALL = (2, 3, 32, 32), (2, 3, 16, 16)
# name: (factory, input shape, BatchNorms that must stay unfolded)
MODELS = {
    "resnet18": (resnet18, IMAGE, set()),
    "resnet50": (resnet50, IMAGE, set()),
    "resnext": (resnext, IMAGE, set()),
    "mobilenet_v2": (MobileNetV2, IMAGE, set()),
    "efficientnet": (EfficientNet, IMAGE, set()),
    "efficientnet_droppath": (lambda: EfficientNet(ndnn.DropPath), IMAGE, set()),
    "densenet": (
        DenseNet,
        IMAGE,
        {  # pre-activation: each of these follows a concatenation or a pooling, not a conv
            "features.denseblock1.denselayer1.norm1",
            "features.denseblock1.denselayer2.norm1",
            "features.transition1.norm",
            "features.denseblock2.denselayer1.norm1",
            "features.denseblock2.denselayer2.norm1",
            "features.norm5",
        },
    ),
    "vgg_bn": (vgg_bn, SMALL, set()),
    "unet": (UNet, SMALL, set()),
    "signals": (Signals, (3, 3, 5), set()),
    "tabular": (Tabular, (4, 6), set()),
    "shared": (SharedBN, (2, 3, 8, 8), {"bn", "bn_c"}),
    "containers": (Containers, (2, 3, 8, 8), {"extra"}),
}


def randomize(model, seed=0):
    """Non-trivial running statistics and affine parameters in every BatchNorm."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            if module.running_mean is not None:
                module.running_mean.normal_(0, 0.5, generator=generator)
                module.running_var.uniform_(0.2, 2.2, generator=generator)
                module.num_batches_tracked.fill_(7)
            if module.weight is not None:
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0, 0.3, generator=generator)
    return model


def build(name, dtype=torch.float32):
    factory, shape, _ = MODELS[name]
    torch.manual_seed(0)
    model = randomize(factory()).to(dtype)
    return model, torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=dtype)


def batchnorms(model):
    return {
        path for path, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }


def no_dropout(model):
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd | StochasticDepth | ndnn.DropPath):
            module.p = 0.0
    return model


# --------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------


class Calls(list):
    """A forward hook that records the class of each module it ran on (picklable)."""

    def __call__(self, module, args, output):
        self.append(type(module))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_convert_round_trip_on_real_architectures(name):
    model, x = build(name, torch.float64)
    first_bn = next(m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    calls = Calls()
    first_bn.register_forward_hook(calls)
    ours = convert(model, "normdrop")
    back = convert(ours, "torch")
    kinds = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    assert all(
        type(m).__module__.startswith("normdrop.") for m in ours.modules() if isinstance(m, kinds)
    )
    assert [type(m) for m in back.modules()] == [type(m) for m in model.modules()]
    # state_dict: same keys, loadable into the original class; a copy shares no tensor
    assert list(ours.state_dict()) == list(back.state_dict()) == list(model.state_dict())
    fresh = MODELS[name][0]().double()
    fresh.load_state_dict(ours.state_dict())
    originals = {id(t) for t in [*model.parameters(), *model.buffers()]}
    assert not originals & {id(t) for t in [*ours.parameters(), *ours.buffers()]}
    for converted in (ours, back, fresh):
        converted.eval()
    model.eval()
    expected = model(x)
    for converted in (ours, back, fresh, copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        torch.testing.assert_close(converted(x), expected, rtol=1e-10, atol=1e-10)
    # the hook travelled (a copy of it: convert works on a deep copy)
    twin = next(m for m in ours.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    (hook,) = twin._forward_hooks.values()
    hook.clear()
    ours(x)
    assert set(hook) == {type(twin)} and type(twin).__module__ == "normdrop.nn.batchnorm"
    # Training: batch statistics and the running-statistics update agree (dropout off: the two
    # libraries draw different masks)
    model, ours = no_dropout(model).train(), no_dropout(ours).train()
    torch.testing.assert_close(ours(x), model(x), rtol=1e-9, atol=1e-9)
    mine = ours.state_dict()
    for key, theirs in model.state_dict().items():
        torch.testing.assert_close(mine[key], theirs, rtol=1e-12, atol=1e-12, msg=key)


def test_convert_inplace_shares_every_tensor_of_a_real_model():
    model, x = build("resnet50")
    tensors = [*model.parameters(), *model.buffers()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ours = convert(model, "normdrop", inplace=True)
    assert ours is model
    assert all(a is b for a, b in zip(tensors, [*ours.parameters(), *ours.buffers()], strict=True))
    before = ours.layer1[0].bn1.weight.detach().clone()
    ours.train()(x).sum().backward()
    optimizer.step()  # the optimizer made for the torch.nn model trains the converted one
    assert not torch.equal(ours.layer1[0].bn1.weight, before)


# --------------------------------------------------------------------------------------------
# fold_batchnorm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_fold_on_real_architectures(name, dtype):
    model, x = build(name, dtype)
    model.eval()
    stays = MODELS[name][2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded = fold_batchnorm(model)
    folded_paths = {p for p, m in folded.named_modules() if isinstance(m, FoldedBatchNorm)}
    assert batchnorms(folded) == stays
    assert folded_paths == batchnorms(model) - stays - {"alias"}  # `alias` is norms.second
    # A pair left after a Linear/Conv is reported; nothing else warns
    reported = {s for s in stays if any(f"'{s}'" in str(w.message) for w in caught)}
    assert reported == {"shared": {"bn", "bn_c"}}.get(name, set())
    assert len(caught) == bool(reported)
    expected = model(x)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    scale = expected.abs().max().item()
    torch.testing.assert_close(folded(x), expected, rtol=tol, atol=tol * scale)


def test_a_batchnorm_under_two_names_is_folded_under_both():
    """Containers' forward calls ``self.alias``, the second name of ``norms.second``: folding
    the conv and replacing the BatchNorm under its first name only applied it twice."""
    model, x = build("containers")
    model.extra = nn.Identity()  # a batch-statistics BatchNorm after it hid the error
    model.eval()
    folded = fold_batchnorm(model)
    assert folded.alias is folded.norms["second"]
    assert isinstance(folded.alias, FoldedBatchNorm)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_layer_a_leaf_module_also_calls_is_not_folded():
    """DropConnect (a leaf for the tracer) calls its layer unseen; forward calls that layer
    directly as well, before a BatchNorm: folding it changed DropConnect's output too."""

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.dc = ndnn.DropConnect(nn.Linear(3, 4), p=0.2)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.dc.module(x)) + self.dc(x)

    model, x = randomize(Wrapped()).eval(), torch.randn(5, 3)
    with pytest.warns(UserWarning, match=r"'bn' \('dc.module' is applied more than once\)"):
        folded = fold_batchnorm(model)
    assert isinstance(folded.bn, nn.BatchNorm1d)
    torch.testing.assert_close(folded(x), model(x))


def test_folded_and_converted_models_script_trace_compile_and_serialize():
    model, x = build("resnet18")
    model.eval()
    folded = fold_batchnorm(model)
    expected = model(x)
    scripted = torch.jit.script(folded)  # the original scripts, so must the folded copy
    traced = torch.jit.trace(folded, x)
    compiled = torch.compile(folded, backend="eager")
    for variant in (scripted, traced, compiled, copy.deepcopy(folded)):
        torch.testing.assert_close(variant(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pickle.loads(pickle.dumps(folded))(x), expected)
    scripted.train()
    with pytest.raises(torch.jit.Error, match="eval-only"):
        scripted(x)
    unet, x = build("unet")
    unet.eval()
    torch.testing.assert_close(torch.jit.script(fold_batchnorm(unet))(x), unet(x))
    # the layout check survives scripting: an unbatched Conv1d output (C, L) is refused
    conv = randomize(nn.Sequential(nn.Conv1d(2, 3, 1), nn.BatchNorm1d(3))).eval()
    with pytest.raises(torch.jit.Error, match="expected that layer's output to be 3-D"):
        torch.jit.script(fold_batchnorm(conv))(torch.randn(2, 3))
    ours = convert(unet)
    torch.testing.assert_close(torch.jit.trace(ours, x)(x), unet(x))


def test_converted_models_agree_under_the_fast_kernels():
    with normdrop.use_backend("fast"):
        for name in ("resnet18", "signals"):
            model, x = build(name)
            ours = convert(model)
            for training in (False, True):
                model.train(training), ours.train(training)
                torch.testing.assert_close(ours(x), model(x), rtol=1e-5, atol=1e-5)
            for key, value in model.state_dict().items():
                torch.testing.assert_close(ours.state_dict()[key], value, msg=key)


def test_fold_reports_a_pair_it_leaves_with_the_reason():
    model, x = build("shared")
    with pytest.warns(UserWarning, match=r"'bn' \(it is applied more than once\)") as caught:
        folded = fold_batchnorm(model.eval())
    assert "'bn_c' ('c' is applied more than once)" in str(caught[0].message)
    torch.testing.assert_close(folded(x), model(x))


class ConvLayer(nn.Module):
    """transformers' ResNetConvLayer: conv, norm, activation, not an nn.Sequential."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.convolution = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.normalization = nn.BatchNorm2d(c_out)
        self.activation = nn.ReLU()

    def forward(self, x):
        return self.activation(self.normalization(self.convolution(x)))


class HubStyle(nn.Module):
    """transformers-style: control flow on an argument at the top, so torch.fx cannot trace
    the model, only its parts."""

    def __init__(self):
        super().__init__()
        self.embedder = ConvLayer(3, 8, 2)
        self.stages = nn.ModuleList([ConvLayer(8, 8), ConvLayer(8, 16, 2)])

    def forward(self, pixel_values, output_hidden_states=None):
        hidden, states = self.embedder(pixel_values), []
        for stage in self.stages:
            hidden = stage(hidden)
            if output_hidden_states:
                states.append(hidden)
        return (hidden, states) if output_hidden_states else hidden


def test_untraceable_model_folds_the_parts_torch_fx_can_trace():
    model = randomize(HubStyle()).eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(UserWarning, match="could not trace HubStyle"):
        folded = fold_batchnorm(model)
    assert batchnorms(folded) == set()
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded(x, True)[1][0], model(x, True)[1][0], rtol=1e-5, atol=1e-5)


class OptionalSkip(nn.Module):
    """A decoder block with an optional skip input: without it, the conv's output is the
    skip. torch.fx reads ``skip is None`` on a symbolic argument as False, so its graph showed
    only the other path, where the pair folds."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1, bias=False), nn.BatchNorm2d(3)

    def forward(self, x, skip=None):
        h = self.conv(x)
        return self.bn(h) + (h if skip is None else skip)


def test_a_forward_with_optional_arguments_folds_only_what_every_path_allows():
    model, x = randomize(OptionalSkip()).eval(), torch.randn(2, 3, 4, 4)
    with pytest.warns(UserWarning, match=r"'bn' \(the output of 'conv' is used elsewhere"):
        folded = fold_batchnorm(model)
    assert isinstance(folded.bn, nn.BatchNorm2d)
    torch.testing.assert_close(folded(x), model(x))
    torch.testing.assert_close(folded(x, x), model(x, x))
    assert batchnorms(fold_batchnorm(resnet18())) == set()  # forward(x): traced once


def test_fold_of_a_model_without_batchnorm_neither_traces_nor_warns():
    class ConvNeXtStyle(nn.Module):  # LayerNorm only, and untraceable
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 4, 3), nn.GroupNorm(1, 4)

        def forward(self, x):
            return self.norm(self.conv(x)) if x.sum() > 0 else x

    model = ConvNeXtStyle()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded = fold_batchnorm(model)
    x = torch.rand(1, 3, 5, 5)
    torch.testing.assert_close(folded(x), model(x))


# --------------------------------------------------------------------------------------------
# recalibrate_batchnorm
# --------------------------------------------------------------------------------------------


def manual_statistics(model, batches):
    """Per BatchNorm: the mean over its calls of the batch mean and unbiased batch variance,
    from hooks on an independent copy in which only the BatchNorms train."""
    reference, seen = copy.deepcopy(model).eval(), {}
    for path, module in reference.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            module.train()

            def hook(module, args, path=path):
                x = args[0].detach().double().transpose(0, 1).flatten(1)
                seen.setdefault(path, []).append((x.mean(1), x.var(1, correction=1)))

            module.register_forward_pre_hook(hook)
    with torch.no_grad():
        for batch in batches:
            reference(batch)
    return {
        path: (
            torch.stack([mean for mean, _ in stats]).mean(0),
            torch.stack([var for _, var in stats]).mean(0),
            len(stats),
        )
        for path, stats in seen.items()
    }


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_droppath", "densenet", "unet",
                                  "signals", "tabular", "shared", "containers"])  # fmt: skip
@pytest.mark.parametrize("library", ["torch", "normdrop"])
def test_recalibrate_equals_the_cumulative_average_over_the_same_batches(name, library):
    model, x = build(name, torch.float64)
    if library == "normdrop":
        model = convert(model)
    model.train()
    model.get_submodule(sorted(batchnorms(model))[0]).eval()  # mixed modes must come back
    model.get_submodule(sorted(batchnorms(model))[-1]).momentum = 0.3
    modes = {path: m.training for path, m in model.named_modules()}
    momenta = {path: getattr(m, "momentum", None) for path, m in model.named_modules()}
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randn(x.shape, generator=generator, dtype=x.dtype) + b for b in range(3)]
    expected = manual_statistics(model, batches)
    recalibrate_batchnorm(model, batches)
    assert set(expected) == {p for p in batchnorms(model) if p != "alias"} - {"extra"}
    for path, (mean, var, count) in expected.items():
        bn = model.get_submodule(path)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)
        assert bn.num_batches_tracked == count  # a BatchNorm applied twice counts both calls
    assert modes == {path: m.training for path, m in model.named_modules()}
    assert momenta == {path: getattr(m, "momentum", None) for path, m in model.named_modules()}


class AuxHead(nn.Module):
    """torchvision's Inception3 / GoogLeNet: the auxiliary classifier runs in training only."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 4)
        self.aux = nn.Sequential(conv_bn(4, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(4, 3))  # fmt: skip
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        x = self.stem(x)
        return (self.head(x), self.aux(x)) if self.training else self.head(x)


@pytest.mark.parametrize("mode", ["cumulative", "precise"])
def test_a_batchnorm_the_eval_forward_never_reaches_keeps_its_statistics(mode):
    """They were reset to (0, 1) ("cumulative"), or the pass failed with 'stack expects a
    non-empty TensorList' ("precise")."""
    model = randomize(AuxHead())
    aux_bn = model.aux[0][1]
    kept = [b.clone() for b in aux_bn.buffers()]
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"no input .* keep their old statistics: 'aux\.0\.1'"):
        recalibrate_batchnorm(model, batches, mode)
    for buffer, old in zip(aux_bn.buffers(), kept, strict=True):
        assert torch.equal(buffer, old)
    assert model.stem[1].num_batches_tracked == 2
    assert model.training


# --------------------------------------------------------------------------------------------
# lint
# --------------------------------------------------------------------------------------------

EXPECTED_FINDINGS = {
    "vgg_bn": {("redundant-bias", f"0.{i}") for i in (1, 5, 9, 12)},  # torchvision's VGG-BN too
    "unet": {("redundant-bias", "up1.bn"), ("redundant-bias", "up2.bn")},  # ConvTranspose bias
    "containers": {("no-running-stats", "extra")},
    # the MLP's dropout reaches the last BatchNorm through Linear, ReLU and the conv
    "tabular": {("dropout-before-batchnorm", "bn")},
    "densenet_dropout": {
        ("dropout-before-batchnorm", path)
        for path in (
            "features.denseblock1.denselayer2.norm1",
            "features.transition1.norm",
            "features.denseblock2.denselayer2.norm1",
            "features.norm5",
        )
    },
}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", [*sorted(MODELS), "densenet_dropout"])
def test_lint_finds_only_the_real_pitfalls(name, training):
    if name == "densenet_dropout":  # dropout on the new features, then concatenated and normed
        model, x = randomize(DenseNet(drop_rate=0.2)), torch.randn(IMAGE)
    else:
        model, x = build(name)
    model.train(training)
    state = copy.deepcopy(model.state_dict())
    findings = {(f.rule, f.path) for f in lint(model, x)}
    assert findings == EXPECTED_FINDINGS.get(name, set())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


# --------------------------------------------------------------------------------------------
# mc_dropout
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["mobilenet_v2", "efficientnet", "efficientnet_droppath", "vgg_bn"]
)
def test_mc_dropout_samples_dropout_only(name):
    """Dropout and stochastic depth (normdrop's DropPath, torchvision's StochasticDepth, known
    by class name) sample; BatchNorm and everything else stay in eval."""
    model, x = build(name)
    model.train()
    next(model.children()).eval()  # mixed modes must come back
    modes = {path: m.training for path, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    with mc_dropout(model):
        for module in model.modules():
            is_dropout = isinstance(
                module, nn.modules.dropout._DropoutNd | ndnn.DropPath | StochasticDepth
            )
            assert module.training == is_dropout
        assert not torch.equal(model(x), model(x))
    prediction = mc_predict(model, x, samples=8, seed=0)
    assert prediction.mean.shape == (2, 5)
    assert torch.all(prediction.mutual_information > -1e-12)
    assert torch.all(prediction.variance.sum(1) > 0)
    assert modes == {path: m.training for path, m in model.named_modules()}
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])  # running statistics untouched


# --------------------------------------------------------------------------------------------
# transformers (optional)
# --------------------------------------------------------------------------------------------


def _hf(kind):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "resnet":
        config = transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16, 16], depths=[1, 2, 1],
            layer_type="bottleneck", num_labels=3,
        )  # fmt: skip
        return transformers.ResNetForImageClassification(config)
    if kind == "mobilenet_v2":
        config = transformers.MobileNetV2Config(
            depth_multiplier=0.25, image_size=32, num_labels=3, tf_padding=False
        )
        return transformers.MobileNetV2ForImageClassification(config)
    if kind == "efficientnet":
        config = transformers.EfficientNetConfig(
            width_coefficient=0.25, depth_coefficient=0.25, image_size=32, hidden_dim=320,
            num_labels=3,
        )  # fmt: skip
        return transformers.EfficientNetForImageClassification(config)
    config = transformers.ConvNextConfig(
        hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1], num_labels=3
    )
    return transformers.ConvNextForImageClassification(config)


# kind: (BatchNorms folded, BatchNorms reported as left)
HF_FOLDS = {"resnet": (15, 0), "mobilenet_v2": (52, 0), "efficientnet": (14, 7), "convnext": (0, 0)}


@pytest.mark.parametrize("kind", sorted(HF_FOLDS))
def test_transformers_models(kind):
    model = randomize(_hf(kind)).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x).logits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        folded = fold_batchnorm(model)
    count, left = HF_FOLDS[kind]
    assert sum(isinstance(m, FoldedBatchNorm) for m in folded.modules()) == count
    reports = [str(w.message) for w in caught if "unfolded" in str(w.message)]
    assert (f"left {left} BatchNorm" in reports[0]) if left else not reports
    torch.testing.assert_close(folded(x).logits, expected, rtol=1e-4, atol=1e-5)
    ours = convert(model)
    assert list(ours.state_dict()) == list(model.state_dict())
    torch.testing.assert_close(ours(x).logits, expected)
    torch.testing.assert_close(convert(ours, "torch")(x).logits, expected)
    rules = {f.rule for f in lint(model, {"pixel_values": x})}
    # transformers' MobileNetV2 and EfficientNet build BatchNorm2d(momentum=0.997 / 0.99): the
    # TensorFlow decay, where PyTorch's momentum is 1 minus it
    assert ("batchnorm-momentum" in rules) == (kind in {"mobilenet_v2", "efficientnet"})
    if kind in {"mobilenet_v2", "efficientnet"}:  # BatchNorm and dropout
        recalibrate_batchnorm(model, [torch.randn(4, 3, 32, 32) for _ in range(2)])
        prediction = mc_predict(model, x, samples=4, seed=0)  # ImageClassifierOutput.logits
        assert prediction.mean.shape == (2, 3)


@pytest.mark.parametrize(
    ("module", "folds"),
    [("torchvision.ops.misc", True), ("detectron2.layers.batch_norm", True), ("mine", False)],
)
def test_fold_recognizes_torchvision_and_detectron2_frozen_batchnorms(module, folds):
    """Detection backbones carry torchvision's FrozenBatchNorm2d; it is known by its qualified
    name only (torchvision is not a dependency), so a look-alike elsewhere is left alone."""
    frozen = frozen_batchnorm_2d_in(module)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), frozen(4), nn.ReLU(), nn.Conv2d(4, 5, 1), frozen(5)
    )
    generator = torch.Generator().manual_seed(0)
    for layer in (model[1], model[4]):
        for buffer in layer.buffers():
            buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)
    x = torch.randn(2, 3, 6, 6, generator=generator)
    folded = fold_batchnorm(model.eval())
    replaced = [isinstance(folded[i], FoldedBatchNorm) for i in (1, 4)]
    assert replaced == [folds, folds]
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
