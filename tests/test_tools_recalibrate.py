"""recalibrate_batchnorm against torch.optim.swa_utils.update_bn ("cumulative") and against the
float64 statistics of every value each BatchNorm saw ("precise")."""

from __future__ import annotations

import copy

import pytest
import torch

import normdrop.nn as ndnn
from normdrop.errors import InputError
from normdrop.tools import recalibrate_batchnorm


def _model(dropout=0.0):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False),
        torch.nn.BatchNorm2d(4, momentum=0.3),
        torch.nn.ReLU(),
        torch.nn.Dropout2d(dropout),
        torch.nn.Conv2d(4, 5, 3),
        ndnn.BatchNorm2d(5, momentum=None, affine=False),
        torch.nn.Flatten(),
        torch.nn.Linear(5 * 4 * 4, 6),
        ndnn.BatchNorm1d(6),
    )


def _data(batches=5, batch=8, seed=1):
    generator = torch.Generator().manual_seed(seed)
    # Batches with different offsets: their means spread, so the two modes differ.
    return [
        (torch.randn(batch, 3, 8, 8, generator=generator) * 2 + b, torch.zeros(batch))
        for b in range(batches)
    ]


def _buffers(model):
    return {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_cumulative_equals_update_bn_and_restores_modes_and_momenta():
    ours, theirs = _model(), _model()
    ours.eval()
    ours[1].train()  # a mixed mode that must survive
    data = _data()
    recalibrate_batchnorm(ours, data, mode="cumulative")
    torch.optim.swa_utils.update_bn(data, theirs)
    for key, value in _buffers(theirs).items():
        torch.testing.assert_close(_buffers(ours)[key], value, rtol=1e-5, atol=1e-6)
    assert [m.training for m in ours] == [False, True] + [False] * 7
    assert (ours[1].momentum, ours[5].momentum, ours[8].momentum) == (0.3, None, 0.1)


def test_dropout_stays_off_while_update_bn_leaves_it_on():
    """update_bn calls model.train(): the statistics then carry dropout's variance shift."""
    data = _data()
    ours = _model(dropout=0.5)
    recalibrate_batchnorm(ours, data)
    without_dropout = _model(dropout=0.0)
    torch.optim.swa_utils.update_bn(data, without_dropout)
    for key, value in _buffers(without_dropout).items():
        torch.testing.assert_close(_buffers(ours)[key], value, rtol=1e-5, atol=1e-6)
    with_dropout = _model(dropout=0.5)
    torch.manual_seed(0)
    torch.optim.swa_utils.update_bn(data, with_dropout)
    assert not torch.allclose(with_dropout[5].running_var, ours[5].running_var, rtol=1e-2)


def _pooled_inputs(model, data):
    """Every BatchNorm's inputs over all batches, with BatchNorms (only) in training mode."""
    model = copy.deepcopy(model).eval()
    seen = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.train()
            module.register_forward_pre_hook(
                lambda m, args, name=name: seen.setdefault(name, []).append(args[0].double())
            )
    with torch.no_grad():
        for x, _ in data:
            model(x)
    return {name: torch.cat(inputs) for name, inputs in seen.items()}


def test_precise_is_the_float64_statistics_of_all_values_seen():
    model, data = _model(), _data(batches=4, batch=6)
    inputs = _pooled_inputs(model, data)
    recalibrate_batchnorm(model, data, mode="precise")
    for name, values in inputs.items():
        bn = model.get_submodule(name)
        dims = [0, *range(2, values.dim())]
        mean, var = values.mean(dims), values.var(dims, correction=1)
        torch.testing.assert_close(bn.running_mean, mean.float(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var, var.float(), rtol=1e-5, atol=1e-6)
        # Equal batches: the mean is also the mean of the per-batch means.
        per_batch = torch.stack([b.mean(dims) for b in values.split(6)]).mean(0)
        torch.testing.assert_close(bn.running_mean, per_batch.float(), rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == 4


def test_precise_sees_the_spread_of_batch_means_and_cumulative_does_not():
    data = _data(batches=5, batch=8)  # batch b has mean b and variance 4
    cumulative, precise = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    recalibrate_batchnorm(cumulative, data, mode="cumulative")
    recalibrate_batchnorm(precise, data, mode="precise")
    # Pooled variance = mean within-batch variance (4) + variance of the means 0..4 (2).
    torch.testing.assert_close(cumulative.running_var, torch.full((3,), 4.0), rtol=0.1, atol=0)
    torch.testing.assert_close(precise.running_var, torch.full((3,), 6.0), rtol=0.1, atol=0)


def test_a_failing_pass_restores_everything():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = [*_data(batches=2), ("not a tensor",)]
    with pytest.raises(InputError, match="each batch must be a tensor"):
        recalibrate_batchnorm(model, data, mode="precise")
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert model.training and model[1].momentum == 0.3
    assert not model[1]._forward_pre_hooks  # the collecting hooks are gone


@pytest.mark.parametrize("mode", ["cumulative", "precise"])
def test_renorm_recalibrates_its_own_statistics_and_keeps_its_schedule(mode):
    """Batch Renorm recalibrates with r = 1, d = 0 and its own running averages (the paper's:
    the mean of mu_B, and of sigma_B = sqrt(v_B + eps), stored as sigma^2 - eps), written out
    here in float64 from the Linear's outputs: per batch in "cumulative" mode, weighted by
    the batches' counts in "precise" mode (the last batch is smaller)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), ndnn.BatchRenorm1d(4, rmax=2, dmax=1))
    model[1].num_batches_tracked.fill_(100)
    data = [torch.randn(8, 3) + i for i in range(3)] + [torch.randn(2, 3) * 5]
    with torch.no_grad():
        features = [model[0](x).double() for x in data]
    eps = model[1].eps
    counts = torch.tensor([len(f) for f in features], dtype=torch.float64)
    weights = torch.ones(len(data)) if mode == "cumulative" else counts
    weights = (weights / weights.sum()).double().unsqueeze(1)
    mean = (weights * torch.stack([f.mean(0) for f in features])).sum(0)
    sigmas = torch.stack([(f.var(0, correction=0) + eps).sqrt() for f in features])
    sigma = (weights * sigmas).sum(0)
    recalibrate_batchnorm(model, data, mode)
    torch.testing.assert_close(model[1].running_mean, mean.float())
    torch.testing.assert_close(model[1].running_var, (sigma**2 - eps).float())
    assert (model[1].rmax, model[1].dmax, int(model[1].num_batches_tracked)) == (2, 1, 100)
    plain = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    plain.load_state_dict(model.state_dict())
    torch.optim.swa_utils.update_bn(data, plain)  # torch's kind: mean of unbiased variances
    assert not torch.allclose(model[1].running_var, plain[1].running_var)


def test_arguments_are_checked_and_num_batches_is_honoured():
    model = _model()
    with pytest.raises(InputError, match="mode must be one of"):
        recalibrate_batchnorm(model, _data(), mode="exact")
    with pytest.raises(InputError, match="no batch"):
        recalibrate_batchnorm(model, [])
    for wrong in (0, 2.5, True):  # 2.5 was taken, and every batch used
        with pytest.raises(InputError, match="num_batches must be a positive int"):
            recalibrate_batchnorm(model, _data(), num_batches=wrong)
    with pytest.raises(InputError, match=r"data must be an iterable of batches.*row by row"):
        recalibrate_batchnorm(model, torch.cat([x for x, _ in _data()]))  # rows: not batches
    consumed = []

    def stream():
        for batch in _data(batches=5):
            consumed.append(1)
            yield batch

    recalibrate_batchnorm(model, stream(), num_batches=2)
    assert int(model[1].num_batches_tracked) == 2 and len(consumed) <= 3
    no_bn = torch.nn.Linear(2, 2)
    assert recalibrate_batchnorm(no_bn, []) is no_bn  # nothing to do is not an error


def test_batchnormact_dropout_is_off_and_num_batches_fetches_no_extra_batch():
    def model(p):
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, bias=False),
            ndnn.BatchNormAct2d(8, p=p),
            torch.nn.Conv2d(8, 8, 3, bias=False),
            torch.nn.BatchNorm2d(8),
        )

    data = [torch.randn(8, 3, 12, 12) for _ in range(4)]
    with_dropout, without = (
        recalibrate_batchnorm(model(0.5), data),
        recalibrate_batchnorm(model(0.0), data),
    )
    # the fused dropout did not run: the next BatchNorm sees what it sees without dropout
    torch.testing.assert_close(with_dropout[3].running_var, without[3].running_var)
    assert with_dropout[1].p == 0.5  # and p is back
    batches = iter([torch.randn(4, 8) for _ in range(5)])
    net = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    recalibrate_batchnorm(net, batches, num_batches=2)
    assert net[1].num_batches_tracked.item() == 2 and len(list(batches)) == 3


class _KeywordModel(torch.nn.Module):
    """Takes its input by keyword, as Hugging Face models do (``model(**batch)``)."""

    def __init__(self):
        super().__init__()
        self.body = _model()

    def forward(self, pixel_values, labels=None):
        assert labels is None or labels.shape[0] == pixel_values.shape[0]
        return self.body(pixel_values)


@pytest.mark.parametrize("mode", ["cumulative", "precise"])
def test_dict_batches_are_keyword_inputs(mode):
    """A batch that is a dict (a Hugging Face dataset's) is passed as ``model(**batch)``,
    tensors moved to ``device``; the statistics equal those from the same inputs as tensors."""
    data = _data()
    ours, reference = _KeywordModel(), _KeywordModel()
    dicts = [{"pixel_values": x, "labels": y} for x, y in data]
    recalibrate_batchnorm(ours, dicts, mode=mode, device="cpu")
    recalibrate_batchnorm(reference.body, [x for x, _ in data], mode=mode)
    for key, value in _buffers(reference.body).items():
        assert torch.equal(_buffers(ours.body)[key], value)
    with pytest.raises(InputError, match="keys must be strings"):
        recalibrate_batchnorm(_KeywordModel(), [{0: data[0][0]}])
