"""``normdrop runs list | show ID | compare ID ID | export ID``: reading the run database.

Every function opens nothing itself: it takes a read-only :class:`RunStore` and returns rich
tables (for the console) or text (for export), so it never changes the database.
"""

from __future__ import annotations

import csv
import io
import json
import math

from rich.table import Table

from normdrop.errors import InputError
from normdrop.lab.store import RunStore

__all__ = ["EXPORT_FORMATS", "compare_tables", "export_run", "list_table", "show_tables"]

EXPORT_FORMATS = ("csv", "json")
EPOCH_COLUMNS = (
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "preact_p15",
    "preact_p50",
    "preact_p85",
    "seconds",
)
RESULT_FIELDS = (
    "status",
    "epochs_run",
    "best_epoch",
    "train_acc",
    "val_acc",
    "test_acc",
    "train_loss",
    "val_loss",
    "test_loss",
    "seconds",
)


def _table(title: str, **options) -> Table:
    # As wide as its title at least: rich would wrap a long title over a narrow table.
    return Table(title=title, min_width=len(title) + 4, **options)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _finite(value):
    """NaN and infinities (a diverged run's loss) become null: JSON has no NaN."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _percent(value) -> str:
    return "" if value is None else f"{100 * value:.1f}"


def list_table(store: RunStore, experiment: str | None = None) -> Table:
    """One line per run: id, experiments, data, model, variant, seed, status, metrics."""
    table = _table(f"runs in {store.path}" + (f" ({experiment})" if experiment else ""))
    columns = (
        "id",
        "experiments",
        "data",
        "model",
        "variant",
        "seed",
        "status",
        "epochs",
        "best epoch",
        "test acc %",
        "time s",
        "finished",
    )
    for column in columns:
        table.add_column(column, justify="right" if column in ("id", "seed") else "left")
    for run in store.list_runs(experiment):
        table.add_row(
            str(run["id"]),
            run["experiments"] or "",
            run["data"],
            run["model"],
            run["variant"],
            str(run["seed"]),
            run["status"],
            _cell(run["epochs_run"]),
            _cell(run["best_epoch"]),
            _percent(run["test_acc"]),
            _cell(run["seconds"]),
            run["finished_at"] or "",
        )
    return table


def _epochs_table(store: RunStore, run_id: int) -> Table:
    table = _table(f"run {run_id}: epochs (eval mode)")
    for column in EPOCH_COLUMNS:
        table.add_column(column, justify="right")
    for row in store.epochs(run_id):
        table.add_row(*(_cell(row[column]) for column in EPOCH_COLUMNS))
    return table


def show_tables(store: RunStore, run_id: int) -> list[Table]:
    """The run's settings and result, then its epochs."""
    run = store.run(run_id)
    table = _table(f"run {run_id}", show_header=False)
    table.add_column("field")
    table.add_column("value")
    for name, value in json.loads(run["spec_json"]).items():
        table.add_row(name, _cell(value))
    for name in (*RESULT_FIELDS, "attempts", "created_at", "finished_at", "error"):
        table.add_row(name, _cell(run[name]))
    return [table, _epochs_table(store, run_id)]


def compare_tables(store: RunStore, first: int, second: int) -> list[Table]:
    """Settings that differ, results side by side, and validation accuracy per epoch."""
    a, b = store.run(first), store.run(second)
    spec_a, spec_b = json.loads(a["spec_json"]), json.loads(b["spec_json"])
    settings = _table(f"settings that differ: run {first} vs run {second}")
    for column in ("setting", f"run {first}", f"run {second}"):
        settings.add_column(column)
    for name in sorted(set(spec_a) | set(spec_b)):
        if spec_a.get(name) != spec_b.get(name):
            settings.add_row(name, _cell(spec_a.get(name)), _cell(spec_b.get(name)))
    results = _table("results (selected model)")
    for column in ("metric", f"run {first}", f"run {second}", "difference"):
        results.add_column(column, justify="right")
    for name in RESULT_FIELDS:
        difference = ""
        if isinstance(a[name], int | float) and isinstance(b[name], int | float):
            difference = _cell(b[name] - a[name])
        results.add_row(name, _cell(a[name]), _cell(b[name]), difference)
    curves = _table("validation accuracy % per epoch")
    for column in ("epoch", f"run {first}", f"run {second}"):
        curves.add_column(column, justify="right")
    rows_a = {row["epoch"]: row for row in store.epochs(first)}
    rows_b = {row["epoch"]: row for row in store.epochs(second)}
    for epoch in sorted(set(rows_a) | set(rows_b)):
        cells = [
            _percent(rows[epoch]["val_acc"]) if epoch in rows else "" for rows in (rows_a, rows_b)
        ]
        curves.add_row(str(epoch), *cells)
    return [settings, results, curves]


def export_run(store: RunStore, run_id: int, fmt: str) -> str:
    """The run as text: CSV (one line per epoch, with the run's id, variant and seed) or JSON
    (``{"run": {...settings and result...}, "epochs": [...]}``)."""
    if fmt not in EXPORT_FORMATS:
        raise InputError(f"--format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    run = store.run(run_id)
    epochs = store.epochs(run_id)
    if fmt == "json":
        fields = {
            name: run[name]
            for name in (
                *RESULT_FIELDS,
                "id",
                "key",
                "attempts",
                "created_at",
                "finished_at",
                "error",
            )
        }
        fields["spec"] = json.loads(run["spec_json"])
        rows = [{column: _finite(row[column]) for column in EPOCH_COLUMNS} for row in epochs]
        fields = {name: _finite(value) for name, value in fields.items()}
        return json.dumps({"run": fields, "epochs": rows}, indent=2, allow_nan=False) + "\n"
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(("run_id", "variant", "seed", *EPOCH_COLUMNS))
    for row in epochs:
        writer.writerow((run_id, run["variant"], run["seed"], *(row[c] for c in EPOCH_COLUMNS)))
    return buffer.getvalue()
