"""Where a BatchNorm training step's time goes, and where the kernels' JIT time goes.

    python benchmarks/breakdown.py [--threads 2] [--repeats 201] [--allocator steady|default]

The process's allocator is set as in ``benchmarks/run.py`` (``--allocator``; by default freed
memory stays mapped, so steps pay no page-fault lottery; the fault counts are printed anyway).
For the BatchNorm1d shapes, one measurement of each quantity (median of ``repeats`` after a
warm-up, minor page faults per call from ``resource.getrusage``), printed in two tables:

- passes: each pass of the kernels alone on preallocated outputs (forward statistics, forward
  output, backward sums, backward sums + ``dx``) next to torch's own single-pass ops on the same
  tensor (``torch.sum(x, 0)``, ``torch.add(x, g, out=y)``) and the machine's floor, a plain
  numba parallel sum and copy of the same memory;
- steps: a training step (forward and ``autograd.grad``) with ``normdrop.nn.BatchNorm1d`` and
  with ``torch.nn.BatchNorm1d`` (ATen); the fixed cost, each module's whole step on a 2x8
  input; our kernels back to back (the forward and the backward kernel call); what of our step
  neither accounts for (step - fixed - kernels); and what a 1.5x speed-up over ATen's step would
  leave for our kernels once ATen's fixed cost is paid.

Then the price of waking the OpenMP workers: our dropout forward+backward on 256x1024 back to
back, right after ``F.dropout`` (3 ms of serial ``bernoulli_``: the workers go to sleep) and
right after a parallel ``torch.mm`` (as in a training step), the three taking turns; and the
Python the modules' eager path saves per call (a parameter read, ``autograd.Function.apply``).

Then plain BatchNorm's two kernel families side by side: a training step's kernel calls on the
planar kernels and on the channel kernels, for shapes from tiny to larger than the caches, and
which of the two ``cpu.kernel_layout`` chooses.

Then, in fresh processes with an empty ``NUMBA_CACHE_DIR``, the cold first ``BatchNorm2d``
training step with and without the backward compiled ahead in a helper process
(``NORMDROP_COMPILE_AHEAD``), and, without it, the compile time split by function from numba's
compile events (each function's time includes the helpers it compiles); last, the helper's
start-up against a plain ``import normdrop``. docs/kernels.md and BENCHMARKS.md quote these
figures.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

SHAPES = [(256, 1024), (64, 4096)]
FIXED_SHAPE = (2, 8)  # a step there is all fixed cost


def _measure(fn, repeats: int) -> tuple[float, float]:
    """``(median us, minor page faults per call)`` over ``repeats`` calls after a warm-up."""
    for _ in range(5):
        fn()
    times = []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    return statistics.median(times) * 1e6, faults / repeats


def _plain_passes():
    """The floor: a numba parallel sum and a copy over flat float32 memory, in 8 blocks (the sum
    in 2048-value runs, reassociated: vector lanes)."""
    from numba import njit, prange

    @njit(fastmath={"reassoc"})
    def run_sum(values):
        total = values.dtype.type(0.0)
        for k in range(values.size):
            total += values[k]
        return total

    @njit(parallel=True)
    def plain_sum(a, out):
        n = a.size // out.size
        for b in prange(out.size):
            total = 0.0
            for lo in range(b * n, (b + 1) * n, 2048):
                total += run_sum(a[lo : min(lo + 2048, (b + 1) * n)])
            out[b] = total

    @njit(parallel=True)
    def plain_copy(a, y, blocks):
        n = a.size // blocks
        for b in prange(blocks):
            y[b * n : (b + 1) * n] = a[b * n : (b + 1) * n]

    return plain_sum, plain_copy


class _Calls:
    """A BatchNorm1d training step on ``shape``, ours and ATen's, and our two kernels called
    directly with preallocated outputs and the statistics of a first step."""

    def __init__(self, shape: tuple[int, ...]):
        import numpy as np
        import torch

        import normdrop

        channels = shape[1]
        self.x = torch.randn(shape, requires_grad=True)
        self.grad = torch.randn(shape)
        self.ours = normdrop.nn.BatchNorm1d(channels)
        self.aten = torch.nn.BatchNorm1d(channels)
        self.step(self.ours)()  # fills the module's cache: the kernels and their fixed arguments
        self.entry = self.ours._fast_path_cache().state[3]
        self.out, self.grad_in = torch.empty_like(self.x), torch.empty_like(self.x)
        self.grad_w, self.grad_b = torch.empty(channels), torch.empty(channels)
        self.stats = np.empty((3, channels), np.float32)
        self.forward(self.entry.what)()  # the statistics, for output-only and backward calls

    def step(self, module):
        import torch

        x = self.x
        return lambda: torch.autograd.grad(module(x), (x, module.weight, module.bias), self.grad)

    def forward(self, what: int):
        from normdrop.kernels import cpu

        e, x_at, out_at = self.entry, self.x.data_ptr(), self.out.data_ptr()
        return lambda: e.forward(
            what, x_at, out_at, e.numel, e.channels, e.plane, e.running_mean, e.running_var,
            0.1, e.eps, self.stats, e.weight, e.bias, e.params, cpu.IDENTITY, 0, 0, 0, 0, False,
        )  # fmt: skip

    def backward(self, dx_at: int):
        from normdrop.kernels import cpu

        e, stats = self.entry, self.stats
        dy_at, x_at = self.grad.data_ptr(), self.x.data_ptr()
        w_at, b_at = self.grad_w.data_ptr(), self.grad_b.data_ptr()
        return lambda: e.backward(
            True, dy_at, x_at, dx_at, e.numel, e.channels, e.plane, stats[0], stats[1],
            e.weight, e.bias, e.params, cpu.IDENTITY, 0, 0, 0, 0, False, True, w_at, b_at,
        )  # fmt: skip


def _passes(calls: _Calls, floor, repeats: int) -> dict[str, float]:
    """The kernels' passes, torch's single-pass ops and the floor on one shape (us)."""
    import numpy as np
    import torch

    from normdrop.kernels import cpu

    plain_sum, plain_copy = floor
    x, partial = calls.x.detach(), np.empty(8, np.float32)
    flat_x, flat_out = x.numpy().reshape(-1), calls.out.numpy().reshape(-1)
    timed = {
        "stats": calls.forward(cpu.STATS),
        "output": calls.forward(cpu.APPLY),
        "fwd kernel": calls.forward(calls.entry.what),
        "bwd sums": calls.backward(0),
        "bwd kernel": calls.backward(calls.grad_in.data_ptr()),
        "torch sum": lambda: torch.sum(x, 0),
        "torch add": lambda: torch.add(x, calls.grad, out=calls.out),
        "plain sum": lambda: plain_sum(flat_x, partial),
        "plain copy": lambda: plain_copy(flat_x, flat_out, 8),
    }
    return {name: _measure(fn, repeats)[0] for name, fn in timed.items()}


def _steps(calls: _Calls, repeats: int) -> dict[str, float]:
    """Our step and ATen's (us), and their page faults per step."""
    ours, ours_faults = _measure(calls.step(calls.ours), repeats)
    aten, aten_faults = _measure(calls.step(calls.aten), repeats)
    return {"ours": ours, "aten": aten, "ours faults": ours_faults, "aten faults": aten_faults}


def _use_threads(threads: int) -> None:
    import numba
    import torch

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def step_breakdown(threads: int, repeats: int) -> None:
    """The two tables (``threads`` only labels them: :func:`main` sets the threads)."""
    floor = _plain_passes()
    calls = {shape: _Calls(shape) for shape in SHAPES}
    # The passes before any repeated 1 MB step: steps leave the C allocator in states (page
    # faults, 4 KiB-aliased buffers) that slow whatever runs after them.
    passes = {shape: _passes(calls[shape], floor, repeats) for shape in SHAPES}
    fixed = _steps(_Calls(FIXED_SHAPE), repeats)
    steps = {shape: _steps(calls[shape], repeats) for shape in SHAPES}
    name = {shape: "x".join(map(str, shape)) for shape in SHAPES}

    print(f"BatchNorm1d kernel passes alone, {threads} thread(s), median of {repeats} (us)")
    print(
        "shape        stats  output  bwd sums  bwd sums+dx | torch sum(x,0)  add(x,g)"
        " | plain sum  plain copy"
    )
    for shape in SHAPES:
        p = passes[shape]
        print(
            f"{name[shape]:12s} {p['stats']:5.1f}  {p['output']:6.1f}  {p['bwd sums']:8.1f}  "
            f"{p['bwd kernel']:11.1f} | {p['torch sum']:14.1f}  {p['torch add']:8.1f} | "
            f"{p['plain sum']:9.1f}  {p['plain copy']:10.1f}"
        )
    print(
        f"\nBatchNorm1d training steps, {threads} thread(s), median of {repeats} (us); fixed:"
        f" the whole step on {'x'.join(map(str, FIXED_SHAPE))}, ours {fixed['ours']:.1f},"
        f" ATen {fixed['aten']:.1f}"
    )
    print(
        "shape        kernels (fwd + bwd)  ours step  unaccounted | ATen step  speed-up"
        "  kernels allowed at 1.5x | faults ours/ATen"
    )
    for shape in SHAPES:
        p, st = passes[shape], steps[shape]
        kernels = p["fwd kernel"] + p["bwd kernel"]
        unaccounted = st["ours"] - fixed["ours"] - kernels
        allowed = st["aten"] / 1.5 - fixed["aten"]
        print(
            f"{name[shape]:12s} {kernels:6.1f} ({p['fwd kernel']:.1f} + {p['bwd kernel']:.1f})"
            f"  {st['ours']:9.1f}  {unaccounted:11.1f} | {st['aten']:9.1f}"
            f"  {st['aten'] / st['ours']:7.2f}x  {allowed:23.1f} |"
            f" {st['ours faults']:.1f} / {st['aten faults']:.1f}"
        )
    print("(unaccounted: ours step - ours fixed - kernels; allowed: ATen step / 1.5 - ATen fixed)")


def python_overheads(repeats: int) -> None:
    """What the modules' eager path saves per call: a parameter read through
    ``nn.Module.__getattr__`` against the registry read, and ``autograd.Function.apply``
    against :func:`normdrop.kernels.ops.direct_apply` (a trivial Function on a 2x8 tensor)."""
    import torch

    import normdrop
    from normdrop.kernels.ops import direct_apply
    from normdrop.nn.batchnorm import _registered

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return grad

    module, x = normdrop.nn.BatchNorm1d(8), torch.randn(2, 8, requires_grad=True)
    direct, loops = direct_apply(Identity), 100

    def per_call(fn):
        def run():
            for _ in range(loops):
                fn()

        return _measure(run, repeats)[0] / loops

    timed = {
        "module.weight": per_call(lambda: module.weight),
        "registry read": per_call(lambda: _registered(module, module._parameters, "weight")),
        "Function.apply": per_call(lambda: Identity.apply(x)),
        "direct_apply": per_call(lambda: direct(x)),
    }
    print(
        f"\nPython per call, median of {repeats} x {loops} (us): "
        + ", ".join(f"{name} {us:.2f}" for name, us in timed.items())
    )


def wake_up(threads: int, repeats: int) -> None:
    """Our dropout forward+backward on 256x1024: back to back, after ``F.dropout`` and after
    ``torch.mm``, in turns (the preceding call untimed)."""
    import torch
    import torch.nn.functional as TF

    from normdrop.kernels import dispatch

    x = torch.randn(256, 1024, requires_grad=True)
    grad, rows = torch.randn(256, 1024), torch.randn(64, 256)

    def ours():
        torch.autograd.grad(dispatch.dropout(x, 0.5), [x], grad)

    before = {
        "back to back": lambda: None,
        "after F.dropout": lambda: TF.dropout(x.detach(), 0.5),
        "after torch.mm": lambda: torch.mm(rows, x.detach()),  # a parallel op
    }
    times: dict[str, list[float]] = {name: [] for name in before}
    for _ in range(5):  # warm-up
        ours()
    for _ in range(repeats):
        for name, preceding in before.items():
            preceding()
            start = time.perf_counter()
            ours()
            times[name].append(time.perf_counter() - start)
    print(
        f"\nOpenMP wake-up, {threads} thread(s), median of {repeats} (us): our dropout"
        " forward+backward on 256x1024 "
        + ", ".join(f"{name} {statistics.median(t) * 1e6:.1f}" for name, t in times.items())
    )


_COMPILE_PROBE = """
import collections, time, torch, normdrop
from numba.core import event
inclusive = collections.defaultdict(float)
starts = []
class Listener(event.Listener):
    def on_start(self, e):
        starts.append(time.perf_counter())
    def on_end(self, e):
        f = e.data["dispatcher"].py_func
        name = f.__module__.split(".")[0] + ":" + f.__qualname__
        inclusive[name] += time.perf_counter() - starts.pop()
event.register("numba:compile", Listener())
layer = normdrop.nn.BatchNorm2d(8)
x = torch.randn(4, 8, 5, 5, requires_grad=True)
start = time.perf_counter()
layer(x).sum().backward()
print(f"first BatchNorm2d training step: {time.perf_counter() - start:.2f} s")
numpy_side = sum(v for k, v in inclusive.items() if not k.startswith("normdrop"))
for name, seconds in sorted(inclusive.items(), key=lambda kv: -kv[1])[:8]:
    print(f"  {seconds:5.2f} s  {name}")
print(f"  {numpy_side:5.2f} s  numba's own overloads (np.empty, np.zeros, min, max...), all")
"""


def compile_breakdown() -> None:
    for ahead in ("1", "0"):
        what = "helper process" if ahead == "1" else "none; by function (inclusive)"
        print(f"\nCold compile, backward compiled ahead (NORMDROP_COMPILE_AHEAD={ahead}): {what}")
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "NUMBA_CACHE_DIR": cache, "NORMDROP_COMPILE_AHEAD": ahead}
            done = subprocess.run(
                [sys.executable, "-c", _COMPILE_PROBE], env=env, capture_output=True, text=True
            )
        if done.returncode != 0:
            print(f"failed ({done.returncode}):\n{done.stderr}")
            continue
        lines = done.stdout.rstrip().splitlines()
        print("\n".join(lines if ahead == "0" else lines[:1]))
    helper_startup()


def _python_seconds(code: str, *args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], check=True)
    return time.perf_counter() - start


def helper_startup() -> None:
    """The compile-ahead helper's start-up (a fresh Python that imports the kernels without the
    normdrop package) against a fresh Python importing normdrop; median of 5 each."""
    import normdrop
    from normdrop.kernels import compile_ahead

    package = os.path.dirname(normdrop.__file__)
    helper = compile_ahead.HELPER_PRELUDE + "from normdrop.kernels import compile_ahead\n"
    runs = [
        (_python_seconds(helper, package), _python_seconds("import normdrop")) for _ in range(5)
    ]
    print(
        f"\nHelper start-up (kernels without the normdrop package): "
        f"{statistics.median(h for h, _ in runs):.2f} s; "
        f"import normdrop: {statistics.median(n for _, n in runs):.2f} s"
    )


FAMILY_SHAPES = [(4, 8, 5, 5), (8, 3, 32, 32), (32, 16, 8, 8), (64, 32, 16), (16, 64, 7, 7),
                 (32, 64, 56, 56), (16, 32, 112, 112)]  # fmt: skip


def _plain_step(layout: str, x, dy):
    """A plain BatchNorm training step's two kernel calls of ``layout`` on ``x`` and ``dy``
    (forward with statistics, backward with sums and ``dx``), outputs preallocated."""
    import math

    import numpy as np
    import torch

    from normdrop.kernels import cpu, ops

    y, dx = torch.empty_like(x), torch.empty_like(x)
    channels, plane, numel = x.shape[1], math.prod(x.shape[2:]), x.numel()
    params, act = ops._kernel_params(x.dtype, "identity", 0.0, 0.0)
    running = np.zeros(channels, np.float32), np.ones(channels, np.float32)
    weight, bias = np.ones(channels, np.float32), np.zeros(channels, np.float32)
    stats, grads = np.empty((3, channels), np.float32), torch.zeros(2, channels)
    forward, backward = cpu.forward_kernel(layout), cpu.backward_kernel(layout)
    keys = (act, 0, 0, 0, 0, False)

    def step():
        forward(cpu.STATS_APPLY, x.data_ptr(), y.data_ptr(), numel, channels, plane, *running,
                0.1, 1e-5, stats, weight, bias, params, *keys)  # fmt: skip
        backward(True, dy.data_ptr(), x.data_ptr(), dx.data_ptr(), numel, channels, plane,
                 stats[0], stats[1], weight, bias, params, *keys, True, grads[0].data_ptr(),
                 grads[1].data_ptr())  # fmt: skip

    return step


def kernel_families(repeats: int) -> None:
    """Plain BatchNorm's training step on the planar and on the channel kernels, same tensors:
    what ``cpu.kernel_layout`` chooses between."""
    import math

    import torch

    from normdrop.kernels import cpu

    print(f"\nPlain BatchNorm kernels, training step (forward + backward calls), median of "
          f"{repeats} (us)")  # fmt: skip
    print(f"{'shape':18s} {'planar':>9s} {'channels':>9s}  chosen")
    for shape in FAMILY_SHAPES:
        x, dy = torch.randn(shape), torch.randn(shape)
        planar, channels = (
            _measure(_plain_step(layout, x, dy), repeats)[0]
            for layout in (cpu.PLANAR, cpu.CHANNELS)
        )
        plane = math.prod(shape[2:])
        chosen = cpu.kernel_layout(cpu.PLANAR, x.numel(), shape[1], plane, cpu.IDENTITY, False)
        name = "x".join(map(str, shape))
        print(f"{name:18s} {planar:9.1f} {channels:9.1f}  {chosen}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=201)
    parser.add_argument(
        "--allocator",
        choices=("steady", "default"),
        default="steady",
        help="as in benchmarks/run.py: steady keeps freed memory mapped (glibc mallopt)",
    )
    args = parser.parse_args()
    if args.allocator == "steady":
        from run import steady_allocator  # benchmarks/run.py, beside this file

        print(f"Allocator: {steady_allocator()}\n")
    _use_threads(args.threads)
    step_breakdown(args.threads, args.repeats)
    wake_up(args.threads, args.repeats)
    python_overheads(args.repeats)
    kernel_families(max(21, args.repeats // 10))
    compile_breakdown()


if __name__ == "__main__":
    main()
