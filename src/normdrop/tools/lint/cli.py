"""``normdrop lint MODULE:FACTORY [--input-shape 8,3,32,32]``: lint a model from the shell.

FACTORY is a callable in MODULE (an importable module, or a path to a ``.py`` file) that
returns the model when called without arguments; a model object works too. The example input is
float32 standard normal noise of ``--input-shape`` (guessed from the first Linear/Conv if not
given). Exit status: 0 no finding at or above ``--fail-on`` (default: error), 1 some, 2 the
model could not be loaded or run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from normdrop.errors import InputError
from normdrop.tools.lint.checks import SEVERITIES, Finding, lint

__all__ = ["cli_main"]


def _load_factory(spec: str) -> Callable[[], Any] | torch.nn.Module:
    """``package.module:name`` or ``path/to/file.py:name`` -> the named object."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise InputError(
            f"expected MODULE:FACTORY (e.g. mypackage.models:make_model or models.py:make), "
            f"got {spec!r}"
        )
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise InputError(f"no such file: {module_name}")
        module = _user_code(f"importing {module_name}", _import_file, path)
    else:
        if "" not in sys.path:
            sys.path.insert(0, "")  # like `python -m`: modules in the working directory
        module = _user_code(f"importing {module_name}", importlib.import_module, module_name)
    try:
        return functools.reduce(getattr, attribute.split("."), module)
    except AttributeError:
        raise InputError(f"{module_name} has no attribute {attribute!r}") from None


def _import_file(path: Path) -> Any:
    """Import a ``.py`` file as ``python path/file.py`` would run it: its directory first on
    ``sys.path`` (so it imports its neighbours) and the module in ``sys.modules`` while it runs
    (dataclasses and pickle look it up there), under the file's name unless that is taken."""
    name = path.stem if path.stem not in sys.modules else f"_normdrop_lint_{path.stem}"
    directory = str(path.resolve().parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    loader_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _user_code(what: str, function: Callable, *args: Any) -> Any:
    """``function(*args)``, running the user's code: whatever it raises is their model's
    problem, reported in one line (with the exit status of any unusable input) rather than
    as a traceback through the linter. ImportError and SyntaxError keep their own message."""
    try:
        return function(*args)
    except (ImportError, SyntaxError):
        raise
    except (Exception, SystemExit) as error:  # sys.exit() or argparse in a model file too
        raise InputError(f"{what} raised {type(error).__name__}: {error}") from None


def _example_input(shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal noise of ``shape``; a shape too large to allocate is the user's input."""
    if math.prod(shape) > _MAX_EXAMPLE_VALUES:  # refused before torch tries (and overflows)
        raise InputError(
            f"--input-shape {','.join(map(str, shape))}: {math.prod(shape):,} values is too "
            f"large an example input (at most {_MAX_EXAMPLE_VALUES:,}); give a small batch, "
            "e.g. 8,3,32,32"
        )
    try:
        return torch.randn(shape, generator=torch.Generator().manual_seed(0))
    except (RuntimeError, MemoryError, OverflowError):
        raise InputError(
            f"--input-shape {','.join(map(str, shape))}: cannot allocate an example input of "
            f"that size ({4 * math.prod(shape):.3g} bytes); give a small batch, e.g. 8,3,32,32"
        ) from None


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive ints such as 8,3,32,32, got {text!r}"
        ) from None
    if not shape or any(size < 1 for size in shape):
        raise argparse.ArgumentTypeError(f"sizes must be positive ints, got {text!r}")
    return shape


# An example input needs a batch, not a data set: 2^28 float32 values are 1 GiB.
_MAX_EXAMPLE_VALUES = 2**28


def _guess_input_shape(model: torch.nn.Module) -> tuple[int, ...]:
    """From the first Linear/Conv: (8, features) or (8, C, 32[, 32[, 32]])."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            return (8, module.in_features)
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            spatial = len(module.kernel_size)
            return (8, module.in_channels, *([32] * spatial))
    raise InputError("cannot guess the input shape; pass --input-shape, e.g. 8,3,32,32")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normdrop lint",
        description="Check a model for BatchNorm and Dropout pitfalls.",
        epilog="Exit status: 0 no finding at or above --fail-on, 1 some, 2 the model could not "
        "be loaded or run, 130 interrupted.",
    )
    parser.add_argument(
        "factory",
        help="MODULE:FACTORY, a callable returning the model (or a model object); MODULE is "
        "an importable module or a path to a .py file",
    )
    parser.add_argument(
        "--input-shape",
        type=_parse_shape,
        help="example input shape, e.g. 8,3,32,32 (float32 standard normal); default: "
        "guessed from the first Linear/Conv layer",
    )
    parser.add_argument(
        "--eval", action="store_true", help="lint the model in eval mode (model.eval())"
    )
    parser.add_argument(
        "--train-only",
        action="store_true",
        help="the model is not meant for deployment (skips no-running-stats)",
    )
    parser.add_argument("--format", choices=("text", "json"), default="text")
    parser.add_argument(
        "--fail-on",
        choices=(*SEVERITIES, "never"),
        default="error",
        help="exit with status 1 if a finding is this severe or worse (default: error)",
    )
    return parser


def _report(findings: list[Finding], model: torch.nn.Module, format: str) -> str:
    if format == "json":
        return json.dumps([asdict(f) for f in findings], indent=2)
    if not findings:
        return f"{type(model).__name__}: no findings"
    counts = ", ".join(f"{sum(f.severity == s for f in findings)} {s}" for s in SEVERITIES)
    return "\n".join([*map(str, findings), f"{type(model).__name__}: {counts}"])


def cli_main(argv: Sequence[str] | None = None) -> int:
    """``normdrop lint MODULE:FACTORY [--input-shape 8,3,32,32]``; returns the exit status.

    0: no finding at or above ``--fail-on``; 1: some; 2: the model could not be loaded or run.
    """
    args = _parser().parse_args(argv)
    # What the model's code prints goes to standard error, so that standard output holds the
    # report alone (--format json is for programs to read).
    with contextlib.redirect_stdout(sys.stderr):
        findings, model, status = _lint_factory(args)
    if status is not None:
        return status
    print(_report(findings, model, args.format))
    if args.fail_on == "never":
        return 0
    worst = SEVERITIES.index(args.fail_on)
    return int(any(SEVERITIES.index(f.severity) <= worst for f in findings))


def _lint_factory(args: argparse.Namespace) -> tuple[list[Finding], Any, int | None]:
    """Load, build and lint the model: ``(findings, model, None)``, or an exit status 2 after
    a one-line error."""
    try:
        made = _load_factory(args.factory)
        if isinstance(made, torch.nn.Module):
            model = made
        elif callable(made):
            model = _user_code(f"the factory {args.factory}", made)
        else:
            raise InputError(
                f"{args.factory} is of type {type(made).__name__}, not a callable returning a model"
            )
        if not isinstance(model, torch.nn.Module):
            raise InputError(
                f"{args.factory} returned {type(model).__name__}, not a torch.nn.Module"
            )
        if args.eval:
            model.eval()
        shape = args.input_shape or _guess_input_shape(model)
        example = _example_input(shape)
        try:
            findings = lint(model, example, deployment=not args.train_only)
        except InputError as error:
            if args.input_shape:
                raise
            raise InputError(
                f"{error} (the input shape {','.join(map(str, shape))} was guessed from the "
                "first Linear/Conv; pass --input-shape)"
            ) from error
    except (InputError, ImportError, OSError, SyntaxError, TypeError) as error:
        print(f"normdrop lint: error: {error}", file=sys.stderr)
        return [], None, 2
    return findings, model, None
