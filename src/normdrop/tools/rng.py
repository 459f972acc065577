"""A model's random state: torch's global generators and the generators its layers own.

A layer built with its own ``torch.Generator`` (``DropPath(p, generator=g)``, timm-style layers)
draws from it, not from the global generator, so forking only the global state neither makes
such a model's draws reproducible nor leaves its random state as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["forked_rng", "generators_of"]


def generators_of(model: torch.nn.Module) -> list[torch.Generator]:
    """The ``torch.Generator``s that the model's modules hold as attributes, each once."""
    found: dict[int, torch.Generator] = {}
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, torch.Generator):
                found.setdefault(id(value), value)
    return list(found.values())


@contextlib.contextmanager
def forked_rng(
    model: torch.nn.Module,
    devices: list,
    device_type: str = "cuda",
    seed: int | None = None,
) -> Iterator[None]:
    """Inside, draws change neither torch's global random state (on the CPU and ``devices``,
    as ``torch.random.fork_rng``) nor the model's layers' own generators; with ``seed``, all of
    them start from it: the global generator is seeded with it, each layer generator with a
    number drawn from that."""
    generators = generators_of(model)
    states = [generator.get_state() for generator in generators]
    with torch.random.fork_rng(devices=devices, device_type=device_type):
        try:
            if seed is not None:
                torch.manual_seed(seed)
                for generator in generators:
                    generator.manual_seed(int(torch.randint(0, 2**62, ())))
            yield
        finally:
            for generator, state in zip(generators, states, strict=True):
                generator.set_state(state)
