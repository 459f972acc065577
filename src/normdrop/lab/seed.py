"""The seed tutorial's system, corrected and measured.

The tutorial built SimpleNet = Linear(10, 50) -> BatchNorm1d -> ReLU -> Dropout(0.5) ->
Linear(50, 1) and trained it on 100 samples of 10 random features with random binary labels,
batch 32, SGD with lr 0.01, for 10 epochs. Its code did not run (see ``docs/math.md``). Here it
runs, correctly:

- the layers are normdrop's (exact ``torch.nn`` semantics, eval mode uses running statistics);
- the optimizer is created once; the loss is ``BCEWithLogitsLoss`` on float targets of shape (N, 1);
- every evaluation runs in eval mode, on the training set and on a held-out set drawn from the same
  distribution, so the train-test gap -- the overfitting the tutorial talks about -- is measured.

With random labels there is nothing to learn: test accuracy stays at chance whatever the model,
and the only way up for train accuracy is memorization. Run ``normdrop seed --epochs 300 --lr 0.1``
to watch it happen, and ``--compare`` to see how much BatchNorm and Dropout change it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from normdrop.errors import InputError
from normdrop.lab.config import check_seed, check_step_settings
from normdrop.nn import BatchNorm1d, Dropout

SEED_SAMPLES = 100
SEED_FEATURES = 10
SEED_BATCH_SIZE = 32
SEED_EPOCHS = 10
SEED_LR = 0.01
SEED_DROPOUT = 0.5
SEED_HIDDEN = 50


def make_seed_data(
    n_samples: int = SEED_SAMPLES, n_features: int = SEED_FEATURES, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """The seed's data: standard-normal features and labels drawn independently of them.

    Returns ``X`` of shape (n_samples, n_features), float32, and ``y`` of shape (n_samples,),
    float32 in {0, 1}. Nothing links ``y`` to ``X``: a model can only memorize it.
    """
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n_samples, n_features, generator=generator)
    labels = torch.randint(0, 2, (n_samples,), generator=generator).float()
    return features, labels


class SimpleNet(nn.Module):
    """Linear -> [BatchNorm1d] -> ReLU -> [Dropout] -> Linear, as in the seed, with BN and
    Dropout optional so their effect can be measured. Outputs one logit per sample."""

    def __init__(
        self,
        in_features: int = SEED_FEATURES,
        hidden: int = SEED_HIDDEN,
        out_features: int = 1,
        batch_norm: bool = True,
        dropout: float = SEED_DROPOUT,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.bn1 = BatchNorm1d(hidden) if batch_norm else nn.Identity()
        self.dropout1 = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout1(torch.relu(self.bn1(self.fc1(x)))))


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    train_accuracy: float
    test_accuracy: float


@torch.no_grad()
def binary_accuracy(model: nn.Module, features: Tensor, labels: Tensor) -> float:
    """Accuracy of the logits' sign, in eval mode; the model's mode is restored after."""
    was_training = model.training
    model.eval()
    predictions = (model(features).squeeze(1) > 0).float()
    model.train(was_training)
    return (predictions == labels).float().mean().item()


def train_seed(
    epochs: int = SEED_EPOCHS,
    lr: float = SEED_LR,
    batch_size: int = SEED_BATCH_SIZE,
    batch_norm: bool = True,
    dropout: float = SEED_DROPOUT,
    momentum: float = 0.0,
    test_size: int = 1000,
    seed: int = 0,
) -> list[EpochResult]:
    """Train SimpleNet on the seed's data; return train and held-out accuracy after each epoch.

    The training set is the seed's 100 samples; ``test_size`` more samples from the same
    distribution are held out (with 20 held-out samples, the accuracy would be +-22 points noise).
    """
    torch.manual_seed(seed)
    features, labels = make_seed_data(SEED_SAMPLES + test_size, SEED_FEATURES, seed)
    train_x, train_y = features[:SEED_SAMPLES], labels[:SEED_SAMPLES]
    test_x, test_y = features[SEED_SAMPLES:], labels[SEED_SAMPLES:]

    model = SimpleNet(batch_norm=batch_norm, dropout=dropout)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.BCEWithLogitsLoss()
    shuffle = torch.Generator().manual_seed(seed + 1)

    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        total_loss = 0.0
        for batch in torch.randperm(SEED_SAMPLES, generator=shuffle).split(batch_size):
            if len(batch) == 1 and batch_norm:
                continue  # BatchNorm cannot normalize one sample; torch's DataLoader drop_last
            optimizer.zero_grad()
            loss = loss_fn(model(train_x[batch]), train_y[batch].unsqueeze(1))
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(batch)
        history.append(
            EpochResult(
                epoch,
                total_loss / SEED_SAMPLES,
                binary_accuracy(model, train_x, train_y),
                binary_accuracy(model, test_x, test_y),
            )
        )
    return history


VARIANTS = {
    "plain": {"batch_norm": False, "dropout": 0.0},
    "bn": {"batch_norm": True, "dropout": 0.0},
    "dropout": {"batch_norm": False, "dropout": SEED_DROPOUT},
    "bn+dropout": {"batch_norm": True, "dropout": SEED_DROPOUT},
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normdrop seed",
        description="Train the seed tutorial's SimpleNet, correctly, on its random-label data "
        "and print train and held-out accuracy per epoch. Defaults are the seed's settings.",
    )
    parser.add_argument("--epochs", type=int, default=SEED_EPOCHS, help="default: %(default)s")
    parser.add_argument("--lr", type=float, default=SEED_LR, help="SGD learning rate")
    parser.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    parser.add_argument("--batch-size", type=int, default=SEED_BATCH_SIZE)
    parser.add_argument("--dropout", type=float, default=SEED_DROPOUT, help="0 disables it")
    parser.add_argument("--no-batchnorm", action="store_true", help="leave BatchNorm out")
    parser.add_argument("--test-size", type=int, default=1000, help="held-out samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compare",
        action="store_true",
        help="train the four variants (plain, bn, dropout, bn+dropout) and print the last epoch",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for option, value in (("--epochs", args.epochs), ("--test-size", args.test_size)):
        if value < 1:
            _parser().error(f"{option} must be a positive integer, got {value}")
    try:
        check_step_settings(args.batch_size, args.lr, args.momentum)
        check_seed("--seed", args.seed)
    except InputError as error:
        _parser().error(str(error))
    if not 0.0 <= args.dropout < 1.0:
        _parser().error(f"--dropout must be in [0, 1), got {args.dropout}")
    common = dict(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        momentum=args.momentum,
        test_size=args.test_size,
        seed=args.seed,
    )
    if args.compare:
        print(f"{'variant':<12} {'train acc':>9} {'test acc':>9} {'gap':>7}")
        for name, variant in VARIANTS.items():
            last = train_seed(**common, **variant)[-1]
            gap = last.train_accuracy - last.test_accuracy
            print(f"{name:<12} {last.train_accuracy:>9.1%} {last.test_accuracy:>9.1%} {gap:>+7.1%}")
        return 0
    history = train_seed(**common, batch_norm=not args.no_batchnorm, dropout=args.dropout)
    print(f"{'epoch':>5} {'loss':>7} {'train acc':>9} {'test acc':>9}")
    for row in history:
        print(
            f"{row.epoch:>5} {row.train_loss:>7.4f} "
            f"{row.train_accuracy:>9.1%} {row.test_accuracy:>9.1%}"
        )
    print(
        "labels are random: test accuracy can only be chance (50%); "
        "train accuracy above it is memorization"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
