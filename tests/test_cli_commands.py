"""The commands that `normdrop` hands to other modules: seed, lint, repro."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

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


FAILING_MODELS = """
import torch

def raises():
    raise ValueError("weights not found")

def small():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))

NOT_CALLABLE = 3
"""


@pytest.mark.parametrize(
    ("source", "argv", "message"),
    [
        (
            FAILING_MODELS,
            [":raises"],
            r"the factory .*models\.py:raises raised ValueError: weights not found",
        ),
        (FAILING_MODELS, [":NOT_CALLABLE"], "is of type int, not a callable returning a model"),
        (
            'raise RuntimeError("no GPU here")',
            [":make"],
            r"importing .*models\.py raised RuntimeError",
        ),
        (
            FAILING_MODELS,
            [":small", "--input-shape", "100000,100000,100000"],
            r"--input-shape 100000,100000,100000: 1,000,000,000,000,000 values is too large an "
            r"example input \(at most 268,435,456\)",
        ),
    ],
)
def test_lint_reports_the_users_failures_in_one_line(tmp_path, capsys, source, argv, message):
    module = tmp_path / "models.py"
    module.write_text(source)
    assert main(["lint", f"{module}{argv[0]}", *argv[1:]]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("normdrop lint: error:"), err
    assert re.search(message, err), err


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
