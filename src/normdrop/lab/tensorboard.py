"""``--tensorboard DIR``: the experiment's per-epoch scalars as TensorBoard event files.

Written from the database once the runs are complete, so runs reused from earlier experiments
or resumed after an interruption appear whole, each epoch exactly once. One event directory per
run, ``DIR/<experiment>/<variant>-seed<k>``; view with ``tensorboard --logdir DIR``. The event
files end in ``SUFFIX``: an export replaces its own earlier files, and no other event file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from normdrop.lab.store import RunStore

__all__ = ["SCALARS", "SUFFIX", "export_scalars"]

SUFFIX = ".normdrop"

SCALARS = (
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "preact_p15",
    "preact_p50",
    "preact_p85",
)


def export_scalars(store: RunStore, runs: Sequence[dict], log_dir: Path) -> list[Path]:
    """Write every complete run's epoch scalars under ``log_dir``; returns the run directories."""
    from torch.utils.tensorboard import SummaryWriter

    written = []
    for run in runs:
        if run["status"] != "complete":
            continue
        directory = Path(log_dir) / f"{run['variant']}-seed{run['seed']}"
        for old in directory.glob(f"events.out.tfevents.*{SUFFIX}"):
            old.unlink()  # our earlier export of this run: rewritten whole, no epoch twice
        with SummaryWriter(str(directory), filename_suffix=SUFFIX) as writer:
            for row in store.epochs(run["id"]):
                for name in SCALARS:
                    if row[name] is not None:
                        writer.add_scalar(name.replace("_", "/", 1), row[name], row["epoch"])
        written.append(directory)
    return written
