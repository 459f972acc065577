"""``normdrop lab``: every variant over every seed, then the statistics, plots and report.

The steps, each resumable because the database is the only state:

1. load and split the data, build each variant's model once (bad options fail before training);
2. record the experiment and its runs (runs already in the database are reused as they are);
3. train what is not complete (:mod:`normdrop.lab.scheduler`), with a progress bar;
4. summarize over seeds, draw the plots, write ``<out>/<experiment>/report.html``.
"""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from normdrop.errors import InputError
from normdrop.lab.config import STUDY_DB, LabConfig, Variant, check_report_folder
from normdrop.lab.data import Splits, prepare
from normdrop.lab.models import build_model
from normdrop.lab.norms import norm_factory
from normdrop.lab.plots import Plot, gap_plot, learning_curves, preactivation_plot
from normdrop.lab.report import Table, write_report
from normdrop.lab.scheduler import execute, interrupt_as_keyboard
from normdrop.lab.store import RunStore, StoreError, read_only_rows
from normdrop.lab.summary import (
    ACCURACY_COLUMNS,
    LOSS_COLUMNS,
    VariantSummary,
    accuracy_rows,
    claims,
    loss_rows,
    summarize,
)

__all__ = ["ExperimentResult", "check_models", "load_splits", "run_lab", "write_outputs"]


@dataclass
class ExperimentResult:
    """What a lab produced: its name, runs (database rows), summaries, report and plots."""

    name: str
    runs: list[dict]
    summaries: list[VariantSummary]
    claims: list[str]
    report: Path
    plots: list[Plot]
    workers: int
    seconds: float

    @property
    def failed(self) -> list[dict]:
        return [run for run in self.runs if run["status"] != "complete"]


def load_splits(config: LabConfig) -> Splits:
    s = config.settings
    return prepare(
        s.data, s.target, s.val_fraction, s.test_fraction, s.split_seed, config.cache_dir
    )


# The largest model the lab trains: 2^28 float32 parameters take 1 GiB, and training keeps
# their gradients and the optimizer's state too. A mistyped width (mlp:2x65536: 4.3e9) is
# refused before any memory is allocated, not a traceback from torch's allocator.
MAX_PARAMETERS = 2**28


def check_models(config: LabConfig, splits: Splits) -> None:
    """Build each variant's model once, on the meta device (no memory), so a bad option or a
    model too large fails before any training."""
    s = config.settings
    norm = norm_factory(s.bn_type, s.bn_momentum, s.virtual_batch_size)
    for variant in config.variants:
        with torch.device("meta"):
            model = build_model(
                s.model,
                Variant.parse(variant),
                splits.sample_shape,
                splits.n_outputs,
                s.dropout_p,
                norm,
            )
        parameters = sum(p.numel() for p in model.parameters())
        if parameters > MAX_PARAMETERS:
            raise InputError(
                f"--model {s.model}: {parameters:,} parameters on this data "
                f"({4 * parameters / 2**30:.1f} GiB in float32, before gradients and the "
                f"optimizer's state); the lab trains at most {MAX_PARAMETERS:,}: use smaller widths"
            )


class _EpochProgress:
    """A progress bar over every epoch of the experiment, read from the database."""

    def __init__(self, store: RunStore, run_ids: list[int], epochs: int, label: str, show: bool):
        self.store, self.run_ids, self.epochs = store, run_ids, epochs
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("epochs"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.bar = Progress(*columns, console=Console(stderr=True), disable=not show)
        self.label = label
        complete, done = self._done()
        # Runs already done count from the start, so they do not inflate the speed (and ETA).
        self.task = self.bar.add_task(
            self._description(complete), total=len(run_ids) * epochs, completed=done
        )
        self.last = 0.0

    def _done(self) -> tuple[int, int]:
        """Complete runs, and epochs done (a complete run counts all, even if it stopped early)."""
        runs = self.store.runs(self.run_ids)
        rows = self.store.epochs_done(self.run_ids)
        complete = sum(run["status"] == "complete" for run in runs)
        epochs = sum(
            self.epochs if run["status"] == "complete" else rows.get(run["id"], 0) for run in runs
        )
        return complete, epochs

    def _description(self, complete: int) -> str:
        return f"{self.label}: {complete}/{len(self.run_ids)} runs"

    def tick(self, force: bool = False) -> None:
        if not force and time.monotonic() - self.last < 0.1:
            return
        self.last = time.monotonic()
        complete, epochs = self._done()
        self.bar.update(self.task, completed=epochs, description=self._description(complete))


def _histories(store: RunStore, runs: list[dict]) -> tuple[dict, dict]:
    """Epoch rows of the complete runs by variant, and the first seed's run per variant."""
    curves: dict[str, list] = {}
    first: dict[str, list] = {}
    for run in sorted(runs, key=lambda r: r["seed"]):
        if run["status"] != "complete":
            continue
        epochs = store.epochs(run["id"])
        curves.setdefault(run["variant"], []).append(epochs)
        first.setdefault(run["variant"], epochs)
    order = [v for v in dict.fromkeys(run["variant"] for run in runs) if v in curves]
    return {v: curves[v] for v in order}, {v: first[v] for v in order}


def _description(config: LabConfig, splits: Splits, runs: list[dict]) -> str:
    s = config.settings
    sizes = "/".join(str(len(part[0])) for part in (splits.train, splits.val, splits.test))
    complete = sum(run["status"] == "complete" for run in runs)
    return (
        f"{len(config.variants)} variants x {config.seeds} seeds ({complete} of {len(runs)} runs "
        f"complete) of {s.model} on {s.data} ({sizes} train/validation/test samples, "
        f"{len(splits.classes)} classes); {s.epochs} epochs, batch {s.batch_size}, "
        f"{s.optimizer} lr {s.lr}, weight decay {s.weight_decay}; the reported model of each run "
        f"is its {s.select} validation epoch's. Accuracies in %, mean ± 95% confidence interval "
        "half-width over seeds (Student t); Δ and p: paired t-test against plain on the same seeds "
        "(the exact sign test where every seed differs by the same amount)."
    )


def write_outputs(
    store: RunStore, config: LabConfig, name: str, run_ids: list[int], splits: Splits, title: str
) -> tuple[list[dict], list[VariantSummary], list[str], Path, list[Plot]]:
    """Summaries, plots and the report of the experiment's runs as they are in the database."""
    runs = store.runs(run_ids)
    summaries = summarize(runs)
    statements = claims(summaries)
    out_dir = Path(config.out) / name
    curves, first = _histories(store, runs)
    plots = []
    if curves:
        plots = [
            learning_curves(curves, out_dir),
            gap_plot(curves, summaries, out_dir),
            preactivation_plot(first, out_dir),
        ]
    report = write_report(
        out_dir / "report.html",
        title=title,
        summary=_description(config, splits, runs),
        tables=[
            Table("accuracy", "Accuracy over seeds", ACCURACY_COLUMNS, accuracy_rows(summaries)),
            Table("loss", "Loss over seeds", LOSS_COLUMNS, loss_rows(summaries)),
        ],
        claims=statements,
        plots=plots,
        config=config.to_dict(),
        command=config.command(),
    )
    return runs, summaries, statements, report, plots


def _check_name_is_this_experiments(store: RunStore, config: LabConfig, kind: str) -> None:
    """A ``--name`` already given to an experiment with other settings, or of another kind (a
    lab's name for a tune's retraining), would replace its run list and its report: refused.
    The same settings resume it; a tune's retraining replaces its own earlier one (more trials
    may find another best). A tune study of that name would share the report folder: refused."""
    report = Path(config.out) / config.name / "report.html"
    if kind == "lab" and config.name in tune_study_names(Path(config.out)):
        raise InputError(
            f"--name {config.name}: a tune study of that name exists in {config.out}, whose "
            f"report is {report}; choose another --name"
        )
    try:
        existing = store.experiment(config.name)
    except StoreError:  # a new name
        return
    if kind == "tune" and existing["kind"] == "tune":
        return
    wanted = json.loads(json.dumps(config.to_dict(), sort_keys=True))
    if existing["kind"] != kind or json.loads(existing["config_json"]) != wanted:
        raise InputError(
            f"--name {config.name}: a {existing['kind']} experiment of that name already exists "
            f"with other settings ({existing['command']}); its report is {report}. Choose "
            "another --name, or rerun that command to resume it"
        )


def tune_study_names(out: Path) -> set[str]:
    """The studies in ``out``'s optuna database (read only)."""
    path = out / STUDY_DB
    if not path.is_file():
        return set()
    try:
        return {row[0] for row in read_only_rows(path, "SELECT study_name FROM studies")}
    except sqlite3.Error:  # not optuna's: tune itself names the problem when it opens it
        return set()


def run_lab(config: LabConfig, *, progress: bool = True, kind: str = "lab") -> ExperimentResult:
    """Run (or resume) the experiment ``config`` describes and write its report."""
    started = time.perf_counter()
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise InputError("--tensorboard needs tensorboard: pip install 'normdrop[tensorboard]'")
    splits = load_splits(config)
    check_models(config, splits)
    name = config.experiment_name(splits.fingerprint)
    with RunStore(config.db_path) as store, interrupt_as_keyboard():
        if config.name:
            _check_name_is_this_experiments(store, config, kind)
        check_report_folder(config.out, name, ours=store.has_experiment(name))
        experiment_id = store.add_experiment(name, kind, config.to_dict(), config.command())
        run_ids = store.add_runs(experiment_id, config.run_specs(splits.fingerprint))
        bar = _EpochProgress(store, run_ids, config.settings.epochs, name, progress)
        with bar.bar:
            workers = execute(
                str(config.db_path),
                run_ids,
                workers=config.workers,
                epochs=config.settings.epochs,
                cache_dir=config.cache_dir,
                tick=bar.tick,
            )
            bar.tick(force=True)
        runs, summaries, statements, report, plots = write_outputs(
            store, config, name, run_ids, splits, f"normdrop lab: {name}"
        )
        if config.tensorboard:
            from normdrop.lab.tensorboard import export_scalars

            export_scalars(store, runs, Path(config.tensorboard) / name)
    seconds = time.perf_counter() - started
    return ExperimentResult(name, runs, summaries, statements, report, plots, workers, seconds)
