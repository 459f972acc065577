"""Where a kernel's cold compile time goes: numba's passes per function, and LLVM's share.

    python benchmarks/compile_profile.py [--layout rows] [--kind forward] [--dtype float32]

Each measurement runs in a fresh process with an empty ``NUMBA_CACHE_DIR`` and compiles one
kernel (``cpu.forward_kernel(layout)`` or ``cpu.backward_kernel(layout)`` for its signature),
twice: at numba's default LLVM optimization level and with ``NUMBA_OPT=0``, whose difference is
the time LLVM spends optimizing (the rest is numba's Python front end: bytecode analysis,
typing, inlining, the parfor passes, lowering to LLVM IR, and machine-code emission). For the
default run it prints, per compiled function (the kernel and the helpers it compiles), the
total of its pipeline's passes and the four slowest passes, from numba's ``pipeline_times``
metadata; a function's typing includes the compilation of the helpers it calls. The parfor
lowering pass of a kernel includes its parallel loop's own compilation (a gufunc). docs/kernels.md
quotes a run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_CHILD = """
import json, sys, time
import numpy as np
from numba.core.registry import CPUDispatcher
from normdrop.kernels import cpu
layout, kind, dtype = sys.argv[1:4]
dispatcher = cpu.forward_kernel(layout) if kind == "forward" else cpu.backward_kernel(layout)
signature = (cpu.forward_signature if kind == "forward" else cpu.backward_signature)(
    np.dtype(dtype)
)
start = time.perf_counter()
dispatcher.compile(signature)
total = time.perf_counter() - start
functions = []
for name in dir(cpu):
    candidate = getattr(cpu, name)
    if not isinstance(candidate, CPUDispatcher):
        continue
    for result in candidate.overloads.values():
        for passes in result.metadata.get("pipeline_times", {}).values():
            times = sorted(((t.run, p.split("_", 1)[1]) for p, t in passes.items()), reverse=True)
            functions.append((name, sum(t for t, _ in times), times[:4]))
print(json.dumps({"total": total, "functions": functions}))
"""


def _compile(layout: str, kind: str, dtype: str, opt: str | None) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        if opt is not None:
            env["NUMBA_OPT"] = opt
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, layout, kind, dtype],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="rows", choices=("rows", "planar", "channels"))
    parser.add_argument("--kind", default="forward", choices=("forward", "backward"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    args = parser.parse_args(argv)
    default = _compile(args.layout, args.kind, args.dtype, None)
    unoptimized = _compile(args.layout, args.kind, args.dtype, "0")
    print(f"{args.kind} {args.layout} {args.dtype}, cold, fresh process each")
    print(f"  default optimization: {default['total']:.2f} s")
    print(f"  NUMBA_OPT=0:          {unoptimized['total']:.2f} s")
    print(f"  LLVM optimization:    {default['total'] - unoptimized['total']:.2f} s (difference)")
    print("  per function (default run; typing includes the helpers it compiles):")
    for name, seconds, slowest in sorted(default["functions"], key=lambda f: -f[1]):
        passes = ", ".join(f"{pass_name} {t:.2f}" for t, pass_name in slowest)
        print(f"    {name:28s} {seconds:6.2f} s  ({passes})")


if __name__ == "__main__":
    main()
