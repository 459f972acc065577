"""mc_dropout / mc_predict: dropout on, BatchNorm in eval, and the predictive statistics."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from scipy import stats

import normdrop.nn as ndnn
from normdrop.errors import InputError
from normdrop.tools import mc_dropout, mc_predict


def _classifier():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 16, bias=False),
        torch.nn.BatchNorm1d(16),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.3),
        ndnn.DropConnect(torch.nn.Linear(16, 4), p=0.2),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    return model


def test_context_turns_on_dropout_only_and_restores_every_mode():
    model = _classifier()
    model.train()
    model[2].eval()  # an odd mixed state that must come back
    before = [m.training for m in model.modules()]
    with mc_dropout(model) as inside:
        assert inside is model
        assert model[3].training and model[4].training
        assert not model[1].training and not model.training and not model[4].module.training
    assert [m.training for m in model.modules()] == before
    with pytest.raises(RuntimeError, match="boom"), mc_dropout(model):
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == before


def _manual(model, x, samples, seed):
    """The same passes, set up by hand: eval everywhere, dropout layers in training mode."""
    model.eval()
    model[3].training = model[4].training = True
    torch.manual_seed(seed)
    with torch.no_grad():
        probs = torch.stack([torch.softmax(model(x).double(), 1) for _ in range(samples)])
    model.eval()
    return probs


def test_prediction_statistics_match_their_definitions():
    model, x = _classifier(), torch.randn(6, 5)
    stats_before = model[1].running_mean.clone()
    rng_before = torch.get_rng_state()
    result = mc_predict(model, x, samples=12, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global stream is untouched
    assert torch.equal(model[1].running_mean, stats_before)  # BatchNorm stayed in eval
    probs = _manual(model, x, 12, seed=3)
    mean = probs.mean(0)
    torch.testing.assert_close(result.mean, mean)
    torch.testing.assert_close(result.variance, probs.var(0, correction=1))
    entropy = -(mean * mean.log()).sum(1)
    torch.testing.assert_close(result.entropy, entropy)
    expected_entropy = -(probs * probs.log()).sum(2).mean(0)
    torch.testing.assert_close(result.mutual_information, entropy - expected_entropy)
    assert torch.all(result.mutual_information >= -1e-12)  # Jensen
    assert torch.all(result.entropy <= math.log(4) + 1e-12)
    again = mc_predict(model, x, samples=12, seed=3)
    assert torch.equal(again.mean, result.mean)


def test_model_train_would_have_changed_batchnorm():
    """The mistake mc_dropout avoids: model.train() normalizes with the test batch."""
    model, x = _classifier(), torch.randn(6, 5)
    result = mc_predict(model, x, samples=4, seed=0)
    model.train()
    torch.manual_seed(0)
    with torch.no_grad():
        wrong = torch.stack([torch.softmax(model(x).double(), 1) for _ in range(4)]).mean(0)
    assert not torch.allclose(wrong, result.mean, atol=1e-3)


def test_monte_carlo_mean_converges_to_the_eval_output_for_a_linear_model():
    """E[dropout(x)] = x, so for a linear head the MC mean estimates the eval output."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    x = torch.randn(3, 8)
    samples = 4000
    result = mc_predict(model, x, samples=samples, activation=None, seed=1)
    assert result.entropy is None and result.mutual_information is None
    z = stats.norm.ppf(0.99995)
    with torch.no_grad():
        exact = model.eval()(x).double()
    bound = z * (result.variance / samples).sqrt()
    assert torch.all((result.mean - exact).abs() <= bound)


def test_sigmoid_entropy_is_the_bernoulli_entropy():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Dropout(0.4))
    result = mc_predict(model, torch.randn(5, 3), samples=6, activation="sigmoid", seed=2)
    p = result.mean
    torch.testing.assert_close(result.entropy, -(p * p.log() + (1 - p) * (1 - p).log()))
    assert result.mean.shape == (5, 2)


def test_errors():
    with pytest.raises(InputError, match="no dropout layer"):
        mc_predict(torch.nn.Linear(2, 2), torch.randn(3, 2))
    model = _classifier()
    with pytest.raises(InputError, match="samples must be an int >= 2"):
        mc_predict(model, torch.randn(3, 5), samples=1)
    with pytest.raises(InputError, match="activation must be one of"):
        mc_predict(model, torch.randn(3, 5), activation="tanh")


def test_dropout_fused_with_batchnorm_is_named_not_silently_skipped():
    """BatchNormAct's dropout runs only with its BatchNorm training, so Monte Carlo dropout
    cannot sample it: say so instead of returning samples without that noise."""
    fused_only = torch.nn.Sequential(torch.nn.Linear(5, 4), ndnn.BatchNormAct1d(4, p=0.3))
    with pytest.raises(InputError, match=r"no dropout layer.*fused into '1'"):
        mc_predict(fused_only, torch.randn(3, 5))
    mixed = torch.nn.Sequential(
        torch.nn.Linear(5, 4), ndnn.BatchNormAct1d(4, p=0.3), torch.nn.Dropout(0.2)
    )
    with pytest.warns(UserWarning, match=r"fused into '1' stays off"):
        result = mc_predict(mixed, torch.randn(3, 5), samples=3, seed=0)
    assert result.mean.shape == (3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # p = 0: nothing is lost, nothing to say
        plain = torch.nn.Sequential(ndnn.BatchNormAct1d(5), torch.nn.Dropout(0.2))
        mc_predict(plain, torch.randn(3, 5), samples=3, seed=0)


class _Output(dict):
    """What transformers' classifiers return: an ImageClassifierOutput with ``.logits``."""

    def __getattr__(self, name):
        return self[name]


def test_a_model_output_with_logits_is_read_and_anything_else_named():
    class HubClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _classifier()

        def forward(self, pixel_values):
            return _Output(logits=self.body(pixel_values), loss=None)

    model, x = HubClassifier(), torch.randn(6, 5)
    prediction = mc_predict(model, x, samples=5, seed=3)
    expected = mc_predict(model.body, x, samples=5, seed=3)
    for got, want in zip(prediction, expected, strict=True):
        torch.testing.assert_close(got, want)

    class Pair(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _classifier()

        def forward(self, x):
            return self.body(x), x

    with pytest.raises(InputError, match=r"must return a tensor .* got tuple"):
        mc_predict(Pair(), x, samples=2)


class ConvNextDropPath(torch.nn.Module):
    """A Hugging Face-style per-model DropPath (``transformers``' ``<Model>DropPath``): whole
    samples dropped, in training only. torchvision's StochasticDepth is covered in
    tests/test_tools_models.py."""

    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        keep = torch.empty(x.shape[0], 1).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


def test_hugging_face_style_drop_path_is_sampled():
    """Stochastic depth known by its class name (``...DropPath``) is turned on like dropout:
    the samples differ, BatchNorm stays in eval, modes are restored."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), ConvNextDropPath(0.5), torch.nn.Linear(8, 3)
    ).eval()
    with mc_dropout(model):
        assert model[2].training and not model[1].training and not model.training
    assert not model[2].training
    prediction = mc_predict(model, torch.randn(16, 5), samples=20)
    assert (prediction.variance > 0).any()


def test_seed_reproduces_layers_with_their_own_generator_and_leaves_it_as_it_was():
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        ndnn.GaussianDropout(0.5, generator=generator),
        ndnn.DropPath(0.5, generator=generator),
        torch.nn.Linear(16, 3),
    )
    x = torch.randn(10, 8)
    state = generator.get_state()
    first = mc_predict(model, x, samples=5, seed=3)
    second = mc_predict(model, x, samples=5, seed=3)
    assert torch.equal(first.mean, second.mean)
    assert torch.equal(generator.get_state(), state)
    other = mc_predict(model, x, samples=5, seed=4)
    assert not torch.equal(first.mean, other.mean)


def _transformer():
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.3, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return torch.nn.Sequential(encoder, torch.nn.Flatten(1), torch.nn.Linear(80, 3))


class Attention(torch.nn.Module):
    """Dropout only inside MultiheadAttention (a rate, no Dropout layer)."""

    def __init__(self, dropout):
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(8, 2, dropout=dropout, batch_first=True)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attention(x, x, x, need_weights=False)[0].mean(1))


class Recurrent(torch.nn.Module):
    """Dropout only between the layers of an LSTM."""

    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(5, 8, num_layers=2, dropout=0.5, batch_first=True)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


@pytest.mark.parametrize(
    ("make", "x"),
    [
        (_transformer, torch.randn(4, 5, 16)),  # eval + no_grad: torch's fast path skipped
        (lambda: Attention(0.5), torch.randn(4, 5, 8)),  # no Dropout layer: a rate
        (Recurrent, torch.randn(4, 6, 5)),
    ],
)
def test_dropout_that_torch_modules_apply_themselves_is_sampled(make, x):
    model = make().eval()
    modes = [m.training for m in model.modules()]
    prediction = mc_predict(model, x, 8, seed=0)
    assert prediction.variance.min() > 0  # every output varies across the samples
    assert [m.training for m in model.modules()] == modes
    with torch.no_grad():
        assert torch.equal(model(x), model(x))  # and eval is deterministic again


def test_a_model_whose_only_dropout_rate_is_zero_has_nothing_to_sample():
    with pytest.raises(InputError, match="no dropout layer"):
        mc_predict(Attention(0.0).eval(), torch.randn(2, 3, 8), 2)


def test_the_input_must_be_a_tensor():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Dropout(0.5))
    with pytest.raises(InputError, match="mc_predict: x must be the input tensor, got list"):
        mc_predict(model, [torch.randn(2, 4)], 2, seed=0)


class FusedAttention(torch.nn.Module):
    """timm's Attention pattern: the dropout layer's rate goes to a fused kernel, and only in
    the module's own training mode; the layer itself never runs."""

    def __init__(self, dim=8):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.attn_drop = torch.nn.Dropout(0.5)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        rate = self.attn_drop.p if self.training else 0.0
        return self.proj(torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=rate))


class Classifier(torch.nn.Module):
    def __init__(self, drop_head):
        super().__init__()
        self.attention = FusedAttention()
        self.head_drop = torch.nn.Dropout(0.3) if drop_head else torch.nn.Identity()
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.head_drop(self.attention(x).mean(1))).squeeze(-1)


@pytest.mark.parametrize("drop_head", [True, False])
def test_a_dropout_layer_that_never_runs_is_named(drop_head):
    """Switched on but never called: its rate is not sampled, and the user hears of it (with
    only that dropout the samples would all be equal)."""
    model = Classifier(drop_head)
    x = torch.randn(4, 5, 8)
    with pytest.warns(UserWarning, match=r"never ran.*'attention\.attn_drop' \(Dropout\)"):
        prediction = mc_predict(model, x, samples=4, seed=0)
    assert (prediction.variance.max() > 0) == drop_head
    with pytest.warns(UserWarning, match="fused_attn = False"), mc_dropout(model):
        model(x)


def test_no_warning_when_every_dropout_layer_runs_or_the_model_did_not():
    model = Classifier(drop_head=True)
    model.attention.forward = lambda x: model.attention.proj(model.attention.attn_drop(x))
    x = torch.randn(4, 5, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mc_predict(model, x, samples=3, seed=0)
        with mc_dropout(model):
            model.head(x)  # a part only: the model itself did not run, nothing to judge
