"""Printing an outcome and writing it under ``--out``: results.json, PNG plots, HTML.

Layout, for ``--out runs/repro``::

    runs/repro/NAME/results.json   per criterion: measured, threshold, passed; seeds, config
    runs/repro/NAME/*.png          the plots
    runs/repro/NAME/section.html   this reproduction's section (images embedded)
    runs/repro/NAME/index.html     the section as a page
    runs/repro/index.html          every section found under runs/repro, in registry order

Each file is written to a temporary name and renamed into place, so an interrupted run never
leaves a truncated results.json behind; a new run of NAME replaces NAME's files only.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import textwrap
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from normdrop.repro.outcome import Outcome
from normdrop.repro.report import page_html, section_html

_WIDTH = 100


def print_outcome(outcome: Outcome, file: TextIO | None = None) -> None:
    """The paper's claim and setup, ours, our choices, then one line per criterion (to
    ``file``, or standard output as it is at the call)."""
    file = sys.stdout if file is None else file

    def say(label: str, text: str) -> None:
        wrapped = textwrap.fill(
            text, _WIDTH, initial_indent=f"{label:<8}", subsequent_indent=" " * 8
        )
        print(wrapped, file=file)

    print(f"\n== {outcome.name}: {outcome.title}", file=file)
    say("paper", outcome.paper)
    say("ours", outcome.setup)
    say("seeds", ", ".join(str(s) for s in outcome.seeds))
    for choice in outcome.choices:
        say("choice", choice)
    for criterion in outcome.criteria:
        verdict = "PASS" if criterion.passed else "FAIL"
        print(
            f"  [{verdict}] {criterion.claim}: measured {criterion.measured:.4g}, "
            f"needs {criterion.threshold_text()}{criterion.seeds_text()}",
            file=file,
        )
        if criterion.detail:
            print(
                textwrap.indent(textwrap.fill(criterion.detail, _WIDTH - 10), " " * 10), file=file
            )
    for note in outcome.notes:
        say("note", note)
    print(f"== {outcome.name}: {outcome.verdict}{outcome.qualifier}", file=file)


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists, keys as strings, and NaN/infinity as the strings
    ``"nan"``/``"inf"`` (standard JSON has no such numbers)."""
    if isinstance(value, dict):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def results_json(outcome: Outcome, extra: dict[str, Any]) -> dict[str, Any]:
    """The JSON document of one run: verdicts first, then what produced them."""
    document = {
        "name": outcome.name,
        "title": outcome.title,
        "passed": outcome.passed,
        "calibrated": not outcome.uncalibrated,
        "uncalibrated": outcome.uncalibrated,
        "criteria": [criterion.to_json() for criterion in outcome.criteria],
        "seeds": list(outcome.seeds),
        "config": outcome.config,
        "paper": outcome.paper,
        "setup": outcome.setup,
        "choices": outcome.choices,
        "notes": outcome.notes,
        "measurements": outcome.measurements,
        "figures": [f"{name}.png" for name in outcome.figures],
        **extra,
    }
    return jsonable(document)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def write_outcome(outcome: Outcome, out: Path, extra: dict[str, Any], order: Iterable[str]) -> Path:
    """Write one reproduction's files under ``out/NAME`` and refresh ``out/index.html``.
    Returns the path of its results.json. ``order`` is the registry order for the index page."""
    folder = out / outcome.name
    folder.mkdir(parents=True, exist_ok=True)
    images = {name: _png(figure) for name, figure in outcome.figures.items()}
    for name, png in images.items():
        _write_atomic(folder / f"{name}.png", png)
    document = json.dumps(results_json(outcome, extra), indent=2, allow_nan=False)
    _write_atomic(folder / "results.json", document.encode())
    section = section_html(outcome, images)
    _write_atomic(folder / "section.html", section.encode())
    page = page_html(f"normdrop repro {outcome.name}", [section])
    _write_atomic(folder / "index.html", page.encode())
    write_index(out, order)
    return folder / "results.json"


def write_index(out: Path, order: Iterable[str]) -> Path:
    """``out/index.html``: every reproduction section present under ``out``, in ``order``."""
    sections = [
        (out / name / "section.html").read_text()
        for name in order
        if (out / name / "section.html").is_file()
    ]
    path = out / "index.html"
    _write_atomic(path, page_html("normdrop paper reproductions", sections).encode())
    return path
