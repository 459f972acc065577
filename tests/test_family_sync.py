"""SyncBatchNorm in one process: the statistics combination, conversion, and class contract.

The multi-process behaviour is in test_distributed_syncbn.py.
"""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import normdrop.nn as ndnn
from normdrop.errors import InputError
from normdrop.nn.sync_batchnorm import _sync_batch_norm, combine_batch_statistics


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 6), min_size=1, max_size=5).filter(lambda s: sum(s) > 0),
    channels=st.integers(1, 3),
    offset=st.sampled_from([0.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_combined_statistics_equal_those_of_the_concatenation(sizes, channels, offset, seed):
    generator = torch.Generator().manual_seed(seed)
    parts = [
        torch.randn(n, channels, generator=generator, dtype=torch.float64) * 2 + offset
        for n in sizes
    ]
    means = torch.stack([p.mean(0) if len(p) else torch.full((channels,), np.nan) for p in parts])
    variances = torch.stack(
        [p.var(0, correction=0) if len(p) else torch.full((channels,), np.nan) for p in parts]
    )
    mean, var, total = combine_batch_statistics(means, variances, torch.tensor(sizes))
    whole = torch.cat(parts)
    assert total.item() == sum(sizes)
    torch.testing.assert_close(mean, whole.mean(0), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(var, whole.var(0, correction=0), rtol=1e-9, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(values=hnp.arrays(np.float32, st.tuples(st.integers(2, 30), st.just(2))))
def test_combination_of_float32_parts_is_accurate_for_offset_data(values):
    """float32 per-part statistics, float64 combination: as good as float64 on the whole."""
    data = torch.from_numpy(np.nan_to_num(values, posinf=0, neginf=0)).clamp(-1e3, 1e3) + 1e4
    parts = data.split(max(1, len(data) // 3))
    means = torch.stack([p.mean(0) for p in parts])
    variances = torch.stack([p.var(0, correction=0) for p in parts])
    counts = torch.tensor([len(p) for p in parts])
    _, var, _ = combine_batch_statistics(means, variances, counts)
    exact = data.double().var(0, correction=0)
    torch.testing.assert_close(var, exact, rtol=1e-3, atol=1e-3 * (1 + exact.abs().max().item()))


def test_is_a_torch_batchnorm_but_not_torch_syncbatchnorm():
    """DDP rejects CPU modules that are torch.nn.SyncBatchNorm instances; ours must pass."""
    sync = ndnn.SyncBatchNorm(4)
    assert isinstance(sync, torch.nn.modules.batchnorm._BatchNorm)
    assert not isinstance(sync, torch.nn.SyncBatchNorm)
    assert list(sync.state_dict()) == list(torch.nn.SyncBatchNorm(4).state_dict())


def _model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 4, 5)),
        ndnn.BatchNorm1d(5, momentum=None, affine=False),
        ndnn.GhostBatchNorm1d(5, virtual_batch_size=2),
        torch.nn.BatchNorm1d(5, track_running_stats=False),
    )


def test_convert_and_revert_share_tensors_and_round_trip():
    model = _model()
    model[1].train(False)
    parameters = {id(p) for p in model.parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    classes = [type(m) for m in model]

    with pytest.warns(UserWarning, match=r"left 1 BatchNorm subclass.*'4' \(GhostBatchNorm1d\)"):
        synced = ndnn.convert_sync_batchnorm(model)
    assert synced is model
    assert isinstance(model[1], ndnn.SyncBatchNorm) and isinstance(model[3], ndnn.SyncBatchNorm)
    assert isinstance(model[5], ndnn.SyncBatchNorm)
    assert type(model[4]) is ndnn.GhostBatchNorm1d  # a variant with its own forward stays
    assert model[1].training is False and model[3].momentum is None and not model[3].affine
    assert {id(p) for p in model.parameters()} == parameters  # optimizers stay valid

    reverted = ndnn.revert_sync_batchnorm(synced)
    assert [type(m) for m in reverted] == classes
    assert reverted.state_dict().keys() == state.keys()
    for key, value in reverted.state_dict().items():
        assert torch.equal(value, state[key])
    x = torch.randn(6, 3, 4, 4)
    torch.testing.assert_close(reverted.eval()(x), _reference_eval(state, x))


def _reference_eval(state, x):
    model = _model()
    model.load_state_dict(state)
    return model.eval()(x)


def test_convert_a_bare_batchnorm_returns_the_new_layer_and_revert_needs_a_class():
    bn = torch.nn.BatchNorm3d(2, bias=False)
    sync = ndnn.SyncBatchNorm.convert_sync_batchnorm(bn)
    assert isinstance(sync, ndnn.SyncBatchNorm) and sync.bias is None
    assert type(ndnn.revert_sync_batchnorm(sync)) is torch.nn.BatchNorm3d
    with pytest.raises(InputError, match="pass cls="):
        ndnn.revert_sync_batchnorm(ndnn.SyncBatchNorm(2))
    reverted = ndnn.revert_sync_batchnorm(ndnn.SyncBatchNorm(2), cls=ndnn.BatchNorm2d)
    assert type(reverted) is ndnn.BatchNorm2d


def test_bad_input_is_rejected_with_a_clear_message():
    sync = ndnn.SyncBatchNorm(3)
    with pytest.raises(InputError, match=r"\(N, C, \*\)"):
        sync(torch.randn(3))
    with pytest.raises(InputError, match="num_features=3"):
        sync(torch.randn(4, 2, 5))
    with pytest.raises(InputError, match="momentum"):
        ndnn.SyncBatchNorm(3, momentum=2.0)


def test_synchronized_path_refuses_eps_that_is_not_positive():
    """The constructor accepts any eps, as torch.nn's does; training must refuse eps <= 0, and
    the synchronized path does so before it enters the collective (no rank is left waiting)."""
    for eps in (0.0, -1.0):
        ndnn.SyncBatchNorm(3, eps=eps)
        with pytest.raises(InputError, match="eps must be positive during training"):
            _sync_batch_norm(torch.randn(4, 3), None, None, None, None, 0.1, eps, None)


def test_convert_and_revert_keep_a_pruned_batchnorm_and_its_hooks():
    """A BatchNorm pruned with torch.nn.utils.prune (``weight`` recomputed by a pre-hook from
    ``weight_orig`` and the ``weight_mask`` buffer) converts and reverts with the same output,
    state_dict keys and a working mask (it lost the pre-hook and gained a fresh ``weight = 1``:
    the output changed silently); a user's forward hook and attributes travel too."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2)
    prune.l1_unstructured(model[1], "weight", amount=0.5)
    calls = []
    model[1].register_forward_hook(lambda *_: calls.append(1))
    model[1].note = "kept"
    x = torch.randn(2, 3, 6, 6)
    expected, keys = model(x), list(model.state_dict())
    converted = ndnn.convert_sync_batchnorm(model)
    assert isinstance(converted[1], ndnn.SyncBatchNorm)
    torch.testing.assert_close(converted(x), expected)
    assert list(converted.state_dict()) == keys and converted[1].note == "kept"
    with torch.no_grad():  # the mask still applies to a changed weight_orig
        converted[1].weight_orig.fill_(3.0)
    converted(x)
    assert torch.equal(converted[1].weight, 3.0 * converted[1].weight_mask)
    reverted = ndnn.revert_sync_batchnorm(converted)
    assert type(reverted[1]) is torch.nn.BatchNorm2d
    assert not hasattr(reverted[1], "process_group")
    assert list(reverted.state_dict()) == keys
    reverted(x)
    assert len(calls) == 4


def test_convert_and_revert_replace_a_layer_under_every_name_by_one():
    bn = torch.nn.BatchNorm2d(4)
    model = torch.nn.Sequential(torch.nn.Sequential(bn), torch.nn.Sequential(bn))
    model.alias = bn
    ndnn.convert_sync_batchnorm(model)
    assert isinstance(model.alias, ndnn.SyncBatchNorm)
    assert model.alias is model[0][0] is model[1][0]
    ndnn.revert_sync_batchnorm(model)
    assert type(model.alias) is torch.nn.BatchNorm2d and model.alias is model[0][0] is model[1][0]


def test_revert_that_raises_leaves_the_model_as_it_was():
    model = torch.nn.Sequential(
        ndnn.convert_sync_batchnorm(torch.nn.BatchNorm2d(4)), ndnn.SyncBatchNorm(4)
    )
    first = model[0]
    with pytest.raises(InputError, match="pass cls="):
        ndnn.revert_sync_batchnorm(model)
    assert model[0] is first
