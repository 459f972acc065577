"""``normdrop runs list | show | compare | export`` on a database a small lab wrote."""

import csv
import io
import json
import os
import re
import shlex
import sqlite3

import pytest

from normdrop.cli import main

LAB = shlex.split(
    "lab --data wine --model mlp:1x8 --epochs 3 --seeds 2 --variants plain,dropout"
    " --backend reference --no-progress --name w"
)


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main([*LAB, "--out", str(out)]) == 0
    return out / "normdrop.db"


def _db_rows(db, sql):
    with sqlite3.connect(db) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute(sql)]


def test_list(db, capsys):
    assert main(["runs", "--db", str(db), "list"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("│")]
    assert len(lines) == 4
    for run in _db_rows(db, "SELECT * FROM runs"):
        assert any(
            f"│ {run['variant']}" in line and f"{100 * run['test_acc']:.1f}" in line
            for line in lines
        )
    assert main(["runs", "--db", str(db), "list", "--experiment", "w"]) == 0
    assert main(["runs", "--db", str(db), "list", "--experiment", "nope"]) == 2
    assert "no experiment named 'nope'" in capsys.readouterr().err


def test_show(db, capsys):
    assert main(["runs", "--db", str(db), "show", "3"]) == 0
    out = capsys.readouterr().out
    run = _db_rows(db, "SELECT * FROM runs WHERE id = 3")[0]
    assert "run 3" in out and f"│ variant            │ {run['variant']}" in out
    assert "run 3: epochs (eval mode)" in out
    assert len([line for line in out.splitlines() if line.startswith("│") and "0." in line]) >= 3


def test_compare(db, capsys):
    assert main(["runs", "--db", str(db), "compare", "1", "3"]) == 0
    out = capsys.readouterr().out
    settings, results = out.split("results (selected model)")
    assert "settings that differ: run 1 vs run 3" in settings
    differing = [
        line.split("│")[1].strip() for line in settings.splitlines() if line.startswith("│")
    ]
    assert differing == ["variant"]  # same seed, same settings: only the variant differs
    first, third = (_db_rows(db, f"SELECT * FROM runs WHERE id = {i}")[0] for i in (1, 3))
    test_line = next(line for line in results.splitlines() if "test_acc" in line)
    assert f"{third['test_acc'] - first['test_acc']:.4g}" in test_line
    assert "validation accuracy % per epoch" in results


def test_export_csv_and_json(db, capsys, tmp_path):
    epochs = _db_rows(db, "SELECT * FROM epochs WHERE run_id = 2 ORDER BY epoch")
    assert main(["runs", "--db", str(db), "export", "2"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 3
    for row, expected in zip(rows, epochs, strict=True):
        assert int(row["epoch"]) == expected["epoch"] and row["variant"] == "plain"
        assert float(row["val_acc"]) == expected["val_acc"]
        assert float(row["train_loss"]) == expected["train_loss"]  # full precision
    target = tmp_path / "run2.json"
    assert (
        main(["runs", "--db", str(db), "export", "2", "--format", "json", "-o", str(target)]) == 0
    )
    document = json.loads(target.read_text())
    assert document["run"]["spec"]["variant"] == "plain" and document["run"]["spec"]["seed"] == 1
    assert [row["val_acc"] for row in document["epochs"]] == [row["val_acc"] for row in epochs]
    run = _db_rows(db, "SELECT * FROM runs WHERE id = 2")[0]
    assert document["run"]["test_acc"] == run["test_acc"]


def test_errors_name_what_is_missing(db, tmp_path, capsys):
    assert main(["runs", "--db", str(tmp_path / "none.db"), "list"]) == 2
    assert "no run database here" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
    assert main(["runs", "--db", str(db), "show", "99"]) == 2
    assert "no run with id 99" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["runs", "--db", str(db), "export", "1", "--format", "xml"])
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"\x00" * 4096)
    assert main(["runs", "--db", str(garbage), "list"]) == 2
    assert "not a normdrop run database" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--db", "", "list"], ["export", "1", "-o", ""]])
def test_an_empty_path_is_refused_naming_the_option(db, capsys, argv):
    # --db '' was the working folder, and -o '' wrote to standard output
    argv = argv if argv[0] == "--db" else ["--db", str(db), *argv]
    with pytest.raises(SystemExit) as exited:
        main(["runs", *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert re.fullmatch(
        r"normdrop runs.*: error: argument --(db|output/-o): must name a file, got ''", err
    )


def _read_only_folder(db, tmp_path):
    """A copy of the run database (WAL mode) in a folder nobody may write (as a read-only mount)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    copy = folder / "normdrop.db"
    copy.write_bytes(db.read_bytes())  # the lab closed it: everything is in the main file
    assert copy.read_bytes()[18:20] == b"\x02\x02"  # the header's WAL-mode versions
    folder.chmod(0o555)
    return copy


def test_a_database_in_a_read_only_folder_names_the_folder(db, tmp_path, capsys):
    copy = _read_only_folder(db, tmp_path)
    try:
        if os.access(copy.parent, os.W_OK):
            pytest.skip("this user may write into any folder (root)")
        assert main(["runs", "--db", str(copy), "list"]) == 2
        err = capsys.readouterr().err
        assert f"the folder {copy.parent} must be writable" in err
        assert "not a normdrop run database" not in err
    finally:
        copy.parent.chmod(0o755)


def test_reading_never_writes(db):
    before = db.stat().st_mtime_ns, db.read_bytes()
    main(["runs", "--db", str(db), "list"])
    main(["runs", "--db", str(db), "export", "1", "--format", "json"])
    assert (db.stat().st_mtime_ns, db.read_bytes()) == before


def test_export_never_overwrites_the_database_or_an_existing_file(db, tmp_path, capsys):
    before = db.read_bytes()
    for target in (db, db.with_name(db.name + "-wal")):
        assert main(["runs", "--db", str(db), "export", "1", "-o", str(target)]) == 2
        assert "that is the run database" in capsys.readouterr().err
    assert db.read_bytes() == before
    beside = db.with_name(db.name + ".csv")  # beside the database, but not one of its files
    assert main(["runs", "--db", str(db), "export", "1", "-o", str(beside)]) == 0
    assert beside.read_text().startswith("run_id,")
    beside.unlink()
    kept = tmp_path / "results.csv"
    kept.write_text("mine")
    assert main(["runs", "--db", str(db), "export", "1", "-o", str(kept)]) == 2
    assert "the file exists" in capsys.readouterr().err and kept.read_text() == "mine"
    assert main(["runs", "--db", str(db), "export", "1", "-o", str(kept), "--force"]) == 0
    assert kept.read_text().startswith("run_id,")
    missing = tmp_path / "nowhere" / "x.csv"
    assert main(["runs", "--db", str(db), "export", "1", "-o", str(missing)]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: names the argument and the expected form
        main(["runs", "--db", str(db), "show", "99999999999999999999999"])
    assert "a run id is a positive integer" in capsys.readouterr().err


def test_an_out_folder_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.write_text("a file a user saved")
    argv = ["lab", "--data", "wine", "--model", "simplenet", "--epochs", "1", "--seeds", "1"]
    assert main([*argv, "--variants", "plain", "--no-progress", "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert "normdrop lab: error:" in err and str(taken) in err and "Traceback" not in err
    assert taken.read_text() == "a file a user saved"


def test_a_run_that_would_take_no_training_step_fails_and_says_why(tmp_path, capfd):
    # ghost batches of 500 out of a 106-sample training split: no whole virtual batch, so the
    # untrained model was reported as a result
    argv = ["lab", "--data", "wine", "--model", "simplenet", "--variants", "bn", "--seeds", "1"]
    argv += ["--bn-type", "ghost", "--batch-size", "1000", "--virtual-batch-size", "500"]
    assert main([*argv, "--epochs", "1", "--no-progress", "--out", str(tmp_path)]) != 0
    assert "no training step in an epoch" in "".join(capfd.readouterr())


def test_a_name_given_to_another_experiment_is_refused_and_its_report_kept(tmp_path, capsys):
    argv = ["lab", "--model", "simplenet", "--epochs", "1", "--seeds", "1", "--variants", "plain"]
    argv += ["--no-progress", "--out", str(tmp_path), "--name", "exp1"]
    assert main([*argv, "--data", "wine"]) == 0
    report = tmp_path / "exp1" / "report.html"
    before = report.read_bytes()
    assert main([*argv, "--data", "wine"]) == 0  # the same settings: resumed (nothing to train)
    capsys.readouterr()
    assert main([*argv, "--data", "breast-cancer"]) == 2
    assert "already exists with other settings" in capsys.readouterr().err
    assert report.read_bytes() == before


def test_an_interrupted_runs_command_says_the_database_is_unchanged(db, capsys, monkeypatch):
    """Ctrl-C in `normdrop runs` exits 130 without the lab's "completed epochs ... resume"
    line, which means nothing for a command that only reads."""
    from normdrop.lab import runs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "list_table", interrupted)
    assert main(["runs", "--db", str(db), "list"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "normdrop: interrupted; the run database is unchanged"
