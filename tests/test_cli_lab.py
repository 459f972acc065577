"""``normdrop lab`` as a user runs it: output, errors, help, and a lab killed, interrupted, or run
twice at once on the same database."""

import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normdrop.cli import build_parser, lab_config, main
from normdrop.lab.config import LabConfig, TrainSettings
from normdrop.lab.experiment import run_lab
from normdrop.lab.train import checkpoint_history

TINY = shlex.split(
    "--data wine --model mlp:1x8 --epochs 2 --seeds 2 --variants plain,bn --backend reference"
    " --no-progress"
)
# Long enough to be stopped half way: 4 runs of 25 short epochs.
SLOW = shlex.split(
    "--data synthetic:samples=300,features=10 --model mlp:1x32 --epochs 25 --seeds 2"
    " --variants plain,bn --backend reference --workers 1 --no-progress --name slow"
)


def test_lab_prints_the_table_and_the_report_path(tmp_path, capsys):
    assert main(["lab", *TINY, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "accuracy % over seeds" in out and "loss over seeds" in out
    assert "│ plain" in out and "│ bn " in out and "(baseline)" in out
    assert "bn vs plain over 2 paired seeds: test accuracy" in out
    report = out.strip().splitlines()[-1].removeprefix("report: ")
    assert Path(report).is_file() and Path(report).parent.parent == tmp_path


def test_default_lab_settings_are_the_issues():
    config = lab_config(build_parser().parse_args(["lab"]))
    assert config == LabConfig()
    s = config.settings
    assert (s.data, s.model, s.epochs, s.batch_size, config.seeds) == (
        "digits",
        "mlp:2x512",
        30,
        64,
        5,
    )
    assert config.variants == ("plain", "bn", "dropout", "bn+dropout")
    assert config.out == "runs" and s.backend == "fast"


def test_reproduce_command_round_trips():
    config = LabConfig(
        TrainSettings(
            data="seed:samples=200",
            model="simplenet",
            epochs=7,
            optimizer="adam",
            dropout_p=0.3,
            bn_type="ghost",
            virtual_batch_size=8,
            patience=2,
            select="last",
            weight_decay=1e-4,
        ),
        variants=("bn+dropout", "plain"),
        seeds=3,
        out="somewhere",
        name="my-exp",
    )
    argv = shlex.split(config.command())
    assert argv[:2] == ["normdrop", "lab"]
    assert lab_config(build_parser().parse_args(argv[1:])) == config


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epochs", "0"], "--epochs must be a positive integer"),
        (["--data", "imagenet"], "unknown dataset"),
        (["--variants", "plain,bn+bn"], "unknown variant"),
        (["--model", "mlp:big"], "--model must be"),
        (["--dropout-p", "1.5"], r"--dropout-p must be in \[0, 1\)"),
        (["--virtual-batch-size", "8"], "applies to --bn-type ghost"),
        (["--model", "cnn:small", "--data", "wine"], "needs image data"),
        (["--name", "../escape"], "--name must be"),
        (["--data", "nothing.csv", "--target", "y"], "no such file"),
        (["--lr", "inf"], "--lr must be a positive finite number, got inf"),
        (["--name", "normdrop.db"], "--name normdrop.db: taken by the lab's own files"),
        (["--name", "normdrop.db-wal"], "taken by the lab's own files"),
        (["--name", "checkpoints"], "--name checkpoints: taken by the lab's own files"),
        (["--out", ""], "--out must name a folder, got ''"),
        (["--tensorboard", ""], "--tensorboard must name a folder, got ''"),
        (["--cache-dir", ""], "--cache-dir must name a folder, got ''"),
        (["--data", "synthetic:seed=1,seed=2"], "option 'seed' is given twice"),
        (["--model", "mlp:2x65536"], r"--model mlp:2x65536: 4,29\d,\d{3},\d{3} parameters"),
    ],
)
def test_bad_options_exit_2_naming_the_option(tmp_path, capsys, argv, message):
    # (the too large model is refused before allocating: built on the meta device)
    assert main(["lab", *TINY, "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normdrop lab: error:")
    assert re.search(message, err)
    assert not (tmp_path / "normdrop.db").exists()  # refused before anything was written


@pytest.mark.parametrize("variants", ["plain,,bn", ",bn", "bn,"])
def test_an_empty_item_in_variants_is_refused(tmp_path, capsys, variants):
    with pytest.raises(SystemExit) as exited:
        main(["lab", *TINY, "--out", str(tmp_path), "--variants", variants])
    assert exited.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("normdrop lab: error: argument --variants:")
    assert "without empty items (e.g. plain,bn)" in err and repr(variants) in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["lab"],
        ["tune"],
        ["runs"],
        ["runs", "list"],
        ["runs", "show"],
        ["runs", "compare"],
        ["runs", "export"],
        ["seed"],
    ],
)
def test_help_on_every_command(capsys, argv):
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: normdrop")
    assert " ".join(["normdrop", *argv]) in out.splitlines()[0] or argv == ["seed"]


def test_seed_command_is_the_seed_module(capsys):
    assert main(["seed", "--epochs", "2", "--test-size", "50"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["epoch", "loss", "train", "acc", "test", "acc"]
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 2


def _normdrop(*argv: str) -> list[str]:
    return [sys.executable, "-m", "normdrop", *argv]


def _db_state(path: Path) -> tuple[int, int]:
    """(complete runs, epochs of unfinished runs), read without disturbing the writer."""
    if not path.exists():
        return 0, 0
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            complete = db.execute("SELECT COUNT(*) FROM runs WHERE status='complete'").fetchone()[0]
            partial = db.execute(
                "SELECT COUNT(*) FROM epochs JOIN runs ON runs.id = run_id"
                " WHERE status != 'complete'"
            ).fetchone()[0]
            return complete, partial
    except sqlite3.OperationalError:  # schema not created yet
        return 0, 0


def _wait_until(process, condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError("timed out")


def _results(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as db:
        runs = db.execute(
            "SELECT variant, seed, status, best_epoch, train_acc, val_acc, test_acc, test_loss"
            " FROM runs ORDER BY id"
        ).fetchall()
        epochs = db.execute(
            "SELECT run_id, epoch, train_loss, val_acc, preact_p50 FROM epochs"
            " ORDER BY run_id, epoch"
        ).fetchall()
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    return runs + epochs


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> list[tuple]:
    """The SLOW lab run whole, in this process: the subprocesses must compute the same."""
    out = tmp_path_factory.mktemp("uninterrupted")
    config = lab_config(build_parser().parse_args(["lab", *SLOW, "--out", str(out)]))
    run_lab(config, progress=False)
    return _results(out / "normdrop.db")


def test_killed_lab_resumes_and_loses_at_most_the_epoch_in_flight(tmp_path, uninterrupted):
    db = tmp_path / "normdrop.db"
    process = subprocess.Popen(
        _normdrop("lab", *SLOW, "--out", str(tmp_path)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _wait_until(process, lambda: _db_state(db)[0] >= 1 and _db_state(db)[1] >= 1)
    process.kill()  # SIGKILL: no handler runs
    process.communicate()
    complete_before, partial_before = _db_state(db)
    with sqlite3.connect(db) as connection:
        finished = connection.execute("SELECT id FROM runs WHERE status='complete'").fetchall()
        partial = connection.execute(
            "SELECT run_id, MAX(epoch) FROM epochs JOIN runs ON runs.id = run_id"
            " WHERE status != 'complete' GROUP BY run_id"
        ).fetchall()
    for run_id, last_epoch in partial:  # the epochs done are saved, ready to continue from
        history = checkpoint_history((tmp_path / "checkpoints" / f"run-{run_id}.pt").read_bytes())
        assert len(history) in (last_epoch, last_epoch + 1)  # killed after the file, before the row
    rerun = subprocess.run(_normdrop("lab", *SLOW, "--out", str(tmp_path)), capture_output=True)
    assert rerun.returncode == 0, rerun.stderr.decode()
    with sqlite3.connect(db) as connection:
        attempts = dict(connection.execute("SELECT id, attempts FROM runs").fetchall())
    assert all(attempts[run_id] == 1 for (run_id,) in finished)  # not retrained
    assert complete_before >= 1 and partial_before >= 1
    assert _results(db) == uninterrupted  # resumed runs continue exactly


@pytest.mark.parametrize(
    ("sig", "workers"),
    [(signal.SIGINT, "1"), (signal.SIGTERM, "2")],  # runs in the lab's process; in workers
)
def test_interrupted_lab_exits_130_and_keeps_its_epochs(tmp_path, sig, workers, uninterrupted):
    db = tmp_path / "normdrop.db"
    argv = [*SLOW, "--out", str(tmp_path)]
    argv[argv.index("--workers") + 1] = workers
    process = subprocess.Popen(
        _normdrop("lab", *argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _wait_until(process, lambda: _db_state(db)[1] >= 2)
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err.decode()
    assert "interrupted" in err.decode() and "rerun the same command to resume" in err.decode()
    with sqlite3.connect(db) as connection:
        statuses = {row[0] for row in connection.execute("SELECT status FROM runs")}
        assert "running" not in statuses  # every claim was released
        assert connection.execute("SELECT COUNT(*) FROM epochs").fetchone()[0] >= 2
    # Resumed in one process: the worker count is not part of the results.
    rerun = subprocess.run(_normdrop("lab", *SLOW, "--out", str(tmp_path)), capture_output=True)
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert _results(db) == uninterrupted


def test_two_labs_on_one_database(tmp_path, uninterrupted):
    labs = [
        subprocess.Popen(
            _normdrop("lab", *SLOW, "--out", str(tmp_path)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = [lab.communicate(timeout=300) for lab in labs]
    for lab, (out, err) in zip(labs, outputs, strict=True):
        assert lab.returncode == 0, err.decode()
        assert out.decode().strip().splitlines()[-1].endswith("slow/report.html")
    with sqlite3.connect(tmp_path / "normdrop.db") as connection:
        attempts = [row[0] for row in connection.execute("SELECT attempts FROM runs")]
    assert attempts == [1, 1, 1, 1]  # each run trained once, by one of the two
    assert _results(tmp_path / "normdrop.db") == uninterrupted
    # Both printed the same table.
    tables = [out.decode().split("report:")[0] for out, _ in outputs]
    assert tables[0] == tables[1]


def test_python_dash_m_normdrop(tmp_path):
    done = subprocess.run(_normdrop("--help"), capture_output=True, text=True, check=True)
    assert all(command in done.stdout for command in ("lab", "tune", "runs", "seed"))


def test_an_out_that_is_a_file_is_named(tmp_path, capsys):
    existing = tmp_path / "results.csv"
    existing.write_text("keep me")
    assert main(["lab", *TINY, "--out", str(existing)]) == 2
    assert f"--out {existing}: is a file; --out must name a folder" in capsys.readouterr().err
    assert existing.read_text() == "keep me"


def test_a_data_path_that_is_a_folder_is_named(tmp_path, capsys):
    folder = tmp_path / "table.csv"
    folder.mkdir()
    assert main(["lab", *TINY, "--out", str(tmp_path), "--data", str(folder)]) == 2
    assert f"--data {folder}: is a folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "error", [MemoryError(), RuntimeError("DefaultCPUAllocator: can't allocate memory: 17 GB")]
)
def test_running_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch, error):
    from normdrop.lab import experiment

    def allocate(*args, **kwargs):
        raise error

    monkeypatch.setattr(experiment, "load_splits", allocate)
    assert main(["lab", *TINY, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normdrop lab: error: out of memory (") and "--batch-size" in err
    assert len(err.strip().splitlines()) == 1


def test_other_runtime_errors_are_not_taken_for_memory(tmp_path, monkeypatch):
    from normdrop.lab import experiment

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(experiment, "load_splits", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["lab", *TINY, "--out", str(tmp_path)])


def test_a_file_where_the_checkpoints_folder_goes_is_refused_up_front(tmp_path, capsys):
    (tmp_path / "checkpoints").write_text("mine")
    assert main(["lab", *TINY, "--out", str(tmp_path)]) == 2
    assert "checkpoints is not a folder" in capsys.readouterr().err
    assert (tmp_path / "checkpoints").read_text() == "mine"
    assert not (tmp_path / "normdrop.db").exists()
