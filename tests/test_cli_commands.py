"""The commands that `normdrop` hands to other modules: seed, lint, repro."""

from __future__ import annotations

import json
import subprocess
import sys

from normdrop.cli import main

BAD_MODEL = """
import torch
import normdrop

def make():
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Dropout(0.5), normdrop.nn.BatchNorm1d(16),
        torch.nn.ReLU(), torch.nn.Linear(16, 2),
    )
"""


def test_lint_through_the_main_cli(tmp_path, capsys):
    module = tmp_path / "badmodel.py"
    module.write_text(BAD_MODEL)
    assert main(["lint", f"{module}:make", "--format", "json"]) == 0
    findings = json.loads(capsys.readouterr().out)
    assert [f["rule"] for f in findings] == ["dropout-before-batchnorm"]
    assert main(["lint", f"{module}:make", "--fail-on", "warning"]) != 0


def test_repro_list_through_the_main_cli(capsys):
    assert main(["repro", "--list"]) == 0
    listed = capsys.readouterr().out
    for name in ("ioffe2015", "srivastava2014", "li2019", "zhang2017"):
        assert name in listed


def test_python_dash_m_normdrop_runs():
    result = subprocess.run(
        [sys.executable, "-m", "normdrop", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    for command in ("lab", "tune", "runs", "seed", "lint", "repro"):
        assert command in result.stdout
