"""The HTML report: one self-contained page (images embedded as base64, CSS inline, no script).

It holds the tables and claims, the plots, the configuration, the library versions and the
command that reproduces the results; the SVG versions of the plots are linked beside it.
"""

from __future__ import annotations

import base64
import html
import json
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from normdrop.lab.files import replace_atomically
from normdrop.lab.plots import Plot

__all__ = ["Table", "library_versions", "write_report"]

_LIBRARIES = ("normdrop", "torch", "numpy", "scipy", "scikit-learn", "matplotlib", "optuna")

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: 1em 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
figure { margin: 1.5em 0; }
img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f6f6f6; padding: 0.8em; white-space: pre-wrap; overflow-wrap: anywhere; }
.claims li { margin: 0.3em 0; }
"""


@dataclass(frozen=True)
class Table:
    """A table for the page: ``id`` is the HTML id, ``rows`` are already formatted cells."""

    id: str
    caption: str
    columns: Sequence[str]
    rows: Sequence[Sequence[str]]


def library_versions() -> dict[str, str]:
    """Python's version and every library's that shapes the results."""
    versions = {"python": platform.python_version()}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in table.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for row in table.rows
    )
    return (
        f'<table id="{html.escape(table.id)}"><caption>{html.escape(table.caption)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    )


def _figure(plot: Plot) -> str:
    encoded = base64.b64encode(plot.png.read_bytes()).decode("ascii")
    return (
        f'<figure id="{html.escape(plot.name)}"><h3>{html.escape(plot.title)}</h3>'
        f'<img alt="{html.escape(plot.title)}" src="data:image/png;base64,{encoded}">'
        f"<figcaption>{html.escape(plot.caption)} "
        f'<a href="{html.escape(plot.svg.name)}">SVG</a></figcaption></figure>'
    )


def write_report(
    path: Path,
    *,
    title: str,
    summary: str,
    tables: Sequence[Table],
    claims: Sequence[str],
    plots: Sequence[Plot],
    config: dict,
    command: str,
) -> Path:
    """Write the page to ``path`` (its plots' SVG files are expected beside it)."""
    versions = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{html.escape(version)}</td></tr>"
        for name, version in library_versions().items()
    )
    claim_items = "".join(f"<li>{html.escape(claim)}</li>" for claim in claims)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p>{html.escape(summary)}</p>
<h2>Results</h2>
{"".join(_table(table) for table in tables)}
<ul class="claims">{claim_items}</ul>
<h2>Plots</h2>
{"".join(_figure(plot) for plot in plots)}
<h2>Reproduce</h2>
<pre id="command">{html.escape(command)}</pre>
<h2>Configuration</h2>
<pre id="config">{html.escape(json.dumps(config, indent=2, sort_keys=True))}</pre>
<h2>Library versions</h2>
<table id="versions"><tbody>{versions}</tbody></table>
</body></html>
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(path, lambda temporary: temporary.write_text(page, encoding="utf-8"))
    return path
