"""One run: the same numbers whatever the thread count, resumable bit for bit, eval mode."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from normdrop.lab.config import RunSpec, TrainSettings
from normdrop.lab.data import prepare
from normdrop.lab.models import last_activation
from normdrop.lab.train import PERCENTILES, RunState, evaluate, train_run

SETTINGS = TrainSettings(
    data="wine", model="mlp:2x16", epochs=4, batch_size=16, lr=0.05, backend="reference"
)


def _spec(variant="bn+dropout", seed=0, **changes) -> RunSpec:
    return RunSpec(SETTINGS.replace(**changes), variant, seed, "wine")


def _splits(data="wine"):
    return prepare(data)


def _without_time(history):
    return [dataclasses.replace(record, seconds=0.0) for record in history]


def _history(spec, splits, **kwargs):
    seen = []
    result = train_run(spec, splits, on_epoch=lambda record, state: seen.append(record), **kwargs)
    return _without_time(seen), dataclasses.replace(result, seconds=0.0)


@pytest.mark.parametrize("backend", ["reference", "fast"])
def test_same_spec_same_numbers_whatever_the_thread_count(backend):
    splits = _splits()
    spec = _spec(backend=backend)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _history(spec, splits)
        torch.set_num_threads(max(2, previous))
        many = _history(spec, splits)
    finally:
        torch.set_num_threads(previous)
    assert one == many
    assert torch.get_num_threads() == previous  # the run put the caller's setting back
    assert _history(_spec(seed=1, backend=backend), splits) != one


def test_the_callers_random_state_is_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_run(_spec(epochs=1), _splits())
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.parametrize("variant", ["bn+dropout", "dropout"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resuming_from_a_checkpoint_continues_bit_for_bit(variant, optimizer):
    splits = _splits()
    spec = _spec(variant, optimizer=optimizer, lr=None, epochs=5, patience=3)
    history, result = _history(spec, splits)

    saved = {}

    def stop_after_two(record, state):
        if record.epoch == 2:
            saved["checkpoint"] = state.checkpoint()
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(spec, splits, on_epoch=stop_after_two)
    seen = []
    resumed = train_run(
        spec, splits, checkpoint=saved["checkpoint"], on_epoch=lambda r, s: seen.append(r)
    )
    assert [r.epoch for r in seen] == [3, 4, 5][: len(history) - 2]
    assert history[2:] == _without_time(seen)
    assert dataclasses.replace(resumed, seconds=0.0) == result


def test_evaluation_is_eval_mode_and_changes_nothing():
    splits = _splits()
    state = RunState(_spec(), splits)
    state.model.train()
    x, y = splits.val
    buffers = {k: v.clone() for k, v in state.model.state_dict().items()}
    loss, accuracy, values = evaluate(state.model, x, y, last_activation(state.model))
    assert state.model.training  # mode restored
    for key, value in state.model.state_dict().items():
        torch.testing.assert_close(value, buffers[key], rtol=0, atol=0)  # no running-stat update
    state.model.eval()
    with torch.no_grad():
        logits = state.model(x)
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)
    assert accuracy == pytest.approx((logits.argmax(1) == y).float().mean().item())
    assert values.shape == (len(x),)
    # Twice in a row: identical (dropout off, running statistics used).
    assert evaluate(state.model, x, y)[:2] == evaluate(state.model, x, y)[:2]


def test_binary_data_use_one_logit_and_bce():
    splits = prepare("breast-cancer")
    assert splits.n_outputs == 1
    state = RunState(RunSpec(SETTINGS.replace(data="breast-cancer"), "bn", 0, "x"), splits)
    x, y = splits.test
    loss, accuracy, _ = evaluate(state.model, x, y)
    state.model.eval()
    with torch.no_grad():
        logit = state.model(x)[:, 0]
    assert loss == pytest.approx(
        F.binary_cross_entropy_with_logits(logit, y.float()).item(), rel=1e-6
    )
    assert accuracy == pytest.approx(((logit > 0).long() == y).float().mean().item())


def test_preactivation_percentiles_are_those_of_the_last_hidden_layer():
    splits = _splits()
    states = []
    train_run(
        _spec(epochs=2),
        splits,
        on_epoch=lambda record, state: states.append(
            (record, {k: v.clone() for k, v in state.model.state_dict().items()})
        ),
    )
    record, weights = states[-1]
    state = RunState(_spec(), splits)
    state.model.load_state_dict(weights)
    state.model.eval()
    captured = []
    last_activation(state.model).register_forward_pre_hook(lambda _, i: captured.append(i[0][:, 0]))
    with torch.no_grad():
        state.model(splits.val[0])
    expected = torch.quantile(captured[0].double(), torch.tensor(PERCENTILES, dtype=torch.float64))
    got = torch.tensor(
        [record.preact_p15, record.preact_p50, record.preact_p85], dtype=torch.float64
    )
    torch.testing.assert_close(got, expected)


def test_early_stopping_and_model_selection():
    splits = _splits()
    # A learning rate this small leaves validation accuracy flat after epoch 1.
    history, result = _history(_spec(lr=1e-9, epochs=10, patience=2, variant="plain"), splits)
    assert len(history) == 3 and result.best_epoch == 1 and result.epochs_run == 3
    history, best = _history(_spec(epochs=6, lr=0.3, variant="plain"), splits)
    assert best.val_acc == max(r.val_acc for r in history)
    assert best.best_epoch == 1 + [r.val_acc for r in history].index(best.val_acc)
    assert best.train_acc == history[best.best_epoch - 1].train_acc
    _, last = _history(_spec(epochs=6, lr=0.3, variant="plain", select="last"), splits)
    assert last.val_acc == history[-1].val_acc and last.train_acc == history[-1].train_acc
    assert last.best_epoch == best.best_epoch


def test_test_split_is_scored_only_when_asked():
    result = train_run(_spec(epochs=1), _splits(), score_test=False)
    assert result.test_acc is None and result.test_loss is None


def test_a_final_batch_of_one_is_skipped():
    # 106 training samples of wine, batch 105: the second batch holds one sample, which BN
    # could not normalize; it is skipped instead of failing.
    splits = _splits()
    assert len(splits.train[0]) == 106
    result = train_run(_spec(batch_size=105, epochs=1, variant="bn"), splits)
    assert result.epochs_run == 1


def test_ghost_batch_norm_trains_on_whole_virtual_batches():
    """106 wine samples in batches of 16: the last batch holds 10, which GhostBatchNorm with
    virtual batches of 4 cannot split; the trainer keeps 8 of them, two whole virtual batches
    (before this, every ghost run failed at the last batch of its first epoch)."""
    from normdrop.lab.train import _train_epoch
    from normdrop.nn.ghost_batchnorm import _GhostBatchNorm

    splits = _splits()
    spec = _spec(variant="bn", epochs=2, bn_type="ghost", virtual_batch_size=4)
    result = train_run(spec, splits)
    assert result.epochs_run == 2 and 0 < result.train_acc <= 1

    state = RunState(spec, splits)
    ghosts = [m for m in state.model.modules() if isinstance(m, _GhostBatchNorm)]
    assert len(ghosts) == 2
    sizes = []
    ghosts[0].register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])))
    _train_epoch(state, *splits.train, 16)
    assert sizes == [16] * 6 + [8]

    with pytest.raises(ValueError, match=r"--batch-size 16 must be a multiple of the virtual"):
        SETTINGS.replace(bn_type="ghost", virtual_batch_size=6)
    with pytest.raises(ValueError, match=r"virtual batch size 32 \(the default"):
        SETTINGS.replace(bn_type="ghost")
