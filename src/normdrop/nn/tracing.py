"""normdrop's layers under torch's tracers: one node each under ``torch.fx.symbolic_trace``,
as torch.nn's own; a clear refusal from ``torch.jit.script``.

fx records a ``torch.nn`` layer as a single ``call_module`` node and traces into every other
module's forward. A normdrop layer's forward checks its input and picks a kernel by the
input's dtype, layout and size: facts a ``Proxy`` does not have. So each layer's forward first
asks :func:`record_call`, which, given Proxies, records the layer as one ``call_module`` node:
the traced model then calls the layer itself, in its own mode, checks and kernels, exactly as
it would call a ``torch.nn.BatchNorm2d``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from normdrop.errors import InputError

__all__ = ["is_proxy", "not_scriptable", "record_call"]


def is_proxy(*args: Any, **kwargs: Any) -> bool:
    """True when some argument is an fx ``Proxy`` (the layer is being symbolically traced)."""
    return any(isinstance(a, fx.Proxy) for a in args) or any(
        isinstance(a, fx.Proxy) for a in kwargs.values()
    )


def record_call(module: torch.nn.Module, *args: Any, **kwargs: Any) -> fx.Proxy:
    """Record ``module(*args, **kwargs)`` in the graph being traced as one ``call_module`` node
    and return its Proxy."""
    proxy = next(a for a in (*args, *kwargs.values()) if isinstance(a, fx.Proxy))
    tracer = proxy.tracer
    path = tracer.path_of_module(module)
    if not path:
        raise InputError(
            f"torch.fx cannot trace a bare {type(module).__name__} as the root module (a layer "
            "cannot call itself); trace a model that holds it, e.g. torch.nn.Sequential(layer)"
        )
    return tracer.create_proxy("call_module", path, args, kwargs)


def not_scriptable(module: torch.nn.Module, twin: bool) -> InputError:
    """The error for ``torch.jit.script(module)`` (raised from ``__prepare_scriptable__``:
    TorchScript would otherwise fail deep inside, on the forward's Python). ``twin``: the layer
    has a ``torch.nn`` counterpart that ``normdrop.tools.convert`` swaps it for."""
    alternative = "use torch.compile, torch.export or torch.jit.trace"
    if twin:
        alternative += ", or normdrop.tools.convert(model, to='torch') for a TorchScript model"
    return InputError(
        f"{type(module).__name__} cannot be compiled by torch.jit.script (its forward is "
        f"Python that TorchScript does not compile); {alternative}"
    )
