"""The ``normdrop`` command line (argparse; ``--help`` on every command).

    normdrop lab      train every variant over every seed, print the table, write the report
    normdrop tune     Optuna search on validation accuracy, best config retrained over seeds
    normdrop runs     list | show ID | compare ID ID | export ID --format csv|json
    normdrop seed     the seed tutorial's SimpleNet (its own options: normdrop seed --help)
    normdrop lint     BatchNorm/Dropout pitfalls in a model (normdrop lint --help)
    normdrop repro    paper reproductions with pass criteria (normdrop repro --help)
    normdrop warmup   compile the CPU kernels into numba's cache ahead of the first step

Adding a command: a function ``_name(args) -> int`` and one ``_add_name`` parser entry in
:func:`build_parser`; or, for a command that parses its own argv, one line in ``_PASSTHROUGH``.
Errors in the user's input print one line naming the option and exit with status 2; Ctrl-C
or SIGTERM exits with 130 after saving every completed epoch (``tune``: every finished trial).
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sqlite3
import sys
from collections.abc import Callable, Sequence

from normdrop.errors import InputError, InputTypeError

__all__ = ["build_parser", "lab_config", "main", "tune_config"]


def _console():
    from rich.console import Console

    # Tables are wide; a pipe or CI log gets 160 columns instead of rich's default 80.
    width = None if sys.stdout.isatty() else max(160, shutil.get_terminal_size().columns)
    return Console(width=width, highlight=False)


# --- shared options -------------------------------------------------------------------------


def _default(name: str):
    from normdrop.lab.config import TrainSettings

    return TrainSettings.__dataclass_fields__[name].default


def _add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of :class:`~normdrop.lab.config.TrainSettings`, defaults from there."""
    from normdrop.backend import BACKENDS
    from normdrop.lab.config import BN_TYPES, OPTIMIZERS, SELECTIONS

    data = parser.add_argument_group("data")
    data.add_argument(
        "--data",
        default=_default("data"),
        help="digits, breast-cancer, wine, mnist5k, seed[:samples=,features=,seed=], "
        "synthetic[:samples=,features=,informative=,classes=,flip=,seed=], mnist, "
        "fashion-mnist, cifar10, or a .csv/.npz/.parquet file (default: %(default)s)",
    )
    data.add_argument("--target", help="label column (CSV, Parquet) or array (NPZ, default y)")
    data.add_argument("--val-fraction", type=float, default=_default("val_fraction"))
    data.add_argument("--test-fraction", type=float, default=_default("test_fraction"))
    data.add_argument("--split-seed", type=int, default=_default("split_seed"))
    data.add_argument("--cache-dir", help="download cache (default: $NORMDROP_CACHE or ~/.cache)")
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=_default("model"),
        help="simplenet, mlp:DEPTHxWIDTH or cnn:small (default: %(default)s)",
    )
    model.add_argument("--dropout-p", type=float, default=_default("dropout_p"))
    model.add_argument("--bn-momentum", type=float, default=_default("bn_momentum"))
    model.add_argument("--bn-type", choices=BN_TYPES, default=_default("bn_type"))
    model.add_argument("--virtual-batch-size", type=int, help="ghost batch norm's batch size")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=_default("epochs"))
    train.add_argument("--batch-size", type=int, default=_default("batch_size"))
    train.add_argument("--optimizer", choices=tuple(OPTIMIZERS), default=_default("optimizer"))
    train.add_argument("--lr", type=float, help="learning rate (default: sgd 0.01, adam 0.001)")
    train.add_argument("--momentum", type=float, default=_default("momentum"), help="SGD's")
    train.add_argument("--weight-decay", type=float, default=_default("weight_decay"))
    train.add_argument(
        "--patience",
        type=int,
        default=_default("patience"),
        help="stop a run after this many epochs without a better validation accuracy (0: never)",
    )
    train.add_argument(
        "--backend",
        choices=BACKENDS,
        default=_default("backend"),
        help="normdrop's fast kernels or its reference math (default: %(default)s)",
    )
    train.add_argument(
        "--select",
        choices=SELECTIONS,
        default=_default("select"),
        help="report each run's best-validation epoch's model, or its last (default: best)",
    )


def _settings(args: argparse.Namespace, skip: Sequence[str] = ()):
    from normdrop.lab.config import TrainSettings

    names = [f.name for f in dataclasses.fields(TrainSettings) if f.name not in skip]
    return TrainSettings(**{name: getattr(args, name) for name in names})


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs", help="database and reports (default: runs/)")
    parser.add_argument("--name", help="experiment name (default: derived from the settings)")
    parser.add_argument(
        "--workers", type=int, help="parallel processes (default: chosen by measuring)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _comma_list(text: str) -> tuple[str, ...]:
    parts = tuple(part.strip() for part in text.split(","))
    if not all(parts):  # "plain,,bn": a typo or a lost item, not something to skip
        raise argparse.ArgumentTypeError(
            f"expected comma-separated names without empty items (e.g. plain,bn), got {text!r}"
        )
    return parts


def _file_path(text: str) -> str:
    # An empty path would be the working folder (--db) or "not given" (-o: standard output).
    if not text:
        raise argparse.ArgumentTypeError("must name a file, got ''")
    return text


def _range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (two numbers), got {text!r}") from None
    return low, high


# --- lab ------------------------------------------------------------------------------------


def _add_lab(sub) -> None:
    from normdrop.lab.config import VARIANTS

    parser = sub.add_parser(
        "lab",
        help="does BatchNorm or Dropout help this model on this data?",
        description="Train every variant over every seed, print accuracy and loss with 95% "
        "confidence intervals and paired tests against plain, and write "
        "OUT/EXPERIMENT/report.html. Rerunning a command resumes it.",
    )
    parser.add_argument(
        "--variants",
        type=_comma_list,
        default=VARIANTS,
        help=f"comma-separated, from {', '.join(VARIANTS)} (default: all four)",
    )
    parser.add_argument("--seeds", type=int, default=5, help="seeds per variant (default: 5)")
    _add_settings_arguments(parser)
    _add_run_arguments(parser)
    parser.add_argument("--tensorboard", metavar="DIR", help="also write TensorBoard scalars")
    parser.set_defaults(run=_lab)


def _print_experiment(result, console) -> None:
    from rich.table import Table

    from normdrop.lab.summary import ACCURACY_COLUMNS, LOSS_COLUMNS, accuracy_rows, loss_rows

    for title, columns, rows in (
        (
            "accuracy % over seeds (mean ± 95% CI)",
            ACCURACY_COLUMNS,
            accuracy_rows(result.summaries),
        ),
        ("loss over seeds (mean ± 95% CI)", LOSS_COLUMNS, loss_rows(result.summaries)),
    ):
        heading = f"{result.name}: {title}"
        table = Table(title=heading, min_width=len(heading) + 4)
        for i, column in enumerate(columns):
            table.add_column(column, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for claim in result.claims:
        console.print(f"- {claim}", soft_wrap=True)
    for run in result.failed:
        console.print(
            f"run {run['id']} ({run['variant']}, seed {run['seed']}) failed: {run['error']}"
        )
    console.print(f"report: {result.report}", soft_wrap=True)


def lab_config(args: argparse.Namespace):
    """The :class:`~normdrop.lab.config.LabConfig` that ``normdrop lab`` arguments describe."""
    from normdrop.lab.config import LabConfig

    return LabConfig(
        _settings(args),
        variants=args.variants,
        seeds=args.seeds,
        out=args.out,
        name=args.name,
        workers=args.workers,
        cache_dir=args.cache_dir,
        tensorboard=args.tensorboard,
    )


def _lab(args: argparse.Namespace) -> int:
    from normdrop.lab.experiment import run_lab

    result = run_lab(lab_config(args), progress=not args.no_progress)
    _print_experiment(result, _console())
    return 1 if result.failed else 0


# --- tune -----------------------------------------------------------------------------------


def _add_tune(sub) -> None:
    from normdrop.lab.config import TUNE_RANGES as defaults

    parser = sub.add_parser(
        "tune",
        help="tune dropout rate, BN momentum, learning rate, weight decay with Optuna",
        description="TPE search with median pruning on validation accuracy, stored in "
        "OUT/optuna.db (rerun to resume); the best configuration is retrained over --seeds "
        "seeds and scored once on the test split; report in OUT/STUDY/report.html.",
    )
    parser.add_argument(
        "--variant", default="bn+dropout", help="variant to tune (default: %(default)s)"
    )
    parser.add_argument("--trials", type=int, default=20, help="trials in the study (default: 20)")
    parser.add_argument(
        "--seeds", type=int, default=3, help="seeds for the retraining (default: 3)"
    )
    parser.add_argument("--tune-seed", type=int, default=0, help="seed of the trials and sampler")
    for name, (low, high) in defaults.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}-range",
            type=_range,
            default=(low, high),
            metavar="LOW,HIGH",
            help=f"default: {low},{high}",
        )
    _add_settings_arguments(parser)
    # None: not given, so that a searched value given (even the default) is refused, not ignored
    parser.set_defaults(**dict.fromkeys(defaults))
    _add_run_arguments(parser)
    parser.set_defaults(run=_tune)


def tune_config(args: argparse.Namespace):
    """The :class:`~normdrop.lab.tune.TuneConfig` that ``normdrop tune`` arguments describe."""
    from normdrop.lab.config import TUNE_RANGES
    from normdrop.lab.tune import TuneConfig, searched_value_error

    given = {name: getattr(args, name) for name in TUNE_RANGES}
    settings = _settings(args, skip=[name for name, value in given.items() if value is None])
    config = TuneConfig(
        settings,
        variant=args.variant,
        trials=args.trials,
        seeds=args.seeds,
        tune_seed=args.tune_seed,
        ranges={name: getattr(args, f"{name}_range") for name in TUNE_RANGES},
        out=args.out,
        name=args.name,
        workers=args.workers,
        cache_dir=args.cache_dir,
    )
    for name, bounds in config.searched().items():
        if given[name] is not None:  # given, even as the default value: it would be ignored
            raise searched_value_error(name, given[name], bounds)
    return config


def _tune(args: argparse.Namespace) -> int:
    from rich.table import Table

    from normdrop.lab.tune import run_tune

    result = run_tune(tune_config(args), progress=not args.no_progress)
    console = _console()
    heading = (
        f"{result.study}: best of {len(result.trials)} trials "
        f"(validation accuracy {100 * result.best_value:.1f}%)"
    )
    best = Table(title=heading, min_width=len(heading) + 4)
    best.add_column("parameter")
    best.add_column("value", justify="right")
    best.add_column("importance", justify="right")
    for name, value in result.best_params.items():
        importance = result.importances.get(name)
        best.add_row(name, f"{value:.4g}", "" if importance is None else f"{importance:.2f}")
    console.print(best)
    _print_experiment(result.final, console)
    console.print(f"tune report: {result.report}", soft_wrap=True)
    return 1 if result.final.failed else 0


# --- runs -----------------------------------------------------------------------------------


def _add_runs(sub) -> None:
    parser = sub.add_parser(
        "runs",
        help="list, show, compare and export what the lab ran",
        description="Read the run database (never changes it).",
    )
    parser.add_argument(
        "--db", type=_file_path, default="runs/normdrop.db", help="default: %(default)s"
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="every run, one line each")
    listing.add_argument("--experiment", help="only this experiment's runs")
    show = actions.add_parser("show", help="a run's settings, result and epochs")
    show.add_argument("id", type=_run_id)
    compare = actions.add_parser("compare", help="two runs side by side")
    compare.add_argument("ids", type=_run_id, nargs=2, metavar="ID")
    export = actions.add_parser("export", help="a run's epochs as CSV or JSON")
    export.add_argument("id", type=_run_id)
    export.add_argument("--format", choices=("csv", "json"), default="csv")
    export.add_argument(
        "--output",
        "-o",
        type=_file_path,
        help="new file to write (default: standard output); an existing one only with --force",
    )
    export.add_argument("--force", action="store_true", help="overwrite an existing --output")
    parser.set_defaults(run=_runs)


def _run_id(text: str) -> int:
    """A run id as the database stores it: a positive 64-bit integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a run id is a positive integer, got {text!r}") from None
    if not 1 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"a run id is a positive integer, got {text}")
    return value


def _runs(args: argparse.Namespace) -> int:
    from pathlib import Path

    from normdrop.lab import runs
    from normdrop.lab.store import RunStore

    with RunStore(args.db, readonly=True) as store:
        if args.action == "export":
            text = runs.export_run(store, args.id, args.format)
            if args.output:
                _write_new(Path(args.output), text, Path(args.db), args.force)
            else:
                sys.stdout.write(text)
            return 0
        if args.action == "list":
            tables = [runs.list_table(store, args.experiment)]
        elif args.action == "show":
            tables = runs.show_tables(store, args.id)
        else:
            tables = runs.compare_tables(store, *args.ids)
        console = _console()
        for table in tables:
            console.print(table)
    return 0


def _write_new(path, text: str, database, force: bool) -> None:
    """Write ``text`` to ``path``, which must not be the run database (or its WAL files) and,
    without ``force``, must not exist: nothing a user saved is overwritten by an export."""
    target, database = path.resolve(), database.resolve()
    # the database and the files SQLite keeps beside it
    kept = {
        database.with_name(database.name + suffix) for suffix in ("", "-wal", "-shm", "-journal")
    }
    if target in kept:
        raise InputError(f"--output {path}: that is the run database; choose another file")
    if target.is_dir():
        raise InputError(f"--output {path}: is a directory; give a file name")
    if target.exists() and not force:
        raise InputError(f"--output {path}: the file exists; choose a new name or pass --force")
    if not target.parent.is_dir():
        raise InputError(f"--output {path}: the folder {path.parent} does not exist")
    path.write_text(text, encoding="utf-8")


# --- commands with their own parsers --------------------------------------------------------


def _seed(argv: list[str]) -> int:
    from normdrop.lab.seed import main as seed_main

    return seed_main(argv)


def _lint(argv: list[str]) -> int:
    from normdrop.tools.lint import cli_main

    return cli_main(argv)


def _repro(argv: list[str]) -> int:
    from normdrop.repro import cli_main

    return cli_main(argv)


# name -> (function of the remaining argv, one-line help)
_PASSTHROUGH: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "seed": (_seed, "the seed tutorial's SimpleNet, trained correctly (see: normdrop seed --help)"),
    "lint": (_lint, "find BatchNorm/Dropout pitfalls in a model (see: normdrop lint --help)"),
    "repro": (_repro, "paper reproductions with pass criteria (see: normdrop repro --help)"),
}


# Top-level modules of the `lab` extra (pyproject.toml): their absence is an install problem.
_LAB_EXTRA = {"sklearn", "scipy", "matplotlib", "optuna", "rich"}


def _kept(args: argparse.Namespace) -> str:
    """What an interrupted command has stored for its rerun to continue from."""
    from pathlib import Path

    from normdrop.lab.config import RUN_DB, STUDY_DB

    if args.command == "tune":  # a trial cut short is failed in the study; a rerun replaces it
        out = Path(args.out)
        return (
            f"every finished trial is in the study ({out / STUDY_DB}) and every completed "
            f"epoch of the retraining in {out / RUN_DB}: rerun the same command to resume"
        )
    if args.command == "lab":
        return "every completed epoch is in the database: rerun the same command to resume"
    if args.command == "warmup":
        return "the kernels compiled so far are in numba's cache"
    return "the run database is unchanged"  # runs only reads it


# --- warmup ---------------------------------------------------------------------------------


def _add_warmup(sub) -> None:
    parser = sub.add_parser(
        "warmup",
        help="compile the CPU kernels into numba's cache ahead of the first training step",
        description="Compile every CPU kernel (BatchNorm forward and backward per layout, "
        "Dropout) into numba's cache, so that later processes load them at once instead of "
        "compiling them at their first training step. The cache is NUMBA_CACHE_DIR when set "
        "(docs/kernels.md).",
    )
    parser.add_argument(
        "--dtype",
        nargs="+",
        choices=("float32", "float64"),  # normdrop.kernels.warmup.DTYPES (imported when run)
        default=["float32", "float64"],
        help="dtypes to compile for (default: %(default)s)",
    )
    parser.add_argument(
        "--processes", type=_positive_int, help="helper processes (default: the usable CPUs)"
    )
    parser.set_defaults(run=_warmup)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _warmup(args) -> int:
    import time

    from normdrop.kernels import warmup

    start = time.perf_counter()
    try:
        results = warmup.warm(tuple(args.dtype), args.processes)
    except RuntimeError as error:  # a helper failed: its error output, no traceback of ours
        print(f"normdrop warmup: error: {error}", file=sys.stderr)
        return 1
    for kernel, seconds in results:
        done = "cached already" if seconds is None else f"compiled in {seconds:.1f} s"
        print(f"{kernel.kind:8} {kernel.layout:8} {kernel.dtype:7}  {done}")
    compiled = sum(seconds is not None for _, seconds in results)
    print(
        f"{compiled} of {len(results)} kernels compiled in {time.perf_counter() - start:.1f} s; "
        f"cache: {warmup.cache_path()}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normdrop",
        description="Batch Normalization and Dropout for PyTorch: the lab and its tools.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_lab(sub)
    _add_tune(sub)
    _add_runs(sub)
    _add_warmup(sub)
    for name, (_, text) in _PASSTHROUGH.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``normdrop`` with ``argv`` (default: the process's arguments); returns the exit code."""
    from normdrop.lab.downloads import DownloadError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _PASSTHROUGH:
        try:
            return _PASSTHROUGH[argv[0]][0](argv[1:])
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM where the command turns it into one
            print(f"normdrop {argv[0]}: interrupted", file=sys.stderr)
            return 130
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(
            f"normdrop: interrupted; {_kept(args)}",
            file=sys.stderr,
        )
        return 130
    except (InputError, InputTypeError, DownloadError) as error:
        print(f"normdrop {args.command}: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a path the user gave: a file where a folder goes, no permission
        where = f"{error.filename}: " if error.filename else ""
        print(f"normdrop {args.command}: error: {where}{error.strerror or error}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as error:
        # torch's allocator raises RuntimeError ("DefaultCPUAllocator: can't allocate memory")
        if isinstance(error, RuntimeError) and "can't allocate memory" not in str(error):
            raise
        why = str(error).strip() or type(error).__name__
        print(
            f"normdrop {args.command}: error: out of memory ({why}); lower --batch-size, the "
            "--model widths or the data size",
            file=sys.stderr,
        )
        return 2
    except sqlite3.Error as error:  # the run database: read-only, locked, damaged
        print(
            f"normdrop {args.command}: error: the run database: {error} (check that the --out "
            "folder and its normdrop.db are writable, or restore the file from a backup)",
            file=sys.stderr,
        )
        return 2
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] not in _LAB_EXTRA:
            raise
        print(
            f"normdrop {args.command}: error: {error.name} is not installed; "
            "install the lab's dependencies: pip install 'normdrop[lab]'",
            file=sys.stderr,
        )
        return 2
