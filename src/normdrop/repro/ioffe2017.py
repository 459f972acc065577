"""Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch Dependence in
Batch-Normalized Models" (NeurIPS), at batch sizes 32, 4 and 2 on an MLP.

BatchNorm trains on batch statistics and predicts with running averages; with tiny batches the
two differ so much that the network's training-mode and eval-mode outputs disagree and
eval-mode accuracy collapses. Batch Renorm (``normdrop.nn.BatchRenorm1d``) corrects each
training batch towards the running statistics with ``r`` and ``d`` (clipped at ``rmax``,
``dmax``), so training already uses the transform that inference will use. GroupNorm, which
normalizes each sample by itself, does not depend on the batch at all: the reference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from matplotlib.figure import Figure
from torch import nn

from normdrop.nn import BatchNorm1d, BatchRenorm1d
from normdrop.repro.common import (
    TRAIN_SIZE,
    accuracy,
    batch_stream,
    load_mnist5k,
    mlp,
    predict,
    seeded,
    sgd_step,
    with_batch_statistics,
)
from normdrop.repro.outcome import Outcome, mean, per_seed
from normdrop.repro.parallel import run_tasks

TITLE = "Batch Renormalization with batches of 32, 4 and 2"
PAPER = (
    "ImageNet, Inception-v3, minibatches of 4 (and non-iid batches): BN's validation accuracy "
    "drops from 78.3% (batch 32) to 74.2% (batch 4); Batch Renorm with r/d clipping relaxed from "
    "(1, 0) to (3, 5) recovers 76.5% (Fig. 3), because training and inference then use the "
    "same transform."
)
NORMS = ("bn", "brn", "gn")


@dataclass(frozen=True)
class Config:
    widths: tuple[int, ...] = (784, 256, 256, 256, 10)
    batch_sizes: tuple[int, ...] = (32, 4, 2)
    epochs: int = 5
    base_lr: float = 0.05  # at batch 32; scaled linearly with the batch size
    momentum: float = 0.9
    norm_momentum: float = 0.01
    rmax: float = 3.0
    dmax: float = 5.0
    warmup_fraction: float = 0.05
    rmax_at: float = 0.30
    dmax_at: float = 0.20
    groups: int = 32
    step_scale: float = 1.0  # a fraction of the epochs, for quick tests

    def scaled(self, scale: float) -> Config:
        return Config(**{**asdict(self), "step_scale": self.step_scale * scale})

    def steps(self, batch_size: int) -> int:
        """Training steps at ``batch_size``: ``epochs`` passes over the 4,000 images."""
        return max(10, round(self.epochs * (TRAIN_SIZE // batch_size) * self.step_scale))

    def lr(self, batch_size: int) -> float:
        return self.base_lr * batch_size / 32


def norm_factory(config: Config, norm: str, batch_size: int):
    """``width -> module`` for :func:`normdrop.repro.common.mlp`."""
    steps = config.steps(batch_size)
    warmup = round(config.warmup_fraction * steps)
    if norm == "bn":
        return lambda width: BatchNorm1d(width, momentum=config.norm_momentum)
    if norm == "brn":
        return lambda width: BatchRenorm1d(
            width,
            momentum=config.norm_momentum,
            rmax=config.rmax,
            dmax=config.dmax,
            warmup_steps=warmup,
            rmax_ramp_steps=round(config.rmax_at * steps) - warmup,
            dmax_ramp_steps=round(config.dmax_at * steps) - warmup,
        )
    return lambda width: nn.GroupNorm(config.groups, width)


def train_task(config: Config, seed: int, norm: str, batch_size: int) -> dict:
    """Train one network; test error in eval mode and in training mode (batch statistics of
    test batches of the training batch size)."""
    data = load_mnist5k()
    generator = seeded(seed)
    model = mlp(config.widths, nn.ReLU, norm_factory(config, norm, batch_size))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr(batch_size),
                                momentum=config.momentum)  # fmt: skip
    batches = batch_stream(len(data.train_x), batch_size, generator)
    for _ in range(config.steps(batch_size)):
        idx = next(batches)
        sgd_step(model, optimizer, data.train_x[idx], data.train_y[idx])
    eval_error = 100.0 - accuracy(predict(model, data.test_x), data.test_y)
    with torch.no_grad():
        clone = with_batch_statistics(model)
        logits = torch.cat([clone(chunk) for chunk in data.test_x.split(batch_size)])
    train_error = 100.0 - accuracy(logits, data.test_y)
    return {"eval_error": eval_error, "train_mode_error": train_error}


def run(seeds: list[int], scale: float = 1.0, jobs: int = 1) -> Outcome:
    config = Config().scaled(scale)
    outcome = Outcome(
        "ioffe2017",
        TITLE,
        PAPER,
        setup=(
            f"mnist5k, 784-256x3-10 ReLU MLP with BatchNorm, BatchRenorm or GroupNorm("
            f"{config.groups} groups) after each hidden Linear, batch sizes "
            f"{list(config.batch_sizes)}, {config.epochs * config.step_scale:g} epochs, SGD "
            f"momentum {config.momentum}, lr {config.base_lr} x batch/32; Batch Renorm: r = 1, "
            f"d = 0 for the first {config.warmup_fraction:.0%} of the steps, then rmax -> "
            f"{config.rmax:g} by "
            f"{config.rmax_at:.0%} and dmax -> {config.dmax:g} by {config.dmax_at:.0%}."
        ),
        choices=[
            "learning rate scaled linearly with the batch size (0.05 at 32), so every batch "
            "size gets the same per-epoch progress; momentum 0.9",
            f"running statistics momentum {config.norm_momentum} for BN and BRN (the paper's "
            "alpha = 0.01 recommendation for renorm; small batches need long averages); BRN "
            "averages sigma_B as the paper does (normdrop.nn.BatchRenorm1d), BN the unbiased "
            "variance as torch does",
            "training-mode error: the test set in consecutive batches of the training batch "
            "size, normalized with their own statistics (BRN: with its final r/d clipping), "
            "running statistics untouched",
            "GroupNorm(32 groups of 8 features) from torch.nn as the batch-independent reference",
        ],
        seeds=seeds,
        config=asdict(config),
    )
    order = sorted(config.batch_sizes)  # smallest batches (most steps) first
    calls = [
        (train_task, (config, seed, norm, b)) for b in order for norm in NORMS for seed in seeds
    ]
    results = iter(run_tasks(calls, jobs))
    runs = {b: {norm: [next(results) for _ in seeds] for norm in NORMS} for b in order}
    _criteria(outcome, config, runs)
    outcome.measurements = {f"batch_{b}": by_norm for b, by_norm in runs.items()}
    outcome.figures = {"batch_size": _figure(runs, config)}
    return outcome


def _mean_of(records: list[dict], key: str) -> float:
    return mean([r[key] for r in records])


def _criteria(outcome: Outcome, config: Config, runs: dict) -> None:
    table = "; ".join(
        f"batch {b}: " + ", ".join(f"{n} {_mean_of(runs[b][n], 'eval_error'):.2f}" for n in NORMS)
        for b in sorted(runs, reverse=True)
    )
    bn2, brn2 = (_mean_of(runs[2][n], "eval_error") for n in ("bn", "brn"))
    outcome.check(
        "brn_fixes_batch_2",
        "eval error at batch 2, BN - BRN (points, means over seeds)",
        bn2 - brn2,
        ">=",
        10.0,
        f"eval error % {table}",
    )
    bn4, brn4 = (_mean_of(runs[4][n], "eval_error") for n in ("bn", "brn"))
    outcome.check(
        "brn_better_batch_4", "eval error at batch 4, BN - BRN (points)", bn4 - brn4, ">", 0.0,
        f"BN {per_seed([r['eval_error'] for r in runs[4]['bn']])}; BRN "
        f"{per_seed([r['eval_error'] for r in runs[4]['brn']])}",
        seeds=[b["eval_error"] - r["eval_error"]
               for b, r in zip(runs[4]["bn"], runs[4]["brn"], strict=True)],
    )  # fmt: skip
    small = [b for b in runs if b <= 4]
    gaps = {
        norm: {b: abs(_mean_of(runs[b][norm], "train_mode_error")
                      - _mean_of(runs[b][norm], "eval_error")) for b in small}
        for norm in ("bn", "brn")
    }  # fmt: skip
    outcome.check(
        "brn_modes_agree",
        "|training-mode - eval-mode test error| for BRN, largest over batch <= 4 (points)",
        max(gaps["brn"].values()),
        "<=",
        1.0,
        ", ".join(f"batch {b}: {g:.2f}" for b, g in gaps["brn"].items()),
    )
    outcome.check(
        "bn_modes_disagree",
        "|training-mode - eval-mode test error| for BN, smallest over batch <= 4 (points)",
        min(gaps["bn"].values()),
        ">",
        5.0,
        ", ".join(f"batch {b}: {g:.2f}" for b, g in gaps["bn"].items()),
    )
    gn = [_mean_of(runs[b]["gn"], "eval_error") for b in runs]
    outcome.check(
        "groupnorm_batch_independent",
        "GroupNorm: spread (max - min) of eval error across batch sizes (points)",
        max(gn) - min(gn),
        "<=",
        2.0,
        ", ".join(f"batch {b}: {e:.2f}" for b, e in zip(runs, gn, strict=True)),
    )


def _figure(runs: dict, config: Config) -> Figure:
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    sizes = sorted(runs)
    labels = {"bn": "BatchNorm", "brn": "Batch Renorm", "gn": "GroupNorm"}
    for norm in NORMS:
        axes.plot(sizes, [_mean_of(runs[b][norm], "eval_error") for b in sizes], "o-",
                  label=f"{labels[norm]} (eval mode)")  # fmt: skip
    axes.plot(sizes, [_mean_of(runs[b]["bn"], "train_mode_error") for b in sizes], "x:",
              color="tab:blue", label="BatchNorm (training mode)")  # fmt: skip
    axes.set(xscale="log", xlabel="batch size", ylabel="test error (%)",
             title="Batch size dependence (mean over seeds)")  # fmt: skip
    axes.set_xticks(sizes, [str(s) for s in sizes])
    axes.minorticks_off()
    axes.legend(fontsize=8)
    return figure
