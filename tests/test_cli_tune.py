"""``normdrop tune``: the study in SQLite, resumption, the test split scored only after the search,
the retraining over seeds, and the report."""

import os
import re
import shlex
import sqlite3
import subprocess
import sys

import optuna
import pytest

from normdrop.cli import build_parser, main, tune_config
from normdrop.errors import InputError
from normdrop.lab import tune
from normdrop.lab.config import TrainSettings
from normdrop.lab.store import owner_id
from normdrop.lab.tune import TuneConfig, run_tune

SETTINGS = TrainSettings(data="wine", model="mlp:1x8", epochs=3, backend="reference")


def _config(out, **changes) -> TuneConfig:
    values = dict(settings=SETTINGS, trials=6, seeds=2, out=str(out), name="study")
    values.update(changes)
    return TuneConfig(**values)


def _counting(monkeypatch) -> list:
    calls = []
    real = tune.train_run

    def counting(spec, splits, **kwargs):
        calls.append((spec, kwargs.get("score_test", True)))
        return real(spec, splits, **kwargs)

    monkeypatch.setattr(tune, "train_run", counting)
    return calls


def test_tune_from_the_command_line(tmp_path, capsys):
    argv = shlex.split(
        "tune --data wine --model mlp:1x8 --epochs 3 --trials 6 --seeds 2 --backend reference"
        f" --no-progress --out {tmp_path}"
    )
    assert main(argv) == 0
    out = capsys.readouterr().out
    study = re.search(r"(tune-wine-mlp1x8-[0-9a-f]{8}): best of 6 trials", out)[1]
    assert f"report: {tmp_path / (study + '-best') / 'report.html'}" in out
    assert f"tune report: {tmp_path / study / 'report.html'}" in out
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    trials = optuna.load_study(study_name=study, storage=storage).trials
    assert len(trials) == 6
    page = (tmp_path / study / "report.html").read_text()
    assert '<table id="trials">' in page and '<table id="best">' in page
    assert page.count("data:image/png;base64,") >= 1 and "normdrop tune --data wine" in page
    with sqlite3.connect(tmp_path / "normdrop.db") as db:
        kind, config = db.execute(
            "SELECT kind, config_json FROM experiments WHERE name = ?", (study + "-best",)
        ).fetchone()
        statuses = db.execute("SELECT status FROM runs").fetchall()
    assert kind == "tune" and statuses == [("complete",), ("complete",)]
    best = optuna.load_study(study_name=study, storage=storage).best_params
    assert all(str(value)[:6] in config for value in best.values())


def test_trials_never_see_the_test_split_and_the_best_is_retrained(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    result = run_tune(_config(tmp_path), progress=False)
    trial_calls = [score for _, score in calls]
    assert len(trial_calls) == 6 and not any(trial_calls)  # the search never scores test
    assert all(spec.seed == 0 and spec.variant == "bn+dropout" for spec, _ in calls)
    retrained = result.final.runs
    assert [run["seed"] for run in retrained] == [0, 1]
    assert all(run["test_acc"] is not None for run in retrained)
    import json

    for run in retrained:
        spec = json.loads(run["spec_json"])
        assert all(spec[name] == value for name, value in result.best_params.items())
    searched = {name for t in result.trials for name in t["params"]}
    assert searched == {"dropout_p", "bn_momentum", "lr", "weight_decay"}
    assert result.best_value == max(t["value"] for t in result.trials if t["state"] == "complete")


def test_resuming_runs_only_the_missing_trials(tmp_path, monkeypatch):
    run_tune(_config(tmp_path, trials=4), progress=False)
    calls = _counting(monkeypatch)
    result = run_tune(_config(tmp_path, trials=6), progress=False)
    assert len([c for c in calls if not c[1]]) == 2 and len(result.trials) == 6
    params = [tuple(sorted(t["params"].items())) for t in result.trials]
    assert len(set(params)) == len(params)  # a resumed sampler does not replay old trials


def test_trials_another_process_finishes_count_toward_trials(tmp_path, monkeypatch):
    """Two identical tunes at once: optimize(n_trials=...) counts one process's trials only,
    so each ran --trials of its own. Here 'another process' finishes 4 trials while this one
    runs its first: the study stops at 6 finished, not 10."""
    real = tune.train_run
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"

    def with_a_neighbour(spec, splits, **kwargs):
        if not kwargs.get("score_test", True) and not getattr(with_a_neighbour, "done", False):
            with_a_neighbour.done = True
            other = optuna.load_study(study_name="study", storage=storage)
            config = _config(tmp_path)
            distributions = {
                name: optuna.distributions.FloatDistribution(*bounds, log=tune.PARAMETERS[name][0])
                for name, bounds in config.searched().items()
            }
            for k in range(4):
                params = {name: d.low * (1 + 0.1 * k) for name, d in distributions.items()}
                trial = optuna.trial.create_trial(
                    params=params, distributions=distributions, value=0.5
                )
                other.add_trial(trial)
        return real(spec, splits, **kwargs)

    monkeypatch.setattr(tune, "train_run", with_a_neighbour)
    result = run_tune(_config(tmp_path, trials=6), progress=False)
    assert len(result.trials) == 6


def test_interrupted_tune_resumes(tmp_path, monkeypatch):
    real = tune.train_run
    started = []

    def interrupt_third(spec, splits, **kwargs):
        started.append(spec)
        if len(started) == 3:
            raise KeyboardInterrupt
        return real(spec, splits, **kwargs)

    monkeypatch.setattr(tune, "train_run", interrupt_third)
    with pytest.raises(KeyboardInterrupt):
        run_tune(_config(tmp_path, trials=5), progress=False)
    monkeypatch.setattr(tune, "train_run", real)
    result = run_tune(_config(tmp_path, trials=5), progress=False)
    assert len(result.trials) == 5
    study = optuna.load_study(study_name="study", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    states = [t.state.name for t in study.trials]
    assert states.count("FAIL") == 1 and states.index("FAIL") == 2


def test_trials_abandoned_by_a_dead_process_are_failed(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="study", storage=storage, direction="maximize")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = study.ask()
    abandoned.set_user_attr("owner", owner_id().rsplit(":", 1)[0] + f":{dead.pid}")
    alive = study.ask()
    alive.set_user_attr("owner", owner_id().rsplit(":", 1)[0] + f":{os.getppid()}")
    run_tune(_config(tmp_path, trials=2), progress=False)
    states = [t.state.name for t in optuna.load_study(study_name="study", storage=storage).trials]
    assert states[:2] == ["FAIL", "RUNNING"]


def test_plain_tunes_learning_rate_and_weight_decay_only(tmp_path):
    result = run_tune(_config(tmp_path, variant="plain", trials=3, seeds=1), progress=False)
    assert {name for t in result.trials for name in t["params"]} == {"lr", "weight_decay"}


@pytest.mark.parametrize("variant", ["bn+dropout", "bn"])
def test_tune_with_adam_searches_its_learning_rate(variant):
    """The learning rate left out is Adam's default, not a value given: tune searches it (it
    refused every --optimizer adam, blaming a --lr 0.001 nobody gave); with a variant that has
    no dropout, a dropout rate given is not searched, and stays."""
    argv = ["tune", "--optimizer", "adam", "--variant", variant, "--dropout-p", "0.3"]
    if variant == "bn+dropout":
        with pytest.raises(InputError, match=r"--dropout-p 0\.3: tune searches dropout_p"):
            tune_config(build_parser().parse_args(argv))
        argv = argv[:-2]
    config = tune_config(build_parser().parse_args(argv))
    assert config.settings.optimizer == "adam" and "lr" in config.searched()
    assert config.settings.dropout_p == (0.3 if variant == "bn" else 0.5)


def test_reproduce_command_round_trips():
    config = TuneConfig(
        TrainSettings(data="digits", model="mlp:1x32", epochs=4),
        variant="bn",
        trials=9,
        seeds=2,
        tune_seed=5,
        ranges={
            "dropout_p": (0.1, 0.4),
            "bn_momentum": (0.05, 0.2),
            "lr": (0.01, 0.1),
            "weight_decay": (1e-5, 1e-3),
        },
        out="elsewhere",
        name="s1",
    )
    argv = shlex.split(config.command())
    assert tune_config(build_parser().parse_args(argv[1:])) == config


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr-range", "0,0.1"], "log scale, so both ends must be > 0"),
        (["--dropout-p-range", "0.5,0.2"], "low end must be below the high end"),
        (["--dropout-p-range", "0,1"], r"--dropout-p must be in \[0, 1\)"),
        (["--variant", "batchnorm"], "^normdrop tune: error: --variant: unknown variant"),
        (
            ["--var", "batchnorm"],
            "^normdrop tune: error: --variant: unknown variant",
        ),  # abbreviated
        (["--out", ""], "--out must name a folder, got ''"),
        (["--trials", "0"], "--trials must be a positive integer, got 0"),
        (["--dropout-p", "0.3"], r"--dropout-p 0\.3: tune searches dropout_p .*--dropout-p-range"),
        (["--lr", "0.5"], r"--lr 0\.5: tune searches lr"),
        (["--lr", "0.01"], r"--lr 0\.01: tune searches lr"),  # SGD's default, given: not ignored
        (["--weight-decay", "0"], r"--weight-decay 0\.0: tune searches weight_decay"),
        (["--seeds", "0"], "--seeds must be a positive integer, got 0"),
        (["--name", "optuna.db"], "--name optuna.db: taken by the lab's own files"),
        (["--model", "cnn:small"], "needs image data"),
        (["--tune-seed", "-1"], r"--tune-seed must be an integer in \[0, 2\^32\)"),
        (["--split-seed", "-1"], r"--split-seed must be an integer in \[0, 2\^32\)"),
    ],
)
def test_bad_tune_options(tmp_path, capsys, argv, message):
    assert main(["tune", "--data", "wine", "--out", str(tmp_path), *argv]) == 2
    assert re.search(message, capsys.readouterr().err)
    with pytest.raises(SystemExit) as exited:
        main(["tune", "--lr-range", "fast"])
    assert exited.value.code == 2


INTERRUPTED_TUNE = """
import os, signal, sys, time
from normdrop.cli import main
from normdrop.lab import tune

real, started = tune.train_run, []

def interrupt_second(spec, splits, **kwargs):
    started.append(spec)
    if len(started) == 2:
        if sys.argv[1] == "sigterm":  # as `kill PID` during a trial's training
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)
        raise KeyboardInterrupt  # as Ctrl-C inside a trial's training
    return real(spec, splits, **kwargs)

if sys.argv[1] != "none":
    tune.train_run = interrupt_second
sys.exit(main(sys.argv[2:]))
"""


def _tune_process(out, interrupt: str) -> subprocess.CompletedProcess:
    argv = shlex.split(
        "tune --data wine --model mlp:1x8 --epochs 2 --trials 4 --backend reference"
        f" --no-progress --out {out}"
    )
    return subprocess.run(
        [sys.executable, "-c", INTERRUPTED_TUNE, interrupt, *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _trial_states(out) -> list[str]:
    storage = f"sqlite:///{out / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    return [t.state.name for t in study.trials]


@pytest.mark.parametrize("interrupt", ["ctrl-c", "sigterm"])
def test_interrupting_a_trial_exits_130_without_optunas_trace(tmp_path, interrupt):
    done = _tune_process(tmp_path, interrupt)
    assert done.returncode == 130, done.stderr
    assert done.stderr == (
        f"normdrop: interrupted; every finished trial is in the study ({tmp_path / 'optuna.db'})"
        f" and every completed epoch of the retraining in {tmp_path / 'normdrop.db'}: rerun the"
        " same command to resume\n"
    )  # one line: no "Trial 1 failed", no traceback
    assert _trial_states(tmp_path) == ["COMPLETE", "FAIL"]  # a rerun replaces it


def test_a_rerun_after_sigterm_keeps_the_finished_trials_and_completes_the_study(tmp_path):
    assert _tune_process(tmp_path, "sigterm").returncode == 130
    done = _tune_process(tmp_path, "none")
    assert done.returncode == 0, done.stderr
    states = _trial_states(tmp_path)
    assert states[:2] == ["COMPLETE", "FAIL"] and len(states) == 5  # 3 trials more, not 4
    assert "FAIL" not in states[2:] and "RUNNING" not in states


def test_a_name_taken_by_a_lab_experiment_is_refused_both_ways(tmp_path):
    """A tune's report folder (its name) and its retraining (name-best) must not replace a lab
    experiment's runs and report, nor a lab take a tune study's report folder."""
    from normdrop.lab.config import LabConfig
    from normdrop.lab.experiment import run_lab

    lab = LabConfig(SETTINGS, variants=("plain",), seeds=1, out=str(tmp_path), name="mine-best")
    run_lab(lab, progress=False)
    report = (tmp_path / "mine-best" / "report.html").read_bytes()
    with pytest.raises(InputError, match=r"--name mine: the study's retraining would replace"):
        run_tune(_config(tmp_path, name="mine", trials=1), progress=False)
    with pytest.raises(InputError, match=r"--name mine-best: the study's report folder"):
        run_tune(_config(tmp_path, name="mine-best", trials=1), progress=False)
    assert (tmp_path / "mine-best" / "report.html").read_bytes() == report
    run_tune(_config(tmp_path, name="study", trials=1, seeds=1), progress=False)
    taken = LabConfig(SETTINGS, variants=("plain",), seeds=1, out=str(tmp_path), name="study")
    with pytest.raises(InputError, match=r"--name study: a tune study of that name exists"):
        run_lab(taken, progress=False)
    retrain = LabConfig(
        SETTINGS, variants=("plain",), seeds=1, out=str(tmp_path), name="study-best"
    )
    with pytest.raises(InputError, match=r"--name study-best: a tune experiment of that name"):
        run_lab(retrain, progress=False)
    run_tune(_config(tmp_path, name="study", trials=2, seeds=1), progress=False)  # resumes


def test_an_optuna_db_that_is_someone_elses_is_refused_and_left_alone(tmp_path):
    path = tmp_path / "optuna.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE mine (x)")
    before = path.read_bytes()
    with pytest.raises(InputError, match=r"holds other tables \(mine\), not optuna studies"):
        run_tune(_config(tmp_path, trials=1), progress=False)
    assert path.read_bytes() == before


def test_a_users_folder_under_the_study_name_is_not_overwritten(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match=r"holds files, and no experiment or study.*'study'"):
        run_tune(_config(tmp_path, trials=1, seeds=1), progress=False)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and not calls


def test_ctrl_c_turned_into_another_error_is_still_an_interruption(tmp_path, monkeypatch, capsys):
    """SQLAlchemy, interrupted inside a commit (optuna's trial.report), raises AssertionError
    instead of the KeyboardInterrupt: still "interrupted", exit status 130, one line, and no
    optuna traceback in the log."""
    import signal

    def interrupted_in_a_commit(spec, splits, **kwargs):
        try:
            signal.raise_signal(signal.SIGINT)
        except KeyboardInterrupt:
            raise AssertionError from None  # what SQLAlchemy raised
        return None

    monkeypatch.setattr(tune, "train_run", interrupted_in_a_commit)
    argv = ["tune", "--data", "wine", "--model", "mlp:1x8", "--epochs", "1", "--trials", "2"]
    assert main([*argv, "--no-progress", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "Traceback" not in err and "AssertionError" not in err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
