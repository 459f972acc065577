"""A self-contained HTML report: one section per reproduction, images embedded as base64.

The page needs no network and no other file: it can be mailed or archived as it is.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence

from normdrop.repro.outcome import Outcome

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 70rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
section { border-top: 2px solid #ccc; margin-top: 2rem; padding-top: 1rem; }
table { border-collapse: collapse; margin: 0.5rem 0; }
td, th { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
.pass { color: #17632a; font-weight: bold; } .fail { color: #a31515; font-weight: bold; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5rem 0; }
pre { background: #f6f6f6; padding: 0.5rem; white-space: pre-wrap; }
"""


def _verdict(passed: bool) -> str:
    return '<span class="pass">PASS</span>' if passed else '<span class="fail">FAIL</span>'


def section_html(outcome: Outcome, images: Mapping[str, bytes]) -> str:
    """One reproduction as an HTML ``<section>``: setup, choices, criteria, embedded plots."""
    esc = html.escape
    rows = "\n".join(
        f"<tr><td>{esc(c.claim)}</td><td>{c.measured:.4g}</td>"
        f"<td>{esc(c.threshold_text() + c.seeds_text())}"
        f"</td><td>{_verdict(c.passed)}</td><td>{esc(c.detail)}</td></tr>"
        for c in outcome.criteria
    )
    choices = "".join(f"<li>{esc(choice)}</li>" for choice in outcome.choices)
    notes = "".join(f"<li>{esc(note)}</li>" for note in outcome.notes)
    pictures = "\n".join(
        f'<figure><img alt="{esc(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(png).decode("ascii")}"><figcaption>{esc(name)}</figcaption></figure>'
        for name, png in images.items()
    )
    seeds = ", ".join(str(s) for s in outcome.seeds)
    uncalibrated = (
        f"<p><b>Uncalibrated run</b> ({esc(outcome.uncalibrated)}): the criteria's thresholds "
        "were set for the full run; these verdicts are indicative only.</p>"
        if outcome.uncalibrated
        else ""
    )
    return f"""<section id="{esc(outcome.name)}">
<h2>{esc(outcome.name)}: {esc(outcome.title)} {_verdict(outcome.passed)}</h2>
<p><b>Paper.</b> {esc(outcome.paper)}</p>
<p><b>Ours (scaled down).</b> {esc(outcome.setup)}</p>
{uncalibrated}
<p><b>Seeds:</b> {esc(seeds)}</p>
<p><b>Choices the paper leaves open:</b></p><ul>{choices}</ul>
<table><tr><th>criterion</th><th>measured</th><th>threshold</th><th>verdict</th>
<th>detail</th></tr>
{rows}
</table>
{f"<ul>{notes}</ul>" if notes else ""}
{pictures}
</section>"""


def page_html(title: str, sections: Sequence[str]) -> str:
    """A complete HTML page around the given sections."""
    body = "\n".join(sections)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head>
<body><h1>{html.escape(title)}</h1>
{body}
</body></html>
"""
