"""``normdrop tune``: choose dropout rate, BN momentum, learning rate and weight decay on the
validation split, then measure the choice once on the test split.

- Search: Optuna's TPE sampler (seeded) over the ranges given (dropout rate uniform, the others
  log-uniform); only the parameters the variant uses are searched.
- Pruning: the median pruner stops a trial whose validation accuracy at an epoch is below the
  median of earlier trials at that epoch.
- Each trial trains one seed (``--tune-seed``) and never touches the test split.
- The study lives in SQLite (``<out>/optuna.db``): rerunning the command resumes it, counting
  finished and pruned trials; trials left running by a dead process are marked failed. Ctrl-C
  or SIGTERM marks the trial in flight failed (a rerun replaces it).
- The best configuration is then retrained over ``--seeds`` seeds as a lab experiment (stored in
  ``<out>/normdrop.db`` like any other) and scored on the test split, once per seed.
- ``<out>/<study>/report.html`` shows the trials, parameter importance (fANOVA), the history and
  the retrained result with its confidence intervals.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shlex
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from normdrop.errors import InputError
from normdrop.lab.config import (
    RUN_DB,
    STUDY_DB,
    TUNE_RANGES,
    LabConfig,
    RunSpec,
    TrainSettings,
    Variant,
    check_name,
    check_out_folder,
    check_path_options,
    check_report_folder,
    check_seed,
    slug,
)
from normdrop.lab.experiment import (
    ExperimentResult,
    check_models,
    load_splits,
    run_lab,
    tune_study_names,
)
from normdrop.lab.plots import importance_plot, tune_history_plot
from normdrop.lab.report import Table, write_report
from normdrop.lab.scheduler import interrupt_as_keyboard
from normdrop.lab.store import owner_alive, owner_id, read_only_rows
from normdrop.lab.summary import ACCURACY_COLUMNS, accuracy_rows
from normdrop.lab.train import train_run

__all__ = ["TuneConfig", "TuneResult", "run_tune"]

# parameter -> (setting, log scale, used by: "bn", "dropout" or "all")
PARAMETERS = {
    "dropout_p": (False, "dropout"),
    "bn_momentum": (True, "bn"),
    "lr": (True, "all"),
    "weight_decay": (True, "all"),
}


def searched_value_error(name: str, value: float, bounds: tuple[float, float]) -> InputError:
    """The error for a value given to a parameter that tune searches (it would be ignored)."""
    option = "--" + name.replace("_", "-")
    return InputError(
        f"{option} {value}: tune searches {name} (over {option}-range, {list(bounds)}); give a "
        "range instead, or leave it out"
    )


def _check_range(name: str, bounds: tuple[float, float], log: bool) -> None:
    low, high = bounds
    option = f"--{name.replace('_', '-')}-range"
    if not low < high:
        raise InputError(f"{option}: the low end must be below the high end, got {low},{high}")
    if log and low <= 0:
        raise InputError(f"{option}: searched on a log scale, so both ends must be > 0")
    # Both ends must be valid settings themselves; TrainSettings says what valid is.
    for value in bounds:
        try:
            TrainSettings(**{name: value})
        except InputError as error:
            raise InputError(f"{option}: {error}") from None


@dataclass(frozen=True)
class TuneConfig:
    """One ``normdrop tune`` invocation."""

    settings: TrainSettings = field(default_factory=TrainSettings)
    variant: str = "bn+dropout"
    trials: int = 20
    seeds: int = 3
    tune_seed: int = 0
    ranges: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(TUNE_RANGES))
    out: str = "runs"
    name: str | None = None
    workers: int | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "variant", Variant.parse(self.variant, "--variant").name)
        check_path_options(out=self.out, cache_dir=self.cache_dir)
        check_out_folder(self.out)
        check_name(self.name)
        for option, value in (("--trials", self.trials), ("--seeds", self.seeds)):
            if value < 1:
                raise InputError(f"{option} must be a positive integer, got {value}")
        check_seed("--tune-seed", self.tune_seed)
        unknown = set(self.ranges) - set(PARAMETERS)
        if unknown:
            raise InputError(
                f"tune: no parameter {sorted(unknown)[0]!r}; tunable: {list(PARAMETERS)}"
            )
        for name, bounds in self.ranges.items():
            _check_range(name, tuple(bounds), PARAMETERS[name][0])
        # a value given would be ignored; the defaults are the optimizer's (Adam's lr is 0.001)
        defaults = TrainSettings(optimizer=self.settings.optimizer)
        for name, bounds in self.searched().items():
            value = getattr(self.settings, name)
            if value != getattr(defaults, name):
                raise searched_value_error(name, value, bounds)

    def searched(self) -> dict[str, tuple[float, float]]:
        """The ranges of the parameters this variant uses."""
        variant = Variant.parse(self.variant)
        used = {"all": True, "bn": variant.batch_norm, "dropout": variant.dropout}
        return {n: tuple(b) for n, b in self.ranges.items() if used[PARAMETERS[n][1]]}

    def study_name(self, data_fingerprint: str) -> str:
        if self.name:
            return self.name
        identity = json.dumps(
            [
                dataclasses.asdict(self.settings),
                self.variant,
                self.tune_seed,
                self.searched(),
                data_fingerprint,
            ],
            sort_keys=True,
        )
        digest = hashlib.sha256(identity.encode()).hexdigest()[:8]
        return f"tune-{slug(self.settings.data)}-{slug(self.settings.model)}-{digest}"

    def command(self) -> str:
        argv = ["normdrop", "tune"]
        for name, value in dataclasses.asdict(self.settings).items():
            if value is not None and name not in PARAMETERS:
                argv += [f"--{name.replace('_', '-')}", str(value)]
        argv += ["--variant", self.variant, "--trials", str(self.trials)]
        argv += ["--seeds", str(self.seeds), "--tune-seed", str(self.tune_seed)]
        for name, (low, high) in self.ranges.items():
            argv += [f"--{name.replace('_', '-')}-range", f"{low},{high}"]
        argv += ["--out", self.out]
        if self.name:
            argv += ["--name", self.name]
        return shlex.join(argv)


@dataclass
class TuneResult:
    """The study's name, best trial, finished trials, importances, retrained result, report."""

    study: str
    best_params: dict[str, float]
    best_value: float
    trials: list[dict]  # number, state, value (pruned: last reported), params
    importances: dict[str, float]
    final: ExperimentResult
    report: Path


def _suggest(trial, ranges: dict[str, tuple[float, float]]) -> dict[str, float]:
    return {
        name: trial.suggest_float(name, low, high, log=PARAMETERS[name][0])
        for name, (low, high) in ranges.items()
    }


def _fail_abandoned(study) -> None:
    """Trials left RUNNING by a process that died will never finish: mark them failed."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get("owner")
        if owner and not owner_alive(owner, None):
            study.tell(trial.number, state=TrialState.FAIL)


class _QuietAfterInterrupt(logging.Filter):
    """Drops optuna's log records once a trial has seen Ctrl-C.

    Optuna marks the interrupted trial failed (right: it did not finish; a rerun replaces it)
    and logs that as a warning with the KeyboardInterrupt's traceback before re-raising it.
    The command line then says in one line that it was interrupted, so those lines are noise.
    """

    def __init__(self, interrupts) -> None:
        super().__init__()
        self.interrupts = interrupts  # the run's interrupt_as_keyboard()

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.interrupts.seen


@contextmanager
def _quiet_after_interrupt(interrupts) -> Iterator[None]:
    quiet = _QuietAfterInterrupt(interrupts)
    # The logger of optuna.study._optimize, which logs failed trials; a filter on a logger
    # sees only the records logged there, so it goes on that one.
    logger = logging.getLogger("optuna.study._optimize")
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _objective(config: TuneConfig, splits, tick, interrupts):
    import optuna

    def objective(trial) -> float:
        try:
            return run_trial(trial)
        except KeyboardInterrupt:
            interrupts.seen = True  # also one that no handler of ours raised
            raise

    def run_trial(trial) -> float:
        trial.set_user_attr("owner", owner_id())
        settings = config.settings.replace(**_suggest(trial, config.searched()))
        spec = RunSpec(settings, config.variant, config.tune_seed, splits.fingerprint)

        def report(record, state) -> None:
            tick()
            trial.report(record.val_acc, record.epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        return train_run(spec, splits, on_epoch=report, score_test=False).val_acc

    return objective


def _study(config: TuneConfig, name: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = Path(config.out) / STUDY_DB
    path.parent.mkdir(parents=True, exist_ok=True)
    _refuse_foreign_optuna_db(path)
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{path.resolve()}",
        engine_kwargs={"connect_args": {"timeout": 120}},
    )
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        load_if_exists=True,
        direction="maximize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1),
    )
    # Seeded by how far the study got: a fresh study is reproducible, and a resumed one does
    # not replay the random start-up trials it already ran.
    # modulo 2^32: numpy's seed range, so any --tune-seed works (smaller ones are unchanged)
    sampler_seed = (config.tune_seed * 100_003 + len(study.trials)) % 2**32
    study.sampler = optuna.samplers.TPESampler(seed=sampler_seed)
    return study


def _refuse_foreign_optuna_db(path: Path) -> None:
    """An ``optuna.db`` holding tables but no optuna studies is someone else's: optuna would
    add its tables to it."""
    if not path.is_file():
        return
    try:
        tables = {row[0] for row in read_only_rows(path, "SELECT name FROM sqlite_master")}
    except sqlite3.Error as error:
        raise InputError(f"{path}: not an optuna study database ({error})") from None
    if tables and "studies" not in tables:
        raise InputError(
            f"{path}: holds other tables ({', '.join(sorted(tables))}), not optuna studies; "
            "refusing to write tune's study into it: choose another --out"
        )


def _importances(study) -> dict[str, float]:
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    try:
        return dict(get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0)))
    except (ValueError, RuntimeError):  # too few finished trials, or no parameter varied
        return {}


def _progress(trials: int, epochs: int, done: int, show: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("trial epochs"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not show,
    )
    return bar, bar.add_task("tuning", total=trials * epochs, completed=done * epochs)


def _check_name_is_free(config: TuneConfig, name: str) -> None:
    """The study's report folder ``out/name`` and its retraining's experiment ``name-best``
    must not be a lab experiment's (their run lists and reports would be replaced)."""
    db_path = Path(config.out) / RUN_DB
    if not db_path.is_file():
        return
    try:
        kinds = dict(read_only_rows(db_path, "SELECT name, kind FROM experiments"))
    except sqlite3.Error:  # not a run database (yet): the retraining names the problem
        return
    for taken, why in ((name, "report folder"), (f"{name}-best", "retraining")):
        if kinds.get(taken, "tune") != "tune":
            raise InputError(
                f"--name {name}: the study's {why} would replace the {kinds[taken]} experiment "
                f"{taken!r} in {db_path} (its runs and {Path(config.out) / taken / 'report.html'})"
                "; choose another --name"
            )


def run_tune(config: TuneConfig, *, progress: bool = True) -> TuneResult:
    """Search, resume if the study exists, retrain the best over seeds, write the report."""
    import optuna
    from optuna.trial import TrialState

    splits = load_splits(LabConfig(config.settings, cache_dir=config.cache_dir))
    check_models(LabConfig(config.settings, variants=(config.variant,)), splits)
    name = config.study_name(splits.fingerprint)
    _check_name_is_free(config, name)
    check_report_folder(config.out, name, ours=name in tune_study_names(Path(config.out)))
    study = _study(config, name)
    _fail_abandoned(study)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    epochs = config.settings.epochs
    bar, task = _progress(config.trials, epochs, done, progress)

    def trial_done(study, trial) -> None:
        finished_now = len(study.get_trials(deepcopy=False, states=finished))
        bar.update(task, completed=min(finished_now, config.trials) * epochs)

    # SIGTERM as Ctrl-C: optuna marks the trial in flight failed (a rerun replaces it) rather
    # than the process dying with the trial left running.
    with bar, interrupt_as_keyboard() as interrupts, _quiet_after_interrupt(interrupts):
        if done < config.trials:
            # Another process running the same study counts too: stop at --trials finished
            # (n_trials alone counts this process's trials only: two would run twice as many).
            enough = optuna.study.MaxTrialsCallback(config.trials, states=finished)
            try:
                study.optimize(
                    _objective(config, splits, lambda: bar.advance(task), interrupts),
                    n_trials=config.trials - done,
                    callbacks=[trial_done, enough],
                )
            except Exception as error:
                if interrupts.seen:  # turned into another error where it landed (SQLAlchemy)
                    raise KeyboardInterrupt from error
                raise
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise InputError(f"study {name}: no trial completed (all pruned or failed); add --trials")
    best = study.best_trial
    final = run_lab(
        LabConfig(
            config.settings.replace(**best.params),
            variants=(config.variant,),
            seeds=config.seeds,
            out=config.out,
            name=f"{name}-best",
            workers=config.workers,
            cache_dir=config.cache_dir,
        ),
        progress=progress,
        kind="tune",
    )
    trials = [
        {
            "number": t.number,
            "state": t.state.name.lower(),
            "value": t.value if t.value is not None else _last(t),
            "params": dict(t.params),
        }
        for t in study.get_trials(deepcopy=False, states=finished)
    ]
    importances = _importances(study)
    report = _write_tune_report(config, name, best, trials, importances, final)
    return TuneResult(name, dict(best.params), best.value, trials, importances, final, report)


def _last(trial) -> float | None:
    values = trial.intermediate_values
    return values[max(values)] if values else None


def _write_tune_report(config, name, best, trials, importances, final) -> Path:
    out_dir = Path(config.out) / name
    plots = [tune_history_plot(trials, out_dir)]
    if importances:
        plots.insert(0, importance_plot(importances, out_dir))
    searched = list(config.searched())
    trial_rows = [
        [str(t["number"]), t["state"], "" if t["value"] is None else f"{100 * t['value']:.1f}"]
        + [f"{t['params'][name]:.4g}" for name in searched]
        for t in trials
    ]
    return write_report(
        out_dir / "report.html",
        title=f"normdrop tune: {name}",
        summary=(
            f"{len(trials)} trials of {config.variant} ({config.settings.model} on "
            f"{config.settings.data}), TPE sampler with median pruning on validation accuracy; "
            f"best validation accuracy {100 * best.value:.1f}% (trial {best.number}, seed "
            f"{config.tune_seed}). The best configuration was retrained over {config.seeds} seeds "
            f"and scored once on the test split (experiment {final.name})."
        ),
        tables=[
            Table(
                "best",
                "Best configuration (chosen on validation accuracy)",
                ["parameter", "value"],
                [[n, f"{v:.4g}"] for n, v in best.params.items()],
            ),
            Table(
                "accuracy",
                f"Best configuration retrained over {config.seeds} seeds (test scored once)",
                ACCURACY_COLUMNS,
                accuracy_rows(final.summaries),
            ),
            Table("trials", "Trials", ["trial", "state", "val acc %", *searched], trial_rows),
        ],
        claims=[f"importance of {n}: {v:.2f}" for n, v in importances.items()],
        plots=plots,
        config={"tune": json.loads(json.dumps(dataclasses.asdict(config), default=list))},
        command=config.command(),
    )
