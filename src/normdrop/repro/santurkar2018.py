"""Santurkar, Tsipras, Ilyas & Madry 2018, "How Does Batch Normalization Help Optimization?"
(NeurIPS), Section 3.1 / Fig. 4, on a 6-layer MLP.

The claim: BatchNorm makes the loss landscape smoother. Every 100 training steps, take the
gradient ``g`` of the loss on the current batch at the weights ``w`` and look along it::

    loss range       = max_eta L(w - eta g) - min_eta L(w - eta g)
    gradient change  = max_eta || grad L(w - eta g) - g ||_2

for ``eta`` in {0.05, 0.1, 0.2, 0.4}, on the same batch, BatchNorm in training mode (batch
statistics, as in the step itself) without touching its running statistics. Both are much
smaller with BatchNorm: the loss is better behaved along the step (Lipschitzness) and the
gradient predicts its neighbours (beta-smoothness).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from normdrop.repro.common import (
    batch_norm,
    batch_stream,
    load_mnist5k,
    mlp,
    seeded,
    sgd_step,
    with_batch_statistics,
)
from normdrop.repro.outcome import Outcome, mean, per_seed
from normdrop.repro.parallel import run_tasks

TITLE = "BatchNorm smooths the loss landscape"
PAPER = (
    "CIFAR-10, VGG, SGD at lr 0.1 and 0.5: along the gradient direction the loss varies far "
    "less with BN (Fig. 4a), gradients change far less (4b, 'gradient predictiveness'), and the "
    "effective beta-smoothness is lower (4c)."
)


@dataclass(frozen=True)
class Config:
    widths: tuple[int, ...] = (784, 256, 256, 256, 256, 256, 256, 10)
    batch_size: int = 128
    steps: int = 1500
    probe_every: int = 100
    lrs: tuple[float, ...] = (0.05, 0.1)
    etas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.4)
    range_ratio: float = 0.2
    gradient_ratio: float = 0.5

    def scaled(self, scale: float) -> Config:
        steps = max(20, round(self.steps * scale))
        return Config(**{**asdict(self), "steps": steps,
                         "probe_every": max(10, round(self.probe_every * scale))})  # fmt: skip


def _loss_and_gradient(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, Tensor]:
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    return loss.item(), grad


def probe(model: nn.Module, x: Tensor, y: Tensor, etas: tuple[float, ...]) -> dict:
    """Loss range and largest gradient change along ``-grad`` at the current weights, on the
    batch ``(x, y)``; the model is not changed (a copy is probed, BN with batch statistics
    and frozen running statistics)."""
    probe_model = with_batch_statistics(model)
    params = list(probe_model.parameters())
    with torch.enable_grad():
        loss0, grad0 = _loss_and_gradient(probe_model, x, y)
    start = [p.detach().clone() for p in params]
    losses, changes = [], []
    for eta in etas:
        with torch.no_grad():
            offset = 0
            for p, p0 in zip(params, start, strict=True):
                n = p.numel()
                p.copy_(p0 - eta * grad0[offset : offset + n].view_as(p))
                offset += n
        with torch.enable_grad():
            loss, grad = _loss_and_gradient(probe_model, x, y)
        losses.append(loss)
        changes.append((grad - grad0).norm().item())
    return {
        "loss": loss0,
        "loss_range": max(losses) - min(losses),
        "gradient_change": max(changes),
    }


def train_task(config: Config, seed: int, lr: float, batchnorm: bool) -> dict:
    """SGD on the 6 x 256 MLP, probing the landscape every ``probe_every`` steps."""
    data = load_mnist5k()
    generator = seeded(seed)
    model = mlp(config.widths, nn.ReLU, batch_norm if batchnorm else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    batches = batch_stream(len(data.train_x), config.batch_size, generator)
    losses, probes = [], []
    for step in range(1, config.steps + 1):
        idx = next(batches)
        x, y = data.train_x[idx], data.train_y[idx]
        if step % config.probe_every == 0:
            probes.append({"step": step, **probe(model, x, y, config.etas)})
        losses.append(sgd_step(model, optimizer, x, y))
        if not math.isfinite(losses[-1]):
            break
    return {"losses": losses, "probes": probes}


def trains(record: dict, window: int) -> bool:
    """Finite losses throughout, and the median loss of some ``window``-step stretch below
    half the median of the first one: the net left its initial plateau. Medians, and any
    stretch rather than the last, because a plain net that has trained still throws loss
    spikes, and can even blow up late: that is the roughness measured here, not a failure
    to train."""
    losses = record["losses"]
    if not all(math.isfinite(v) for v in losses) or len(losses) < 2 * window:
        return False
    medians = [
        statistics.median(losses[start : start + window])
        for start in range(0, len(losses) - window + 1, window)
    ]
    return min(medians[1:]) < 0.5 * medians[0]


def run(seeds: list[int], scale: float = 1.0, jobs: int = 1) -> Outcome:
    config = Config().scaled(scale)
    outcome = Outcome(
        "santurkar2018",
        TITLE,
        PAPER,
        setup=(
            f"mnist5k, 784-256x6-10 ReLU MLP with and without BN, SGD at lr in {list(config.lrs)},"
            f" batch {config.batch_size}, {config.steps} steps; every {config.probe_every} steps "
            f"the loss and gradient at w - eta g for eta in {list(config.etas)}."
        ),
        choices=[
            "plain SGD (no momentum, no weight decay); PyTorch's default Linear init; no bias "
            "before BN",
            "probes use the training batch of that step, before the step is taken; BN in "
            "training mode with momentum 0 on a copy, so probing never changes the model",
            "gradient change is the L2 norm over all parameters; both quantities are averaged "
            "over the probes, then over seeds",
            "'trains' = finite losses, and the median loss of some 100-step stretch below half "
            "the first 100 steps' (a plain net that trained and later spiked or blew up still "
            "trained: its roughness is what is measured)",
        ],
        seeds=seeds,
        config=asdict(config),
    )
    calls = [
        (train_task, (config, seed, lr, bn))
        for bn in (True, False)
        for lr in config.lrs
        for seed in seeds
    ]
    results = iter(run_tasks(calls, jobs))
    runs = {
        name: {lr: [next(results) for _ in seeds] for lr in config.lrs} for name in ("bn", "plain")
    }
    _criteria(outcome, config, runs)
    outcome.figures = {"landscape": _figure(runs, config)}
    outcome.measurements = {
        name: {str(lr): [r["probes"] for r in records] for lr, records in by_lr.items()}
        for name, by_lr in runs.items()
    }
    return outcome


def _average(records: list[dict], key: str) -> list[float]:
    """Per seed, the mean of ``key`` over the probes."""
    return [mean([p[key] for p in r["probes"]]) for r in records]


# (key in a probe, criterion wording, figure label)
MEASURES = (
    ("loss_range", "loss range along the gradient", "loss range along -g"),
    ("gradient_change", "gradient change along the gradient", "max ||grad(w - eta g) - g||"),
)


def _criteria(outcome: Outcome, config: Config, runs: dict) -> None:
    window = max(1, min(100, config.steps // 10))
    limits = {"loss_range": config.range_ratio, "gradient_change": config.gradient_ratio}
    compared = []
    for lr in config.lrs:
        if not all(trains(r, window) for name in runs for r in runs[name][lr]):
            outcome.notes.append(f"lr {lr:g}: not compared, a net did not train at this lr")
            continue
        compared.append(lr)
        for key, words, _ in MEASURES:
            bn, plain = _average(runs["bn"][lr], key), _average(runs["plain"][lr], key)
            outcome.check(
                f"{key}_lr{lr:g}",
                f"{words}, BN / plain, lr {lr:g} (means over probes and seeds)",
                mean(bn) / mean(plain),
                "<=",
                limits[key],
                f"BN {per_seed(bn, 4)}; plain {per_seed(plain, 4)}",
            )
    outcome.check(
        "learning_rates_compared",
        f"learning rates in {list(config.lrs)} where both nets train (every seed)",
        len(compared),
        ">=",
        1,
    )


def _figure(runs: dict, config: Config) -> Figure:
    figure = Figure(figsize=(11, 4))
    for k, (key, _, label) in enumerate(MEASURES):
        axes = figure.add_subplot(1, 2, k + 1)
        for name, style in (("plain", "--"), ("bn", "-")):
            for lr in config.lrs:
                probes = runs[name][lr][0]["probes"]
                axes.plot([p["step"] for p in probes], [p[key] for p in probes], style,
                          label=f"{'BN' if name == 'bn' else 'plain'} lr {lr:g}")  # fmt: skip
        axes.set(yscale="log", xlabel="training step", ylabel=label,
                 title=f"Fig. 4 analogue: {label} (first seed)")  # fmt: skip
        axes.legend(fontsize=8)
    return figure
