"""Replace layers inside a model: the one walk behind freezing, sync conversion and ``convert``.

A model is a graph of modules, not a tree: a layer can sit under two names of one parent
(``self.bn_b = self.bn_a``) or under two parents (a block reused twice). ``named_children``
lists such a layer once per parent, so a walk built on it replaces it under one name and leaves
the other, silently, and one that visits each parent replaces a shared layer by two separate
copies. :func:`swap_layers` replaces a layer under every name it has, by one new layer.

Every replacement is built before the model is touched, so a replacement that raises leaves the
model exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["swap_layers"]


def swap_layers(
    module: torch.nn.Module,
    replacement: Callable[[torch.nn.Module, str], torch.nn.Module | None],
) -> torch.nn.Module:
    """Swap, in place, each layer of ``module`` for ``replacement(layer, path)``.

    ``replacement`` sees every module once (the root first, path ``""``; then each child, with
    its dotted path where it was first met) and returns a module to put in its place (itself to
    keep it as it is), or None to look inside it. Returns ``module``, or its replacement when
    ``module`` itself is replaced.
    """
    planned: dict[int, torch.nn.Module] = {}  # id -> what takes its place (itself: kept)
    opened: set[int] = set()  # modules whose children were planned

    def plan(layer: torch.nn.Module, path: str) -> None:
        if id(layer) in planned:
            return
        new = replacement(layer, path)
        planned[id(layer)] = layer if new is None else new
        if new is None:
            opened.add(id(layer))
            # _modules, not named_children(): that lists a child held under two names once
            for name, child in layer._modules.items():
                if child is not None:
                    plan(child, f"{path}.{name}" if path else name)

    def apply(layer: torch.nn.Module) -> None:
        opened.discard(id(layer))  # each parent once, however many names it has
        for name, child in list(layer._modules.items()):
            if child is None:
                continue
            new = planned[id(child)]
            if new is not child:
                layer.add_module(name, new)
            elif id(child) in opened:
                apply(child)

    plan(module, "")
    root = planned[id(module)]
    if root is module and id(module) in opened:
        apply(module)
    return root
