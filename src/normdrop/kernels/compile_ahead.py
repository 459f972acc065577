"""Compile a BatchNorm backward kernel in a helper process while this one compiles the forward.

A cold first training step JIT-compiles two large kernels one after the other: the forward
(about 6 s on a 2-core EPYC) and the backward (about 5 s). They do not depend on each other,
but numba compiles under one lock per process (and llvmlite serializes its LLVM calls), so a
thread cannot overlap them; another process can. At the first forward that autograd records
(a backward will follow: the eager BatchNorm and BatchNormAct functions call :func:`start`, and
so does the statistics op of a traced training graph) of a (layout, dtype) whose two kernels
are neither compiled here nor in numba's cache, :func:`start` launches a helper Python
process that compiles that backward into the cache and exits. The helper imports the kernels
(numpy and numba) without the normdrop package, whose ``__init__`` imports torch: it starts in
about 0.3 s instead of 1.5 s. The first backward call here (:func:`wait`) waits for it, then
numba loads the kernel from the cache.

The helper only ever saves time. Whatever goes wrong (it fails, stalls past ``TIMEOUT_S``,
cannot write the cache, finds the kernels' source files changed since this process imported
them), this process compiles the kernel itself, as it would without the helper; the kernel is
the same either way. No helper starts with ``NORMDROP_COMPILE_AHEAD=0``, with one CPU, in a
frozen application (its ``sys.executable`` is not a Python), without a writable numba cache
(``NUMBA_CACHE_DIR``, see docs/kernels.md), or from a helper. One still running when this
process exits is stopped; finished ones are reaped.
"""

from __future__ import annotations

import atexit
import logging
import os
import subprocess
import sys
import threading

import numba
import numpy as np

from normdrop._cpus import usable_cpus
from normdrop.kernels import cpu, philox

__all__ = ["TIMEOUT_S", "enabled", "start", "wait"]

_log = logging.getLogger(__name__)

# A helper that has not finished by then is stuck (it takes about 5 s): compile here instead.
TIMEOUT_S = 60.0

# The source files of the kernels, as this process imported them: the helper compiles from the
# files on disk and must compile the same code (numba's cache would not notice an edit to
# philox.py alone, and a backward with another generator would drop other elements).
_SOURCES = tuple(os.path.abspath(module.__file__) for module in (cpu, philox))


def _stamp(path: str) -> str:
    status = os.stat(path)
    return f"{status.st_mtime_ns}:{status.st_size}"


_SOURCE_STAMPS = ",".join(_stamp(path) for path in _SOURCES)

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
_pending: dict[tuple[str, np.dtype], subprocess.Popen] = {}
# Pairs already looked at in this process (a helper started or not needed).
_considered: set[tuple[str, np.dtype]] = set()
# Held while a pair is looked at: a second thread's first call waits, then finds the helper.
_starting = threading.Lock()


def enabled() -> bool:
    """True unless switched off (``NORMDROP_COMPILE_AHEAD=0``), frozen, or on one CPU."""
    if os.environ.get("NORMDROP_COMPILE_AHEAD", "1").strip() == "0":
        return False
    if getattr(sys, "frozen", False) or not sys.executable:
        return False
    return usable_cpus() > 1


def _cached(dispatcher, signature: tuple) -> bool:
    """True when ``signature`` is compiled in this process or listed in numba's cache index for
    the current source (the check numba makes before loading, without loading the code)."""
    if signature in dispatcher.overloads:
        return True
    cache = dispatcher._cache
    key = cache._index_key(signature, dispatcher.targetctx.codegen())
    return key in cache._cache_file._load_index()


def _worth_a_helper(layout: str, dtype: np.dtype) -> bool:
    """True when this process is about to compile the forward kernel of (layout, dtype) cold
    and would then compile the backward too, and a cache can carry a helper's work here."""
    backward, forward = cpu.backward_kernel(layout), cpu.forward_kernel(layout)
    path = getattr(getattr(backward, "_cache", None), "_cache_path", None)
    if path is None or not os.access(path, os.W_OK):
        return False
    if _cached(backward, cpu.backward_signature(dtype)):
        return False
    # A cached forward loads at once: the helper would only make the backward wait for it.
    return not _cached(forward, cpu.forward_signature(dtype))


def start(layout: str, dtype: np.dtype) -> None:
    """Start compiling the backward kernel of ``layout`` on ``dtype`` (a numpy dtype) in a helper
    process if this process would otherwise compile it cold later. Cheap after the first call
    per pair; never raises."""
    key = (layout, dtype)
    if key in _considered:
        return
    with _starting:
        if key in _considered:
            return
        _reap()
        try:
            if enabled() and _worth_a_helper(layout, dtype):
                _pending[key] = _launch(layout, dtype)
        except Exception as error:  # an optimization only: any failure means "compile here"
            _log.debug("no compile-ahead helper for %s: %r", key, error)
        _considered.add(key)  # after the helper is in _pending, for the threads waiting


def _launch(layout: str, dtype: np.dtype) -> subprocess.Popen:
    return helper_process(_HELPER, [layout, np.dtype(dtype).name, _SOURCE_STAMPS])


def helper_process(code: str, arguments: list[str], output: bool = False) -> subprocess.Popen:
    """A helper Python running ``code`` (which starts with :data:`HELPER_PRELUDE`) on
    ``arguments`` (its ``sys.argv[2:]``), in :func:`_helper_environment`; its standard output
    and error are pipes (text) with ``output``, else discarded. (The warm-up command's
    helpers start here too: :mod:`normdrop.kernels.warmup`.)"""
    package = os.path.dirname(os.path.dirname(cpu.__file__))
    windows = {"creationflags": subprocess.CREATE_NO_WINDOW} if os.name == "nt" else {}
    streams = subprocess.PIPE if output else subprocess.DEVNULL
    return subprocess.Popen(
        # -P: the working directory does not go first on the helper's sys.path.
        [sys.executable, "-P", "-c", code, package, *arguments],
        env=_helper_environment(),
        stdin=subprocess.DEVNULL,
        stdout=streams,
        stderr=streams,
        text=True,
        **windows,
    )


def _helper_environment() -> dict[str, str]:
    """This process's environment, with the numba cache directory this process uses (numba read
    ``NUMBA_CACHE_DIR`` when it was imported; the variable may have changed since), and no
    helpers of its own."""
    env = dict(os.environ)
    if numba.config.CACHE_DIR:
        env["NUMBA_CACHE_DIR"] = numba.config.CACHE_DIR
    else:
        env.pop("NUMBA_CACHE_DIR", None)
    env["NORMDROP_COMPILE_AHEAD"] = "0"
    return env


def wait(layout: str, dtype: np.dtype) -> None:
    """Before a backward call of (layout, dtype): let its helper, if one runs, finish. Cheap
    when no helper runs (every call checks); never raises."""
    if not _pending:
        return
    key = (layout, dtype)
    helper = _pending.get(key)
    if helper is None:
        return
    try:  # another thread may wait for the same helper: Popen.wait serves both
        code = helper.wait(TIMEOUT_S)
        if code != 0:
            _log.debug("compile-ahead helper for %s exited with %s", key, code)
    except subprocess.TimeoutExpired:
        _log.debug("compile-ahead helper for %s stalled; compiling here", key)
        _stop(helper)
    except Exception as error:
        _log.debug("compile-ahead helper for %s: %r", key, error)
    finally:
        _pending.pop(key, None)


def _stop(helper: subprocess.Popen) -> None:
    try:
        helper.kill()
        helper.wait(5)
    except Exception as error:
        _log.debug("could not stop compile-ahead helper %s: %r", helper.pid, error)


def _reap() -> None:
    """Collect helpers that finished without a backward call waiting for them (a graph
    whose backward never ran), so that none stays a zombie."""
    for key, helper in list(_pending.items()):
        if helper.poll() is not None:
            _pending.pop(key, None)


def _stop_helpers() -> None:
    for helper in list(_pending.values()):
        _stop(helper)
    _pending.clear()


def _after_fork_in_child() -> None:
    """A forked child does not own its parent's helpers, and another thread of the parent may
    have held the lock when the fork happened."""
    global _starting
    _starting = threading.Lock()
    _pending.clear()


atexit.register(_stop_helpers)
if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_after_fork_in_child)


def main(argv: list[str]) -> int:
    """``LAYOUT DTYPE STAMPS``: compile that backward kernel into numba's cache (the helper's
    work), unless the kernels' source files changed since the parent imported them."""
    layout, dtype, stamps = argv
    if stamps != _SOURCE_STAMPS:  # the files as this helper imported them
        return 3
    cpu.backward_kernel(layout).compile(cpu.backward_signature(np.dtype(dtype)))
    return 0
