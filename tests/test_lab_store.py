"""The run database: schema, WAL, refusals, run identity and reuse, claims, concurrent writers."""

import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from normdrop.lab.config import RunSpec, TrainSettings
from normdrop.lab.store import SCHEMA_VERSION, RunStore, StoreError, owner_id
from normdrop.lab.train import EpochRecord, RunResult


def _spec(variant="bn+dropout", seed=0, **changes) -> RunSpec:
    return RunSpec(TrainSettings(data="wine", **changes), variant, seed, "wine")


def _record(epoch: int) -> EpochRecord:
    return EpochRecord(epoch, 1.0 / epoch, 0.5, 1.1, 0.4, -1.0, 0.0, 1.0, 0.01)


def test_schema_and_wal(tmp_path):
    with RunStore(tmp_path / "runs" / "normdrop.db") as store:
        db = store.connection
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"experiments", "runs", "experiment_runs", "epochs"} <= tables
    with RunStore(tmp_path / "runs" / "normdrop.db", readonly=True) as store:
        assert store.experiments() == []


def test_readonly_never_creates(tmp_path):
    with pytest.raises(StoreError, match="no run database here"):
        RunStore(tmp_path / "nothing.db", readonly=True)
    assert not (tmp_path / "nothing.db").exists()


def test_a_file_that_is_not_sqlite_is_refused(tmp_path):
    path = tmp_path / "notes.db"
    path.write_text("my precious notes " * 100)
    with pytest.raises(StoreError, match="not a normdrop run database"):
        RunStore(path)
    assert path.read_text() == "my precious notes " * 100


@pytest.mark.parametrize("user_version", [0, 1, 7])
def test_someone_elses_database_is_refused_and_left_alone(tmp_path, user_version):
    """Whatever schema version it claims (our 1, a newer 7): only its tables tell."""
    path = tmp_path / "other.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE customers (name TEXT)")
        db.execute("INSERT INTO customers VALUES ('ada')")
        db.execute(f"PRAGMA user_version = {user_version}")
    before = path.read_bytes()
    pattern = (
        rf"not a normdrop run database \(schema version {user_version}, other tables \(customers\)"
    )
    with pytest.raises(StoreError, match=pattern):
        RunStore(path)
    assert path.read_bytes() == before  # not even switched to WAL mode (its header bytes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]
    with sqlite3.connect(path) as db:
        names = {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
        assert names == {"customers"}
    with pytest.raises(StoreError, match="not a normdrop run database") as refused:
        RunStore(path, readonly=True)
    assert "refusing to write" not in str(refused.value)  # a reader writes nothing anyway
    assert path.read_bytes() == before


def test_a_newer_normdrops_database_is_left_as_it_was(tmp_path):
    path = tmp_path / "normdrop.db"
    RunStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode = DELETE")  # as a newer normdrop might leave it
        db.execute("PRAGMA user_version = 99")
    before = path.read_bytes()
    with pytest.raises(StoreError, match="schema version 99 is newer"):
        RunStore(path)
    assert path.read_bytes() == before


def test_a_read_only_folder_is_named_not_called_another_database(tmp_path, monkeypatch):
    path = tmp_path / "runs" / "normdrop.db"
    RunStore(path).close()
    # What SQLite raised, not as root, for a WAL database whose folder it may not write
    # (tests/test_cli_runs.py has the real thing where the tests do not run as root).
    refused = sqlite3.OperationalError("attempt to write a readonly database")
    refused.sqlite_errorcode, refused.sqlite_errorname = 1544, "SQLITE_READONLY_DIRECTORY"

    def configure(self, readonly):
        raise refused

    monkeypatch.setattr(RunStore, "_configure", configure)
    monkeypatch.setattr(os, "access", lambda target, mode: target != path.parent)
    for readonly in (True, False):
        with pytest.raises(StoreError, match=f"the folder {path.parent} must be writable"):
            RunStore(path, readonly=readonly)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "n.db"
    RunStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this normdrop"):
        RunStore(path)


def test_runs_are_keyed_by_what_they_compute(tmp_path):
    with RunStore(tmp_path / "r.db") as store:
        first = store.add_experiment("one", "lab", {}, "cmd")
        second = store.add_experiment("two", "lab", {}, "cmd")
        plain = store.add_runs(first, [_spec("plain"), _spec("bn")])
        # A plain run does not depend on dropout or BN settings: it is the same run.
        reused = store.add_runs(
            second, [_spec("plain", dropout_p=0.2, bn_momentum=0.3), _spec("bn", bn_momentum=0.3)]
        )
        assert reused[0] == plain[0] and reused[1] != plain[1]
        assert _spec("dropout").key() != _spec("dropout", dropout_p=0.1).key()
        assert _spec("plain", seed=1).key() != _spec("plain").key()
        assert _spec().key() != RunSpec(_spec().settings, "bn+dropout", 0, "other data").key()
        listing = store.list_runs("two")
        assert [r["id"] for r in listing] == reused
        assert store.list_runs()[0]["experiments"] == "one,two"
        # Re-adding with a different run list replaces the experiment's membership only.
        store.add_runs(second, [_spec("plain")])
        assert [r["id"] for r in store.list_runs("two")] == [plain[0]]
        assert len(store.list_runs()) == 3
        with pytest.raises(StoreError, match="no experiment named 'three'"):
            store.list_runs("three")


def test_spec_round_trips_through_the_database(tmp_path):
    spec = _spec("bn", seed=3, target=None, bn_type="ghost", virtual_batch_size=8)
    with RunStore(tmp_path / "r.db") as store:
        (run_id,) = store.add_runs(store.add_experiment("e", "lab", {}, "c"), [spec])
        assert RunSpec.from_dict(json.loads(store.run(run_id)["spec_json"])) == spec


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_claims(tmp_path):
    with RunStore(tmp_path / "r.db") as store:
        (run_id,) = store.add_runs(store.add_experiment("e", "lab", {}, "c"), [_spec()])
        host = owner_id().rsplit(":", 1)[0]
        live_other = f"{host}:{os.getppid()}"  # our parent: alive, not us
        assert store.claim(run_id, live_other)
        assert not store.claim(run_id)  # a live process holds it
        assert store.claim(run_id, live_other)  # the holder itself may claim again
        dead = f"{host}:{_dead_pid()}"
        store.connection.execute("UPDATE runs SET owner = ? WHERE id = ?", (dead, run_id))
        assert store.claim(run_id)  # its owner died: taken over
        assert store.run(run_id)["owner"] == owner_id() and store.run(run_id)["attempts"] == 3
        store.release(run_id)
        assert store.run(run_id)["status"] == "pending" and store.run(run_id)["owner"] is None
        assert store.claim(run_id)
        store.release(run_id, error="ValueError: boom")
        assert store.run(run_id)["status"] == "failed"
        assert store.claim(run_id)  # failed runs are retried
        store.finish(run_id, RunResult(1, 1, 0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 1.5))
        assert not store.claim(run_id)  # complete runs are never retrained


def test_a_claim_whose_pid_now_belongs_to_a_newer_process_is_abandoned(tmp_path):
    # PIDs are reused (after a restart, in containers): a live process that started after the
    # claim's heartbeat cannot be its owner, so the lab takes the run over instead of waiting.
    with RunStore(tmp_path / "r.db") as store:
        (run_id,) = store.add_runs(store.add_experiment("e", "lab", {}, "c"), [_spec()])
        host = owner_id().rsplit(":", 1)[0]
        newer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            claimed = f"{host}:{newer.pid}"
            update = "UPDATE runs SET status = 'running', owner = ?, heartbeat = ? WHERE id = ?"
            store.connection.execute(update, (claimed, 1000.0, run_id))  # a 1970 heartbeat
            assert store.claim(run_id)
            store.connection.execute(update, (claimed, time.time(), run_id))  # a fresh one
            assert not store.claim(run_id)  # the process started before it: still the owner
        finally:
            newer.kill()
            newer.wait()


def test_epochs_and_checkpoints_move_together(tmp_path):
    with RunStore(tmp_path / "r.db") as store:
        (run_id,) = store.add_runs(store.add_experiment("e", "lab", {}, "c"), [_spec()])
        assert store.claim(run_id)
        assert store.load_checkpoint(run_id) is None
        for epoch in (1, 2):
            store.save_epoch(run_id, _record(epoch), f"state after {epoch}".encode())
        assert store.load_checkpoint(run_id) == b"state after 2"
        assert store.checkpoint_path(run_id) == tmp_path / "checkpoints" / f"run-{run_id}.pt"
        assert [row["epoch"] for row in store.epochs(run_id)] == [1, 2]
        assert store.epochs(run_id)[0]["train_loss"] == 1.0
        assert store.epochs_done([run_id]) == {run_id: 2}
        # Resuming rewrites the rows from the checkpoint's history: a row written after it
        # goes, one the checkpoint has but the database missed comes back.
        store.reset_epochs(run_id, [_record(1), _record(2), _record(3)][:1])
        assert [row["epoch"] for row in store.epochs(run_id)] == [1]
        store.reset_epochs(run_id, [_record(1), _record(2), _record(3)])
        assert [row["epoch"] for row in store.epochs(run_id)] == [1, 2, 3]
        store.finish(run_id, RunResult(2, 2, 0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 1.5))
        assert not store.checkpoint_path(run_id).exists()
        assert not list((tmp_path / "checkpoints").iterdir())
        row = store.run(run_id)
        assert (row["status"], row["best_epoch"], row["test_acc"]) == ("complete", 2, 0.7)
        with pytest.raises(StoreError, match="no run with id 99"):
            store.run(99)


def _writer(path: str, worker: int, runs: int, epochs: int) -> None:
    with RunStore(path) as store:
        experiment = store.add_experiment(f"exp{worker}", "lab", {}, "c")
        ids = store.add_runs(experiment, [_spec(seed=100 * worker + i) for i in range(runs)])
        for run_id in ids:
            assert store.claim(run_id)
            for epoch in range(1, epochs + 1):
                store.save_epoch(run_id, _record(epoch), os.urandom(2048))
            store.finish(run_id, RunResult(1, epochs, 0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 1.0))


def test_concurrent_writers_do_not_corrupt(tmp_path):
    path = str(tmp_path / "shared.db")
    RunStore(path).close()
    # fork: the writers use sqlite only, and start in milliseconds instead of importing torch.
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_writer, args=(path, w, 6, 30)) for w in range(3)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(120)
        assert process.exitcode == 0
    with RunStore(path) as store:
        db = store.connection
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*) FROM runs WHERE status = 'complete'").fetchone()[0] == 18
        assert db.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] == 18 * 30
    assert not list((tmp_path / "checkpoints").iterdir())


def test_a_lock_conflict_reported_at_once_is_waited_out(tmp_path, monkeypatch):
    """SQLite reports some lock conflicts at once, without its busy handler (two ``normdrop
    lab`` commands started together on one new folder met one: "not a normdrop run database
    (database is locked)"); opening waits them out like any other lock."""
    original = RunStore._configure
    conflicts = []

    def conflicting(self, readonly):
        if len(conflicts) < 3:
            error = sqlite3.OperationalError("database is locked")
            error.sqlite_errorcode = sqlite3.SQLITE_BUSY
            conflicts.append(error)
            raise error
        return original(self, readonly)

    monkeypatch.setattr(RunStore, "_configure", conflicting)
    with RunStore(tmp_path / "normdrop.db") as store:
        assert store.connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert len(conflicts) == 3


def test_a_database_locked_past_the_timeout_says_so(tmp_path, monkeypatch):
    import normdrop.lab.store as store_module

    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_MS", 300)
    path = tmp_path / "normdrop.db"
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("PRAGMA journal_mode = WAL")
    other.execute("BEGIN IMMEDIATE")  # holds the write lock the schema's creation needs
    try:
        with pytest.raises(StoreError, match="locked by another process"):
            RunStore(path)
    finally:
        other.execute("ROLLBACK")
        other.close()
    RunStore(path).close()  # free again: it opens
