"""The lab's report rendered in a real browser: headless Chromium loads every image and the table.

The report has no script of its own; the test renders a copy with one appended that records,
once the page has loaded, how many images decoded and how many table rows are there.
"""

import json
import re
import shutil
import subprocess

import pytest

from normdrop.lab.config import LabConfig, TrainSettings
from normdrop.lab.experiment import run_lab

BROWSER = next((shutil.which(n) for n in ("chromium", "chromium-browser") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(
    BROWSER is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)

_PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  const check = document.createElement("pre");
  check.id = "normdrop-check";
  check.textContent = JSON.stringify({
    images: images.length,
    loaded: images.filter((image) => image.complete && image.naturalWidth > 0).length,
    widths: images.map((image) => image.naturalWidth),
    accuracyRows: document.querySelectorAll("#accuracy tbody tr").length,
    lossRows: document.querySelectorAll("#loss tbody tr").length,
    headers: [...document.querySelectorAll("#accuracy th")].map((th) => th.textContent),
  });
  document.body.appendChild(check);
});
</script>"""


def _render(page, profile) -> dict:
    dom = subprocess.run(
        [
            BROWSER,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=15000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    found = re.search(r'<pre id="normdrop-check">(.*?)</pre>', dom, re.S)
    assert found, dom[-2000:]
    return json.loads(found[1].replace("&quot;", '"').replace("&amp;", "&"))


def test_report_renders_with_every_image_and_the_table(tmp_path):
    settings = TrainSettings(data="wine", model="mlp:1x8", epochs=3, backend="reference")
    config = LabConfig(
        settings, variants=("plain", "bn", "bn+dropout"), seeds=2, out=str(tmp_path), workers=1
    )
    report = run_lab(config, progress=False).report
    probe = report.with_name("probe.html")
    probe.write_text(report.read_text().replace("</body>", _PROBE + "</body>"))
    result = _render(probe, tmp_path / "profile")
    assert result["images"] == 3
    assert result["loaded"] == 3, result
    assert all(width > 300 for width in result["widths"])
    assert result["accuracyRows"] == 3 and result["lossRows"] == 3
    assert result["headers"][:3] == ["variant", "seeds", "train acc %"]


def test_a_broken_image_is_detected(tmp_path):
    # The probe itself must be able to fail: an image whose data is not a PNG does not load.
    page = tmp_path / "broken.html"
    page.write_text(
        '<!DOCTYPE html><html><body><table id="accuracy"><tbody><tr><td>x</td></tr></tbody>'
        '</table><img src="data:image/png;base64,bm90IGEgcG5n">' + _PROBE + "</body></html>"
    )
    result = _render(page, tmp_path / "profile")
    assert result["images"] == 1 and result["loaded"] == 0 and result["accuracyRows"] == 1
