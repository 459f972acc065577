"""The reproductions' measurement functions against oracles: direct simulation, float64
recomputation, numpy/scikit-learn, hand-built models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from normdrop import functional as F
from normdrop import use_backend
from normdrop.nn import BatchNorm1d, Dropout
from normdrop.repro import (
    common,
    gal2016,
    ioffe2015,
    ioffe2017,
    li2019,
    santurkar2018,
    srivastava2014,
    zhang2017,
)


@pytest.fixture(autouse=True)
def _reference_backend():
    """The reproductions run on the reference math (see normdrop.repro.run_one)."""
    with use_backend("reference"):
        yield


def test_mnist5k_split_is_stratified_fixed_and_scaled():
    data = common.load_mnist5k()
    assert data.train_x.shape == (4000, 784) and data.test_x.shape == (1000, 784)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert torch.bincount(data.train_y).tolist() == [400] * 10
    assert torch.bincount(data.test_y).tolist() == [100] * 10
    assert data.train_x.min() == 0.0 and data.train_x.max() == 1.0
    # no image in both splits
    train_rows = {row.tobytes() for row in data.train_x.numpy()}
    assert sum(row.tobytes() in train_rows for row in data.test_x.numpy()) < 5  # MNIST dups


def test_keep_to_drop_converts_the_papers_convention():
    assert common.keep_to_drop(0.8) == pytest.approx(0.2)
    assert common.keep_to_drop(1.0) == 0.0
    with pytest.raises(ValueError, match="keep"):
        common.keep_to_drop(0.0)
    model = common.mlp((4, 3, 2), drop=common.keep_to_drop(0.8))
    assert [m.p for m in model if isinstance(m, Dropout)] == [pytest.approx(0.2)]


def test_mlp_layers_and_no_bias_before_norm():
    model = common.mlp((5, 4, 3, 2), nn.Sigmoid, common.batch_norm, drop=0.1, input_drop=0.2)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Dropout", "Linear", "BatchNorm1d", "Sigmoid", "Dropout",
                     "Linear", "BatchNorm1d", "Sigmoid", "Dropout", "Linear"]  # fmt: skip
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [m.bias is None for m in linears] == [True, True, False]


def test_accuracy_counts_nan_rows_as_wrong():
    logits = torch.tensor([[1.0, 0.0], [math.nan, 0.0], [0.0, 1.0]])
    assert common.accuracy(logits, torch.tensor([0, 0, 1])) == pytest.approx(200 / 3)


def test_batch_statistics_inference_equals_functional_batch_norm_and_leaves_model_alone():
    torch.manual_seed(0)
    model = nn.Sequential(BatchNorm1d(3))
    model[0].running_mean.fill_(5.0)
    x, y = torch.randn(8, 3), torch.zeros(8, dtype=torch.long)
    clone = common.with_batch_statistics(model)
    with torch.no_grad():
        got = clone(x[:4])
    expected = F.batch_norm(x[:4], None, None, model[0].weight, model[0].bias, training=True)
    torch.testing.assert_close(got, expected)
    assert torch.equal(clone[0].running_mean, torch.full((3,), 5.0))
    common.batch_statistics_accuracy(model, x, y, 4)
    assert torch.equal(model[0].running_mean, torch.full((3,), 5.0)) and model.training


# ----------------------------------------------------------------------------------------
# ioffe2015
# ----------------------------------------------------------------------------------------


def _tiny_bn_net() -> nn.Sequential:
    torch.manual_seed(3)
    return common.mlp((6, 5, 4, 3), nn.Sigmoid, common.batch_norm)


def test_population_statistics_match_a_float64_computation():
    """Algorithm 2: E[mu_B] and m/(m-1) E[sigma_B^2] per layer, earlier BN layers normalizing
    each batch with its own statistics."""
    torch.manual_seed(1)
    model = _tiny_bn_net()
    x = torch.randn(120, 6) * 3 + 2
    data = common.Data(x, torch.zeros(120, dtype=torch.long), x, x)
    config = ioffe2015.Config(batch_size=10, population_batches=7)
    got = ioffe2015.population_statistics(model, data, config, seed=4)

    stream = common.batch_stream(120, 10, torch.Generator().manual_seed(4 + 7))
    batches = [x[next(stream)].double() for _ in range(7)]
    reference = list(model.double())
    bns = [i for i, m in enumerate(reference) if isinstance(m, BatchNorm1d)]
    for layer in bns:
        means, variances = [], []
        for batch in batches:
            h = batch
            for module in reference[:layer]:
                if isinstance(module, BatchNorm1d):
                    mu, var = h.mean(0), h.var(0, unbiased=False)
                    h = (h - mu) / torch.sqrt(var + module.eps) * module.weight + module.bias
                else:
                    h = module(h)
            means.append(h.mean(0))
            variances.append(h.var(0, unbiased=True))  # = m/(m-1) * biased
        expected_mean, expected_var = torch.stack(means).mean(0), torch.stack(variances).mean(0)
        close = {"rtol": 1e-5, "atol": 1e-5}
        torch.testing.assert_close(got[layer].running_mean.double(), expected_mean, **close)
        torch.testing.assert_close(got[layer].running_var.double(), expected_var, **close)


def test_batch_independence_is_tiny_in_eval_and_catches_batch_statistics():
    model = _tiny_bn_net()
    model.train()
    model(torch.randn(32, 6))  # some running statistics
    x = torch.randn(20, 6)
    assert ioffe2015.batch_independence(model, x, count=20) < 1e-12
    leaky = common.with_batch_statistics(model)
    leaky.eval = lambda: leaky  # a model whose "eval" still uses batch statistics
    assert ioffe2015.batch_independence(leaky, x, count=20) > 1e-3


def test_tracked_percentiles_are_the_numpy_percentiles_of_the_unit_input():
    data = common.load_mnist5k()
    config = ioffe2015.Config(steps=20, eval_every=10)
    model, record = ioffe2015.train_tracked(config, data, seed=0, batchnorm=False)
    assert record["steps"] == [10, 20]
    with torch.no_grad():  # layer 3's pre-sigmoid input, by hand
        h = data.test_x
        linears = [m for m in model if isinstance(m, nn.Linear)]
        for layer in linears[:2]:
            h = torch.sigmoid(layer(h))
        unit = linears[2](h)[:, config.unit].double().numpy()
    for q in ioffe2015.PERCENTILES:
        assert record[f"p{int(q)}"][-1] == pytest.approx(np.percentile(unit, q), rel=1e-5)


def test_steps_to_and_spread_drift():
    assert ioffe2015.steps_to([50, 89.9, 90.0, 95], [100, 200, 300, 400], 90.0) == 300
    assert ioffe2015.steps_to([50, 60], [100, 200], 90.0) == math.inf
    assert ioffe2015.spread_drift([0, -1, -2], [1, 1, 3]) == pytest.approx(5 - 1)


# ----------------------------------------------------------------------------------------
# li2019: variance-shift theory against a direct simulation with normdrop's dropout
# ----------------------------------------------------------------------------------------


@settings(max_examples=10)
@given(keep=st.sampled_from([0.3, 0.5, 0.8]), shift=st.floats(-1.0, 1.0), seed=st.integers(0, 99))
def test_variance_shift_theory_matches_simulation(keep, shift, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(200_000, 2, generator=generator, dtype=torch.float64) + shift)
    trained = F.dropout(x, 1.0 - keep, training=True, generator=generator)
    simulated = x.var(0) / trained.var(0)
    theory = li2019.shift_theory(x.mean(0), x.var(0), keep)

    def relative_se(v):  # of a sample variance: sqrt((kurtosis - 1) / n)
        centered = v - v.mean(0)
        return torch.sqrt(((centered**4).mean(0) / centered.var(0) ** 2 - 1) / len(v))

    tolerance = 4 * torch.sqrt(relative_se(x) ** 2 + relative_se(trained) ** 2)
    assert torch.all((simulated / theory - 1).abs() <= tolerance), (simulated, theory, tolerance)


def test_variance_ratio_is_one_for_matching_statistics_and_masks_dead_units():
    bn = BatchNorm1d(3)
    x = torch.randn(500, 3, dtype=torch.float32)
    x[:, 2] = 0.0  # a dead unit
    with torch.no_grad():
        bn.running_var.copy_(x.var(0, unbiased=True))
        bn.running_var[2] = 0.0
    (layer,) = li2019.variance_ratios(nn.Sequential(bn), x, keep=0.5)
    assert layer["ratio"] == pytest.approx(1.0, rel=1e-5) and layer["live_units"] == 2


def test_placements_put_dropout_where_they_say():
    kinds = lambda model: [type(m).__name__ for m in model]  # noqa: E731
    assert kinds(li2019.dropout_then_bn(8, 0.5))[:4] == ["Linear", "ReLU", "Dropout", "BatchNorm1d"]
    assert kinds(li2019.dropout_linear_bn(8, 0.5))[:5] == ["Linear", "BatchNorm1d", "ReLU",
                                                           "Dropout", "Linear"]  # fmt: skip
    after = kinds(li2019.dropout_after_bn(8, 0.5))
    assert after.index("Dropout") > max(i for i, k in enumerate(after) if k == "BatchNorm1d")


# ----------------------------------------------------------------------------------------
# srivastava2014, gal2016
# ----------------------------------------------------------------------------------------


def test_max_norm_clips_only_rows_above_the_limit():
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[3.0, 4.0, 0.0], [0.1, 0.2, 0.2]]))
        model[2].weight.fill_(10.0)
    srivastava2014.apply_max_norm(model, 2.0)
    torch.testing.assert_close(model[0].weight[0], torch.tensor([1.2, 1.6, 0.0]))
    torch.testing.assert_close(model[0].weight[1], torch.tensor([0.1, 0.2, 0.2]))
    assert torch.all(model[2].weight == 10.0)  # the output layer is not constrained


@pytest.mark.parametrize("lr_decay", [False, True])
def test_classifier_learning_rate_falls_linearly_to_zero_or_stays(monkeypatch, lr_decay):
    """The learning rate at step k of ``total``: ``lr * (1 - k / total)`` with ``lr_decay``,
    ``lr`` without (read by each SGD step)."""
    seen = []
    monkeypatch.setattr(
        srivastava2014, "sgd_step", lambda model, opt, x, y: seen.append(opt.param_groups[0]["lr"])
    )
    data = common.Data(
        torch.rand(40, 6), torch.randint(0, 10, (40,)), torch.rand(4, 6), torch.zeros(4)
    )
    config = srivastava2014.Config(lr=0.3, batch_size=10)
    srivastava2014.train_classifier(data, 0, (6, 5, 10), 3, config, lr_decay=lr_decay)
    expected = [0.3 * (1.0 - k / 12) if lr_decay else 0.3 for k in range(12)]
    assert seen == pytest.approx(expected, rel=1e-12, abs=0)


def test_mc_error_averages_disjoint_groups():
    y = torch.tensor([0, 1])
    right = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    wrong = torch.tensor([[0.2, 0.8], [0.9, 0.1]])
    draws = torch.stack([right, wrong, right, right])
    assert srivastava2014.mc_error(draws, y, 1) == pytest.approx(25.0)  # one of four wrong
    # groups (right, wrong) and (right, right): the first averages to [0.55, 0.45], [0.55, 0.45]
    assert srivastava2014.mc_error(draws, y, 2) == pytest.approx(25.0)
    assert srivastava2014.mc_error(draws, y, 4) == pytest.approx(0.0)


@given(st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=2, max_size=40))
def test_auroc_equals_scikit_learn(pairs):
    from sklearn.metrics import roc_auc_score

    scores = torch.tensor([float(s) for s, _ in pairs])
    labels = torch.tensor([b for _, b in pairs])
    if labels.all() or not labels.any():
        assert math.isnan(gal2016.auroc(scores, labels))
    else:
        assert gal2016.auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


def test_nll_matches_cross_entropy():
    logits = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (7,))
    expected = nn.functional.cross_entropy(logits, y).item()
    assert gal2016.nll(torch.softmax(logits, 1), y) == pytest.approx(expected)


def test_rotation_by_90_degrees_is_rot90_and_by_0_is_identity():
    image = torch.rand(2, 784)
    torch.testing.assert_close(gal2016.rotate(image, 0.0), image)
    turned = gal2016.rotate(image, 90.0).reshape(2, 28, 28)
    expected = torch.from_numpy(np.rot90(image.reshape(2, 28, 28).numpy(), 1, axes=(1, 2)).copy())
    torch.testing.assert_close(turned, expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------
# zhang2017, santurkar2018, ioffe2017
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_corruption_keeps_the_expected_share_of_labels(fraction):
    labels = torch.arange(20_000) % 10
    kept = (zhang2017.corrupt(labels, fraction, seed=0) == labels).double().mean().item()
    expected = 1.0 - fraction + fraction / 10  # a random replacement is right 1 time in 10
    half_width = 4.0 * math.sqrt(expected * (1 - expected) / len(labels)) + 1e-12
    assert abs(kept - expected) <= half_width


def test_subset_is_balanced():
    _, y = zhang2017.subset(1000)
    assert torch.bincount(y).tolist() == [100] * 10


def test_probe_matches_a_manual_computation_and_changes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), common.batch_norm(3), nn.ReLU(), nn.Linear(3, 2))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = santurkar2018.probe(model, x, y, (0.1, 0.3))
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key

    def loss_at(params):  # functional forward, BN with batch statistics
        w1, gamma, beta, w2, b2, b1 = params
        h = x.double() @ w1.T + b1
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + 1e-5) * gamma + beta
        return nn.functional.cross_entropy(torch.relu(h) @ w2.T + b2, y)

    names = ["0.weight", "1.weight", "1.bias", "3.weight", "3.bias", "0.bias"]
    params = [state[n].double().requires_grad_() for n in names]
    grads = torch.autograd.grad(loss_at(params), params)
    losses, changes = [], []
    for eta in (0.1, 0.3):
        moved = [
            (p - eta * g).detach().requires_grad_() for p, g in zip(params, grads, strict=True)
        ]
        loss = loss_at(moved)
        new = torch.autograd.grad(loss, moved)
        losses.append(loss.item())
        changes.append(
            torch.cat([(a - b).flatten() for a, b in zip(new, grads, strict=True)]).norm()
        )
    assert result["loss"] == pytest.approx(loss_at(params).item(), rel=1e-4)
    assert result["loss_range"] == pytest.approx(max(losses) - min(losses), rel=1e-3, abs=1e-6)
    assert result["gradient_change"] == pytest.approx(max(changes).item(), rel=1e-3)


def test_trains_needs_finite_falling_losses():
    assert santurkar2018.trains({"losses": [2.0] * 10 + [0.5] * 10}, 10)
    assert not santurkar2018.trains({"losses": [2.0] * 20}, 10)
    assert not santurkar2018.trains({"losses": [2.0] * 10 + [0.1] * 9 + [math.nan]}, 10)
    # a late blow-up does not undo the training; a plateau with a few dips is no training
    assert santurkar2018.trains({"losses": [2.0] * 10 + [0.1] * 10 + [5.0] * 10}, 10)
    assert not santurkar2018.trains({"losses": [2.0] * 10 + [2.0] * 7 + [0.1] * 3}, 10)


def test_batch_renorm_schedule_follows_the_fractions():
    config = ioffe2017.Config()
    steps = config.steps(4)
    layer = ioffe2017.norm_factory(config, "brn", 4)(8)
    limits = {}
    for fraction in (0.0, 0.04, 0.2, 0.3, 0.9):
        layer.num_batches_tracked.fill_(round(fraction * steps))
        limits[fraction] = layer.current_limits()
    assert limits[0.0] == (1.0, 0.0) and limits[0.04] == (1.0, 0.0)
    assert limits[0.2][1] == pytest.approx(5.0) and limits[0.2][0] < 3.0
    assert limits[0.3] == pytest.approx((3.0, 5.0)) and limits[0.9] == pytest.approx((3.0, 5.0))
