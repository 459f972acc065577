"""``run_lab`` end to end on small settings: statistics recomputed from the database, report
and plots, reuse of completed runs, resume after an interruption, parallel == sequential."""

import base64
import math
import re
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest
from scipy import stats

from normdrop.errors import InputError
from normdrop.lab import scheduler
from normdrop.lab.config import LabConfig, TrainSettings
from normdrop.lab.experiment import run_lab
from normdrop.lab.scheduler import choose_workers
from normdrop.lab.store import RunStore
from normdrop.lab.summary import LOSS_COLUMNS, loss_rows

SETTINGS = TrainSettings(
    data="synthetic:samples=240,features=8,informative=4,classes=3",
    model="mlp:1x16",
    epochs=3,
    batch_size=32,
    lr=0.05,
    backend="reference",
)


def _config(tmp_path, **changes) -> LabConfig:
    values = dict(
        settings=SETTINGS,
        variants=("plain", "bn", "dropout"),
        seeds=3,
        out=str(tmp_path / "runs"),
        workers=1,
    )
    values.update(changes)
    return LabConfig(**values)


def _rows(config: LabConfig, name: str) -> tuple[list[dict], dict[int, list[dict]]]:
    with RunStore(config.db_path, readonly=True) as store:
        runs = store.list_runs(name)
        epochs = {run["id"]: store.epochs(run["id"]) for run in runs}
    for rows in epochs.values():
        for row in rows:
            row.pop("seconds")
    for run in runs:
        for key in ("seconds", "finished_at", "created_at", "owner", "heartbeat", "experiments"):
            run.pop(key)
    return runs, epochs


def test_lab_statistics_come_from_the_database(tmp_path):
    config = _config(tmp_path)
    result = run_lab(config, progress=False)
    assert not result.failed and len(result.runs) == 9
    runs, epochs = _rows(config, result.name)
    assert all(len(rows) == 3 for rows in epochs.values())
    assert all(run["attempts"] == 1 and run["status"] == "complete" for run in runs)
    by_variant = {
        v: sorted((r for r in runs if r["variant"] == v), key=lambda r: r["seed"])
        for v in ("plain", "bn", "dropout")
    }
    for summary in result.summaries:
        group = by_variant[summary.variant]
        test = np.array([r["test_acc"] for r in group])
        interval = summary.metrics["test_acc"]
        assert interval.mean == pytest.approx(test.mean())
        low, high = stats.t.interval(0.95, 2, loc=test.mean(), scale=stats.sem(test))
        if test.std() > 0:
            assert (interval.low, interval.high) == pytest.approx((low, high))
        gap = np.array([r["train_acc"] - r["test_acc"] for r in group])
        assert summary.metrics["gap"].mean == pytest.approx(gap.mean())
        if summary.variant == "plain":
            assert summary.test_vs_plain is None
            continue
        base = np.array([r["test_acc"] for r in by_variant["plain"]])
        assert summary.test_vs_plain.difference.mean == pytest.approx((test - base).mean())
        expected_p = stats.ttest_rel(test, base).pvalue
        if not math.isnan(expected_p) and np.ptp(test - base) > 1e-9:  # else the sign test
            assert summary.test_vs_plain.p_value == pytest.approx(expected_p)
    assert len(result.claims) == 2 and all("95% CI" in c or "one seed" in c for c in result.claims)
    # The loss table's comparison column is the ACCURACY gap, in points: its label says so.
    column = LOSS_COLUMNS.index("Δ acc gap vs plain")
    for summary, row in zip(result.summaries, loss_rows(result.summaries), strict=True):
        if summary.variant == "plain":
            continue
        gap = np.array([r["train_acc"] - r["test_acc"] for r in by_variant[summary.variant]])
        base = np.array([r["train_acc"] - r["test_acc"] for r in by_variant["plain"]])
        assert summary.gap_vs_plain.difference.mean == pytest.approx((gap - base).mean())
        assert row[column] == summary.gap_vs_plain.difference.format(100, sign=True)


def test_report_and_plots_are_written(tmp_path):
    config = _config(tmp_path, variants=("plain", "bn+dropout"), seeds=2)
    result = run_lab(config, progress=False)
    page = result.report.read_text()
    assert result.report == tmp_path / "runs" / result.name / "report.html"
    assert '<table id="accuracy">' in page and '<table id="loss">' in page
    for variant in ("plain", "bn+dropout"):
        assert f"<td>{variant}</td>" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 3
    for encoded in images:
        assert base64.b64decode(encoded)[:8] == b"\x89PNG\r\n\x1a\n"
    for plot in result.plots:
        assert plot.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert ElementTree.parse(plot.svg).getroot().tag.endswith("svg")
        assert f'href="{plot.svg.name}"' in page
    assert "normdrop lab --data" in page and "torch" in page and "scikit-learn" in page
    assert 'src="http' not in page  # self-contained


def test_completed_runs_are_never_retrained(tmp_path, monkeypatch):
    config = _config(tmp_path, variants=("plain", "bn"), seeds=2)
    first = run_lab(config, progress=False)
    calls = []
    real_train_run = scheduler.train_run

    def counting(spec, *args, **kwargs):
        calls.append((spec.variant, spec.seed))
        return real_train_run(spec, *args, **kwargs)

    monkeypatch.setattr(scheduler, "train_run", counting)
    again = run_lab(config, progress=False)
    assert calls == [] and again.name == first.name
    more_seeds = run_lab(_config(tmp_path, variants=("plain", "bn"), seeds=3), progress=False)
    assert sorted(calls) == [("bn", 2), ("plain", 2)]  # only the new seed is trained
    assert len(more_seeds.runs) == 6 and not more_seeds.failed


@pytest.mark.parametrize("damage", ["none", "row lost", "checkpoint corrupt"])
def test_interrupted_lab_resumes_where_it_stopped(tmp_path, monkeypatch, damage):
    reference_config = _config(tmp_path / "reference", variants=("plain", "bn+dropout"), seeds=2)
    reference = run_lab(reference_config, progress=False)
    config = _config(tmp_path / "interrupted", variants=("plain", "bn+dropout"), seeds=2)
    real_train_run = scheduler.train_run
    started = []

    def interrupt_third_run(spec, splits, **kwargs):
        started.append(spec)
        if len(started) == 3:
            save = kwargs["on_epoch"]

            def save_then_stop(record, state):
                save(record, state)
                if record.epoch == 2:
                    raise KeyboardInterrupt

            kwargs["on_epoch"] = save_then_stop
        return real_train_run(spec, splits, **kwargs)

    monkeypatch.setattr(scheduler, "train_run", interrupt_third_run)
    with pytest.raises(KeyboardInterrupt):
        run_lab(config, progress=False)
    with RunStore(config.db_path) as store:
        statuses = [run["status"] for run in store.list_runs()]
        assert statuses == ["complete", "complete", "pending", "pending"]
        assert store.epochs_done([3]) == {3: 2}  # the epochs before the interruption are kept
        if damage == "row lost":  # killed after the checkpoint's rename, before the commit
            store.connection.execute("DELETE FROM epochs WHERE run_id = 3 AND epoch = 2")
        if damage == "checkpoint corrupt":  # a power cut truncated it: the run starts over
            path = store.checkpoint_path(3)
            path.write_bytes(path.read_bytes()[:100])
    monkeypatch.setattr(scheduler, "train_run", real_train_run)
    resumed_epochs = []
    monkeypatch.setattr(
        scheduler,
        "train_run",
        lambda spec, splits, **kw: real_train_run(
            spec, splits, **{**kw, "on_epoch": _also(kw["on_epoch"], resumed_epochs)}
        ),
    )
    resumed = run_lab(config, progress=False)
    runs, epochs = _rows(config, resumed.name)
    assert [run["attempts"] for run in runs] == [1, 1, 2, 1]
    trained_again = [r.epoch for r in resumed_epochs[:3]]
    assert trained_again == ([1, 2, 3] if damage == "checkpoint corrupt" else [3, 1, 2])
    expected_runs, expected_epochs = _rows(reference_config, reference.name)
    for run in (*runs, *expected_runs):
        run.pop("attempts")
    assert runs == expected_runs and epochs == expected_epochs


def _also(callback, seen):
    def both(record, state):
        seen.append(record)
        callback(record, state)

    return both


def test_a_failing_run_is_reported_and_retried(tmp_path, monkeypatch):
    config = _config(tmp_path, variants=("plain", "bn"), seeds=1)
    real_train_run = scheduler.train_run

    def fail_bn(spec, splits, **kwargs):
        if spec.variant == "bn":
            raise ValueError("the kernel caught fire")
        return real_train_run(spec, splits, **kwargs)

    monkeypatch.setattr(scheduler, "train_run", fail_bn)
    result = run_lab(config, progress=False)
    assert [r["variant"] for r in result.failed] == ["bn"]
    assert result.failed[0]["error"] == "ValueError: the kernel caught fire"
    assert [s.variant for s in result.summaries] == ["plain"]
    monkeypatch.setattr(scheduler, "train_run", real_train_run)
    assert not run_lab(config, progress=False).failed


def test_parallel_workers_give_the_same_numbers(tmp_path):
    sequential = _config(tmp_path / "one", variants=("plain", "bn+dropout"), seeds=2)
    parallel = _config(tmp_path / "two", variants=("plain", "bn+dropout"), seeds=2, workers=2)
    a, b = run_lab(sequential, progress=False), run_lab(parallel, progress=False)
    assert a.workers == 1 and b.workers == 2
    assert _rows(sequential, a.name) == _rows(parallel, b.name)


def test_choose_workers_by_measured_time():
    assert choose_workers(run_seconds=0.05, remaining=10, cpus=2) == 1  # start-up dominates
    assert choose_workers(run_seconds=3.0, remaining=10, cpus=2) == 2
    assert choose_workers(run_seconds=3.0, remaining=10, cpus=1) == 1
    assert choose_workers(run_seconds=100.0, remaining=1, cpus=8) == 1
    assert choose_workers(run_seconds=3.0, remaining=3, cpus=8) == 3


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = _config(tmp_path, variants=("bn",), seeds=1, tensorboard=str(tmp_path / "tb"))
    result = run_lab(config, progress=False)
    run_dir = tmp_path / "tb" / result.name / "bn-seed0"
    events = EventAccumulator(str(run_dir)).Reload()
    values = [event.value for event in events.Scalars("val/acc")]
    runs, epochs = _rows(config, result.name)
    expected = [row["val_acc"] for row in epochs[runs[0]["id"]]]
    assert values == pytest.approx(expected)
    theirs = run_dir / "events.out.tfevents.1700000000.myhost.123.0"  # not ours: kept
    theirs.write_bytes(b"a user's own events")
    run_lab(config, progress=False)  # exported again: each epoch still once
    assert theirs.read_bytes() == b"a user's own events"
    ours = list(run_dir.glob("events.out.tfevents.*.normdrop"))
    assert len(ours) == 1
    assert len(EventAccumulator(str(ours[0])).Reload().Scalars("val/acc")) == 3


def test_one_seed_gives_numbers_without_intervals_or_claims_of_significance(tmp_path):
    result = run_lab(_config(tmp_path, variants=("plain", "bn"), seeds=1), progress=False)
    bn = result.summaries[1]
    assert math.isnan(bn.metrics["test_acc"].half_width) and math.isnan(bn.test_vs_plain.p_value)
    assert "not testable with fewer than 2 paired seeds" in result.claims[0]
    assert "significantly" not in result.claims[0]


def test_a_users_folder_under_the_report_name_is_not_overwritten(tmp_path):
    """OUT/NAME receives the report: a folder there with files that no experiment of the
    database wrote is refused, its files untouched; once the experiment is recorded, its
    reruns rewrite its own report as before (also with a derived name)."""
    config = _config(tmp_path, variants=("bn",), seeds=1, name="results")
    folder = tmp_path / "runs" / "results"
    folder.mkdir(parents=True)
    (folder / "report.html").write_text("<html>my own report</html>")
    with pytest.raises(InputError, match=r"holds files, and no experiment or study.*'results'"):
        run_lab(config, progress=False)
    assert (folder / "report.html").read_text() == "<html>my own report</html>"
    assert sorted(p.name for p in folder.iterdir()) == ["report.html"]
    (folder / "report.html").unlink()  # an empty folder is fine
    first = run_lab(config, progress=False).report.read_text()
    assert run_lab(config, progress=False).report.read_text() == first  # its own: rewritten
    derived = _config(tmp_path, variants=("bn",), seeds=1)
    name = run_lab(derived, progress=False).name
    assert run_lab(derived, progress=False).name == name


def test_an_interruption_just_after_a_claim_commits_releases_the_run(tmp_path, monkeypatch):
    """A worker's SIGTERM can land between the claim's commit and the training: the run goes
    back to pending, not left 'running' for a dead owner until its heartbeat times out."""
    import sqlite3

    real = RunStore.claim

    def claim_then_interrupted(self, run_id, owner=None):
        assert real(self, run_id, owner)
        raise KeyboardInterrupt

    monkeypatch.setattr(RunStore, "claim", claim_then_interrupted)
    config = _config(tmp_path, variants=("bn",), seeds=1)
    with pytest.raises(KeyboardInterrupt):
        run_lab(config, progress=False)
    with sqlite3.connect(config.db_path) as db:
        assert [row[0] for row in db.execute("SELECT status FROM runs")] == ["pending"]
