"""Compile a BatchNorm backward kernel in a helper process while this one compiles the forward.

A cold first training step JIT-compiles two large kernels one after the other: the forward
(about 6 s on a 2-core EPYC) and the backward (about 5 s). They do not depend on each other,
but numba compiles under one lock per process (and llvmlite serializes its LLVM calls), so a
thread cannot overlap them; another process can. At the first training-mode forward of a
(layout, dtype) whose two kernels are neither compiled here nor in numba's cache, :func:`start`
launches a helper Python process that compiles that backward into the cache and exits. The
helper imports the kernels (numpy and numba) without the normdrop package, whose ``__init__``
imports torch: it starts in about 0.5 s instead of 2 s. The first backward call here
(:func:`wait`) waits for it, then numba loads the kernel from the cache. Whatever goes wrong
in the helper (it fails, times out, cannot write the cache), this process compiles the kernel
itself, as it would without the helper; the kernel is the same either way.

Off with ``NORMDROP_COMPILE_AHEAD=0``; never with one CPU, nor without a writable numba cache
(``NUMBA_CACHE_DIR``, see docs/kernels.md). A helper still running when this process exits is
stopped. ``python -m normdrop.kernels.compile_ahead LAYOUT DTYPE`` compiles one backward kernel
into the cache by hand.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading

import numba
import numpy as np

from normdrop.kernels import cpu

__all__ = ["enabled", "start", "wait"]

# A helper that has not finished by then is stuck: compile here instead.
TIMEOUT_S = 300.0

# Run first in the helper: the normdrop packages as bare namespaces over their directories, so
# that kernels/cpu.py imports under its own name (numba's cache is keyed by it) without the
# packages' __init__ files, which import torch. Argument 1: the normdrop package directory.
HELPER_PRELUDE = """
import sys, types
for name, path in (("normdrop", sys.argv[1]), ("normdrop.kernels", sys.argv[1] + "/kernels")):
    package = types.ModuleType(name)
    package.__path__ = [path]
    sys.modules[name] = package
"""
_HELPER = (
    HELPER_PRELUDE
    + """
from normdrop.kernels import compile_ahead
sys.exit(compile_ahead.main(sys.argv[2:]))
"""
)

# (layout, numpy dtype) -> the helper compiling that backward kernel; empty when none runs.
pending: dict[tuple[str, np.dtype], subprocess.Popen] = {}
# Pairs already looked at in this process (a helper started or not needed).
_considered: set[tuple[str, np.dtype]] = set()
_starting = threading.Lock()  # two threads' first calls start one helper, not two


def enabled() -> bool:
    """True unless ``NORMDROP_COMPILE_AHEAD=0`` or this process may use only one CPU."""
    if os.environ.get("NORMDROP_COMPILE_AHEAD", "1").strip() == "0":
        return False
    affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere, the machine's CPUs
    return (len(affinity(0)) if affinity else os.cpu_count() or 1) > 1


def _compiled_or_cached(dispatcher, signature: tuple) -> bool:
    """True when ``signature`` is compiled in this process or can be loaded from numba's cache
    (a look costs about 10 ms, once per kernel and process)."""
    if signature in dispatcher.overloads:
        return True
    return dispatcher._cache.load_overload(signature, dispatcher.targetctx) is not None


def _worth_a_helper(layout: str, dtype: np.dtype) -> bool:
    """True when this process is about to compile the forward kernel of (layout, dtype) cold
    and would then compile the backward too, and a cache can carry a helper's work here."""
    backward, forward = cpu.backward_kernel(layout), cpu.forward_kernel(layout)
    path = getattr(getattr(backward, "_cache", None), "_cache_path", None)
    if path is None or not os.access(path, os.W_OK):
        return False
    if _compiled_or_cached(backward, cpu.backward_signature(dtype)):
        return False
    # A cached forward loads at once: the helper would only make the backward wait for it.
    return not _compiled_or_cached(forward, cpu.forward_signature(dtype))


def start(layout: str, dtype: np.dtype) -> None:
    """Start compiling the backward kernel of ``layout`` on ``dtype`` (a numpy dtype) in a helper
    process if this process would otherwise compile it cold later. Cheap after the first call
    per pair."""
    key = (layout, dtype)
    if key in _considered:
        return
    with _starting:
        if key in _considered:
            return
        _considered.add(key)
        _start_helper(key)


def _start_helper(key: tuple[str, np.dtype]) -> None:
    layout, dtype = key
    try:
        if not enabled() or not _worth_a_helper(layout, dtype):
            return
        package = os.path.dirname(os.path.dirname(cpu.__file__))
        pending[key] = subprocess.Popen(
            [sys.executable, "-c", _HELPER, package, layout, np.dtype(dtype).name],
            env=_helper_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except Exception:  # an optimization only: any failure means "compile here"
        pending.pop(key, None)


def _helper_environment() -> dict[str, str]:
    """This process's environment, with the numba cache directory this process uses (numba read
    ``NUMBA_CACHE_DIR`` when it was imported; the variable may have changed since)."""
    env = dict(os.environ)
    if numba.config.CACHE_DIR:
        env["NUMBA_CACHE_DIR"] = numba.config.CACHE_DIR
    else:
        env.pop("NUMBA_CACHE_DIR", None)
    return env


def wait(layout: str, dtype: np.dtype) -> None:
    """Before a backward call of (layout, dtype): let its helper, if one runs, finish. Cheap
    when no helper runs (every call checks)."""
    if not pending:
        return
    key = (layout, dtype)
    helper = pending.get(key)
    if helper is None:
        return
    try:  # another thread may wait for the same helper: Popen.wait serves both
        helper.wait(TIMEOUT_S)
    except subprocess.TimeoutExpired:
        helper.kill()
        helper.wait()
    pending.pop(key, None)


def _stop_helpers() -> None:
    for helper in list(pending.values()):
        helper.kill()
    pending.clear()


atexit.register(_stop_helpers)
# A forked child does not own its parent's helpers (and cannot wait for them).
os.register_at_fork(after_in_child=pending.clear)


def main(argv: list[str]) -> int:
    """``LAYOUT DTYPE``: compile that backward kernel into numba's cache (the helper's work)."""
    layout, dtype = argv
    cpu.backward_kernel(layout).compile(cpu.backward_signature(np.dtype(dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
