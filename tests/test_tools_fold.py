"""fold_batchnorm: the folded model computes what the original computes in eval mode.

The oracle is the original model itself (eval mode); each test also checks WHICH BatchNorms
were folded, since leaving everything unfolded would trivially pass the output check.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normdrop.nn as ndnn
from normdrop.errors import InputError
from normdrop.tools import fold_batchnorm


def _randomize(model, seed=0):
    """Non-trivial running statistics and affine parameters everywhere."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name in ("running_mean", "bias"):
                tensor = getattr(module, name, None)
                if isinstance(tensor, torch.Tensor) and not isinstance(module, torch.nn.Linear):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator))
            for name in ("running_var", "weight"):
                tensor = getattr(module, name, None)
                if isinstance(tensor, torch.Tensor) and tensor.dim() == 1:
                    tensor.copy_(torch.rand(tensor.shape, generator=generator) * 2 + 0.2)
    return model


def _batchnorm_paths(model):
    kinds = (torch.nn.modules.batchnorm._BatchNorm, ndnn.FrozenBatchNorm2d)
    return {name for name, m in model.named_modules() if isinstance(m, kinds)}


class BasicBlock(torch.nn.Module):
    """ResNet's basic block with a projection shortcut."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c_out)
        self.conv2 = torch.nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = ndnn.BatchNorm2d(c_out)
        self.downsample = torch.nn.Sequential(
            torch.nn.Conv2d(c_in, c_out, 1, stride, bias=False), torch.nn.BatchNorm2d(c_out)
        )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.downsample(x))


class SmallResNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU()
        )
        self.layer1 = BasicBlock(8, 16, 2)
        self.head = torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(16, 10),
            torch.nn.BatchNorm1d(10),
        )

    def forward(self, x):
        return self.head(self.layer1(self.stem(x)))


def test_resnet_block_folds_every_batchnorm_and_keeps_the_output():
    model = _randomize(SmallResNet()).eval()
    original = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 3, 12, 12)
    folded = fold_batchnorm(model)
    assert _batchnorm_paths(folded) == set()
    assert isinstance(folded.layer1.bn1, torch.nn.Identity)
    assert folded.layer1.conv1.bias is not None
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    # The original is untouched.
    assert len(_batchnorm_paths(model)) == 5
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key])


LAYERS = {
    "linear": (lambda g: torch.nn.Linear(5, 6), torch.nn.BatchNorm1d, (4, 5)),
    "conv1d": (lambda g: torch.nn.Conv1d(4, 6, 3, groups=g, bias=False), ndnn.BatchNorm1d,
               (3, 4, 7)),
    "conv2d": (lambda g: torch.nn.Conv2d(4, 6, 3, groups=g), torch.nn.BatchNorm2d, (3, 4, 5, 5)),
    "conv3d": (lambda g: torch.nn.Conv3d(4, 6, 2, groups=g), torch.nn.BatchNorm3d,
               (2, 4, 3, 3, 3)),
    "convtranspose1d": (lambda g: torch.nn.ConvTranspose1d(4, 6, 3, stride=2, groups=g),
                        torch.nn.BatchNorm1d, (3, 4, 5)),
    "convtranspose2d": (lambda g: torch.nn.ConvTranspose2d(4, 6, 3, groups=g, bias=False),
                        ndnn.BatchNorm2d, (3, 4, 4, 4)),
    "convtranspose3d": (lambda g: torch.nn.ConvTranspose3d(4, 6, 2, groups=g),
                        torch.nn.BatchNorm3d, (2, 4, 2, 3, 2)),
}  # fmt: skip


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(sorted(LAYERS)),
    groups=st.sampled_from([1, 2]),
    affine=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_every_layer_kind_folds_exactly(kind, groups, affine, dtype, seed):
    make_layer, bn_class, shape = LAYERS[kind]
    torch.manual_seed(seed)
    layer = make_layer(1 if kind == "linear" else groups)
    model = _randomize(torch.nn.Sequential(layer, bn_class(6, affine=affine)), seed).to(dtype)
    model.eval()
    folded = fold_batchnorm(model)
    assert isinstance(folded[1], torch.nn.Identity)
    assert folded[0].weight.dtype == dtype
    x = torch.randn(shape, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(folded(x), model(x), rtol=tol, atol=tol)


def test_normdrop_variants_fold_as_their_eval_transform():
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 1), ndnn.GhostBatchNorm2d(4, virtual_batch_size=2),
        torch.nn.Conv2d(4, 4, 1), ndnn.BatchRenorm2d(4),
        torch.nn.Conv2d(4, 4, 1), ndnn.FrozenBatchNorm2d(4),
        torch.nn.Conv2d(4, 4, 1), ndnn.SyncBatchNorm(4),
    )  # fmt: skip
    model = _randomize(model).eval()
    folded = fold_batchnorm(model)
    assert all(isinstance(folded[i], torch.nn.Identity) for i in (1, 3, 5, 7))
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


class ReusedConv(torch.nn.Module):
    """pytorch/pytorch#104593: the conv feeds the BatchNorm on one path only."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 1, 1)
        self.bn1 = torch.nn.BatchNorm2d(1)

    def forward(self, x, y):
        return self.conv1(x) + self.bn1(self.conv1(y))


class SharedOutput(torch.nn.Module):
    """The conv's output also goes around the BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 1)
        self.bn = torch.nn.BatchNorm2d(2)

    def forward(self, x):
        h = self.conv(x)
        return self.bn(h) * h


class ReusedBatchNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 1)
        self.bn = torch.nn.BatchNorm2d(2)

    def forward(self, x):
        return self.bn(self.conv(x)) + self.bn(x)


class KeptFeatures(torch.nn.Module):
    """forward keeps the conv's output for a feature loss: a use the graph does not show."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 2, 1)
        self.bn = torch.nn.BatchNorm2d(2)
        self.features: list[torch.Tensor] = []

    def forward(self, x):
        h = self.conv(x)
        self.pre_bn = h
        self.features.append(h)
        return self.bn(h)


def test_a_pair_whose_output_forward_keeps_is_not_folded_and_no_trace_objects_stay():
    model = _randomize(KeptFeatures()).eval()
    with pytest.warns(UserWarning, match="forward keeps the output of 'conv' in an attribute"):
        folded = fold_batchnorm(model)
    assert _batchnorm_paths(folded) == {"bn"}
    assert folded.features == [] and not hasattr(folded, "pre_bn")
    x = torch.rand(4, 2, 3, 3)
    torch.testing.assert_close(folded(x), model(x))
    torch.testing.assert_close(folded.pre_bn, model.pre_bn)


def test_a_batchnorm_called_with_its_input_as_keyword_folds():
    class Keyword(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(2, 2, 1)
            self.bn = torch.nn.BatchNorm2d(2)

        def forward(self, x):
            return self.bn(input=self.conv(x))

    model = _randomize(Keyword()).eval()
    folded = fold_batchnorm(model)
    assert _batchnorm_paths(folded) == set()
    x = torch.rand(4, 2, 3, 3)
    torch.testing.assert_close(folded(x), model(x))


@pytest.mark.parametrize(
    ("model", "inputs"),
    [
        (ReusedConv(), (torch.rand(4, 1, 5, 5), torch.rand(4, 1, 5, 5))),
        (SharedOutput(), (torch.rand(4, 2, 3, 3),)),
        (ReusedBatchNorm(), (torch.rand(4, 2, 3, 3),)),
    ],
)
def test_a_pair_with_other_uses_is_not_folded(model, inputs):
    model = _randomize(model).eval()
    folded = fold_batchnorm(model)
    assert _batchnorm_paths(folded) == _batchnorm_paths(model)
    torch.testing.assert_close(folded(*inputs), model(*inputs))


def test_what_must_not_fold_stays():
    class StandardizedConv(torch.nn.Conv2d):  # weight standardization: scaling cancels out
        def forward(self, x):
            w = self.weight
            w = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), keepdim=True)
            return self._conv_forward(x, w, self.bias)

    hooked = torch.nn.Conv2d(2, 2, 1)
    hooked.register_forward_pre_hook(lambda m, a: None)
    model = torch.nn.Sequential(
        StandardizedConv(2, 2, 1), torch.nn.BatchNorm2d(2),
        hooked, torch.nn.BatchNorm2d(2),
        torch.nn.Conv2d(2, 2, 1), torch.nn.BatchNorm2d(2, track_running_stats=False),
    )  # fmt: skip
    model = _randomize(model).eval()
    folded = fold_batchnorm(model)
    assert _batchnorm_paths(folded) == {"1", "3", "5"}
    x = torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(folded(x), model(x))


def test_untraceable_model_folds_inside_sequentials_with_a_warning():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
            self.conv = torch.nn.Conv2d(3, 3, 1)
            self.bn = torch.nn.BatchNorm2d(3)

        def forward(self, x):
            h = self.body(x)
            if h.sum() > 0:  # data-dependent: torch.fx cannot trace this
                return self.bn(self.conv(h))
            return -h

    model = _randomize(Branchy()).eval()
    with pytest.warns(UserWarning, match="could not trace"):
        folded = fold_batchnorm(model)
    assert _batchnorm_paths(folded) == {"bn"}
    x = torch.rand(2, 2, 3, 3) + 1
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


def test_folded_model_is_eval_only():
    folded = fold_batchnorm(torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2)))
    assert not folded.training
    folded.train()
    with pytest.raises(InputError, match="eval-only"):
        folded(torch.randn(4, 3))
    with pytest.raises(InputError, match=r"torch\.nn\.Module"):
        fold_batchnorm(lambda x: x)


def test_an_output_the_fold_misreads_is_refused_not_silently_wrong():
    """Linear(4, 5) on (N, 5, 4) gives (N, 5, 5): BatchNorm1d(5) normalized dim 1 (the 5
    positions) while the fold scales the last dim (the 5 features). Both run; only the refusal
    keeps the folded model from returning a wrong answer. Unbatched Conv1d output likewise."""

    class Tokens(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.bn = torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5)

        def forward(self, x):
            return self.bn(self.linear(x))

    model = _randomize(Tokens()).eval()
    folded = fold_batchnorm(model)
    assert _batchnorm_paths(folded) == set()
    x = torch.randn(6, 4)
    torch.testing.assert_close(folded(x), model(x))  # the layout the fold holds for
    with pytest.raises(InputError, match=r"folded into 'linear' expected .* 2-D.*\(3, 5, 5\)"):
        folded(torch.randn(3, 5, 4))
    conv = _randomize(torch.nn.Sequential(torch.nn.Conv1d(2, 3, 1), torch.nn.BatchNorm1d(3)))
    folded = fold_batchnorm(conv.eval())
    assert isinstance(folded[1], torch.nn.Identity)
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(folded(x), conv(x))
    with pytest.raises(InputError, match=r"3-D"):
        folded(torch.randn(2, 3))  # unbatched (C, L) output, read as (N, C) by BatchNorm1d


def test_a_layer_whose_weight_forward_also_reads_is_not_folded():
    # F.conv2d(x, self.conv.weight) would see the folded weight: the pair must stay.
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, bias=False)
            self.bn = torch.nn.BatchNorm2d(4)
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

        def forward(self, x):
            return self.bn(self.conv(x)) + torch.nn.functional.conv2d(x, self.conv.weight)

    model, x = Tied().eval(), torch.randn(2, 3, 8, 8)
    folded = fold_batchnorm(model)
    assert isinstance(folded.bn, torch.nn.BatchNorm2d)  # left alone
    torch.testing.assert_close(folded(x), model(x))


def test_a_data_parallel_wrapper_folds_its_model_without_a_warning():
    """DataParallel's forward(*inputs, **kwargs) does not trace; the model inside does."""
    model = _randomize(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
    wrapped = torch.nn.DataParallel(model).eval()
    x = torch.randn(2, 3, 6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        folded = fold_batchnorm(wrapped)
    assert isinstance(folded.module[1], torch.nn.Identity)
    torch.testing.assert_close(folded(x), wrapped(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "model",
    [torch.nn.BatchNorm2d(3), torch.nn.Sequential(torch.nn.ReLU(), torch.nn.BatchNorm1d(3))],
)
def test_nothing_to_fold_into_is_no_warning(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was: torch.fx could not trace BatchNorm2d
        folded = fold_batchnorm(model)
    assert type(folded) is type(model) and folded is not model
