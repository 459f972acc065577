"""Srivastava, Hinton, Krizhevsky, Sutskever & Salakhutdinov 2014, "Dropout: A Simple Way to
Prevent Neural Networks from Overfitting" (JMLR 15), on mnist5k.

Four claims:

1. Dropout overfits less (Table 2): lower test error, smaller train-test gap.
2. The keep probability p has a broad optimum (Fig. 9a): too small underfits.
3. Weight scaling at test time approximates the average of many dropout networks (Fig. 11):
   one sampled network is much worse, about 50 Monte-Carlo samples match it.
4. Dropout makes the hidden features of an autoencoder sparse (Fig. 8).

The paper's p is the probability of *keeping* a unit; ``normdrop.nn.Dropout`` takes the
probability of *dropping* it, so every keep probability below goes through
:func:`normdrop.repro.common.keep_to_drop`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from normdrop.repro.common import (
    Data,
    accuracy,
    epoch_batches,
    keep_to_drop,
    load_mnist5k,
    mlp,
    predict,
    seeded,
    sgd_step,
)
from normdrop.repro.outcome import Outcome, mean, per_seed
from normdrop.repro.parallel import run_tasks

TITLE = "Dropout: less overfitting, keep-probability sweep, weight scaling, sparse features"
PAPER = (
    "MNIST (60k), SGD with momentum, max-norm: dropout cuts test error from 1.60% (784-1024-1024"
    "-2048 ReLU... 784-800-800 standard net) to 1.25-1.05% (Table 2); error is flat for keep p "
    "in 0.4-0.8 and underfits at p < 0.4 (Fig. 9a); Monte-Carlo averaging of k sampled nets "
    "matches weight scaling from k ~ 50 (Fig. 11); an autoencoder's mean hidden activation "
    "drops from ~2.0 to ~0.7 with dropout, with far more near-zero activations (Fig. 8)."
)
NEAR_ZERO = 0.05  # an activation at or below this counts as (near) zero


@dataclass(frozen=True)
class Config:
    lr: float = 0.05
    momentum: float = 0.9
    batch_size: int = 100
    overfit_widths: tuple[int, ...] = (784, 1024, 1024, 10)
    overfit_epochs: int = 30
    overfit_lr_decay: bool = True  # lr falls linearly from lr to 0 over the overfitting runs
    input_keep: float = 0.8
    hidden_keep: float = 0.5
    sweep_widths: tuple[int, ...] = (784, 512, 512, 10)
    sweep_keeps: tuple[float, ...] = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0)
    sweep_epochs: int = 20
    max_norm: float = 3.0
    mc_samples: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)
    autoencoder_hidden: int = 256
    autoencoder_lr: float = 1e-3
    autoencoder_epochs: int = 20
    autoencoder_keep: float = 0.5

    def scaled(self, scale: float) -> Config:
        def epochs(n: int) -> int:
            return max(1, round(n * scale))

        return Config(
            **{
                **asdict(self),
                "overfit_epochs": epochs(self.overfit_epochs),
                "sweep_epochs": epochs(self.sweep_epochs),
                "autoencoder_epochs": epochs(self.autoencoder_epochs),
            }
        )


@torch.no_grad()
def apply_max_norm(model: nn.Sequential, limit: float) -> None:
    """Rescale every hidden unit's incoming weight vector to L2 norm <= ``limit`` (the paper's
    max-norm constraint, Section 5.1); the output layer is left free."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    for layer in linears[:-1]:
        norms = layer.weight.norm(dim=1, keepdim=True)
        layer.weight.mul_(torch.clamp(limit / norms.clamp_min(1e-12), max=1.0))


def train_classifier(
    data: Data,
    seed: int,
    widths: tuple[int, ...],
    epochs: int,
    config: Config,
    input_keep: float = 1.0,
    hidden_keep: float = 1.0,
    max_norm: float | None = None,
    lr_decay: bool = False,
) -> nn.Sequential:
    """SGD with momentum on the 4,000 training images, ReLU MLP with dropout at the given
    keep probabilities (1.0: no dropout). ``lr_decay``: the learning rate falls linearly from
    ``config.lr`` (first step) towards 0 (after the last step) instead of staying constant."""
    generator = seeded(seed)
    model = mlp(widths, nn.ReLU, None, keep_to_drop(hidden_keep), keep_to_drop(input_keep))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    total = epochs * (len(data.train_x) // config.batch_size)
    # LambdaLR sets lr = config.lr * factor(step) before each step: no drift, unlike LinearLR.
    factor = (lambda step: 1.0 - step / total) if lr_decay else (lambda step: 1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    for _ in range(epochs):
        for idx in epoch_batches(len(data.train_x), config.batch_size, generator):
            sgd_step(model, optimizer, data.train_x[idx], data.train_y[idx])
            schedule.step()
            if max_norm is not None:
                apply_max_norm(model, max_norm)
    return model


def errors(model: nn.Module, data: Data) -> tuple[float, float]:
    """(train error, test error) in percent, eval mode (weight scaling for dropout)."""
    train = 100.0 - accuracy(predict(model, data.train_x), data.train_y)
    test = 100.0 - accuracy(predict(model, data.test_x), data.test_y)
    return train, test


@torch.no_grad()
def dropout_draws(model: nn.Module, x: Tensor, count: int) -> Tensor:
    """``count`` softmax outputs of ``x`` with dropout on (each a sampled thinned network):
    shape (count, N, classes)."""
    from normdrop.tools import mc_dropout

    with mc_dropout(model):
        return torch.stack([torch.softmax(model(x), dim=1) for _ in range(count)])


def mc_error(draws: Tensor, y: Tensor, k: int) -> float:
    """Test error (percent) of averaging the predictions of k sampled networks, averaged over
    the ``len(draws) // k`` disjoint groups of k draws."""
    groups = draws[: len(draws) // k * k].reshape(-1, k, *draws.shape[1:]).mean(1)
    return mean([100.0 - accuracy(group, y) for group in groups])


def train_autoencoder(data: Data, seed: int, config: Config, keep: float) -> nn.Sequential:
    """784-256 ReLU -[dropout]- 784 sigmoid, Adam, binary cross-entropy on pixel intensities."""
    generator = seeded(seed)
    hidden = config.autoencoder_hidden
    model = mlp((784, hidden, 784), nn.ReLU, None, keep_to_drop(keep))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.autoencoder_lr)
    loss_fn = nn.functional.binary_cross_entropy_with_logits  # the sigmoid is in the loss
    for _ in range(config.autoencoder_epochs):
        for idx in epoch_batches(len(data.train_x), config.batch_size, generator):
            x = data.train_x[idx]
            sgd_step(model, optimizer, x, x, loss_fn)
    return model


def hidden_activations(model: nn.Sequential, x: Tensor) -> Tensor:
    """The ReLU outputs of the autoencoder's hidden layer, eval mode: (N, hidden)."""
    return predict(model[:2], x)


def run(seeds: list[int], scale: float = 1.0, jobs: int = 1) -> Outcome:
    """All four parts for every seed; criteria on the means over seeds."""
    config = Config().scaled(scale)
    outcome = Outcome(
        "srivastava2014",
        TITLE,
        PAPER,
        setup=(
            f"mnist5k, ReLU MLPs, SGD lr {config.lr} momentum {config.momentum}, batch "
            f"{config.batch_size}. Overfitting: 784-1024-1024-10, {config.overfit_epochs} epochs"
            f"{' (lr decaying linearly to 0)' if config.overfit_lr_decay else ''}, "
            f"keep {config.input_keep} (input) / {config.hidden_keep} (hidden) vs none. Sweep: "
            f"784-512-512-10, hidden keep in {list(config.sweep_keeps)}, max-norm "
            f"{config.max_norm}, {config.sweep_epochs} epochs. Monte Carlo: k in "
            f"{list(config.mc_samples)} sampled nets of the overfitting part's dropout net. "
            f"Autoencoder 784-{config.autoencoder_hidden}-784, Adam {config.autoencoder_lr}, "
            f"{config.autoencoder_epochs} epochs, hidden keep {config.autoencoder_keep}."
        ),
        choices=[
            "keep probabilities are the paper's p; normdrop.nn.Dropout gets 1 - p (drop)",
            f"overfitting part: the learning rate falls linearly from {config.lr} to 0 over the "
            f"{config.overfit_epochs} epochs, for both nets (the paper decays its learning rate; "
            "at a constant 0.05 the dropout net ends on a noisy iterate; docs/REPRODUCTIONS.md)"
            if config.overfit_lr_decay
            else "overfitting part: constant learning rate",
            "overfitting part: no max-norm on either net (the paper's c = 3 or 4 does not bind "
            "at lr 0.05); error is measured in eval mode, i.e. with weight scaling",
            "sweep: the keep probability applies to both hidden layers; no input dropout; "
            "max-norm 3 on every hidden unit's incoming weights after each step, for every keep",
            "Monte Carlo: the prediction of k nets is the mean of their softmax outputs; each "
            "error is averaged over the 100 // k disjoint groups of 100 draws",
            "autoencoder: binary cross-entropy on [0, 1] pixels, batch 100; activations are "
            f"measured on the test set in eval mode; 'near zero' means <= {NEAR_ZERO}",
        ],
        seeds=seeds,
        config=asdict(config),
    )
    calls = [(overfit_task, (config, seed, keep)) for keep in (True, False) for seed in seeds]
    calls += [(sweep_task, (config, seed, keep)) for keep in config.sweep_keeps for seed in seeds]
    calls += [(autoencoder_task, (config, seed)) for seed in seeds]
    results = iter(run_tasks(calls, jobs))
    dropout_runs = [next(results) for _ in seeds]
    plain_runs = [next(results) for _ in seeds]
    sweep = {keep: [next(results) for _ in seeds] for keep in config.sweep_keeps}
    parts = {
        "overfit": [
            {"plain": plain, "dropout": dropout["errors"]}
            for plain, dropout in zip(plain_runs, dropout_runs, strict=True)
        ],
        "mc": [dropout["mc"] for dropout in dropout_runs],
        "sweep": [{keep: sweep[keep][i] for keep in config.sweep_keeps} for i in range(len(seeds))],
        "sparsity": [next(results) for _ in seeds],
    }
    _criteria(outcome, config, parts)
    outcome.figures = {
        "keep_sweep": _sweep_figure(parts["sweep"], config),
        "monte_carlo": _mc_figure(parts["mc"], config),
        "sparsity": _sparsity_figure(parts["sparsity"]),
    }
    for record in parts["sparsity"]:
        del record["histograms"]
    outcome.measurements = parts
    return outcome


def overfit_task(config: Config, seed: int, dropout: bool):
    """784-1024-1024-10 with or without dropout: (train, test) errors; for the dropout net
    also the Monte-Carlo errors against weight scaling."""
    data = load_mnist5k()
    keeps = (config.input_keep, config.hidden_keep) if dropout else (1.0, 1.0)
    model = train_classifier(data, seed, config.overfit_widths, config.overfit_epochs, config,
                             *keeps, lr_decay=config.overfit_lr_decay)  # fmt: skip
    if not dropout:
        return errors(model, data)
    draws = dropout_draws(model, data.test_x, max(config.mc_samples))
    weight_scaling = errors(model, data)
    return {
        "errors": weight_scaling,
        "mc": {
            "weight_scaling": weight_scaling[1],
            "monte_carlo": {k: mc_error(draws, data.test_y, k) for k in config.mc_samples},
        },
    }


def sweep_task(config: Config, seed: int, keep: float) -> tuple[float, float]:
    """784-512-512-10 at hidden keep probability ``keep``, max-norm: (train, test) errors."""
    data = load_mnist5k()
    model = train_classifier(data, seed, config.sweep_widths, config.sweep_epochs, config,
                             hidden_keep=keep, max_norm=config.max_norm)  # fmt: skip
    return errors(model, data)


def autoencoder_task(config: Config, seed: int) -> dict:
    """Mean hidden activation and near-zero fraction, with and without dropout."""
    data = load_mnist5k()
    record = {"histograms": {}}
    for name, keep in (("plain", 1.0), ("dropout", config.autoencoder_keep)):
        h = hidden_activations(train_autoencoder(data, seed, config, keep), data.test_x)
        record[name] = {
            "mean_activation": h.mean().item(),
            "near_zero_fraction": (h <= NEAR_ZERO).float().mean().item(),
        }
        record["histograms"][name] = h.mean(0).tolist()
    return record


def _criteria(outcome: Outcome, config: Config, parts: dict) -> None:
    overfit = parts["overfit"]
    test_gain = [r["plain"][1] - r["dropout"][1] for r in overfit]
    gap = {
        name: [r[name][1] - r[name][0] for r in overfit] for name in ("plain", "dropout")
    }  # test error - train error = train accuracy - test accuracy
    outcome.check(
        "dropout_lower_error",
        "test error plain - test error dropout, 784-1024-1024-10 (points, mean over seeds)",
        mean(test_gain),
        ">=",
        0.8,
        f"plain {per_seed([r['plain'][1] for r in overfit])}%; dropout "
        f"{per_seed([r['dropout'][1] for r in overfit])}%",
    )
    outcome.check(
        "dropout_smaller_gap",
        "train-test gap plain - gap dropout (points, mean over seeds)",
        mean(gap["plain"]) - mean(gap["dropout"]),
        ">=",
        1.0,
        f"gap plain {per_seed(gap['plain'])}; gap dropout {per_seed(gap['dropout'])}",
    )
    keeps = config.sweep_keeps
    test_err = {k: mean([s[k][1] for s in parts["sweep"]]) for k in keeps}
    train_err = {k: mean([s[k][0] for s in parts["sweep"]]) for k in keeps}
    best = min(keeps, key=test_err.__getitem__)
    table = ", ".join(
        f"keep {k:g}: test {test_err[k]:.2f} / train {train_err[k]:.2f}" for k in keeps
    )
    outcome.check(
        "best_keep", "keep probability with the lowest mean test error", best, "in", (0.4, 0.8),
        table,
    )  # fmt: skip
    outcome.check(
        "best_beats_no_dropout",
        "test error at keep 1.0 - at the best keep (points)",
        test_err[1.0] - test_err[best],
        ">",
        0.0,
        seeds=[s[1.0][1] - s[best][1] for s in parts["sweep"]],
    )
    outcome.check(
        "keep_0.1_underfits",
        "train error at keep 0.1 - at keep 0.8 (points)",
        train_err[0.1] - train_err[0.8],
        ">=",
        10.0,
    )
    ws = mean([r["weight_scaling"] for r in parts["mc"]])
    mc = {k: mean([r["monte_carlo"][k] for r in parts["mc"]]) for k in config.mc_samples}
    curve = ", ".join(f"k={k}: {v:.2f}" for k, v in mc.items())
    outcome.check(
        "one_net_worse",
        "MC error with k=1 - weight-scaling error (points)",
        mc[1] - ws,
        ">",
        1.0,
        f"weight scaling {ws:.2f}%; MC {curve}",
    )
    outcome.check(
        "mc50_matches", "|MC error with k=50 - weight-scaling error| (points)",
        abs(mc[50] - ws), "<=", 0.5,
    )  # fmt: skip
    sparsity = parts["sparsity"]
    act = {n: [r[n]["mean_activation"] for r in sparsity] for n in ("plain", "dropout")}
    zero = {n: [r[n]["near_zero_fraction"] for r in sparsity] for n in ("plain", "dropout")}
    outcome.check(
        "sparser_mean_activation",
        "autoencoder mean hidden activation, dropout / plain (paper ~0.7 / ~2.0)",
        mean(act["dropout"]) / mean(act["plain"]),
        "<=",
        0.5,
        f"dropout {per_seed(act['dropout'], 3)}; plain {per_seed(act['plain'], 3)}",
    )
    outcome.check(
        "more_near_zero",
        f"fraction of hidden activations <= {NEAR_ZERO}, dropout - plain",
        mean(zero["dropout"]) - mean(zero["plain"]),
        ">",
        0.0,
        f"dropout {per_seed(zero['dropout'], 3)}; plain {per_seed(zero['plain'], 3)}",
        seeds=[d - p for d, p in zip(zero["dropout"], zero["plain"], strict=True)],
    )


def _sweep_figure(sweep: list[dict], config: Config) -> Figure:
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    keeps = list(config.sweep_keeps)
    for index, label in ((1, "test error"), (0, "training error")):
        axes.plot(keeps, [mean([s[k][index] for s in sweep]) for k in keeps], "o-", label=label)
    axes.set(xlabel="keep probability p (hidden layers)", ylabel="error (%)",
             title="Fig. 9a analogue: 784-512-512-10, max-norm 3")  # fmt: skip
    axes.legend()
    return figure


def _mc_figure(records: list[dict], config: Config) -> Figure:
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    ks = list(config.mc_samples)
    axes.plot(ks, [mean([r["monte_carlo"][k] for r in records]) for k in ks], "o-",
              label="Monte-Carlo model averaging")  # fmt: skip
    axes.axhline(mean([r["weight_scaling"] for r in records]), color="k", ls="--",
                 label="weight scaling (eval mode)")  # fmt: skip
    axes.set(xscale="log", xlabel="number of sampled networks k", ylabel="test error (%)",
             title="Fig. 11 analogue (mean over seeds)")  # fmt: skip
    axes.legend()
    return figure


def _sparsity_figure(records: list[dict]) -> Figure:
    figure = Figure(figsize=(10, 4))
    for k, name in enumerate(("plain", "dropout")):
        axes = figure.add_subplot(1, 2, k + 1)
        axes.hist(records[0]["histograms"][name], bins=40, color="tab:blue")
        axes.set(xlabel="mean activation of a hidden unit over the test set",
                 ylabel="hidden units", title=f"{name} autoencoder (first seed)")  # fmt: skip
    figure.suptitle("Fig. 8 analogue: mean hidden activations")
    return figure
