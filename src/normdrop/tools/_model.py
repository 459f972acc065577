"""The model argument of every tool: what each accepts, and the deep copy some work on."""

from __future__ import annotations

import copy
from typing import Any

import torch

from normdrop.errors import InputError


def check_model(tool: str, model: Any) -> None:
    """Raise ``InputError`` unless ``model`` is an eager ``torch.nn.Module``: the tools find
    layers by type and hook their calls, which a TorchScript module has neither of."""
    if isinstance(model, torch.jit.ScriptModule):
        raise InputError(
            f"{tool}: model is a TorchScript module ({type(model).__name__}), whose layers "
            "cannot be found or hooked by type; apply it to the eager model, then script that"
        )
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"{tool}: model must be a torch.nn.Module, got {type(model).__name__}")


def deep_copy(model: torch.nn.Module, tool: str, way_out: str) -> torch.nn.Module:
    """``copy.deepcopy(model)``, or an error that says why it cannot be copied (e.g. a cached
    non-leaf tensor left by a forward with autograd on, as transformers' LeViT keeps)."""
    try:
        return copy.deepcopy(model)
    except Exception as error:
        raise InputError(
            f"{tool} works on a deep copy of the model, and copying it failed "
            f"({type(error).__name__}: {error}){way_out}"
        ) from error
