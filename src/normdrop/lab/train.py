"""Training one run: one model, one variant, one seed, in memory.

- Tensor batching: each epoch is a seeded permutation of the training indices split into
  batches; no per-sample Dataset. A final batch of one sample is skipped in every variant (BN
  cannot normalize a single value per channel).
- Every evaluation runs in eval mode (running BN statistics, no dropout) on whole splits.
- After each epoch: train and validation loss and accuracy, and the 15th, 50th and 85th
  percentiles of one hidden unit's pre-activation over the validation set (Ioffe & Szegedy
  2015, figure 1): the input of the last ReLU, unit 0.
- Early stopping (``patience``) and model selection (``select``): the reported model is the
  one of the best validation epoch (``best``) or the last one (``last``). The test split is
  scored once, on that model.
- Reproducible: seeded from the spec; the global RNG (dropout masks) is forked so the caller's
  is untouched; one intra-op thread per run, because a CPU matrix product's summation order
  (hence its rounding) depends on the thread count; parallelism is across runs instead.
- Resumable: :meth:`RunState.checkpoint` captures everything (model, optimizer, RNG states,
  history, early-stopping state), and a run restored from it continues bit for bit.
"""

from __future__ import annotations

import io
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normdrop.backend import use_backend
from normdrop.errors import InputError
from normdrop.lab.config import RunSpec, Variant
from normdrop.lab.data import Splits
from normdrop.lab.models import build_model, last_activation
from normdrop.lab.norms import norm_factory

__all__ = ["EpochRecord", "RunResult", "RunState", "evaluate", "train_run"]

PREACTIVATION_UNIT = 0
PERCENTILES = (0.15, 0.50, 0.85)
EVAL_BATCH = 4096
THREADS_PER_RUN = 1


@dataclass
class EpochRecord:
    """Metrics after one epoch, all in eval mode. Accuracies are fractions in [0, 1]."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    preact_p15: float
    preact_p50: float
    preact_p85: float
    seconds: float


@dataclass
class RunResult:
    """The selected model's metrics; test ones are None when the test split was not scored."""

    best_epoch: int
    epochs_run: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    test_loss: float | None
    test_acc: float | None
    seconds: float


def batch_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Binary cross-entropy on one logit, or cross-entropy on one logit per class."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(
            logits[:, 0], labels.to(logits.dtype), reduction=reduction
        )
    return F.cross_entropy(logits, labels, reduction=reduction)


def _hits(logits: Tensor, labels: Tensor) -> int:
    predictions = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
    return int((predictions == labels).sum())


@torch.no_grad()
def evaluate(
    model: nn.Module, features: Tensor, labels: Tensor, probe: nn.Module | None = None
) -> tuple[float, float, Tensor | None]:
    """``(mean loss, accuracy, probe inputs)`` of ``model`` in eval mode on a whole split.

    With ``probe``, the values of unit ``PREACTIVATION_UNIT`` entering that module are returned
    too. The model's training flag is restored afterwards.
    """
    was_training = model.training
    model.eval()
    seen: list[Tensor] = []
    handle = None
    if probe is not None:
        handle = probe.register_forward_pre_hook(
            lambda _, inputs: seen.append(inputs[0][:, PREACTIVATION_UNIT].detach().clone())
        )
    try:
        loss, hits = 0.0, 0
        for start in range(0, len(features), EVAL_BATCH):
            logits = model(features[start : start + EVAL_BATCH])
            chunk = labels[start : start + EVAL_BATCH]
            loss += float(batch_loss(logits, chunk, reduction="sum"))
            hits += _hits(logits, chunk)
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)
    values = torch.cat(seen) if seen else None
    return loss / len(features), hits / len(features), values


def _optimizer(model: nn.Module, settings) -> torch.optim.Optimizer:
    if settings.optimizer == "adam":
        return torch.optim.Adam(
            model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
    return torch.optim.SGD(
        model.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )


class RunState:
    """A run in progress: model, optimizer, shuffling generator, history, best epoch so far."""

    def __init__(self, spec: RunSpec, splits: Splits) -> None:
        settings = spec.settings
        torch.manual_seed(spec.seed)
        norm = norm_factory(settings.bn_type, settings.bn_momentum, settings.virtual_batch_size)
        self.model = build_model(
            settings.model,
            Variant.parse(spec.variant),
            splits.sample_shape,
            splits.n_outputs,
            settings.dropout_p,
            norm,
        )
        self.optimizer = _optimizer(self.model, settings)
        self.shuffle = torch.Generator().manual_seed(spec.seed)
        self.history: list[EpochRecord] = []
        self.best_val = -math.inf
        self.best_epoch = 0
        self.best_state: dict[str, Tensor] | None = None
        self.stale_epochs = 0

    def observe(self, record: EpochRecord) -> None:
        """Add an epoch; remember the model if its validation accuracy is the best so far."""
        self.history.append(record)
        if record.val_acc > self.best_val:  # ties keep the earlier epoch
            self.best_val, self.best_epoch, self.stale_epochs = record.val_acc, record.epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.stale_epochs += 1

    def checkpoint(self) -> bytes:
        """Everything needed to continue this run exactly, serialized."""
        buffer = io.BytesIO()
        # The legacy (non-zip) format: 2.5 ms instead of 11 ms for the default lab's 3.6 MB,
        # paid every epoch; torch.load(weights_only=True) reads both.
        torch.save(
            _use_new_zipfile_serialization=False,
            obj={
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "shuffle": self.shuffle.get_state(),
                "rng": torch.get_rng_state(),
                "history": [asdict(record) for record in self.history],
                "best": [self.best_val, self.best_epoch, self.stale_epochs],
                "best_state": self.best_state,
            },
            f=buffer,
        )
        return buffer.getvalue()

    def restore(self, checkpoint: bytes) -> None:
        state = torch.load(io.BytesIO(checkpoint), weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.shuffle.set_state(state["shuffle"])
        torch.set_rng_state(state["rng"])
        self.history = [EpochRecord(**record) for record in state["history"]]
        self.best_val, self.best_epoch, self.stale_epochs = state["best"]
        self.best_state = state["best_state"]


def checkpoint_history(checkpoint: bytes | None) -> list[EpochRecord] | None:
    """The epochs a checkpoint holds ([] for none); None if the bytes are not a checkpoint."""
    if checkpoint is None:
        return []
    try:
        state = torch.load(io.BytesIO(checkpoint), weights_only=True)
        return [EpochRecord(**record) for record in state["history"]]
    except Exception:  # truncated or foreign bytes: whatever unpickling raised
        return None


def _batch_multiple(model: torch.nn.Module) -> int:
    """Batch sizes the model trains on must be multiples of this: the least common multiple of
    its ghost batch norms' virtual batch sizes (1 without any)."""
    from normdrop.nn.ghost_batchnorm import _GhostBatchNorm

    return math.lcm(
        *(m.virtual_batch_size for m in model.modules() if isinstance(m, _GhostBatchNorm))
    )


def _train_epoch(state: RunState, features: Tensor, labels: Tensor, batch_size: int) -> None:
    state.model.train()
    order = torch.randperm(len(features), generator=state.shuffle)
    multiple = _batch_multiple(state.model)
    steps = 0
    for batch in order.split(batch_size):
        # The last batch of an epoch is smaller: ghost batch norm keeps its whole virtual
        # batches (the samples left out are shuffled into other batches next epoch), and
        # BatchNorm cannot normalize a batch of one.
        batch = batch[: len(batch) - len(batch) % multiple]
        if len(batch) < 2:
            continue
        state.optimizer.zero_grad(set_to_none=True)
        batch_loss(state.model(features[batch]), labels[batch]).backward()
        state.optimizer.step()
        steps += 1
    if steps == 0:  # an untrained model would be reported as a result
        raise InputError(
            f"no training step in an epoch: {len(features)} training samples in batches of "
            f"{batch_size}, each cut to whole virtual batches of {multiple} (ghost batch norm) "
            "and skipped below 2 samples; use a smaller --batch-size or --virtual-batch-size"
        )


def _percentiles(values: Tensor) -> list[float]:
    return torch.quantile(values.double(), torch.tensor(PERCENTILES, dtype=torch.float64)).tolist()


def _epoch_record(state: RunState, splits: Splits, epoch: int, started: float) -> EpochRecord:
    train_loss, train_acc, _ = evaluate(state.model, *splits.train)
    val_loss, val_acc, values = evaluate(state.model, *splits.val, last_activation(state.model))
    p15, p50, p85 = _percentiles(values)
    seconds = time.perf_counter() - started
    return EpochRecord(epoch, train_loss, train_acc, val_loss, val_acc, p15, p50, p85, seconds)


@contextmanager
def _threads(count: int) -> Iterator[None]:
    """Run with ``count`` intra-op threads in torch and, if the kernels loaded it, numba."""
    numba = sys.modules.get("numba")
    previous = torch.get_num_threads(), numba.get_num_threads() if numba else None
    torch.set_num_threads(count)
    if numba:
        numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        torch.set_num_threads(previous[0])
        if numba:
            numba.set_num_threads(previous[1])


EpochCallback = Callable[[EpochRecord, RunState], None]


def train_run(
    spec: RunSpec,
    splits: Splits,
    *,
    checkpoint: bytes | None = None,
    on_epoch: EpochCallback | None = None,
    score_test: bool = True,
) -> RunResult:
    """Train ``spec`` on ``splits``; continue from ``checkpoint`` if given.

    ``on_epoch(record, state)`` runs after every epoch (to persist it, report it, or stop the
    run by raising). Returns the selected model's metrics (see the module docstring).
    """
    settings = spec.settings
    with (
        torch.random.fork_rng(devices=[]),
        _threads(THREADS_PER_RUN),
        use_backend(settings.backend),
    ):
        state = RunState(spec, splits)
        if checkpoint is not None:
            state.restore(checkpoint)
        while len(state.history) < settings.epochs and not (
            settings.patience and state.stale_epochs >= settings.patience
        ):
            started = time.perf_counter()
            _train_epoch(state, *splits.train, settings.batch_size)
            record = _epoch_record(state, splits, len(state.history) + 1, started)
            state.observe(record)
            if on_epoch is not None:
                on_epoch(record, state)
        return _result(state, splits, settings.select, score_test)


def _result(state: RunState, splits: Splits, select: str, score_test: bool) -> RunResult:
    if select == "best" and state.best_state is not None:
        state.model.load_state_dict(state.best_state)
    train_loss, train_acc, _ = evaluate(state.model, *splits.train)
    val_loss, val_acc, _ = evaluate(state.model, *splits.val)
    test_loss = test_acc = None
    if score_test:
        test_loss, test_acc, _ = evaluate(state.model, *splits.test)
    return RunResult(
        state.best_epoch,
        len(state.history),
        train_loss,
        train_acc,
        val_loss,
        val_acc,
        test_loss,
        test_acc,
        sum(record.seconds for record in state.history),
    )
