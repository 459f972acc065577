"""Fused BatchNorm -> GELU -> Dropout against torch's BatchNorm, GELU and Dropout modules.

    python benchmarks/gelu.py [--threads 2] [--repeats 15] [--rounds 5]

``benchmarks/run.py`` times the fused op with ReLU; GELU is the activation whose math costs
more than its memory traffic (erf in the forward, erf and exp in the backward), so it shows
whether the kernels' element loops vectorize (docs/kernels.md, "erf and exp"). Same cases as
run.py (float32, training mode), each side's repeats back to back, the sides taking turns by
round; the median over rounds of the per-round medians, in ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numba
import torch

sys.path.insert(0, str(Path(__file__).parent))
import run  # run.py's shapes, chain, timing, allocator setting and machine line


def _case(shape, p: float, repeats: int, rounds: int) -> dict[str, dict[str, float]]:
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    chain, fused = run._chain_modules(shape[1], len(shape) == 4, "gelu", p)
    modules = {"torch": chain, "normdrop": fused}

    def forward(module):
        with torch.no_grad():
            module(x)

    def forward_backward(module):
        torch.autograd.grad(module(x), [x, *module.parameters()], grad)

    results = {}
    for name, step in (("fwd", forward), ("fwd+bwd", forward_backward)):
        per_round = {side: [] for side in modules}
        for _ in range(rounds):
            for side, module in modules.items():
                per_round[side].append(run.median_ms(lambda m=module, s=step: s(m), repeats))
        results[name] = {side: statistics.median(v) for side, v in per_round.items()}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    allocator = run.steady_allocator()
    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    print(f"Machine: {run.machine()}; threads: {args.threads}; allocator: {allocator}")
    print(f"torch {torch.__version__}, numba {numba.__version__}; median of {args.repeats}")
    print(f"repeats, median over {args.rounds} rounds; float32; ms\n")
    print("| shape | p | pass | torch chain | normdrop BatchNormAct | speed-up |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for shape in run.SHAPES:
        for p in (0.0, 0.1):
            for name, t in _case(shape, p, args.repeats, args.rounds).items():
                label = "x".join(map(str, shape))
                print(
                    f"| {label} | {p} | {name} | {t['torch']:.3f} | {t['normdrop']:.3f} | "
                    f"{t['torch'] / t['normdrop']:.1f}x |",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
