"""The run database: SQLite in WAL mode, one row per epoch per run (schema in docs/lab.md).

Safety rules, and why:

- WAL journal: readers (``normdrop runs``, a lab's progress bar) never block the writers, and a
  crash leaves the database consistent. ``synchronous=NORMAL`` may lose the last commits on a
  power cut, never corrupt the file; a process being killed loses nothing committed.
- Every write is one short ``BEGIN IMMEDIATE`` transaction, so concurrent labs queue for the
  write lock (waiting up to ``busy_timeout``) instead of failing or deadlocking.
- Checkpoints (everything needed to continue a run after its last epoch) are files beside the
  database, ``checkpoints/run-<id>.pt``: a few megabytes a epoch cost ~3 ms as a file and ~45 ms
  as a SQLite blob (WAL checkpoints copy and sync them). The file of epoch k is in place (written
  aside, then renamed) before epoch k's row is committed; resuming rewrites the run's epoch rows
  from the checkpoint's own history, so rows and checkpoint always agree.
- A run is claimed before training (``status='running'``, ``owner=host:pid``); another lab skips
  it while that process lives and takes it over, from its checkpoint, once it is dead.
- Nothing is ever deleted except a finished run's checkpoint file; a database that is not ours
  (other tables, or a newer schema) is refused rather than written to.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict
from pathlib import Path

from normdrop.errors import InputError
from normdrop.lab.config import CHECKPOINTS, RunSpec
from normdrop.lab.files import replace_atomically
from normdrop.lab.train import EpochRecord, RunResult

__all__ = ["RunStore", "StoreError", "owner_id", "read_only_rows"]

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 120_000
STALE_SECONDS = 1800  # another host's claim without a heartbeat for this long is abandoned

SCHEMA = """
CREATE TABLE IF NOT EXISTS experiments (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    kind        TEXT NOT NULL,
    config_json TEXT NOT NULL,
    command     TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    id            INTEGER PRIMARY KEY,
    key           TEXT NOT NULL UNIQUE,
    spec_json     TEXT NOT NULL,
    data          TEXT NOT NULL,
    model         TEXT NOT NULL,
    variant       TEXT NOT NULL,
    seed          INTEGER NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('pending', 'running', 'complete', 'failed')),
    owner         TEXT,
    heartbeat     REAL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    error         TEXT,
    created_at    TEXT NOT NULL,
    finished_at   TEXT,
    best_epoch    INTEGER,
    epochs_run    INTEGER,
    train_loss    REAL,
    train_acc     REAL,
    val_loss      REAL,
    val_acc       REAL,
    test_loss     REAL,
    test_acc      REAL,
    seconds       REAL
);
CREATE TABLE IF NOT EXISTS experiment_runs (
    experiment_id INTEGER NOT NULL REFERENCES experiments(id),
    run_id        INTEGER NOT NULL REFERENCES runs(id),
    PRIMARY KEY (experiment_id, run_id)
);
CREATE TABLE IF NOT EXISTS epochs (
    run_id      INTEGER NOT NULL REFERENCES runs(id),
    epoch       INTEGER NOT NULL,
    train_loss  REAL,
    train_acc   REAL,
    val_loss    REAL,
    val_acc     REAL,
    preact_p15  REAL,
    preact_p50  REAL,
    preact_p85  REAL,
    seconds     REAL,
    PRIMARY KEY (run_id, epoch)
);
"""
_TABLES = {"experiments", "runs", "experiment_runs", "epochs"}


class StoreError(InputError):
    """The database is missing, not a normdrop run database, or asked for something absent."""


def owner_id() -> str:
    """``host:pid`` of this process: who holds a claimed run."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child not yet reaped by its parent is a zombie: dead for our purpose
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _started_after(pid: int, when: float) -> bool:
    """Whether process ``pid`` started after the time ``when`` (so it cannot be the process
    that wrote a heartbeat then: its pid was reused, as after a restart or in a container).
    False where /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime
        with open("/proc/stat") as system:
            boot = next(int(line.split()[1]) for line in system if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK") > when + 1.0  # 1 s: btime's rounding
    except (OSError, ValueError, IndexError, StopIteration):
        return False


def owner_alive(owner: str | None, heartbeat: float | None) -> bool:
    """Whether the process that claimed a run may still be training it."""
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        reused = heartbeat is not None and _started_after(int(pid), heartbeat)
        return _pid_alive(int(pid)) and not reused
    return heartbeat is not None and time.time() - heartbeat < STALE_SECONDS


def read_only_rows(path: Path, sql: str) -> list[tuple]:
    """The rows ``sql`` selects from the SQLite file ``path``, opened read-only: the file is
    left byte for byte as it was (no journal mode switched, no table created). Raises
    ``sqlite3.Error`` for a file that is not SQLite or lacks the tables."""
    uri = f"{path.resolve().as_uri()}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True)) as db:
        return db.execute(sql).fetchall()


class RunStore:
    """A connection to ``runs/normdrop.db``; ``readonly`` never creates or changes the file."""

    def __init__(self, path: Path | str, readonly: bool = False) -> None:
        self.path = Path(path)
        if readonly and not self.path.is_file():
            raise StoreError(f"{self.path}: no run database here (run `normdrop lab` first)")
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = "?mode=ro" if readonly else ""
        uri = f"file:{urllib.parse.quote(str(self.path.resolve()))}{mode}"
        try:
            self.connection = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=60)
        except sqlite3.OperationalError as error:
            raise self._open_error(error, readonly) from None
        self.connection.row_factory = sqlite3.Row
        try:
            self._configure_when_free(readonly)
        except sqlite3.DatabaseError as error:
            self.connection.close()
            raise self._open_error(error, readonly) from None
        except BaseException:
            self.connection.close()
            raise

    def _configure_when_free(self, readonly: bool) -> None:
        """:meth:`_configure`, retried while another process holds the lock it needs. SQLite
        reports some lock conflicts at once, without its busy handler (switching a new file
        to WAL while another connection opens it, reading the WAL index while another
        recovers it): two ``normdrop lab`` commands started together on one folder met them."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        pause = 0.01
        while True:
            try:
                return self._configure(readonly)
            except sqlite3.OperationalError as error:
                code = getattr(error, "sqlite_errorcode", 0) & 0xFF
                if code not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                    raise
                if time.monotonic() + pause > deadline:
                    raise StoreError(
                        f"{self.path}: the run database stayed locked by another process "
                        f"({error}); try again when it is done"
                    ) from None
                time.sleep(pause)
                pause = min(2 * pause, 0.5)

    def _open_error(self, error: sqlite3.Error, readonly: bool) -> StoreError:
        """Why the database could not be opened. SQLite says "readonly" or "unable to open"
        for a folder or file it may not write; only other errors mean the file is not ours."""
        code = getattr(error, "sqlite_errorcode", 0) & 0xFF
        if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN):
            folder = self.path.resolve().parent
            if not os.access(folder, os.W_OK):
                # WAL mode keeps NAME-wal and NAME-shm beside the database, even for readers.
                return StoreError(
                    f"{self.path}: the folder {folder} must be writable (SQLite's WAL mode "
                    f"keeps {self.path.name}-wal and {self.path.name}-shm beside the database, "
                    "even to read it)"
                )
            if not readonly and self.path.exists() and not os.access(self.path, os.W_OK):
                return StoreError(f"{self.path}: the file must be writable ({error})")
            return StoreError(f"{self.path}: cannot open the run database ({error})")
        return StoreError(f"{self.path}: not a normdrop run database ({error})")

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _configure(self, readonly: bool) -> None:
        self.connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        # Every check before WAL mode, which rewrites the file's header: a file that is not
        # ours, or is a newer normdrop's, is left byte for byte as it was.
        self._refuse_foreign(readonly)
        version = self.connection.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {version} is newer than this normdrop's "
                f"({SCHEMA_VERSION}); upgrade normdrop to read it"
            )
        if not readonly:
            self.connection.execute("PRAGMA journal_mode = WAL")
            self.connection.execute("PRAGMA synchronous = NORMAL")
        self.connection.execute("PRAGMA foreign_keys = ON")
        if version == SCHEMA_VERSION:
            return
        if readonly:
            raise StoreError(f"{self.path}: not a normdrop run database (no schema)")
        with self._write() as db:
            self._refuse_foreign(readonly)  # again: another process may have written it
            # executescript would commit the open transaction first; run statement by statement.
            for statement in filter(str.strip, SCHEMA.split(";")):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _refuse_foreign(self, readonly: bool) -> None:
        """Raise if the file is an SQLite database that is not (and does not start as) ours:
        without a schema version, other tables than ours; with one (ours set it with the
        tables), no ``experiments`` table."""
        version = self.connection.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in self.connection.execute("SELECT name FROM sqlite_master")}
        others = tables - _TABLES
        if (version == 0 and others) or (version != 0 and "experiments" not in tables):
            described = f"other tables ({', '.join(sorted(others))})" if others else "no run tables"
            refusing = "" if readonly else "; refusing to write a run database into it"
            raise StoreError(
                f"{self.path}: not a normdrop run database (schema version {version}, "
                f"{described}){refusing}"
            )

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        self.connection.execute("BEGIN IMMEDIATE")
        try:
            yield self.connection
            self.connection.execute("COMMIT")  # may fail too (busy): never leave it open
        except BaseException:
            if self.connection.in_transaction:
                self.connection.execute("ROLLBACK")
            raise

    # --- writing ----------------------------------------------------------------------------

    def add_experiment(self, name: str, kind: str, config: dict, command: str) -> int:
        """Create or update an experiment by name; returns its id."""
        now = _now()
        with self._write() as db:
            db.execute(
                "INSERT INTO experiments (name, kind, config_json, command, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET kind = excluded.kind,"
                " config_json = excluded.config_json, command = excluded.command,"
                " updated_at = excluded.updated_at",
                (name, kind, json.dumps(config, sort_keys=True), command, now, now),
            )
            return db.execute("SELECT id FROM experiments WHERE name = ?", (name,)).fetchone()[0]

    def add_runs(self, experiment_id: int, specs: Iterable[RunSpec]) -> list[int]:
        """Ids of the runs for ``specs``, creating the missing ones (existing ones are reused).

        The experiment's run list becomes exactly these runs.
        """
        ids = []
        with self._write() as db:
            db.execute("DELETE FROM experiment_runs WHERE experiment_id = ?", (experiment_id,))
            for spec in specs:
                settings = spec.settings
                db.execute(
                    "INSERT OR IGNORE INTO runs (key, spec_json, data, model, variant, seed,"
                    " status, created_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
                    (
                        spec.key(),
                        json.dumps(spec.to_dict(), sort_keys=True),
                        settings.data,
                        settings.model,
                        spec.variant,
                        spec.seed,
                        _now(),
                    ),
                )
                run_id = db.execute("SELECT id FROM runs WHERE key = ?", (spec.key(),)).fetchone()
                db.execute(
                    "INSERT OR IGNORE INTO experiment_runs VALUES (?, ?)",
                    (experiment_id, run_id[0]),
                )
                ids.append(run_id[0])
        return ids

    def claim(self, run_id: int, owner: str | None = None) -> bool:
        """Take a run to train it; False if it is complete or another live process has it."""
        owner = owner or owner_id()
        with self._write() as db:
            row = db.execute(
                "SELECT status, owner, heartbeat FROM runs WHERE id = ?", (run_id,)
            ).fetchone()
            if row is None or row["status"] == "complete":
                return False
            taken = row["status"] == "running" and row["owner"] != owner
            if taken and owner_alive(row["owner"], row["heartbeat"]):
                return False
            db.execute(
                "UPDATE runs SET status = 'running', owner = ?, heartbeat = ?, error = NULL,"
                " attempts = attempts + 1 WHERE id = ?",
                (owner, time.time(), run_id),
            )
            return True

    def checkpoint_path(self, run_id: int) -> Path:
        return self.path.parent / CHECKPOINTS / f"run-{run_id}.pt"

    def load_checkpoint(self, run_id: int) -> bytes | None:
        """The checkpoint of the run's last completed epoch, if it has one."""
        try:
            return self.checkpoint_path(run_id).read_bytes()
        except FileNotFoundError:
            return None

    def reset_epochs(self, run_id: int, history: Iterable[EpochRecord]) -> None:
        """Make the run's epoch rows exactly ``history`` (the checkpoint's, when resuming)."""
        with self._write() as db:
            db.execute("DELETE FROM epochs WHERE run_id = ?", (run_id,))
            for record in history:
                self._insert_epoch(db, run_id, record)

    @staticmethod
    def _insert_epoch(db: sqlite3.Connection, run_id: int, record: EpochRecord) -> None:
        values = asdict(record)
        db.execute(
            f"INSERT OR REPLACE INTO epochs (run_id, {', '.join(values)})"
            f" VALUES (?, {', '.join('?' * len(values))})",
            (run_id, *values.values()),
        )

    def save_epoch(self, run_id: int, record: EpochRecord, checkpoint: bytes) -> None:
        """Put the checkpoint after an epoch in place, then commit the epoch's row."""
        path = self.checkpoint_path(run_id)
        path.parent.mkdir(exist_ok=True)
        replace_atomically(path, lambda temporary: temporary.write_bytes(checkpoint))
        with self._write() as db:
            self._insert_epoch(db, run_id, record)
            db.execute("UPDATE runs SET heartbeat = ? WHERE id = ?", (time.time(), run_id))

    def finish(self, run_id: int, result: RunResult) -> None:
        """Mark a run complete with its selected model's metrics; its checkpoint goes."""
        values = asdict(result)
        assignments = ", ".join(f"{name} = ?" for name in values)
        with self._write() as db:
            db.execute(
                f"UPDATE runs SET {assignments}, status = 'complete', owner = NULL,"
                " finished_at = ? WHERE id = ?",
                (*values.values(), _now(), run_id),
            )
        self.checkpoint_path(run_id).unlink(missing_ok=True)

    def release(self, run_id: int, error: str | None = None) -> None:
        """Give a claimed run back: ``pending`` (interrupted) or ``failed`` with the error."""
        status = "failed" if error else "pending"
        with self._write() as db:
            db.execute(
                "UPDATE runs SET status = ?, owner = NULL, error = ? WHERE id = ? AND owner = ?"
                " AND status = 'running'",
                (status, error, run_id, owner_id()),
            )

    # --- reading ----------------------------------------------------------------------------

    def _rows(self, sql: str, parameters: Iterable = ()) -> list[dict]:
        return [dict(row) for row in self.connection.execute(sql, tuple(parameters))]

    def runs(self, run_ids: Iterable[int]) -> list[dict]:
        """Run rows in the order of ``run_ids``."""
        ids = list(run_ids)
        marks = ", ".join("?" * len(ids))
        found = {
            row["id"]: row for row in self._rows(f"SELECT * FROM runs WHERE id IN ({marks})", ids)
        }
        return [found[i] for i in ids if i in found]

    def run(self, run_id: int) -> dict:
        rows = self.runs([run_id])
        if not rows:
            raise StoreError(
                f"{self.path}: no run with id {run_id} (`normdrop runs list` shows them)"
            )
        return rows[0]

    def epochs(self, run_id: int) -> list[dict]:
        return self._rows("SELECT * FROM epochs WHERE run_id = ? ORDER BY epoch", (run_id,))

    def epochs_done(self, run_ids: Iterable[int]) -> dict[int, int]:
        """Epoch rows per run (for progress bars)."""
        ids = list(run_ids)
        marks = ", ".join("?" * len(ids))
        rows = self._rows(
            f"SELECT run_id, COUNT(*) AS n FROM epochs WHERE run_id IN ({marks}) GROUP BY run_id",
            ids,
        )
        return {row["run_id"]: row["n"] for row in rows}

    def experiment(self, name: str) -> dict:
        rows = self._rows("SELECT * FROM experiments WHERE name = ?", (name,))
        if not rows:
            raise StoreError(f"{self.path}: no experiment named {name!r}")
        return rows[0]

    def has_experiment(self, name: str) -> bool:
        return bool(self._rows("SELECT 1 FROM experiments WHERE name = ?", (name,)))

    def experiments(self) -> list[dict]:
        return self._rows("SELECT * FROM experiments ORDER BY id")

    def list_runs(self, experiment: str | None = None) -> list[dict]:
        """Every run (or an experiment's), with the experiments it belongs to."""
        sql = (
            "SELECT runs.*, group_concat(experiments.name, ',') AS experiments FROM runs"
            " LEFT JOIN experiment_runs ON experiment_runs.run_id = runs.id"
            " LEFT JOIN experiments ON experiments.id = experiment_runs.experiment_id"
        )
        if experiment is None:
            return self._rows(sql + " GROUP BY runs.id ORDER BY runs.id")
        self.experiment(experiment)
        return self._rows(
            sql + " WHERE runs.id IN (SELECT run_id FROM experiment_runs JOIN experiments"
            " ON experiments.id = experiment_id WHERE experiments.name = ?)"
            " GROUP BY runs.id ORDER BY runs.id",
            (experiment,),
        )
