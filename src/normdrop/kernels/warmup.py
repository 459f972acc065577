"""Compile every kernel into numba's cache before the first training step: ``normdrop warmup``.

Cold, the first training step that uses a kernel compiles it: seconds per kernel, 10-20 s for
a program's first steps on a 2-core machine (BENCHMARKS.md, first-call latency); from numba's
cache the same kernels load in milliseconds. :func:`warm` compiles them all ahead (the forward
and backward kernels of the three layouts, and dropout, for each dtype asked for), spread over
helper processes, one per usable CPU, so that an image build, a CI job or a cluster's shared
``NUMBA_CACHE_DIR`` pays the compilation once, outside training. The helpers import the
kernels without torch, as the compile-ahead helper does (:mod:`normdrop.kernels.compile_ahead`);
each prints one line per kernel, ``KIND LAYOUT DTYPE SECONDS``. One dtype at a time: numba
keeps one cache index per function (the kernels' and their compiled helpers') and rewrites it
without a lock, so two processes adding different signatures of one function at once could
lose an entry or point it at the other's code; the same signature twice writes the same.

numba uses a cache directory only where it can write: a cache warmed at an image build must
stay writable for the user who trains, or numba quietly compiles again elsewhere.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import numpy as np
from numba import config
from numba.core.caching import UserProvidedCacheLocator

from normdrop._cpus import usable_cpus
from normdrop.kernels import compile_ahead, cpu

__all__ = ["DTYPES", "TIMEOUT_S", "Kernel", "cache_path", "kernels", "warm"]

DTYPES = ("float32", "float64")
_LAYOUTS = (cpu.CHANNELS, cpu.PLANAR, cpu.ROWS)

_WORKER = (
    compile_ahead.HELPER_PRELUDE
    + """
from normdrop.kernels import warmup
sys.exit(warmup.main(sys.argv[2:]))
"""
)


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One compiled kernel: ``kind`` is ``forward``, ``backward`` or ``dropout`` (whose
    ``layout`` is ``flat``)."""

    kind: str
    layout: str
    dtype: str

    def dispatcher_and_signature(self):
        dtype = np.dtype(self.dtype)
        if self.kind == "dropout":
            return cpu.dropout_flat, cpu.dropout_signature(dtype)
        if self.kind == "forward":
            return cpu.forward_kernel(self.layout), cpu.forward_signature(dtype)
        return cpu.backward_kernel(self.layout), cpu.backward_signature(dtype)

    def cached(self) -> bool:
        """Compiled in this process or in numba's cache for the current source."""
        return compile_ahead._cached(*self.dispatcher_and_signature())

    def compile(self) -> None:
        dispatcher, signature = self.dispatcher_and_signature()
        dispatcher.compile(signature)


def kernels(dtypes: tuple[str, ...] = DTYPES) -> list[Kernel]:
    """Every kernel for ``dtypes`` (numpy dtype names: ``float32``, ``float64``)."""
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"dtypes: each must be one of {DTYPES}, got {dtype!r}")
    dtypes = tuple(dict.fromkeys(dtypes))  # each once
    pairs = [
        Kernel(kind, layout, dtype)
        for dtype in dtypes
        for layout in _LAYOUTS
        for kind in ("forward", "backward")
    ]
    return pairs + [Kernel("dropout", "flat", dtype) for dtype in dtypes]


def _cache():
    """numba's cache object of the kernels (they share one source file, so one directory)."""
    return cpu.forward_kernel(cpu.PLANAR)._cache


def cache_path() -> str:
    """The directory numba writes these kernels' cache to (``NUMBA_CACHE_DIR`` when set)."""
    return _cache()._cache_path


def warm(
    dtypes: tuple[str, ...] = DTYPES, processes: int | None = None
) -> list[tuple[Kernel, float | None]]:
    """Compile into numba's cache every kernel of ``dtypes`` not there yet; returns each kernel
    with its compile seconds (None: it was cached). ``processes``: helpers to spread them over
    (default: the usable CPUs). Raises ``OSError`` when the cache directory is not writable and
    ``RuntimeError`` when a helper fails (with its error output)."""
    wanted = kernels(dtypes)
    path = cache_path()
    chosen = config.CACHE_DIR
    if chosen and not isinstance(_cache()._impl.locator, UserProvidedCacheLocator):
        # numba falls back to another directory when NUMBA_CACHE_DIR cannot be used
        raise OSError(
            f"NUMBA_CACHE_DIR={chosen} is not a writable directory (numba would cache in "
            f"{path} instead): fix or unset it"
        )
    if not os.access(path, os.W_OK):
        raise OSError(f"numba's cache directory {path} is not writable: set NUMBA_CACHE_DIR")
    todo = [kernel for kernel in wanted if not kernel.cached()]
    seconds = dict.fromkeys(wanted)
    for dtype in dict.fromkeys(kernel.dtype for kernel in todo):
        batch = [kernel for kernel in todo if kernel.dtype == dtype]
        seconds.update(_compile_in_helpers(batch, processes or usable_cpus()))
    return list(seconds.items())


# A helper compiles a few kernels of about 10 s each on a slow 2-core machine: one that has not
# finished by then is stuck.
TIMEOUT_S = 900.0


def _compile_in_helpers(batch: list[Kernel], processes: int) -> dict[Kernel, float]:
    """Compile ``batch`` (one dtype) over up to ``processes`` helpers; their timings."""
    helpers: list[subprocess.Popen] = []
    seconds: dict[Kernel, float] = {}
    errors = []
    try:
        shares = _shares(batch, max(1, min(processes, len(batch))))
        helpers += [_launch(share) for share in shares if share]
        for helper in helpers:
            try:
                output, error = helper.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                errors.append(f"a helper was still compiling after {TIMEOUT_S:.0f} s")
                continue
            if helper.returncode != 0:
                errors.append(error.strip() or f"exit status {helper.returncode}")
                continue
            seconds.update(_parse(output))
    finally:  # interrupted or stuck: stop the helpers (what they finished stays in the cache)
        for helper in helpers:
            if helper.poll() is None:
                helper.kill()
                helper.wait()
    if errors:
        raise RuntimeError("a warm-up helper failed:\n" + "\n".join(errors))
    return seconds


def _parse(output: str) -> dict[Kernel, float]:
    """A helper's ``KIND LAYOUT DTYPE SECONDS`` lines (anything else it printed is skipped)."""
    seconds = {}
    for line in output.splitlines():
        fields = line.split()
        if len(fields) != 4:
            continue
        try:
            seconds[Kernel(*fields[:3])] = float(fields[3])
        except ValueError:
            continue
    return seconds


# Relative compile times (BENCHMARKS.md, first-call latency; the rows kernels take longest).
_COST = {cpu.ROWS: 3.0, cpu.PLANAR: 2.0, cpu.CHANNELS: 1.0, "flat": 0.3}


def _shares(todo: list[Kernel], count: int) -> list[list[Kernel]]:
    """``todo`` dealt to ``count`` helpers, longest first to the least loaded (forwards take
    longer than backwards)."""
    shares: list[list[Kernel]] = [[] for _ in range(count)]
    loads = [0.0] * count

    def cost(kernel: Kernel) -> float:
        return _COST.get(kernel.layout, 1.0) * (1.3 if kernel.kind == "forward" else 1.0)

    for kernel in sorted(todo, key=cost, reverse=True):
        least = loads.index(min(loads))
        shares[least].append(kernel)
        loads[least] += cost(kernel)
    return shares


def _launch(share: list[Kernel]) -> subprocess.Popen:
    arguments = [f"{k.kind}:{k.layout}:{k.dtype}" for k in share]
    return compile_ahead.helper_process(_WORKER, arguments, output=True)


def main(argv: list[str]) -> int:
    """A helper: compile each ``KIND:LAYOUT:DTYPE`` and print ``KIND LAYOUT DTYPE SECONDS``."""
    import time

    for text in argv:
        kernel = Kernel(*text.split(":"))
        start = time.perf_counter()
        kernel.compile()
        print(kernel.kind, kernel.layout, kernel.dtype, f"{time.perf_counter() - start:.3f}")
        sys.stdout.flush()
    return 0
