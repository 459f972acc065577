"""The backward kernel compiled ahead in a helper process (normdrop.kernels.compile_ahead)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import ClassVar

import numba
import numpy as np
import pytest
import torch

import normdrop
from normdrop.kernels import compile_ahead, cpu


@pytest.fixture
def fresh_state(monkeypatch):
    """compile_ahead's bookkeeping, emptied for one test and restored after it."""
    monkeypatch.setattr(compile_ahead, "pending", {})
    monkeypatch.setattr(compile_ahead, "_considered", set())
    monkeypatch.setenv("NORMDROP_COMPILE_AHEAD", "1")
    return compile_ahead


def _train_steps() -> None:
    """A training step on every path that calls a backward kernel: modules on the rows and
    planar layouts in float32 and float64, channels_last, the fused op with dropout, and an
    eval-mode BatchNorm that passes gradients to its input."""
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
    for layout in (cpu.PLANAR, cpu.ROWS):
        compiled = set(kernel(layout).signatures)
        assert compiled, layout
        assert compiled <= expected, (layout, compiled - expected)


_COLD_STEP = textwrap.dedent(
    """
    import numpy as np, torch, normdrop
    from normdrop.kernels import compile_ahead, cpu
    torch.manual_seed(0)
    ours, theirs = normdrop.nn.BatchNorm1d(5).double(), torch.nn.BatchNorm1d(5).double()
    x = torch.randn(16, 5, dtype=torch.float64, requires_grad=True)
    helper = None
    ours(x).square().sum().backward()
    expected_grad = x.grad.clone()
    x.grad = None
    theirs(x).square().sum().backward()
    assert torch.allclose(expected_grad, x.grad, rtol=1e-10, atol=1e-12)
    stats = cpu.backward_kernel(cpu.ROWS).stats
    signature = cpu.backward_signature(np.dtype("float64"))
    print(stats.cache_hits[signature], stats.cache_misses[signature], len(compile_ahead.pending))
    """
)


def _cold_step(cache_dir, ahead: str) -> tuple[int, int, int]:
    """``(cache hits, cache misses, helpers still pending)`` of the backward kernel after a cold
    training step in a fresh process."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir), "NORMDROP_COMPILE_AHEAD": ahead}
    done = subprocess.run(
        [sys.executable, "-c", _COLD_STEP], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    hits, misses, still_pending = map(int, done.stdout.split())
    return hits, misses, still_pending


def test_a_cold_training_step_loads_the_backward_the_helper_compiled(tmp_path):
    """End to end, in a fresh process with an empty numba cache: the forward compiles here, the
    backward in the helper, and the first backward loads it from the cache (a hit; numba counts
    a miss before it compiles a kernel itself), with the gradient torch computes. On one CPU
    no helper runs and the backward compiles here."""
    helped = len(os.sched_getaffinity(0)) > 1
    assert _cold_step(tmp_path / "ahead", "1") == ((1, 0, 0) if helped else (0, 1, 0))


def test_the_helper_compiles_without_importing_torch(tmp_path):
    """The helper's start-up is its share of a cold first step: it loads the kernels without
    the normdrop package (which imports torch) and compiles into the cache it is given."""
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


def test_no_helper_when_switched_off_or_on_one_cpu(fresh_state, monkeypatch):
    assert fresh_state.enabled()
    monkeypatch.setenv("NORMDROP_COMPILE_AHEAD", "0")
    assert not fresh_state.enabled()
    monkeypatch.setenv("NORMDROP_COMPILE_AHEAD", "1")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert not fresh_state.enabled()


class _RecordedPopen:
    calls: ClassVar[list] = []
    environments: ClassVar[list] = []

    def __init__(self, command, env=None, **kwargs):
        type(self).calls.append(command)
        type(self).environments.append(env)


def test_one_helper_per_layout_and_dtype(fresh_state, monkeypatch):
    monkeypatch.setattr(_RecordedPopen, "calls", [])
    monkeypatch.setattr(_RecordedPopen, "environments", [])
    monkeypatch.setattr(subprocess, "Popen", _RecordedPopen)
    monkeypatch.setattr(fresh_state, "_worth_a_helper", lambda layout, dtype: True)
    for _ in range(3):
        fresh_state.start(cpu.ROWS, np.dtype("float32"))
    fresh_state.start(cpu.PLANAR, np.dtype("float64"))
    package = os.path.dirname(normdrop.__file__)
    helper = compile_ahead._HELPER
    assert _RecordedPopen.calls == [
        [sys.executable, "-c", helper, package, "rows", "float32"],
        [sys.executable, "-c", helper, package, "planar", "float64"],
    ]
    assert set(fresh_state.pending) == {
        (cpu.ROWS, np.dtype("float32")),
        (cpu.PLANAR, np.dtype("float64")),
    }


@pytest.mark.parametrize("numba_cache_dir", ["", "/somewhere/numba-cache"])
def test_the_helper_uses_the_cache_this_process_uses(fresh_state, monkeypatch, numba_cache_dir):
    """numba read NUMBA_CACHE_DIR at import; a later change of the variable must not send the
    helper's kernel where this process will not look."""
    monkeypatch.setattr(numba.config, "CACHE_DIR", numba_cache_dir)
    monkeypatch.setenv("NUMBA_CACHE_DIR", "/changed/after/import")
    monkeypatch.setattr(_RecordedPopen, "environments", [])
    monkeypatch.setattr(subprocess, "Popen", _RecordedPopen)
    monkeypatch.setattr(fresh_state, "_worth_a_helper", lambda layout, dtype: True)
    fresh_state.start(cpu.ROWS, np.dtype("float64"))
    (env,) = _RecordedPopen.environments
    assert env.get("NUMBA_CACHE_DIR") == (numba_cache_dir or None)


def test_two_threads_first_calls_start_one_helper(fresh_state, monkeypatch):
    monkeypatch.setattr(_RecordedPopen, "calls", [])
    monkeypatch.setattr(subprocess, "Popen", _RecordedPopen)

    def slow_check(layout, dtype):
        time.sleep(0.05)  # both threads are inside start() by the time this returns
        return True

    monkeypatch.setattr(fresh_state, "_worth_a_helper", slow_check)
    threads = [
        threading.Thread(target=fresh_state.start, args=(cpu.ROWS, np.dtype("float32")))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(_RecordedPopen.calls) == 1


def test_no_helper_for_kernels_already_compiled_here(fresh_state, monkeypatch):
    _train_steps()  # compiles (or loads) both layouts' kernels in this process
    monkeypatch.setattr(subprocess, "Popen", _RecordedPopen)
    monkeypatch.setattr(_RecordedPopen, "calls", [])
    for layout in (cpu.PLANAR, cpu.ROWS):
        for dtype in ("float32", "float64"):
            assert not fresh_state._worth_a_helper(layout, np.dtype(dtype))
            fresh_state.start(layout, np.dtype(dtype))
    assert _RecordedPopen.calls == [] and fresh_state.pending == {}


def test_a_helper_only_while_this_process_compiles_the_forward(fresh_state, monkeypatch):
    """A cold backward with a cached forward: the forward loads at once, so a helper would only
    make the backward wait for its start-up; this process compiles the backward itself."""
    cached = set()
    monkeypatch.setattr(os, "access", lambda path, mode: True)  # a writable cache, wherever
    monkeypatch.setattr(
        fresh_state, "_compiled_or_cached", lambda dispatcher, signature: dispatcher in cached
    )
    layout, dtype = cpu.ROWS, np.dtype("float32")
    assert fresh_state._worth_a_helper(layout, dtype)  # both cold
    cached.add(cpu.forward_kernel(layout))
    assert not fresh_state._worth_a_helper(layout, dtype)
    cached.clear()
    cached.add(cpu.backward_kernel(layout))
    assert not fresh_state._worth_a_helper(layout, dtype)


def test_a_failed_helper_leaves_the_compile_to_this_process(fresh_state):
    key = (cpu.ROWS, np.dtype("float32"))
    fresh_state.pending[key] = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    fresh_state.wait(*key)
    assert fresh_state.pending == {}
    fresh_state.wait(*key)  # nothing pending: returns at once


def test_a_stuck_helper_is_stopped(fresh_state, monkeypatch):
    monkeypatch.setattr(fresh_state, "TIMEOUT_S", 0.2)
    key = (cpu.PLANAR, np.dtype("float32"))
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    fresh_state.pending[key] = helper
    start = time.perf_counter()
    fresh_state.wait(*key)
    assert time.perf_counter() - start < 10
    assert helper.returncode is not None and fresh_state.pending == {}
