r"""Li, Chen, Hu & Yang 2019, "Understanding the Disharmony between Dropout and Batch
Normalization by Variance Shift" (CVPR), on mnist5k MLPs.

Dropout with keep probability ``q`` changes the variance of what it passes on between
training and test. For one unit with input ``x`` (mean ``c``, variance ``v``) and inverted
dropout ``y = x * m / q``, ``m ~ Bernoulli(q)``::

    Var_train[y] = E[x^2] / q - c^2 = v / q + c^2 (1/q - 1)
    Var_test[y]  = v
    ratio        = Var_test / Var_train = v / (v / q + c^2 (1/q - 1))

A BatchNorm right after the dropout learns ``running_var ~ Var_train`` but sees ``Var_test``
at inference: its output is rescaled by ``sqrt(ratio)``, about 0.6 for ReLU inputs at q = 0.5.
A weight layer between the two averages many independent masks, which shrinks the shift as
the layer gets wider; dropout after the last BatchNorm cannot shift any BatchNorm statistic;
recomputing the statistics with dropout off removes the shift.

The measured ratio of a BN layer is the mean over its units of ``Var_test[x] / running_var``,
with ``Var_test`` the unbiased variance of the layer's input over the 1,000 test images in
eval mode, leaving out units whose ``running_var < 1e-6`` (dead ReLUs) and units whose input
is 0 on every test image (dead at test time, where the theory is 0/0).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from normdrop.nn import BatchNorm1d, Dropout
from normdrop.repro.common import (
    Data,
    epoch_batches,
    keep_to_drop,
    load_mnist5k,
    predict,
    seeded,
    sgd_step,
    test_accuracy,
)
from normdrop.repro.outcome import Outcome, mean, per_seed
from normdrop.repro.parallel import run_tasks

TITLE = "Variance shift: Dropout before BatchNorm"
PAPER = (
    "CIFAR-10/100, DenseNet/ResNet/ResNeXt/WRN: dropout (p = 0.5 drop) placed before BN makes "
    "the BN's moving variance overestimate the test-time variance; for a unit directly after "
    "dropout the shift is Var_test/Var_train = v / (v/q + c^2(1/q - 1)) (Sec. 3), ~0.3-0.6; "
    "wider weight layers between dropout and BN shrink it (Fig. 4); dropout after the last BN "
    "avoids it; recomputing BN statistics with dropout off repairs it (Table 5)."
)
DEAD_VARIANCE = 1e-6


@dataclass(frozen=True)
class Config:
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    epochs: int = 15
    keep: float = 0.5
    width: int = 256  # for the "directly before BN" and "after every BN" models
    narrow: int = 64
    wide: int = 512
    lint_batch: int = 8

    def scaled(self, scale: float) -> Config:
        return Config(**{**asdict(self), "epochs": max(1, round(self.epochs * scale))})


# ------------------------------------------------------------------------------------------
# The three placements (three hidden layers of `width` units each, then Linear(width, 10))
# ------------------------------------------------------------------------------------------


def dropout_then_bn(width: int, drop: float) -> nn.Sequential:
    """Linear -> ReLU -> Dropout -> BN, three times: every BN directly after a dropout."""
    layers: list[nn.Module] = []
    for fan_in in (784, width, width):
        layers += [nn.Linear(fan_in, width), nn.ReLU(), Dropout(drop), BatchNorm1d(width)]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def dropout_linear_bn(width: int, drop: float) -> nn.Sequential:
    """Linear -> BN -> ReLU -> Dropout, three times: BN 2 and 3 see dropout -> Linear -> BN."""
    layers: list[nn.Module] = []
    for fan_in in (784, width, width):
        layers += [nn.Linear(fan_in, width, bias=False), BatchNorm1d(width), nn.ReLU(),
                   Dropout(drop)]  # fmt: skip
    return nn.Sequential(*layers, nn.Linear(width, 10))


def dropout_after_bn(width: int, drop: float) -> nn.Sequential:
    """Linear -> BN -> ReLU, three times, then one Dropout before the output layer."""
    layers: list[nn.Module] = []
    for fan_in in (784, width, width):
        layers += [nn.Linear(fan_in, width, bias=False), BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*layers, Dropout(drop), nn.Linear(width, 10))


BUILDERS = {
    "dropout_then_bn": dropout_then_bn,
    "dropout_linear_bn": dropout_linear_bn,
    "dropout_after_bn": dropout_after_bn,
}


# ------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------


def shift_theory(mean_: Tensor, var: Tensor, keep: float) -> Tensor:
    """Var_test / Var_train of inverted dropout with keep probability ``keep`` on a unit whose
    input has mean ``mean_`` and variance ``var`` (elementwise)."""
    return var / (var / keep + mean_.square() * (1.0 / keep - 1.0))


def bn_inputs(model: nn.Module, x: Tensor) -> list[Tensor]:
    """The input of every BatchNorm layer for ``x``, in eval mode, in module order."""
    captured: list[Tensor] = []
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    handles = [bn.register_forward_pre_hook(lambda _, args: captured.append(args[0])) for bn in bns]
    try:
        predict(model, x)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def variance_ratios(model: nn.Module, x: Tensor, keep: float | None = None) -> list[dict]:
    """Per BN layer: the mean over live units of Var_test / running_var and, if ``keep`` is
    given, of the theory for a dropout directly before the layer."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    layers = []
    for bn, inputs in zip(bns, bn_inputs(model, x), strict=True):
        real = inputs.var(dim=0, unbiased=True)
        # Dead units: no training variance, or an input that is constantly 0 on the test set
        # (where the theory is 0/0).
        live = (bn.running_var > DEAD_VARIANCE) & (real + inputs.mean(0).square() > 0)
        layer = {
            "ratio": (real[live] / bn.running_var[live]).mean().item(),
            "live_units": int(live.sum()),
        }
        if keep is not None:
            theory = shift_theory(inputs.mean(0), real, keep)
            layer["theory"] = theory[live].mean().item()
        layers.append(layer)
    return layers


def train(model: nn.Module, data: Data, generator: torch.Generator, config: Config) -> nn.Module:
    """SGD with momentum and weight decay, cosine-annealed per step to 0; ``generator`` draws
    the batches."""
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)  # fmt: skip
    steps = config.epochs * (len(data.train_x) // config.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(config.epochs):
        for idx in epoch_batches(len(data.train_x), config.batch_size, generator):
            sgd_step(model, optimizer, data.train_x[idx], data.train_y[idx])
            schedule.step()
    return model


def recalibrated(model: nn.Module, data: Data, config: Config) -> nn.Module:
    """A copy whose BN statistics are recomputed over one pass of the training set with
    dropout off (normdrop.tools.recalibrate_batchnorm, pooled 'precise' statistics)."""
    from normdrop.tools import recalibrate_batchnorm

    batches = data.train_x.split(config.batch_size)
    return recalibrate_batchnorm(copy.deepcopy(model), batches, mode="precise")


def lint_findings(model: nn.Module, data: Data, config: Config) -> list[str]:
    """``normdrop lint``'s variance-shift findings for ``model`` in training mode."""
    from normdrop.tools import lint

    findings = lint(model.train(), data.train_x[: config.lint_batch])
    return [str(f) for f in findings if f.rule == "dropout-before-batchnorm"]


def placement_task(config: Config, seed: int, placement: str, width: int) -> dict:
    """Train one placement; measure its ratios, accuracy, and after recalibration."""
    data = load_mnist5k()
    generator = seeded(seed)
    model = train(BUILDERS[placement](width, keep_to_drop(config.keep)), data, generator, config)
    fixed = recalibrated(model, data, config)
    keep = config.keep if placement == "dropout_then_bn" else None
    return {
        "layers": variance_ratios(model, data.test_x, keep),
        "accuracy": test_accuracy(model, data.test_x, data.test_y),
        "recalibrated_layers": variance_ratios(fixed, data.test_x),
        "recalibrated_accuracy": test_accuracy(fixed, data.test_x, data.test_y),
        "lint": lint_findings(model, data, config),
    }


# ------------------------------------------------------------------------------------------
# The reproduction
# ------------------------------------------------------------------------------------------

# Which BN layers (0-based) have a dropout upstream since the previous normalization.
SHIFTED_LAYERS = {"dropout_then_bn": (0, 1, 2), "dropout_linear_bn": (1, 2), "dropout_after_bn": ()}


def shifted_ratio(result: dict, placement: str, key: str = "layers", field: str = "ratio") -> float:
    """Mean ratio over the BN layers a dropout can shift (all layers where none can)."""
    layers = SHIFTED_LAYERS[placement] or range(len(result[key]))
    return mean([result[key][i][field] for i in layers])


def run(seeds: list[int], scale: float = 1.0, jobs: int = 1) -> Outcome:
    """Four trained models per seed; criteria on the means over seeds."""
    config = Config().scaled(scale)
    models = [
        ("dropout_linear_bn", config.wide),
        ("dropout_then_bn", config.width),
        ("dropout_after_bn", config.width),
        ("dropout_linear_bn", config.narrow),
    ]
    calls = [(placement_task, (config, seed, p, w)) for p, w in models for seed in seeds]
    results = iter(run_tasks(calls, jobs))
    runs = {f"{p}_{w}": [next(results) for _ in seeds] for p, w in models}
    shown = [models[1], models[3], models[0], models[2]]  # the order of the docstring
    runs = {f"{p}_{w}": runs[f"{p}_{w}"] for p, w in shown}
    outcome = Outcome(
        "li2019",
        TITLE,
        PAPER,
        setup=(
            f"mnist5k, 784-W-W-W-10 ReLU MLPs with BN, dropout keep {config.keep} (drop "
            f"{keep_to_drop(config.keep)}), SGD lr {config.lr} momentum {config.momentum} wd "
            f"{config.weight_decay}, cosine to 0, batch {config.batch_size}, {config.epochs} "
            f"epochs. Placements: dropout directly before BN (W={config.width}), dropout -> "
            f"Linear -> BN (W={config.narrow} and {config.wide}), dropout only after the last BN "
            f"(W={config.width})."
        ),
        choices=[
            "'directly before BN' is the block Linear -> ReLU -> Dropout -> BN, so each BN sees "
            "a dropped-out ReLU output; the other placements use Linear -> BN -> ReLU",
            "layer ratio = mean over live units (running_var >= 1e-6) of the test-set variance "
            "(unbiased, eval mode) over running_var; a placement's ratio is the mean over the BN "
            "layers with a dropout upstream (BN 2 and 3 for dropout -> Linear -> BN; all three "
            "otherwise)",
            "theory per unit from the measured test-set mean and variance of the BN input, "
            "averaged like the ratio",
            "weight decay on every parameter, BN's included; the cosine schedule is per step",
            "recalibration: normdrop.tools.recalibrate_batchnorm(mode='precise') over the "
            "training set in batches of 64, dropout off",
        ],
        seeds=seeds,
        config=asdict(config),
    )
    _criteria(outcome, config, runs)
    outcome.measurements = runs
    outcome.figures = {"variance_shift": _figure(runs, config)}
    return outcome


def _criteria(outcome: Outcome, config: Config, runs: dict) -> None:
    direct = runs[f"dropout_then_bn_{config.width}"]
    ratio = [shifted_ratio(r, "dropout_then_bn") for r in direct]
    theory = [shifted_ratio(r, "dropout_then_bn", field="theory") for r in direct]
    outcome.check(
        "direct_shift", "variance ratio, dropout directly before BN", mean(ratio), "<", 0.5,
        f"per seed {per_seed(ratio, 3)}; per layer (first seed) "
        f"{per_seed([layer['ratio'] for layer in direct[0]['layers']], 3)}",
    )  # fmt: skip
    outcome.check(
        "direct_matches_theory",
        "|measured ratio - theory v/(v/q + c^2(1/q-1))|, dropout directly before BN",
        abs(mean(ratio) - mean(theory)),
        "<=",
        0.08,
        f"theory per seed {per_seed(theory, 3)}",
    )
    narrow = [
        shifted_ratio(r, "dropout_linear_bn") for r in runs[f"dropout_linear_bn_{config.narrow}"]
    ]
    wide = [shifted_ratio(r, "dropout_linear_bn") for r in runs[f"dropout_linear_bn_{config.wide}"]]
    outcome.check(
        "wider_shifts_less",
        f"ratio(W={config.wide}) - ratio(W={config.narrow}), dropout -> Linear -> BN",
        mean(wide) - mean(narrow),
        ">",
        0.0,
        f"W={config.narrow}: {per_seed(narrow, 3)}; W={config.wide}: {per_seed(wide, 3)}",
        seeds=[w - n for w, n in zip(wide, narrow, strict=True)],
    )
    outcome.check(
        "wide_still_shifted", f"ratio(W={config.wide}), dropout -> Linear -> BN", mean(wide),
        "<", 0.95,
    )  # fmt: skip
    after = [shifted_ratio(r, "dropout_after_bn") for r in runs[f"dropout_after_bn_{config.width}"]]
    outcome.check(
        "after_bn_no_shift", "variance ratio, dropout only after the last BN", mean(after),
        "in", (0.95, 1.05), f"per seed {per_seed(after, 3)}",
    )  # fmt: skip
    repaired = [shifted_ratio(r, "dropout_then_bn", key="recalibrated_layers") for r in direct]
    before = mean([r["accuracy"] for r in direct])
    after_fix = mean([r["recalibrated_accuracy"] for r in direct])
    outcome.check(
        "recalibrated_no_shift",
        "variance ratio, dropout directly before BN, after recomputing BN statistics with "
        "dropout off",
        mean(repaired),
        ">=",
        0.95,
        f"per seed {per_seed(repaired, 3)}; test accuracy {before:.2f}% before, "
        f"{after_fix:.2f}% after (not gated)",
    )
    flagged = len(direct[0]["lint"])
    clean = len(runs[f"dropout_after_bn_{config.width}"][0]["lint"])
    outcome.check(
        "lint_flags_bad_model",
        "normdrop lint 'dropout-before-batchnorm' findings on the bad model minus on the good one",
        flagged - clean if clean == 0 else -1,
        ">=",
        1,
        f"{flagged} finding(s) on dropout->BN, {clean} on dropout-after-BN; first: "
        + (direct[0]["lint"][0].splitlines()[0] if flagged else "none"),
    )
    outcome.notes += ["normdrop lint on the bad model:", *direct[0]["lint"]]


def _figure(runs: dict, config: Config) -> Figure:
    figure = Figure(figsize=(8, 4))
    axes = figure.add_subplot()
    labels, values, theory = [], [], []
    for key, records in runs.items():
        placement, width = key.rsplit("_", 1)
        for layer in range(len(records[0]["layers"])):
            labels.append(f"{placement}\nW={width} BN{layer + 1}")
            values.append(mean([r["layers"][layer]["ratio"] for r in records]))
            theory.append(mean([r["layers"][layer].get("theory", float("nan")) for r in records]))
    positions = range(len(labels))
    axes.bar(positions, values, label="measured Var_test / running_var")
    axes.plot(positions, theory, "k_", markersize=20, label="theory (dropout directly before BN)")
    axes.axhline(1.0, color="gray", lw=0.5)
    axes.set_xticks(list(positions), labels, rotation=90, fontsize=7)
    axes.set(ylabel="variance ratio (mean over seeds)", title="Variance shift per BN layer")
    axes.legend()
    return figure
