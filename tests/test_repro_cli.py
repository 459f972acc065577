"""normdrop repro: registry, command line, seeds, exit codes and the files a run writes."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import types

import pytest
from hypothesis import given
from hypothesis import strategies as st
from matplotlib.figure import Figure

import normdrop.repro as repro
from normdrop.repro import REPRODUCTIONS, cli_main, parse_seeds
from normdrop.repro.outcome import Outcome

PAPERS = (
    "ioffe2015",
    "srivastava2014",
    "li2019",
    "zhang2017",
    "ioffe2017",
    "hoffer2017",
    "gal2016",
    "santurkar2018",
)


def test_registry_names_every_paper_and_each_module_has_the_interface():
    assert tuple(REPRODUCTIONS) == PAPERS
    for name in PAPERS:
        module = repro.module(name)
        assert isinstance(module.TITLE, str) and isinstance(module.PAPER, str)
        assert callable(module.run)


def test_list_prints_every_reproduction(capsys):
    assert cli_main(["--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(PAPERS)


@pytest.mark.parametrize(
    "argv",
    [["nosuchpaper"], [], ["all", "--scale", "0"], ["li2019", "--jobs", "0"]],
)  # fmt: skip
def test_usage_errors_exit_2_and_say_why(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        cli_main(argv)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    if argv == ["nosuchpaper"]:
        assert "nosuchpaper" in err and "ioffe2015" in err


def test_out_must_be_a_folder(tmp_path, capsys):
    a_file = tmp_path / "results.txt"
    a_file.write_text("kept")
    with pytest.raises(SystemExit) as raised:
        cli_main(["li2019", "--out", str(a_file)])
    assert raised.value.code == 2 and "--out" in capsys.readouterr().err
    assert a_file.read_text() == "kept"


def test_an_empty_out_is_refused(capsys):
    # Path("") is the working folder: the results would land there
    with pytest.raises(SystemExit) as raised:
        cli_main(["li2019", "--out", ""])
    assert raised.value.code == 2
    assert "argument --out: must name a folder, got ''" in capsys.readouterr().err


def test_seeds_count_and_list():
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("11,12,13") == [11, 12, 13]
    assert parse_seeds("7,") == [7]
    assert parse_seeds(" 4 , 5 ") == [4, 5]
    assert parse_seeds("4,5,") == [4, 5]  # the trailing comma that marks a list, and no more


@pytest.mark.parametrize(
    "text", ["0", "-2", "x", "1,x", "1,1", "-1,2", ",", "1.5", "1,,2", ",1", "7,,", "1, ,2"]
)
def test_bad_seeds_are_refused_with_the_expected_form(text):
    with pytest.raises(argparse.ArgumentTypeError, match="seeds"):
        parse_seeds(text)


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=6, unique=True))
def test_seed_lists_round_trip(seeds):
    assert parse_seeds(",".join(map(str, seeds)) + ",") == seeds


def _fake_module(passes: bool) -> types.ModuleType:
    """A reproduction whose one criterion passes or fails on demand."""

    def run(seeds, scale=1.0, jobs=1):
        outcome = Outcome("ioffe2015", "fake", "paper", "setup", ["a choice"], seeds, {"s": scale})
        outcome.check("k", "claim", 1.0 if passes else 3.0, "<=", 2.0, "detail")
        figure = Figure()
        figure.add_subplot().plot([0, 1], [1, 0])
        outcome.figures = {"curve": figure}
        outcome.measurements = {"nan": float("nan"), "by_key": {0.5: (1, 2)}}
        return outcome

    return types.SimpleNamespace(run=run, TITLE="fake", PAPER="paper")


@pytest.mark.parametrize("passes", [True, False])
def test_exit_status_and_results_json_follow_the_criteria(passes, tmp_path, monkeypatch):
    monkeypatch.setattr(repro, "module", lambda name: _fake_module(passes))
    status = cli_main(["ioffe2015", "--seeds", "5,6,7", "--out", str(tmp_path), "--jobs", "1"])
    assert status == (0 if passes else 1)
    document = json.loads((tmp_path / "ioffe2015" / "results.json").read_text())
    assert document["passed"] is passes
    assert document["seeds"] == [5, 6, 7]
    (criterion,) = document["criteria"]
    assert criterion["measured"] == (1.0 if passes else 3.0)
    assert (
        criterion["threshold"] == 2.0 and criterion["op"] == "<=" and criterion["passed"] is passes
    )
    assert document["measurements"] == {"nan": "nan", "by_key": {"0.5": [1, 2]}}
    png = (tmp_path / "ioffe2015" / "curve.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    index = (tmp_path / "index.html").read_text()
    assert 'id="ioffe2015"' in index and "data:image/png;base64," in index
    assert ("PASS" if passes else "FAIL") in index
    assert not list(tmp_path.rglob(".*.tmp"))  # atomic writes leave no temporary file


def test_all_runs_every_reproduction_and_fails_if_one_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(repro, "module", lambda name: _fake_module(name != "gal2016"))
    assert cli_main(["all", "--seeds", "1", "--out", str(tmp_path), "--jobs", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  gal2016" in out and "PASS  ioffe2015" in out


def test_python_dash_m_lists():
    done = subprocess.run(
        [sys.executable, "-m", "normdrop.repro", "--list"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "santurkar2018" in done.stdout


@pytest.mark.parametrize(
    ("argv", "label"),
    [
        (["--seeds", "3"], ""),
        (["--seeds", "3", "--scale", "0.01"], "--scale 0.01"),
        (["--seeds", "7,"], "1 seed(s), fewer than 3"),
    ],
)
def test_a_run_off_the_calibration_says_so_everywhere(argv, label, tmp_path, monkeypatch, capsys):
    """The criteria were set for --scale 1 and 3 seeds: a quick look is labelled in the
    verdict line, results.json and the HTML, not reported as a plain PASS."""
    monkeypatch.setattr(repro, "module", lambda name: _fake_module(True))
    assert cli_main(["ioffe2015", *argv, "--out", str(tmp_path), "--jobs", "1"]) == 0
    out = capsys.readouterr().out
    document = json.loads((tmp_path / "ioffe2015" / "results.json").read_text())
    html = (tmp_path / "index.html").read_text()
    assert document["calibrated"] is (label == "")
    assert document["uncalibrated"] == label
    if label:
        assert f"== ioffe2015: PASS (uncalibrated: {label})" in out
        assert "Uncalibrated run" in html and label in html
    else:
        assert "== ioffe2015: PASS\n" in out and "Uncalibrated" not in html


def test_a_folder_is_checked_before_training_and_another_run_is_not_replaced(
    tmp_path, monkeypatch, capsys
):
    ran = []

    def module(name):
        ran.append(name)
        return _fake_module(True)

    monkeypatch.setattr(repro, "module", module)
    (tmp_path / "afile").write_text("mine")
    for out in (tmp_path / "afile" / "sub", tmp_path / "afile"):
        with pytest.raises(SystemExit) as exited:
            cli_main(["ioffe2015", "--out", str(out), "--jobs", "1"])
        assert exited.value.code == 2
    full = tmp_path / "runs"
    assert cli_main(["ioffe2015", "--out", str(full), "--jobs", "1"]) == 0
    before = (full / "ioffe2015" / "results.json").read_text()
    ran.clear()
    with pytest.raises(SystemExit) as exited:  # a quick look would wipe out the full run
        cli_main(["ioffe2015", "--scale", "0.01", "--out", str(full), "--jobs", "1"])
    assert exited.value.code == 2 and not ran
    assert "holds a run with scale 1.0, seeds [0, 1, 2], backend reference" in (
        capsys.readouterr().err
    )
    assert (full / "ioffe2015" / "results.json").read_text() == before
    assert cli_main(["ioffe2015", "--out", str(full), "--jobs", "1"]) == 0  # same settings


def test_jobs_are_bounded():
    with pytest.raises(SystemExit) as exited:
        cli_main(["ioffe2015", "--jobs", "65"])
    assert exited.value.code == 2


@pytest.mark.parametrize("text", ["1000000000", f"{2**64},", "0,1,4294967296"])
def test_seed_counts_and_values_out_of_range_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError, match="--seeds"):
        parse_seeds(text)


def test_ctrl_c_is_one_line_and_status_130(tmp_path, monkeypatch, capsys):
    from normdrop.cli import main

    def interrupted(seeds, scale=1.0, jobs=1):
        raise KeyboardInterrupt

    monkeypatch.setattr(repro, "module", lambda name: types.SimpleNamespace(run=interrupted))
    assert main(["repro", "ioffe2015", "--out", str(tmp_path), "--jobs", "1"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["normdrop repro: interrupted"]
