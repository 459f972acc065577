"""Independent training runs in worker processes.

Every task seeds its own generators (see :func:`normdrop.repro.common.seeded`), so a task's
result depends on its arguments only: the same seeds give the same numbers with one process or
several, in any order. Workers are spawned (never forked: a fork of a process whose OpenMP pool
is running can hang) and inherit the parent's torch thread count and normdrop backend.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import torch

from normdrop.backend import get_backend, set_backend


def _init_worker(threads: int, backend: str) -> None:
    torch.set_num_threads(threads)
    set_backend(backend)


def run_tasks(calls: Sequence[tuple[Callable[..., Any], tuple]], jobs: int = 1) -> list[Any]:
    """``[function(*args) for function, args in calls]``, in ``jobs`` processes if ``jobs > 1``.

    Each ``function`` must be a module-level function (workers import it by name). Put the
    longest calls first: they are handed out in order.
    """
    if jobs <= 1 or len(calls) <= 1:
        return [function(*args) for function, args in calls]
    context = multiprocessing.get_context("spawn")
    workers = min(jobs, len(calls))
    settings = (torch.get_num_threads(), get_backend())
    with ProcessPoolExecutor(workers, context, _init_worker, settings) as pool:
        futures = [pool.submit(function, *args) for function, args in calls]
        return [future.result() for future in futures]
