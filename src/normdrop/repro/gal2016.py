"""Gal & Ghahramani 2016, "Dropout as a Bayesian Approximation: Representing Model Uncertainty
in Deep Learning" (ICML), on mnist5k.

Keeping dropout on at test time and averaging T stochastic passes (Monte-Carlo dropout) gives a
predictive distribution: better calibrated than the single deterministic pass (lower negative
log-likelihood), and with an entropy that is high where the model is wrong and on inputs unlike
the training data (the paper's Fig. 4: a "1" rotated away from upright).

Predictions come from :func:`normdrop.tools.mc_predict` (dropout on, everything else in eval).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from normdrop.repro.common import (
    epoch_batches,
    load_mnist5k,
    mlp,
    predict,
    seeded,
    sgd_step,
)
from normdrop.repro.outcome import Outcome, mean, per_seed
from normdrop.repro.parallel import run_tasks

TITLE = "Monte-Carlo dropout: likelihood, error detection, out-of-distribution entropy"
PAPER = (
    "MNIST, LeNet-style networks with dropout, T = 100 MC passes: the MC predictive mean has a "
    "better test log-likelihood than the weight-scaled network (Sec. 5), and predictive "
    "uncertainty grows as a '1' is rotated away from upright (Fig. 4), where the deterministic "
    "softmax stays confidently wrong."
)


@dataclass(frozen=True)
class Config:
    widths: tuple[int, ...] = (784, 512, 512, 10)
    drop: float = 0.5  # Gal's p = 0.5 is a drop probability here and a keep one in Srivastava
    lr: float = 1e-3
    batch_size: int = 100
    epochs: int = 20
    samples: int = 100
    digit: int = 1
    angle: float = 60.0
    entropy_ratio: float = 5.0
    sweep_angles: tuple[float, ...] = tuple(float(a) for a in range(0, 181, 15))

    def scaled(self, scale: float) -> Config:
        return Config(**{**asdict(self), "epochs": max(1, round(self.epochs * scale))})


def nll(probabilities: Tensor, labels: Tensor) -> float:
    """Mean negative log-likelihood of the labels, in nats (probabilities clamped at 1e-12)."""
    picked = probabilities[torch.arange(len(labels)), labels].clamp_min(1e-12)
    return -picked.log().mean().item()


def auroc(scores: Tensor, positives: Tensor) -> float:
    """Area under the ROC curve of ``scores`` for the boolean ``positives``: the probability
    that a random positive scores above a random negative, ties counting one half
    (Mann-Whitney U / (n_pos * n_neg))."""
    scores, positives = scores.double(), positives.bool()
    pos, neg = scores[positives], scores[~positives]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return ((greater + 0.5 * ties) / (len(pos) * len(neg))).item()


def rotate(images: Tensor, degrees: float) -> Tensor:
    """Rotate flat 28x28 images by ``degrees`` counter-clockwise about the centre
    (scipy.ndimage.rotate, bilinear, same size, zero fill)."""
    from scipy.ndimage import rotate as nd_rotate

    grid = images.reshape(-1, 28, 28).numpy()
    turned = nd_rotate(grid, degrees, axes=(2, 1), reshape=False, order=1, mode="constant")
    return torch.from_numpy(np.clip(turned, 0.0, 1.0).reshape(len(images), 784).astype(np.float32))


def train(config: Config, seed: int) -> nn.Sequential:
    data = load_mnist5k()
    generator = seeded(seed)
    model = mlp(config.widths, nn.ReLU, None, config.drop)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    for _ in range(config.epochs):
        for idx in epoch_batches(len(data.train_x), config.batch_size, generator):
            sgd_step(model, optimizer, data.train_x[idx], data.train_y[idx])
    return model


def entropy(probabilities: Tensor) -> Tensor:
    """Entropy in nats of each row of class probabilities."""
    return -torch.special.xlogy(probabilities, probabilities).sum(1)


def seed_task(config: Config, seed: int) -> dict:
    """Train, then compare MC dropout with the deterministic net on the test set and on
    rotated digits."""
    from normdrop.tools import mc_predict

    data = load_mnist5k()
    model = train(config, seed)
    deterministic = torch.softmax(predict(model, data.test_x), 1).double()
    mc = mc_predict(model, data.test_x, config.samples, seed=seed)
    wrong = mc.mean.argmax(1) != data.test_y
    digits = data.test_x[data.test_y == config.digit]
    sweep = {}
    for angle in config.sweep_angles:
        turned = mc_predict(model, rotate(digits, angle), config.samples, seed=seed)
        det = torch.softmax(predict(model, rotate(digits, angle)), 1).double()
        sweep[angle] = {
            "mc_entropy": turned.entropy.mean().item(),
            "deterministic_entropy": entropy(det).mean().item(),
            "mc_digit_probability": turned.mean[:, config.digit].mean().item(),
        }
    upright = mc_predict(model, digits, config.samples, seed=seed).entropy.mean().item()
    turned = mc_predict(model, rotate(digits, config.angle), config.samples, seed=seed)
    return {
        "nll_mc": nll(mc.mean, data.test_y),
        "nll_deterministic": nll(deterministic, data.test_y),
        "error_mc": 100.0 * wrong.double().mean().item(),
        "error_deterministic": 100.0
        * (deterministic.argmax(1) != data.test_y).double().mean().item(),
        "auroc": auroc(mc.entropy, wrong),
        "entropy_upright": upright,
        "entropy_rotated": turned.entropy.mean().item(),
        "sweep": sweep,
        "entropy_right": mc.entropy[~wrong].tolist(),
        "entropy_wrong": mc.entropy[wrong].tolist(),
    }


def run(seeds: list[int], scale: float = 1.0, jobs: int = 1) -> Outcome:
    config = Config().scaled(scale)
    outcome = Outcome(
        "gal2016",
        TITLE,
        PAPER,
        setup=(
            f"mnist5k, 784-512-512-10 ReLU with dropout {config.drop} after each hidden layer, "
            f"Adam {config.lr}, batch {config.batch_size}, {config.epochs} epochs; T = "
            f"{config.samples} MC passes; the {len(config.sweep_angles)} rotations of the 100 "
            f"test '{config.digit}'s from 0 to 180 degrees."
        ),
        choices=[
            "no input dropout; dropout p = 0.5 is the drop probability (for 0.5 the two "
            "conventions agree)",
            "deterministic prediction = eval mode (weight scaling); MC prediction = mean of the "
            "T softmax outputs (normdrop.tools.mc_predict, dropout on, fixed seed)",
            "errors to detect are the MC prediction's mistakes on the 1,000 test images; the "
            "score is its predictive entropy; AUROC by Mann-Whitney",
            "rotation: scipy.ndimage.rotate, bilinear, same 28x28 frame, zero fill; entropy "
            "ratio = mean MC entropy at 60 degrees / mean MC entropy upright, over the test 1s",
        ],
        seeds=seeds,
        config=asdict(config),
    )
    results = run_tasks([(seed_task, (config, seed)) for seed in seeds], jobs)
    outcome.figures = {"uncertainty": _figure(results, config)}
    for result in results:
        del result["entropy_right"], result["entropy_wrong"]
    _criteria(outcome, config, results)
    outcome.measurements = {"per_seed": results}
    return outcome


def _criteria(outcome: Outcome, config: Config, results: list[dict]) -> None:
    mc, det = [r["nll_mc"] for r in results], [r["nll_deterministic"] for r in results]
    outcome.check(
        "mc_better_nll", "test NLL, MC dropout - deterministic (nats, mean over seeds)",
        mean(mc) - mean(det), "<", 0.0,
        f"MC {per_seed(mc, 4)}; deterministic {per_seed(det, 4)}; test error MC "
        f"{per_seed([r['error_mc'] for r in results])}%, deterministic "
        f"{per_seed([r['error_deterministic'] for r in results])}%",
        seeds=[m - d for m, d in zip(mc, det, strict=True)],
    )  # fmt: skip
    scores = [r["auroc"] for r in results]
    outcome.check(
        "entropy_detects_errors", "AUROC of MC predictive entropy for the MC net's errors",
        mean(scores), ">=", 0.85, f"per seed {per_seed(scores, 3)}",
    )  # fmt: skip
    ratios = [r["entropy_rotated"] / r["entropy_upright"] for r in results]
    rotated, upright = (
        mean([r[k] for r in results]) for k in ("entropy_rotated", "entropy_upright")
    )
    outcome.check(
        "rotated_more_uncertain",
        f"mean MC entropy of test '{config.digit}'s rotated {config.angle:g} degrees / upright "
        "(ratio of the seed means)",
        rotated / upright,
        ">=",
        config.entropy_ratio,
        f"per seed {per_seed(ratios)}",
    )


def _figure(results: list[dict], config: Config) -> Figure:
    figure = Figure(figsize=(11, 4))
    axes = figure.add_subplot(1, 2, 1)
    angles = list(config.sweep_angles)
    curves = {
        "mc_entropy": "MC dropout entropy",
        "deterministic_entropy": "deterministic softmax entropy",
        "mc_digit_probability": f"MC probability of '{config.digit}'",
    }
    for key, label in curves.items():
        axes.plot(angles, [mean([r["sweep"][a][key] for r in results]) for a in angles], "o-",
                  label=label)  # fmt: skip
    axes.axvline(config.angle, color="gray", lw=0.5)
    axes.set(xlabel="rotation (degrees)", ylabel="nats / probability",
             title=f"Fig. 4 analogue: rotated test '{config.digit}'s")  # fmt: skip
    axes.legend(fontsize=8)
    axes = figure.add_subplot(1, 2, 2)
    first = results[0]
    axes.hist([first["entropy_right"], first["entropy_wrong"]], bins=30, density=True,
              label=["right", "wrong"])  # fmt: skip
    axes.set(xlabel="MC predictive entropy (nats)", ylabel="density",
             title="test predictions (first seed)")  # fmt: skip
    axes.legend()
    return figure
