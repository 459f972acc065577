"""normdrop's layers under torch.fx.symbolic_trace: one call_module node each, as torch.nn's."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import fx

import normdrop.nn as ndnn
from normdrop.errors import InputError
from normdrop.tools import convert, fold_batchnorm


def _layers():
    return [
        ndnn.BatchNorm1d(4),
        ndnn.BatchNormAct1d(4, "relu", 0.2),
        ndnn.GhostBatchNorm1d(4, 2),
        ndnn.BatchRenorm1d(4),
        ndnn.SyncBatchNorm(4),
        ndnn.FrozenBatchNorm1d(4),
        ndnn.Dropout(0.3),
        ndnn.AlphaDropout(0.2),
        ndnn.DropPath(0.2),
        ndnn.GaussianDropout(0.2),
        ndnn.DropConnect(torch.nn.Linear(4, 4), 0.3),
    ]


@pytest.mark.parametrize("layer", _layers(), ids=lambda layer: type(layer).__name__)
def test_each_layer_is_one_node_and_the_traced_model_runs_it_in_its_mode(layer):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), layer)
    traced = fx.symbolic_trace(model)
    calls = [node for node in traced.graph.nodes if node.op == "call_module"]
    assert [node.target for node in calls] == ["0", "1"]
    x = torch.randn(8, 4)
    for training in (True, False):
        model.train(training)  # the traced model shares the layers, so their mode
        state = {key: value.clone() for key, value in model.state_dict().items()}
        outputs = []
        for module in (model, traced):
            model.load_state_dict(state)  # the same running statistics for both calls
            torch.manual_seed(0)
            outputs.append(module(x))
        torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


def test_a_bare_layer_as_the_root_is_refused_clearly():
    with pytest.raises(InputError, match="as the root module"):
        fx.symbolic_trace(ndnn.BatchNorm2d(3))


def test_converted_and_folded_models_trace_as_their_originals():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(144, 2),
    ).eval()
    model[1].running_mean.normal_()
    model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    for derived in (convert(model), fold_batchnorm(model)):
        traced = fx.symbolic_trace(derived)
        torch.testing.assert_close(traced(x), derived(x), rtol=0, atol=0)
        torch.testing.assert_close(traced(x), model(x))


def test_a_model_folded_once_folds_its_remaining_pairs_by_a_whole_model_trace():
    """After a first fold the FoldedBatchNorm placeholders are single nodes, so a second fold
    (of a pair added later) still traces the whole model, without the by-parts warning."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4)).eval()
    folded = fold_batchnorm(model)
    folded.append(torch.nn.Conv2d(4, 4, 1))
    folded.append(torch.nn.BatchNorm2d(4).eval())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = fold_batchnorm(folded)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in again.modules()) == 0


@pytest.mark.parametrize(
    "layer",
    [
        ndnn.DropPath(0.2),
        ndnn.DropBlock2d(0.2, 3),
        ndnn.GaussianDropout(0.2),
        ndnn.DropConnect(torch.nn.Linear(4, 4), 0.3),
        ndnn.AlphaDropout(0.2),
        ndnn.BatchNormAct1d(4),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_torchscript_refuses_each_layer_clearly(layer):
    with pytest.raises(InputError, match=r"cannot be compiled by torch\.jit\.script"):
        torch.jit.script(torch.nn.Sequential(layer))
