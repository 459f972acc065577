"""Where a BatchNorm training step's time goes, and where the kernels' JIT time goes.

    python benchmarks/breakdown.py [--threads 2] [--repeats 201]

Prints the floor of the BatchNorm1d shapes: each pass of the kernels alone (forward
statistics, forward output, backward sums, backward ``dx``) next to torch's own single-pass ops
on the same tensor (``torch.sum(x, 0)``, ``torch.add(x, g, out=y)``), and what a 1.5x speed-up
over ATen's step would leave for the kernels once the step's fixed cost (ATen's whole step on a
2x8 input) is paid;

then, for BatchNorm1d training steps (forward and ``autograd.grad``):

- the forward and backward kernels alone, called directly with preallocated outputs;
- the whole step with ``normdrop.nn.BatchNorm1d`` and with ``torch.nn.BatchNorm1d`` (ATen);
- minor page faults per step (``resource.getrusage``), for both;

then, in fresh processes with an empty ``NUMBA_CACHE_DIR``, the cold first ``BatchNorm2d``
training step with and without the backward compiled ahead in a helper process
(``NORMDROP_COMPILE_AHEAD``), and, without it, the compile time split by function from numba's
compile events (each function's time includes the helpers it compiles); last, the helper's
start-up against a plain ``import normdrop``. docs/kernels.md and
BENCHMARKS.md quote these figures.
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

SHAPES = [(256, 1024), (64, 4096), (2, 8)]


def _median_us(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _faults_per_call(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / repeats


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


def _shape_row(shape: tuple[int, ...], repeats: int) -> list[float]:
    """Kernel forward, kernel backward, normdrop step, ATen step (us); faults per step."""
    calls = _Calls(shape)
    steps = calls.step(calls.ours), calls.step(calls.aten)
    kernels = calls.forward(calls.entry.what), calls.backward(calls.grad_in.data_ptr())
    times = [_median_us(f, repeats) for f in (*kernels, *steps)]
    return times + [_faults_per_call(f, repeats) for f in steps]


def _pass_row(shape: tuple[int, ...], repeats: int) -> list[float]:
    """Kernel passes alone (us): statistics, output, backward sums, backward sums + dx; torch's
    ``sum(x, 0)`` and ``add(x, g, out=y)`` on the same tensor."""
    import torch

    from normdrop.kernels import cpu

    calls = _Calls(shape)
    x = calls.x.detach()
    passes = [
        calls.forward(cpu.STATS),
        calls.forward(cpu.APPLY),
        calls.backward(0),
        calls.backward(calls.grad_in.data_ptr()),
        lambda: torch.sum(x, 0),
        lambda: torch.add(x, calls.grad, out=calls.out),
    ]
    return [_median_us(f, repeats) for f in passes]


def _aten_step_us(shape: tuple[int, ...], repeats: int) -> float:
    calls = _Calls(shape)
    return _median_us(calls.step(calls.aten), repeats)


def floor_breakdown(threads: int, repeats: int) -> None:
    import numba
    import torch

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    shapes = SHAPES[:2]
    # The passes first, in a fresh process: steps on 1 MB tensors leave the C allocator in
    # states (page faults, 4 KiB-aliased buffers) that slow whatever runs after them.
    passes = [_pass_row(shape, repeats) for shape in shapes]
    fixed = _aten_step_us((2, 8), repeats)
    print(f"BatchNorm1d kernel passes alone, {threads} thread(s), median of {repeats} (us)")
    print(
        "shape        stats  output  bwd sums  bwd sums+dx | torch sum(x,0)  add(x,g)"
        " | ATen step  1.5x needs  minus fixed  = for kernels"
    )
    for shape, (stats, output, sums, full, torch_sum, torch_add) in zip(
        shapes, passes, strict=True
    ):
        aten = _aten_step_us(shape, repeats)
        target = aten / 1.5
        print(
            f"{'x'.join(map(str, shape)):12s} {stats:5.1f}  {output:6.1f}  {sums:8.1f}  "
            f"{full:11.1f} | {torch_sum:14.1f}  {torch_add:8.1f} | {aten:9.1f}  {target:10.1f}"
            f"  {fixed:11.1f}  {target - fixed:14.1f}"
        )
    print(
        "(fixed: ATen's whole step on 2x8, module call and autograd engine included; ours"
        " kernels back to back: stats+output forward, sums+dx backward)\n"
    )


def step_breakdown(threads: int, repeats: int) -> None:
    import numba
    import torch

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    print(f"BatchNorm1d training steps, {threads} thread(s), median of {repeats} (us)")
    print("shape        fwd kernel  bwd kernel  normdrop step  ATen step  faults normdrop/ATen")
    for shape in SHAPES:
        fwd, bwd, ours, aten, faults_ours, faults_aten = _shape_row(shape, repeats)
        print(
            f"{'x'.join(map(str, shape)):12s} {fwd:10.1f}  {bwd:10.1f}  {ours:13.1f}  "
            f"{aten:9.1f}  {faults_ours:.1f} / {faults_aten:.1f}"
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
        lines = (done.stdout.rstrip() or done.stderr).splitlines()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=201)
    args = parser.parse_args()
    floor_breakdown(args.threads, args.repeats)
    step_breakdown(args.threads, args.repeats)
    compile_breakdown()


if __name__ == "__main__":
    main()
