"""Training an experiment's runs: resumably, in parallel processes when that is faster.

Each run is trained by :func:`train_stored_run`, which claims it in the database, continues from
its last checkpoint, commits every epoch with a new checkpoint, and marks it complete. Whatever
stops a process, the database keeps every finished epoch, and the same call later resumes.

Parallelism is across runs, one process and one intra-op thread each (a CPU matrix product's
rounding depends on its thread count, so a fixed count keeps results identical whatever runs
where). Whether processes pay off is decided by measurement: the first run trains in this
process and is timed; the rest go to ``min(idle cores, runs)`` spawned workers only if the
estimated time, including the workers' start-up (measured at about 2.5 s on 2 cores, importing
torch), beats training them here one after the other. Idle cores are the cores less the load
average of other processes: measured on a 2-core machine already running 6 busy processes, the
default lab took 1:48 in one process and 2:17 with two workers. ``workers=N`` overrides.

Runs another live process has claimed (a second lab on the same database) are waited for, and
taken over if that process dies.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Sequence

from normdrop._cpus import usable_cpus
from normdrop.errors import InputError
from normdrop.lab.config import RunSpec
from normdrop.lab.data import prepare
from normdrop.lab.store import RunStore, owner_alive
from normdrop.lab.train import checkpoint_history, train_run

__all__ = ["choose_workers", "execute", "train_stored_run"]

WORKER_START_SECONDS = 2.5
PARALLEL_SLOWDOWN = 1.15  # two processes share memory bandwidth: each is a little slower
POLL_SECONDS = 0.2

Tick = Callable[[], None]


def _splits_for(spec: RunSpec, cache_dir: str | None):
    s = spec.settings
    splits = prepare(s.data, s.target, s.val_fraction, s.test_fraction, s.split_seed, cache_dir)
    if splits.fingerprint != spec.data_fingerprint:
        raise InputError(
            f"--data {s.data}: the data changed since this experiment started "
            f"({splits.fingerprint} != {spec.data_fingerprint}); rerun the lab to start anew"
        )
    return splits


def train_stored_run(
    db_path: str, run_id: int, cache_dir: str | None = None, tick: Tick | None = None
) -> str:
    """Train one stored run to completion: ``"done"``, ``"busy"`` (claimed by a live process)
    or ``"failed"`` (the error is stored with the run). Interruptions propagate, leaving the
    run ``pending`` with its last epoch's checkpoint."""
    with RunStore(db_path) as store:
        # The claim inside the try: an interruption that lands just after it commits still
        # releases the run (release only touches a run this process holds).
        try:
            if not store.claim(run_id):
                return "busy"
            spec = RunSpec.from_dict(json.loads(store.run(run_id)["spec_json"]))
            splits = _splits_for(spec, cache_dir)

            def save(record, state) -> None:
                store.save_epoch(run_id, record, state.checkpoint())
                if tick is not None:
                    tick()

            checkpoint = store.load_checkpoint(run_id)
            history = checkpoint_history(checkpoint)
            if history is None:  # unreadable (a power cut mid-write): start the run over
                checkpoint, history = None, []
            store.reset_epochs(run_id, history)
            result = train_run(spec, splits, checkpoint=checkpoint, on_epoch=save)
            store.finish(run_id, result)
            return "done"
        except Exception as error:  # this run failed; the experiment goes on with the others
            store.release(run_id, error=f"{type(error).__name__}: {error}")
            return "failed"
        except BaseException:
            store.release(run_id)
            raise


def idle_cpus() -> int:
    """Cores not busy with other work: usable cores less the 1-minute load average beyond this
    process's own 1, at least 1. (On a shared machine, extra workers only queue.)"""
    cpus = usable_cpus()
    try:
        others = max(0.0, os.getloadavg()[0] - 1.0)
    except (AttributeError, OSError):  # no load average on this platform
        return cpus
    return max(1, min(cpus, round(cpus - others)))


def choose_workers(run_seconds: float, remaining: int, cpus: int) -> int:
    """Worker processes for ``remaining`` runs of about ``run_seconds`` each (1: stay here)."""
    workers = min(cpus, remaining)
    if workers < 2:
        return 1
    sequential = remaining * run_seconds
    parallel = (
        WORKER_START_SECONDS + math.ceil(remaining / workers) * run_seconds * PARALLEL_SLOWDOWN
    )
    return workers if parallel < sequential else 1


def _raise_exit(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _worker(db_path: str, run_ids: list[int], cache_dir: str | None) -> None:
    """A worker process: claim and train every run it can; the database is the work queue."""
    # The parent handles Ctrl-C and stops workers with SIGTERM; turning SIGTERM into SystemExit
    # lets a worker release its run (status 'pending') on the way out.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _raise_exit)
    try:
        for run_id in run_ids:
            train_stored_run(db_path, run_id, cache_dir)  # "busy": another worker has it
    except SystemExit as stop:
        # The run is released and the database closed: skip the interpreter's teardown
        # (seconds with torch loaded), so an interrupted lab stops promptly.
        os._exit(stop.code if isinstance(stop.code, int) else 1)


def _in_processes(db_path, run_ids, cache_dir, workers, tick: Tick) -> None:
    """Train ``run_ids`` in ``workers`` spawned processes; on an interruption, stop them all.

    No multiprocessing.Pool: its terminate() can wait forever on a worker blocked reading the
    task queue. Claims in the database hand each run to exactly one worker.
    """
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_worker, args=(db_path, list(run_ids), cache_dir), daemon=True)
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    try:
        while any(process.is_alive() for process in processes):
            time.sleep(POLL_SECONDS)
            tick()
    except BaseException:
        for process in processes:
            process.terminate()  # SIGTERM: each worker releases its run and exits
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
        raise
    finally:
        for process in processes:
            process.join()


def _wait_for_others(db_path, run_ids, cache_dir, tick: Tick) -> None:
    """Wait for runs another live process is training; take over those whose owner died."""
    waiting = list(run_ids)
    with RunStore(db_path) as store:
        while waiting:
            time.sleep(POLL_SECONDS)
            tick()
            for run_id in list(waiting):
                if _settled(store.run(run_id), db_path, cache_dir, tick):
                    waiting.remove(run_id)


def _settled(row: dict, db_path, cache_dir, tick: Tick) -> bool:
    """Whether a run another process held is done with: finished, or taken over and trained."""
    if row["status"] in ("complete", "failed"):
        return True
    if owner_alive(row["owner"], row["heartbeat"]):
        return False
    return train_stored_run(db_path, row["id"], cache_dir, tick) != "busy"


def execute(
    db_path: str,
    run_ids: Sequence[int],
    *,
    workers: int | None = None,
    epochs: int = 1,
    cache_dir: str | None = None,
    tick: Tick | None = None,
) -> int:
    """Train every run of ``run_ids`` that is not complete; returns the worker count used.

    ``epochs`` (per run) scales the measured time of the first run's epochs into a run's time:
    the first run may be a resumed one with few epochs left.
    """
    tick = tick or (lambda: None)
    trained = 0

    def counting_tick() -> None:
        nonlocal trained
        trained += 1
        tick()

    with RunStore(db_path) as store:
        todo = [row["id"] for row in store.runs(run_ids) if row["status"] != "complete"]
    busy: list[int] = []
    used = workers or 1
    if todo and workers is None:
        first = todo.pop(0)
        started = time.perf_counter()
        if train_stored_run(db_path, first, cache_dir, counting_tick) == "busy":
            busy.append(first)
        per_epoch = (time.perf_counter() - started) / max(trained, 1)
        used = choose_workers(per_epoch * epochs, len(todo), idle_cpus())
    if used > 1 and len(todo) > 1:
        _in_processes(db_path, todo, cache_dir, min(used, len(todo)), tick)
        with RunStore(db_path) as store:  # what the workers could not have: another lab's
            busy += [row["id"] for row in store.runs(todo) if row["status"] != "complete"]
    else:
        for run_id in todo:
            if train_stored_run(db_path, run_id, cache_dir, tick) == "busy":
                busy.append(run_id)
    _wait_for_others(db_path, busy, cache_dir, tick)
    tick()
    return used


def interrupt_as_keyboard() -> _Interrupts:
    """Within the block, SIGTERM behaves like Ctrl-C, and the returned object's ``seen`` says
    whether either arrived: a library may turn the KeyboardInterrupt raised inside it into
    another error (SQLAlchemy, interrupted in a commit, raises AssertionError). Main thread
    only; elsewhere the signals are left alone and ``seen`` stays False."""
    import threading

    return _Interrupts(threading.current_thread() is threading.main_thread())


class _Interrupts:
    """``seen``: whether an interruption arrived (set by the handlers, or by code that caught
    a KeyboardInterrupt they did not raise)."""

    def __init__(self, handle: bool) -> None:
        self.handle, self.seen = handle, False

    def __enter__(self) -> _Interrupts:
        self.previous = {}
        if self.handle:
            self.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handler)
            # Ctrl-C as Python's own handler has it (not where it is ignored or handled)
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)
