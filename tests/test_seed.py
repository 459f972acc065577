"""The seed tutorial's system runs, correctly, and shows memorization of random labels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normdrop.lab import seed

ROOT = Path(__file__).resolve().parents[1]


def test_seed_data_matches_the_tutorial():
    features, labels = seed.make_seed_data()
    assert features.shape == (100, 10) and features.dtype == torch.float32
    assert labels.shape == (100,) and set(labels.unique().tolist()) <= {0.0, 1.0}
    again, _ = seed.make_seed_data()
    assert torch.equal(features, again)


def test_simplenet_topology_is_the_seeds():
    model = seed.SimpleNet()
    layers = [type(m).__name__ for m in model.children()]
    assert layers == ["Linear", "BatchNorm1d", "Dropout", "Linear"]
    assert model.fc1.in_features == 10 and model.fc1.out_features == 50
    assert model.fc2.out_features == 1 and model.dropout1.p == 0.5
    assert model(torch.randn(4, 10)).shape == (4, 1)


def test_default_run_is_the_seeds_settings_and_reproducible():
    history = seed.train_seed(test_size=200)
    assert [row.epoch for row in history] == list(range(1, 11))
    again = seed.train_seed(test_size=200)
    assert history == again
    for row in history:
        assert 0 <= row.train_accuracy <= 1 and 0 <= row.test_accuracy <= 1


def test_random_labels_are_memorized_but_not_generalized():
    """Given enough epochs the plain net reaches ~100% train accuracy; held-out accuracy stays
    inside the 99.9% binomial interval of chance (1000 samples: 50% +- 5.2 points)."""
    last = seed.train_seed(epochs=300, lr=0.1, batch_norm=False, dropout=0.0)[-1]
    assert last.train_accuracy >= 0.95
    assert abs(last.test_accuracy - 0.5) < 0.052


def test_batchnorm_and_dropout_slow_memorization_down():
    plain = seed.train_seed(epochs=150, lr=0.1, batch_norm=False, dropout=0.0)[-1]
    both = seed.train_seed(epochs=150, lr=0.1, batch_norm=True, dropout=0.5)[-1]
    assert both.train_accuracy < plain.train_accuracy


def test_cli_prints_one_line_per_epoch(capsys):
    assert seed.main(["--epochs", "3", "--test-size", "50"]) == 0
    out = capsys.readouterr().out
    assert out.count("%") >= 6 and "memorization" in out


def test_cli_rejects_bad_dropout():
    with pytest.raises(SystemExit):
        seed.main(["--dropout", "1.5"])


def test_example_script_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "seed_simplenet.py"), "--epochs", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "train acc" in result.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "1"], "--batch-size must be >= 2"),
        (["--lr", "0"], "--lr must be a positive finite number"),
        (["--lr", "nan"], "--lr must be a positive finite number"),
        (["--momentum", "2"], "--momentum must be in [0, 1)"),
        (["--seed", str(2**64)], "--seed must be an integer in [0, 2^32)"),
        (["--seed", "-1"], "--seed must be an integer in [0, 2^32)"),
    ],
)
def test_settings_that_would_train_nothing_are_refused(argv, message, capsys):
    # a batch of one is skipped (BatchNorm needs two samples): the run printed loss 0.0000
    with pytest.raises(SystemExit) as exit_info:
        seed.main([*argv, "--epochs", "1"])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
