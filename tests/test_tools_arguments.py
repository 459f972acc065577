"""Every tool names a model it cannot work on: not a Module, or a TorchScript module (whose
layers cannot be found by type or hooked, so fold and convert would silently do nothing)."""

from __future__ import annotations

import pytest
import torch

from normdrop import tools
from normdrop.errors import InputError

X = torch.randn(4, 6)
TOOLS = {
    "fold_batchnorm": lambda model: tools.fold_batchnorm(model),
    "convert": lambda model: tools.convert(model),
    "lint": lambda model: tools.lint(model, X),
    "recalibrate_batchnorm": lambda model: tools.recalibrate_batchnorm(model, [X]),
    "mc_predict": lambda model: tools.mc_predict(model, X, 2),
    "mc_dropout": lambda model: tools.mc_dropout(model).__enter__(),
}


def _model():
    return torch.nn.Sequential(
        torch.nn.Linear(6, 6, bias=False), torch.nn.BatchNorm1d(6), torch.nn.Dropout(0.5)
    )


@pytest.mark.parametrize("tool", TOOLS)
def test_a_scripted_model_is_refused_by_name(tool):
    scripted = torch.jit.script(_model().eval())
    with pytest.raises(InputError, match=rf"^{tool}: model is a TorchScript module.*eager"):
        TOOLS[tool](scripted)


@pytest.mark.parametrize("tool", TOOLS)
@pytest.mark.parametrize("model", [None, "model", X])
def test_a_model_that_is_not_a_module_is_refused_by_name(tool, model):
    with pytest.raises(InputError, match=rf"^{tool}: model must be a torch.nn.Module, got"):
        TOOLS[tool](model)
