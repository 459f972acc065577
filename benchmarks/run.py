"""normdrop's kernels side by side with PyTorch, in one process; writes BENCHMARKS.md.

    python benchmarks/run.py                 # every case, writes BENCHMARKS.md (make bench)
    python benchmarks/run.py --quick --output /tmp/b.md   # a fast smoke run

Torch and numba run with the same thread count (``--threads``, default torch's). Each timing is
the median of ``--repeats`` runs after warm-up; an op case's, the median of that over
``--rounds`` rounds on fresh tensors. A case's memory-traffic bound is the bytes the
op must move (see ``TRAFFIC``) divided by the bandwidth of a large ``copy_`` measured in the
same run; ``x bound`` is the measured time over that bound.

Timing of the op cases (``--timing``): ``blocks`` (default) times each function's repeats back
to back, as ``timeit`` and ``torch.utils.benchmark`` do, the sides taking turns by round;
``turns`` runs every function once per repetition, so each call follows the other side's (after
a 3 ms serial ``F.dropout`` the OpenMP workers have gone to sleep, and the next parallel call
pays their wake-up, which no training step pays: the layer before keeps them busy). Whole
training steps and the small batches always take turns: every step starts after a step.
Allocator (``--allocator``): ``steady`` (default) sets glibc's trim and mmap thresholds so that
freed memory stays mapped, the tuning PyTorch's CPU performance guide makes with jemalloc or
tcmalloc; ``default`` leaves glibc's dynamic thresholds, under which a 1 MB tensor is sometimes
freshly mapped (up to 256 page faults), depending on the order of earlier allocations.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numba
import torch
import torch.nn.functional as TF
from torch import nn

import normdrop
from normdrop.kernels import dispatch

SHAPES = [(256, 1024), (64, 4096), (32, 64, 56, 56), (8, 256, 28, 28)]
# The image shapes again in channels_last (BatchNorm and the fused op; dropout does not care).
CHANNELS_LAST_SHAPES = [(32, 64, 56, 56), (8, 256, 28, 28)]
P = 0.5
# Passes over the tensor (each reads or writes N elements) that any implementation must make:
# dropout forward reads x, writes y; backward reads dy, writes dx (the mask is regenerated).
# BatchNorm training forward reads x for the statistics, then reads x and writes y; the
# backward reads dy and x for the two sums, then dy and x again and writes dx. The fused op
# moves what BatchNorm moves.
TRAFFIC = {
    ("dropout", "fwd"): 2,
    ("dropout", "fwd+bwd"): 4,
    ("batchnorm", "fwd"): 3,
    ("batchnorm", "fwd+bwd"): 8,
    ("fused", "fwd"): 3,
    ("fused", "fwd+bwd"): 8,
}


@dataclass
class Row:
    case: str
    shape: tuple[int, ...]
    mode: str
    torch_ms: float
    ours_ms: float
    bound_ms: float
    channels_last: bool = False

    @property
    def speedup(self) -> float:
        return self.torch_ms / self.ours_ms


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    return medians_ms([fn], repeats, warmup)[0]


def _turns_ms(fns: list[Callable[[], object]], repeats: int, warmup: int) -> list[float]:
    """Median milliseconds of each function, each repetition running all of them once."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) * 1e3 for spent in times]


def medians_ms(
    fns: list[Callable[[], object]],
    repeats: int,
    warmup: int = 2,
    *,
    turns: bool = True,
    reverse: bool = False,
) -> list[float]:
    """Median milliseconds of each function, taking turns (``turns``) or in blocks, one function's
    repeats after the other's, in list order (``reverse``: the last first). See ``--timing`` in
    the module docstring."""
    if turns:
        return _turns_ms(fns, repeats, warmup)
    order = range(len(fns) - 1, -1, -1) if reverse else range(len(fns))
    times = {i: _turns_ms([fns[i]], repeats, warmup)[0] for i in order}
    return [times[i] for i in range(len(fns))]


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def steady_allocator() -> str:
    """Keep freed memory mapped (glibc): no trimming of the heap's top, and blocks up to 32 MiB
    (glibc's largest mmap threshold) from the heap, so a 1 MB tensor freed and allocated again
    costs no page faults. Returns what was done, for the report."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) and libc.mallopt(
            _M_MMAP_THRESHOLD, 32 << 20
        )
    except (OSError, AttributeError):
        done = 0
    if not done:
        return "default (glibc's mallopt unavailable)"
    return "steady (glibc mallopt: M_TRIM_THRESHOLD 1 GiB, M_MMAP_THRESHOLD 32 MiB)"


def copy_bandwidth(repeats: int) -> float:
    """Bytes per second of a large ``copy_`` (read + write), torch's threads."""
    source = torch.randn(64 * 2**20)
    target = torch.empty_like(source)
    seconds = median_ms(lambda: target.copy_(source), repeats) / 1e3
    return 2 * source.numel() * source.element_size() / seconds


# --------------------------------------------------------------------------------------------
# Op cases
# --------------------------------------------------------------------------------------------


def _forward_backward(make_output: Callable[[], torch.Tensor], grad: torch.Tensor, inputs):
    # autograd.grad, not backward: accumulating into .grad is not the op's work.
    def run():
        torch.autograd.grad(make_output(), inputs, grad)

    return run


def _no_grad(make_output: Callable[[], torch.Tensor]):
    def run():
        with torch.no_grad():
            make_output()

    return run


def _timed(make_output: Callable[[], torch.Tensor], mode: str, grad: torch.Tensor, inputs):
    if mode == "fwd":
        return _no_grad(make_output)
    return _forward_backward(make_output, grad, inputs)


_TORCH_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


def _chain_modules(
    channels: int, two_d: bool, activation: str = "relu", p: float = P
) -> tuple[nn.Module, nn.Module]:
    """torch.nn's BatchNorm -> activation -> Dropout chain and normdrop's BatchNormAct."""
    bn = nn.BatchNorm2d if two_d else nn.BatchNorm1d
    fused = normdrop.nn.BatchNormAct2d if two_d else normdrop.nn.BatchNormAct1d
    chain = nn.Sequential(bn(channels), _TORCH_ACTIVATIONS[activation](), nn.Dropout(p))
    return chain, fused(channels, activation, p)


def op_cases(shape: tuple[int, ...], channels_last: bool = False):
    """(case, torch forward, ours forward, differentiated inputs) for one shape; in
    channels_last, BatchNorm and the fused op only."""
    x = torch.randn(shape)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    channels, two_d = shape[1], len(shape) == 4
    torch_bn = (nn.BatchNorm2d if two_d else nn.BatchNorm1d)(channels)
    ours_bn = (normdrop.nn.BatchNorm2d if two_d else normdrop.nn.BatchNorm1d)(channels)
    chain, fused = _chain_modules(channels, two_d)
    params = [x, *torch_bn.parameters()], [x, *ours_bn.parameters()]
    chain_params = [x, *chain.parameters()], [x, *fused.parameters()]
    dropout = ("dropout", lambda: TF.dropout(x, P), lambda: dispatch.dropout(x, P), ([x], [x]))
    return x, [
        *([] if channels_last else [dropout]),
        ("batchnorm", lambda: torch_bn(x), lambda: ours_bn(x), params),
        ("fused", lambda: chain(x), lambda: fused(x), chain_params),
    ]


def run_ops(
    repeats: int, bandwidth: float, shapes, rounds: int, turns: bool, channels_last_shapes=()
) -> list[Row]:
    """Every op case (on ``shapes``, then in channels_last on ``channels_last_shapes``),
    ``rounds`` times over, each round on fresh tensors and modules; a row holds
    the median over rounds of each side's median time. The host's memory system is not steady
    (page faults when the C allocator re-maps a freed 1 MB block, input and output buffers
    4 KiB apart that alias in the cache): one round can catch a slow state for a whole case,
    and fresh tensors in another round land elsewhere."""
    measured: dict[tuple, list[tuple[float, float]]] = {}
    nbytes: dict[tuple[int, ...], int] = {}
    layouts = [(shape, False) for shape in shapes]
    layouts += [(shape, True) for shape in channels_last_shapes]
    for round_ in range(rounds):
        for shape, last in layouts:
            x, cases = op_cases(shape, last)
            nbytes[shape] = x.numel() * x.element_size()
            grad = torch.randn_like(x)  # in x's memory format
            for case, torch_fn, ours_fn, (torch_inputs, ours_inputs) in cases:
                for mode in ("fwd", "fwd+bwd"):
                    times = medians_ms(
                        [
                            _timed(torch_fn, mode, grad, torch_inputs),
                            _timed(ours_fn, mode, grad, ours_inputs),
                        ],
                        repeats,
                        turns=turns,
                        reverse=round_ % 2 == 1,
                    )
                    measured.setdefault((case, shape, last, mode), []).append(tuple(times))
                    print(f"  round {round_ + 1} {case:9s} {_shape(shape, last):30s} {mode:8s} "
                          f"torch {times[0]:8.2f} ms  normdrop {times[1]:8.2f} ms",
                          flush=True)  # fmt: skip
    rows = []
    for (case, shape, last, mode), times in measured.items():
        torch_ms = statistics.median(t for t, _ in times)
        ours_ms = statistics.median(o for _, o in times)
        bound_ms = TRAFFIC[case, mode] * nbytes[shape] / bandwidth * 1e3
        rows.append(Row(case, shape, mode, torch_ms, ours_ms, bound_ms, last))
    return rows


SMALL_SHAPES = [(32, 50), (64, 512), (128, 256)]


def _small_batchnorm_ms(shape: tuple[int, ...], repeats: int) -> list[float]:
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    torch_bn, ours_bn = nn.BatchNorm1d(shape[1]), normdrop.nn.BatchNorm1d(shape[1])
    torch_run = _forward_backward(lambda: torch_bn(x), grad, [x, *torch_bn.parameters()])
    ours_run = _forward_backward(lambda: ours_bn(x), grad, [x, *ours_bn.parameters()])

    def reference_run():
        with normdrop.use_backend("reference"):
            ours_run()

    return medians_ms([torch_run, reference_run, ours_run], max(repeats, 50), warmup=10, turns=True)


def run_small_batchnorm(repeats: int) -> list[tuple[tuple[int, ...], float, float, float]]:
    """BatchNorm1d training forward+backward on small batches: ATen, normdrop's reference
    backend and its fast backend (ms); overhead-dominated sizes, as in the lab's MLP."""
    rows = []
    for shape in SMALL_SHAPES:
        times = _small_batchnorm_ms(shape, repeats)
        rows.append((shape, *times))
        print(f"  batchnorm {shape!s:12s} torch {times[0]:.3f} ms  reference {times[1]:.3f} ms  "
              f"fast {times[2]:.3f} ms", flush=True)  # fmt: skip
    return rows


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward, counted by saved_tensors_hooks."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x)
    return total


def run_saved_bytes(shapes) -> list[tuple[tuple[int, ...], int, int]]:
    rows = []
    for shape in shapes:
        x = torch.randn(shape, requires_grad=True)
        chain, fused = _chain_modules(shape[1], len(shape) == 4)
        rows.append((shape, saved_bytes(chain, x), saved_bytes(fused, x)))
    return rows


# --------------------------------------------------------------------------------------------
# Training steps of real models
# --------------------------------------------------------------------------------------------


def mlp(layers: str) -> nn.Module:
    """64-512-512-10 with BN + ReLU + Dropout after each hidden Linear."""
    blocks, width_in = [], 64
    for width in (512, 512):
        blocks.append(nn.Linear(width_in, width, bias=False))
        if layers == "torch":
            blocks += [nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(P)]
        elif layers == "normdrop":
            blocks += [normdrop.nn.BatchNorm1d(width), nn.ReLU(), normdrop.nn.Dropout(P)]
        else:
            blocks.append(normdrop.nn.BatchNormAct1d(width, "relu", P))
        width_in = width
    return nn.Sequential(*blocks, nn.Linear(width_in, 10))


def cnn(layers: str) -> nn.Module:
    """Two conv blocks (Conv -> BN -> ReLU -> Dropout -> MaxPool) and a linear head, 32x32x3."""
    blocks, channels_in = [], 3
    for channels in (32, 64):
        blocks.append(nn.Conv2d(channels_in, channels, 3, padding=1, bias=False))
        if layers == "torch":
            blocks += [nn.BatchNorm2d(channels), nn.ReLU(), nn.Dropout(0.1)]
        elif layers == "normdrop":
            blocks += [normdrop.nn.BatchNorm2d(channels), nn.ReLU(), normdrop.nn.Dropout(0.1)]
        else:
            blocks.append(normdrop.nn.BatchNormAct2d(channels, "relu", 0.1))
        blocks.append(nn.MaxPool2d(2))
        channels_in = channels
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(64 * 8 * 8, 10))


def _digits_batches(batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    features, labels = load_digits(return_X_y=True)
    x = torch.tensor(features, dtype=torch.float32) / 16
    y = torch.tensor(labels)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x) - batch + 1, batch)]


def _image_batches(batch: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(batch, 3, 32, 32, generator=generator), torch.randint(0, 10, (batch,)))
        for _ in range(count)
    ]


def training_step(model: nn.Module, batches, backend: str = "fast") -> Callable[[], None]:
    """One SGD step per call (forward, cross-entropy, backward, update), cycling the batches."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    index = 0

    def step():
        nonlocal index
        x, y = batches[index % len(batches)]
        index += 1
        optimizer.zero_grad(set_to_none=True)
        with normdrop.use_backend(backend):
            TF.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


TRAINING_LAYERS = ("torch", "reference", "normdrop", "fused")


def run_training(repeats: int) -> list[tuple[str, dict[str, float]]]:
    """ms per step: torch.nn layers, normdrop layers on the reference backend and on the fast
    one, and BatchNormAct (fused), the steps taking turns."""
    cases = [
        ("MLP 64-512-512-10, digits, batch 64 (the lab's)", mlp, _digits_batches(64)),
        ("MLP 64-512-512-10, digits, batch 256", mlp, _digits_batches(256)),
        ("CNN 2 conv blocks, 32x32x3, batch 64", cnn, _image_batches(64, 8)),
    ]
    rows = []
    for name, build, batches in cases:
        steps = []
        for layers in TRAINING_LAYERS:
            torch.manual_seed(0)
            model = build("normdrop" if layers == "reference" else layers)
            backend = "reference" if layers == "reference" else "fast"
            steps.append(training_step(model, batches, backend))
        times = dict(zip(TRAINING_LAYERS, medians_ms(steps, repeats, warmup=3), strict=True))
        rows.append((name, times))
        print(f"  {name}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in times.items()), flush=True)
    return rows


# --------------------------------------------------------------------------------------------
# First-call latency: JIT compilation, cold and cached
# --------------------------------------------------------------------------------------------

_FIRST_CALL = textwrap.dedent(
    """
    import sys, time
    start = time.perf_counter()
    import torch, normdrop
    imported = time.perf_counter()
    import torch._dynamo  # what the first custom-op call imports: timed apart
    dynamo = time.perf_counter()
    def train_step(module, shape):
        x = torch.randn(shape, requires_grad=True)
        module(x).sum().backward()
    rank, shape = (1, (64, 512)) if sys.argv[1] == "1d" else (2, (4, 8, 5, 5))
    channels = shape[1]
    times = [time.perf_counter()]
    for layer in (
        getattr(normdrop.nn, f"BatchNorm{rank}d")(channels),
        normdrop.nn.Dropout(0.5),
        getattr(normdrop.nn, f"BatchNormAct{rank}d")(channels, "relu", 0.5),
    ):
        train_step(layer, shape)
        times.append(time.perf_counter())
    steps = [b - a for a, b in zip(times, times[1:])]
    print(imported - start, dynamo - imported, *steps, sum(steps))
    """
)

# (label, argument of _FIRST_CALL): the programs timed, each in its own fresh processes
FIRST_CALL_PROGRAMS = [
    ("images: `BatchNorm2d`, `Dropout`, `BatchNormAct2d` on 4x8x5x5", "2d"),
    ("vectors: `BatchNorm1d`, `Dropout`, `BatchNormAct1d` on 64x512 (the lab's MLP)", "1d"),
]


def first_call_seconds() -> list[tuple[str, list[float]]]:
    """For each of ``FIRST_CALL_PROGRAMS``: import, torch._dynamo import, then its three
    training steps (float32), in fresh processes: with an empty numba cache, then with the cache
    it left."""
    results = []
    for program, argument in FIRST_CALL_PROGRAMS:
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "NUMBA_CACHE_DIR": cache}
            for state in ("cold (empty NUMBA_CACHE_DIR)", "cached"):
                output = subprocess.run(
                    [sys.executable, "-c", _FIRST_CALL, argument],
                    env=env,
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                results.append((f"{program} | {state}", [float(v) for v in output.split()]))
    return results


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def _shape(shape, channels_last: bool = False) -> str:
    return "x".join(str(d) for d in shape) + (" channels_last" if channels_last else "")


TIMING_TEXT = {
    "blocks": "op cases in blocks (each side's repeats back to back, the sides taking turns by"
    " round); training steps and small batches in turns (call by call)",
    "turns": "turns (the sides alternate call by call) everywhere",
}


def report(args, runs, saved, first_calls) -> str:
    """``runs``: per thread count, (threads, bandwidth, op rows, training rows, small rows)."""
    lines = [
        "# Benchmarks",
        "",
        f"Command: `{args.command}`  ",
        f"Machine: {machine()}  ",
        f"Threads: {', '.join(str(run[0]) for run in runs)} (torch and numba alike, per run)  ",
        f"Load: 1-minute load average {args.load_before} before the run, {os.getloadavg()[0]:.2f} "
        "after  ",
        f"Versions: Python {platform.python_version()}, torch {torch.__version__}, "
        f"numba {numba.__version__}, normdrop {normdrop.__version__}  ",
        f"Repetitions: median of {args.repeats} after warm-up (op cases: the median of that over "
        f"{args.rounds} rounds on fresh tensors); float32; dropout p = {P}  ",
        f"Timing: {TIMING_TEXT[args.timing]}  ",
        f"Allocator: {args.allocator_done}",
        "",
        "Speed-up is torch time / normdrop time. `x bound` is normdrop's time over the",
        "memory-traffic bound (passes over the tensor the op must make, at the copy bandwidth):",
        "dropout 2 (forward) and 4 (forward+backward) passes; BatchNorm and the fused op 3 and 8.",
        "Torch's side: `F.dropout`; `nn.BatchNorm*` (ATen); the `nn.BatchNorm* -> nn.ReLU ->",
        "nn.Dropout` chain. normdrop's: `dispatch.dropout` (what `normdrop.nn.Dropout` runs),",
        "`normdrop.nn.BatchNorm*`, `normdrop.nn.BatchNormAct*`. `fwd` runs under `no_grad`",
        "(BatchNorm in training mode); `fwd+bwd` is the forward and `torch.autograd.grad` of the",
        "input and the parameters (no accumulation into `.grad`).",
    ]
    for threads, bandwidth, rows, _, _ in runs:
        lines += [
            "",
            f"## {threads} thread{'s' if threads > 1 else ''}",
            "",
            f"Copy bandwidth (large `copy_`, read + write): {bandwidth / 1e9:.1f} GB/s",
            "",
            "| case | shape | pass | torch ms | normdrop ms | speed-up | x bound |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for r in rows:
            lines.append(
                f"| {r.case} | {_shape(r.shape, r.channels_last)} | {r.mode} | {r.torch_ms:.3f} | "
                f"{r.ours_ms:.3f} | {r.speedup:.1f}x | {r.ours_ms / r.bound_ms:.1f} |"
            )
    lines += [
        "",
        "## Bytes kept for backward (BN -> ReLU -> Dropout, saved_tensors_hooks)",
        "",
        "| shape | torch.nn chain | BatchNormAct | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    for shape, chain, fused in saved:
        lines.append(f"| {_shape(shape)} | {chain:,} | {fused:,} | {fused / chain:.2f} |")
    lines += [
        "",
        "## Small BatchNorm1d batches (training forward+backward, ms)",
        "",
        "Overhead-dominated sizes (the lab's MLP runs BatchNorm1d on (64, 512)): ATen, normdrop's",
        "reference backend (`normdrop.functional`) and its fast backend.",
        "",
        "| threads | shape | ATen | reference | fast | fast vs reference | fast vs ATen |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for threads, _, _, _, small in runs:
        for shape, torch_ms, reference_ms, fast_ms in small:
            lines.append(
                f"| {threads} | {_shape(shape)} | {torch_ms:.3f} | {reference_ms:.3f} | "
                f"{fast_ms:.3f} | {reference_ms / fast_ms:.2f}x | {torch_ms / fast_ms:.2f}x |"
            )
    lines += [
        "",
        "## Training steps (forward, backward, SGD step; ms per step)",
        "",
        "Speed-ups are over the torch.nn model. `reference`: normdrop layers on the reference",
        "backend; `fast`: normdrop layers (BatchNorm, ReLU, Dropout) on the kernels; `fused`:",
        "BatchNormAct (BN -> ReLU -> Dropout in one module).",
        "",
        "| threads | model | torch.nn | reference | fast | speed-up | fused | speed-up |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for threads, _, _, training, _ in runs:
        for name, t in training:
            lines.append(
                f"| {threads} | {name} | {t['torch']:.2f} | {t['reference']:.2f} | "
                f"{t['normdrop']:.2f} | {t['torch'] / t['normdrop']:.2f}x | {t['fused']:.2f} | "
                f"{t['torch'] / t['fused']:.2f}x |"
            )
    lines += [
        "",
        "## First-call latency (fresh process, seconds)",
        "",
        "`import` is `import torch, normdrop`; the first custom-op call imports `torch._dynamo`",
        "(torch's cost, once per process); then, one after the other, the first training step of",
        "a BatchNorm, a `Dropout` and a `BatchNormAct` (ReLU, p = 0.5), float32, which JIT-compile",
        "their kernels or load them from numba's cache (`NUMBA_CACHE_DIR`, see docs/kernels.md);",
        "`kernels` is the three steps' total. On images plain BatchNorm runs the channel",
        "kernels and the fused module the planar ones (two pairs to compile); on vectors both",
        "run the rows kernels (one pair).",
        "",
        "| program | numba cache | import | torch._dynamo | BatchNorm | Dropout | BatchNormAct "
        "| kernels |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, values in first_calls:
        lines.append(f"| {label} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    lines += ["", *args.notes, ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[torch.get_num_threads()], help="one run each"
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3, help="op cases: rounds, fresh tensors")
    parser.add_argument("--quick", action="store_true", help="3 repeats, smallest shapes only")
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent.parent / "BENCHMARKS.md"
    )
    parser.add_argument(
        "--timing", choices=("blocks", "turns"), default="blocks", help="see the docstring"
    )
    parser.add_argument(
        "--allocator", choices=("steady", "default"), default="steady", help="see the docstring"
    )
    parser.add_argument("--note", action="append", default=[], help="a line for the report")
    args = parser.parse_args(argv)
    shown = ["..." if a in args.note else a for a in (argv or sys.argv[1:])]  # notes: at the end
    args.command = " ".join(["python benchmarks/run.py", *shown])
    args.notes = args.note
    args.load_before = f"{os.getloadavg()[0]:.2f}"
    if args.quick:
        args.repeats, args.rounds = 3, 1
    args.allocator_done = steady_allocator() if args.allocator == "steady" else "default (glibc's)"
    shapes = SHAPES[:1] + SHAPES[2:3] if args.quick else SHAPES
    last_shapes = CHANNELS_LAST_SHAPES[1:] if args.quick else CHANNELS_LAST_SHAPES
    runs = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        print(f"threads {threads}: copy bandwidth, op cases", flush=True)
        bandwidth = copy_bandwidth(args.repeats)
        rows = run_ops(
            args.repeats, bandwidth, shapes, args.rounds, args.timing == "turns", last_shapes
        )
        print("small batches", flush=True)
        small = run_small_batchnorm(args.repeats)
        print("training steps", flush=True)
        runs.append((threads, bandwidth, rows, run_training(args.repeats), small))
    saved = run_saved_bytes(shapes)
    print("first-call latency", flush=True)
    first_calls = first_call_seconds()
    args.output.write_text(report(args, runs, saved, first_calls))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
