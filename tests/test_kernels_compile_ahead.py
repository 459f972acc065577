"""The backward kernel compiled ahead in a helper process (normdrop.kernels.compile_ahead)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import numba
import numpy as np
import pytest
import torch

import normdrop
from normdrop.kernels import compile_ahead, cpu


@pytest.fixture
def fresh_state(monkeypatch):
    """compile_ahead's bookkeeping, emptied for one test and restored after it, on any machine
    (enabled() says False on one CPU; tests of that patch it back)."""
    monkeypatch.setattr(compile_ahead, "_pending", {})
    monkeypatch.setattr(compile_ahead, "_considered", set())
    monkeypatch.setattr(compile_ahead, "enabled", lambda: True)
    monkeypatch.setenv("NORMDROP_COMPILE_AHEAD", "1")
    return compile_ahead


def _train_steps() -> None:
    """A training step on every path that calls a backward kernel: modules on the rows,
    planar and channel kernels in float32 and float64, channels_last, the fused op with
    dropout, and an eval-mode BatchNorm that passes gradients to its input."""
    torch.manual_seed(0)
    last = torch.channels_last
    for dtype in (torch.float32, torch.float64):
        cases = [
            (normdrop.nn.BatchNorm1d(3), torch.randn(8, 3)),
            (normdrop.nn.BatchNorm2d(3), torch.randn(4, 3, 5, 5)),
            (normdrop.nn.BatchNorm2d(3), torch.randn(4, 3, 5, 5).to(memory_format=last)),
            (normdrop.nn.BatchNormAct2d(3, "gelu", 0.3), torch.randn(4, 3, 5, 5)),
            (normdrop.nn.BatchNorm1d(3, affine=False).eval(), torch.randn(8, 3, 7)),
        ]
        for module, x in cases:
            x = x.to(dtype).requires_grad_()
            module.to(dtype)(x).square().sum().backward()
            assert x.grad is not None


@pytest.mark.parametrize(
    ("kernel", "signature"),
    [(cpu.forward_kernel, cpu.forward_signature), (cpu.backward_kernel, cpu.backward_signature)],
)
def test_kernel_signatures_are_the_ones_every_call_site_uses(kernel, signature):
    _train_steps()
    expected = {signature(np.dtype(d)) for d in ("float32", "float64")}
    for layout in (cpu.PLANAR, cpu.ROWS, cpu.CHANNELS):
        compiled = set(kernel(layout).signatures)
        assert compiled, layout
        assert compiled <= expected, (layout, compiled - expected)


def test_dropout_signature_is_the_one_its_call_site_uses():
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(70_000, dtype=dtype, requires_grad=True)
        normdrop.nn.Dropout(0.3)(x).sum().backward()
    expected = {cpu.dropout_signature(np.dtype(d)) for d in ("float32", "float64")}
    assert set(cpu.dropout_flat.signatures) == expected


_COLD_STEP = textwrap.dedent(
    """
    import sys, numpy as np, torch, normdrop
    from normdrop.kernels import compile_ahead, cpu
    torch.manual_seed(0)
    if sys.argv[1] == "BatchNorm1d":  # the modules' eager path (kernels/eager.py)
        ours, theirs = normdrop.nn.BatchNorm1d(5), torch.nn.BatchNorm1d(5)
    else:  # the fused op's path (kernels/ops.py)
        ours = normdrop.nn.BatchNormAct1d(5, "relu")
        theirs = torch.nn.Sequential(torch.nn.BatchNorm1d(5), torch.nn.ReLU())
    ours, theirs = ours.double(), theirs.double()
    x = torch.randn(16, 5, dtype=torch.float64, requires_grad=True)
    ours(x).square().sum().backward()
    expected_grad = x.grad.clone()
    x.grad = None
    theirs(x).square().sum().backward()
    assert torch.allclose(expected_grad, x.grad, rtol=1e-10, atol=1e-12)
    stats = cpu.backward_kernel(cpu.ROWS).stats
    signature = cpu.backward_signature(np.dtype("float64"))
    print(stats.cache_hits[signature], stats.cache_misses[signature], len(compile_ahead._pending))
    """
)


def _cold_step(cache_dir, module: str) -> tuple[int, int, int]:
    """``(cache hits, cache misses, helpers still pending)`` of the backward kernel after a
    training step of ``module`` in a fresh process with an empty numba cache."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir), "NORMDROP_COMPILE_AHEAD": "1"}
    done = subprocess.run(
        [sys.executable, "-c", _COLD_STEP, module],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    hits, misses, still_pending = map(int, done.stdout.split())
    return hits, misses, still_pending


@pytest.mark.parametrize("module", ["BatchNorm1d", "BatchNormAct1d"])
def test_a_cold_training_step_loads_the_backward_the_helper_compiled(tmp_path, module):
    """End to end, in a fresh process with an empty numba cache, on both paths that call the
    kernels: the forward compiles here, the backward in the helper, and the first backward
    loads it from the cache (a hit; numba counts a miss before it compiles a kernel itself),
    with the gradient torch computes. Where no helper may run (one CPU), the backward compiles
    here."""
    helped = compile_ahead.enabled()
    assert _cold_step(tmp_path, module) == ((1, 0, 0) if helped else (0, 1, 0))


def test_the_helper_loads_the_kernels_without_importing_torch():
    """The helper's start-up is its share of a cold first step: it loads the kernels without
    the normdrop package (which imports torch), under their own module names."""
    probe = compile_ahead.HELPER_PRELUDE + (
        "from normdrop.kernels import compile_ahead, cpu\n"
        "print('torch' in sys.modules, cpu.backward_kernel.__module__)\n"
    )
    package = os.path.dirname(normdrop.__file__)
    done = subprocess.run(
        [sys.executable, "-c", probe, package], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "normdrop.kernels.cpu"]


def test_a_helper_that_finds_the_sources_changed_compiles_nothing(tmp_path):
    """A helper compiles from the files on disk; after an edit it would compile other code than
    this process runs, so it exits without compiling."""
    package = os.path.dirname(normdrop.__file__)
    stale = "0:0," + compile_ahead._SOURCE_STAMPS.split(",")[1]
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", compile_ahead._HELPER, package, "rows", "float32", stale],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stderr
    assert not any(name.endswith(".nbc") for _, _, names in os.walk(tmp_path) for name in names)


def test_no_helper_when_switched_off_on_one_cpu_or_frozen(monkeypatch):
    monkeypatch.setenv("NORMDROP_COMPILE_AHEAD", "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert compile_ahead.enabled()
    monkeypatch.setenv("NORMDROP_COMPILE_AHEAD", "0")
    assert not compile_ahead.enabled()
    monkeypatch.setenv("NORMDROP_COMPILE_AHEAD", "1")
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert not compile_ahead.enabled()
    monkeypatch.delattr(sys, "frozen")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert not compile_ahead.enabled()
    monkeypatch.delattr(os, "sched_getaffinity")  # macOS, Windows: the machine's CPUs
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert not compile_ahead.enabled()
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert compile_ahead.enabled()


class _RecordedPopen:
    """Stands in for subprocess.Popen: records each command and environment, starts nothing."""

    def __init__(self, command, env=None, **kwargs):
        self.command, self.env = command, env
        launched.append(self)

    def poll(self):
        return None

    def wait(self, timeout=None):
        return 0


launched: list[_RecordedPopen] = []


@pytest.fixture
def recorded(monkeypatch) -> list[_RecordedPopen]:
    """The helpers start() launches, recorded instead of started."""
    monkeypatch.setattr(subprocess, "Popen", _RecordedPopen)
    launched.clear()
    return launched


def test_one_helper_per_layout_and_dtype(fresh_state, monkeypatch, recorded):
    monkeypatch.setattr(fresh_state, "_worth_a_helper", lambda layout, dtype: True)
    for _ in range(3):
        fresh_state.start(cpu.ROWS, np.dtype("float32"))
    fresh_state.start(cpu.PLANAR, np.dtype("float64"))
    package = os.path.dirname(normdrop.__file__)
    helper, stamps = compile_ahead._HELPER, compile_ahead._SOURCE_STAMPS
    assert [helper.command for helper in recorded] == [
        [sys.executable, "-P", "-c", helper, package, "rows", "float32", stamps],
        [sys.executable, "-P", "-c", helper, package, "planar", "float64", stamps],
    ]
    assert set(fresh_state._pending) == {
        (cpu.ROWS, np.dtype("float32")),
        (cpu.PLANAR, np.dtype("float64")),
    }


@pytest.mark.parametrize("numba_cache_dir", ["", "/somewhere/numba-cache"])
def test_the_helper_uses_the_cache_this_process_uses(
    fresh_state, monkeypatch, recorded, numba_cache_dir
):
    """numba read NUMBA_CACHE_DIR at import; a later change of the variable must not send the
    helper's kernel where this process will not look."""
    monkeypatch.setattr(numba.config, "CACHE_DIR", numba_cache_dir)
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/changed/after/import")
    monkeypatch.setattr(fresh_state, "_worth_a_helper", lambda layout, dtype: True)
    fresh_state.start(cpu.ROWS, np.dtype("float64"))
    (helper,) = recorded
    env = helper.env
    assert env.get("NUMBA_CACHE_DIR") == (numba_cache_dir or None)
    assert env["NORMDROP_COMPILE_AHEAD"] == "0"  # a helper starts no helpers


def test_a_second_threads_first_call_finds_the_first_ones_helper(
    fresh_state, monkeypatch, recorded
):
    """Two threads' first calls start one helper, and the second returns only once the helper
    is registered, so that its backward waits for the helper instead of compiling too."""
    inside = threading.Event()

    def slow_check(layout, dtype):
        inside.set()
        time.sleep(0.2)
        return True

    monkeypatch.setattr(fresh_state, "_worth_a_helper", slow_check)
    key = (cpu.ROWS, np.dtype("float32"))
    first = threading.Thread(target=fresh_state.start, args=key)
    first.start()
    assert inside.wait(10)
    fresh_state.start(*key)  # the second thread (this one), while the first is deciding
    assert key in fresh_state._pending
    first.join()
    assert len(recorded) == 1


def test_no_helper_for_kernels_already_compiled_here(fresh_state, request):
    _train_steps()  # compiles (or loads) both layouts' kernels in this process
    fresh_state._considered.clear()  # the warm-up's own first calls were considered already
    recorded = request.getfixturevalue("recorded")  # recording from here on
    for layout in (cpu.PLANAR, cpu.ROWS, cpu.CHANNELS):
        for dtype in ("float32", "float64"):
            assert not fresh_state._worth_a_helper(layout, np.dtype(dtype))
            fresh_state.start(layout, np.dtype(dtype))
    assert [helper.command for helper in recorded] == [] and fresh_state._pending == {}


@pytest.mark.parametrize(
    "module", [normdrop.nn.BatchNorm1d(4), normdrop.nn.BatchNormAct1d(4, "relu", 0.2)]
)
def test_a_helper_only_where_a_backward_follows(fresh_state, monkeypatch, recorded, module):
    """A training-mode forward that autograd does not record (no_grad, as recalibration runs)
    needs no backward kernel: no helper may compete with its forward's compile."""
    monkeypatch.setattr(fresh_state, "_worth_a_helper", lambda layout, dtype: True)
    x = torch.randn(8, 4)
    with torch.no_grad():
        module(x)
    module.requires_grad_(False)
    module(x)  # nothing requires grad
    assert recorded == []
    module.requires_grad_(True)
    module(x)
    assert [helper.command[5:7] for helper in recorded] == [["rows", "float32"]]


def test_a_helper_only_while_this_process_compiles_the_forward(fresh_state, monkeypatch):
    """A cold backward with a cached forward: the forward loads at once, so a helper would only
    make the backward wait for its start-up; this process compiles the backward itself."""
    cached = set()
    monkeypatch.setattr(os, "access", lambda path, mode: True)  # a writable cache, wherever
    monkeypatch.setattr(fresh_state, "_cached", lambda dispatcher, signature: dispatcher in cached)
    layout, dtype = cpu.ROWS, np.dtype("float32")
    assert fresh_state._worth_a_helper(layout, dtype)  # both cold
    cached.add(cpu.forward_kernel(layout))
    assert not fresh_state._worth_a_helper(layout, dtype)
    cached.clear()
    cached.add(cpu.backward_kernel(layout))
    assert not fresh_state._worth_a_helper(layout, dtype)


def test_no_helper_without_a_writable_cache(fresh_state, monkeypatch):
    monkeypatch.setattr(fresh_state, "_cached", lambda dispatcher, signature: False)
    monkeypatch.setattr(os, "access", lambda path, mode: True)
    assert fresh_state._worth_a_helper(cpu.ROWS, np.dtype("float32"))
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert not fresh_state._worth_a_helper(cpu.ROWS, np.dtype("float32"))


def test_a_helper_that_cannot_start_costs_nothing(fresh_state, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("no processes here")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    monkeypatch.setattr(fresh_state, "_worth_a_helper", lambda layout, dtype: True)
    fresh_state.start(cpu.ROWS, np.dtype("float32"))  # does not raise
    assert fresh_state._pending == {}
    fresh_state.wait(cpu.ROWS, np.dtype("float32"))


def test_a_failed_helper_is_waited_for_once(fresh_state):
    key = (cpu.ROWS, np.dtype("float32"))
    fresh_state._pending[key] = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    fresh_state.wait(*key)
    assert fresh_state._pending == {}
    fresh_state.wait(*key)  # nothing pending: returns at once


def test_a_stuck_helper_is_stopped(fresh_state, monkeypatch):
    monkeypatch.setattr(fresh_state, "TIMEOUT_S", 0.2)
    key = (cpu.PLANAR, np.dtype("float32"))
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    fresh_state._pending[key] = helper
    start = time.perf_counter()
    fresh_state.wait(*key)
    assert time.perf_counter() - start < 10
    assert helper.returncode is not None and fresh_state._pending == {}


def test_helpers_are_stopped_at_exit_and_reaped_when_done(fresh_state):
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    fresh_state._pending.update({("rows", "done"): done, ("rows", "running"): running})
    fresh_state._reap()
    assert list(fresh_state._pending) == [("rows", "running")]
    fresh_state._stop_helpers()
    assert running.returncode is not None and fresh_state._pending == {}


def test_a_forked_child_owns_no_helpers_and_a_free_lock(fresh_state):
    """A child forked while another thread of the parent looks at a pair (holding the lock),
    and while a helper runs, starts afresh: no helpers to wait for, a lock it can take."""
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    fresh_state._pending[("rows", "running")] = running
    try:
        with fresh_state._starting:
            pid = os.fork()
            if pid == 0:  # the child
                ok = not fresh_state._pending and fresh_state._starting.acquire(timeout=5)
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert ("rows", "running") in fresh_state._pending  # the parent's, untouched
    finally:
        fresh_state._stop_helpers()
