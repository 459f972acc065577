r"""Recompute BatchNorm running statistics from data, with the weights fixed.

Running statistics are a moving average over a model that kept changing while they were
collected; after weight averaging (SWA), pruning, quantization or a change of data they no
longer match the weights. With the weights fixed, one pass over ``B`` batches gives, for a
BatchNorm whose input in batch ``b`` has per-channel mean ``mu_b``, biased variance ``v_b``
and ``n_b`` values per channel:

``mode="cumulative"``, as ``torch.optim.swa_utils.update_bn`` (momentum ``None``)::

    running_mean = (1/B) sum_b mu_b
    running_var  = (1/B) sum_b v_b * n_b / (n_b - 1)          mean of unbiased batch variances

``mode="precise"``, the statistics of all the values the layer saw, pooled (PreciseBN,
Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", appendix; combined in float64 with
:func:`normdrop.nn.sync_batchnorm.combine_batch_statistics`)::

    n            = sum_b n_b
    running_mean = sum_b n_b mu_b / n
    running_var  = sum_b n_b (v_b + (mu_b - running_mean)^2) / (n - 1)

They differ by the spread of the batch means: "cumulative" leaves it out, which underestimates
the variance when batches are small or not shuffled; "precise" is the exact unbiased variance
of the pooled values.

In both modes the BatchNorm layers run in training mode (each batch is normalized with its
own statistics, as during training, so later layers see training-time activations) and every
other module runs in eval mode: unlike ``update_bn``, which calls ``model.train()``, dropout
stays off, so its variance shift (Li et al. 2019) does not leak into the statistics. Batch
Renorm layers run as plain BatchNorm (r = 1, d = 0) and keep their own kind of average, the
paper's (the mean of ``sigma_B = sqrt(v_b + eps)``, stored as ``sigma^2 - eps``: docs/family.md),
which their training steps normalize with: "cumulative" averages it over the batches,
"precise" weights each batch by its count, in float64 (and the mean likewise).
Momenta, modes and Batch Renorm's limits and step count are restored afterwards; if the pass
fails, the old statistics are put back too.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from normdrop.errors import InputError
from normdrop.functional import batch_statistics
from normdrop.nn.batch_renorm import _BatchRenorm, stored_variance
from normdrop.nn.norm_act import _BatchNormAct
from normdrop.nn.sync_batchnorm import combine_batch_statistics
from normdrop.tools._model import check_model

__all__ = ["recalibrate_batchnorm"]

_MODES = ("cumulative", "precise")


def _batchnorms(model: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


def _model_inputs(
    batch: Any, device: torch.device | str | None
) -> tuple[tuple[Tensor, ...], dict[str, Any]]:
    """``(args, kwargs)`` of the model call for one batch: a tensor, a list/tuple whose first
    item is the input (as ``update_bn``), or a mapping of keyword inputs (a Hugging Face batch:
    ``model(**batch)``); tensors moved to ``device`` if given."""
    if isinstance(batch, Mapping) and batch:
        if not all(isinstance(key, str) for key in batch):
            raise InputError(
                "recalibrate_batchnorm: a dict batch is passed as keyword arguments, so its "
                f"keys must be strings, got {sorted(map(repr, batch))}"
            )
        return (), {key: _to(value, device) for key, value in batch.items()}
    if isinstance(batch, list | tuple) and batch:
        batch = batch[0]
    if not isinstance(batch, Tensor):
        raise InputError(
            "recalibrate_batchnorm: each batch must be a tensor, an (input, ...) tuple/list "
            f"with a tensor first, or a dict of keyword inputs, got {type(batch).__name__}"
        )
    return (_to(batch, device),), {}


def _to(value: Any, device: torch.device | str | None) -> Any:
    return value.to(device) if device is not None and isinstance(value, Tensor) else value


class _Pooled:
    """Collects every batch's (mean, biased var, count) of one BatchNorm's input."""

    def __init__(self) -> None:
        self.means: list[Tensor] = []
        self.variances: list[Tensor] = []
        self.counts: list[int] = []

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        x = args[0]
        mean, var = batch_statistics(x.detach().to(torch.float64))
        self.means.append(mean)
        self.variances.append(var)
        self.counts.append(x.numel() // x.shape[1])

    def write_to(self, bn: torch.nn.modules.batchnorm._BatchNorm) -> None:
        means, variances = torch.stack(self.means), torch.stack(self.variances)
        counts = torch.tensor(self.counts)
        mean, var, total = combine_batch_statistics(means, variances, counts)
        bn.running_mean.copy_(mean)
        if isinstance(bn, _BatchRenorm):
            # Its own statistic, which its training steps normalize with (r and d map each
            # batch onto it): the count-weighted mean of sigma_B = sqrt(v_b + eps).
            weights = (counts / total).to(torch.float64).unsqueeze(1)
            sigma = (weights * (variances + bn.eps).sqrt()).sum(0)
            bn.running_var.copy_(stored_variance(sigma, bn.eps))
        else:
            bn.running_var.copy_(var * (total / (total - 1)))


def _saved_state(model: torch.nn.Module, bns: list) -> dict:
    return {
        "modes": {m: m.training for m in model.modules()},
        "momenta": {bn: bn.momentum for bn in bns},
        "buffers": {bn: [b.detach().clone() for b in bn.buffers(recurse=False)] for bn in bns},
        # Batch Renorm's num_batches_tracked is the clock of its warm-up schedule.
        "renorm": {
            bn: (bn.rmax, bn.dmax, bn.num_batches_tracked.clone())
            for bn in bns
            if isinstance(bn, _BatchRenorm)
        },
        # BatchNormAct's dropout is part of the layer put in training mode: switched off too.
        "dropout": {bn: bn.p for bn in bns if isinstance(bn, _BatchNormAct)},
    }


def _restore(state: dict, *, buffers: Iterable[torch.nn.Module]) -> None:
    """Modes, momenta, renorm and dropout settings; the statistics of the BatchNorms
    ``buffers``."""
    for module, training in state["modes"].items():
        module.training = training
    for bn, momentum in state["momenta"].items():
        bn.momentum = momentum
    for bn, (rmax, dmax, steps) in state["renorm"].items():
        bn.rmax, bn.dmax = rmax, dmax
        bn.num_batches_tracked.copy_(steps)
    for bn, p in state["dropout"].items():
        bn.p = p
    for bn in buffers:
        for buffer, value in zip(bn.buffers(recurse=False), state["buffers"][bn], strict=True):
            buffer.copy_(value)


@torch.no_grad()
def recalibrate_batchnorm(
    model: torch.nn.Module,
    data: Iterable[Any],
    mode: str = "cumulative",
    *,
    num_batches: int | None = None,
    device: torch.device | str | None = None,
) -> torch.nn.Module:
    """Recompute the running statistics of every BatchNorm in ``model`` from ``data``.

    Args:
        model: modified in place (buffers only) and returned.
        data: an iterable of batches (a DataLoader): tensors, tuples/lists whose first
            item is the model's input, or dicts of keyword inputs (``model(**batch)``, as a
            Hugging Face dataset yields them).
        mode: ``"cumulative"`` (mean of per-batch statistics, as ``update_bn``) or
            ``"precise"`` (statistics of all values pooled); see the module docstring.
        num_batches: use at most this many batches.
        device: move each input there first.

    BatchNorms with ``track_running_stats=False`` have nothing to recalibrate and are skipped;
    one that the eval-mode forward never reaches (a training-only auxiliary head) keeps its
    statistics, with a warning.
    ``num_batches_tracked`` ends as the number of batches seen, as with ``update_bn``.
    """
    check_model("recalibrate_batchnorm", model)
    if mode not in _MODES:
        raise InputError(f"recalibrate_batchnorm: mode must be one of {_MODES}, got {mode!r}")
    if isinstance(data, Tensor):
        raise InputError(
            "recalibrate_batchnorm: data must be an iterable of batches (a DataLoader, a list "
            f"of tensors), got a tensor of shape {tuple(data.shape)}, which would be read row "
            "by row; pass [tensor] for one batch, or tensor.split(batch_size) for several"
        )
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise InputError(
            f"recalibrate_batchnorm: num_batches must be a positive int or None, got "
            f"{num_batches!r}"
        )
    bns = _batchnorms(model)
    if not bns:
        return model
    state = _saved_state(model, bns)
    pooled = {bn: _Pooled() for bn in bns} if mode == "precise" else {}
    handles = [bn.register_forward_pre_hook(hook) for bn, hook in pooled.items()]
    called: set[torch.nn.Module] = set()
    handles += [bn.register_forward_pre_hook(lambda m, _: called.add(m)) for bn in bns]
    try:
        seen = _run(model, data, bns, num_batches, device)
        if seen == 0:
            raise InputError("recalibrate_batchnorm: data yielded no batch")
        for bn, collected in pooled.items():
            if bn in called:
                collected.write_to(bn)
    except BaseException:
        _restore(state, buffers=bns)
        raise
    finally:
        for handle in handles:
            handle.remove()
    # A BatchNorm the eval-mode forward never reaches (an auxiliary head that runs in training
    # only) has no new statistics: it keeps its old ones instead of the reset (0, 1).
    unused = [bn for bn in bns if bn not in called]
    _restore(state, buffers=unused)
    if unused:
        paths = {m: path for path, m in model.named_modules()}
        warnings.warn(
            f"recalibrate_batchnorm: {len(unused)} BatchNorm(s) received no input in the "
            "eval-mode forward and keep their old statistics: "
            + ", ".join(repr(paths[bn]) for bn in unused),
            UserWarning,
            stacklevel=3,  # past torch.no_grad's wrapper
        )
    return model


def _run(
    model: torch.nn.Module,
    data: Iterable[Any],
    bns: list,
    num_batches: int | None,
    device: torch.device | str | None,
) -> int:
    """Forward every batch with the BatchNorms (only) in training mode; returns the count."""
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: running = mean over the batches so far
        bn.train()
        if isinstance(bn, _BatchRenorm):
            bn.rmax, bn.dmax = 1.0, 0.0  # plain BatchNorm while the statistics are rebuilt
        if isinstance(bn, _BatchNormAct):
            bn.p = 0.0  # its fused dropout stays off, as every other dropout
    seen = 0
    for batch in data:
        args, kwargs = _model_inputs(batch, device)
        model(*args, **kwargs)
        seen += 1
        if seen == num_batches:  # before fetching another: an iterator keeps the rest
            break
    return seen
