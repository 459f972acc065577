r"""Fold inference-mode BatchNorm into the Linear or Conv layer before it.

In eval mode a BatchNorm is a per-channel affine map, so it composes with the affine layer
that feeds it. For output channel ``o``::

    s_o  = gamma_o / sqrt(running_var_o + eps)
    W'_o = W_o * s_o                         (every weight producing channel o)
    b'_o = (b_o - running_mean_o) * s_o + beta_o

(``gamma = 1``, ``beta = 0``, ``b = 0`` when absent.) For Linear and Conv the output channel is
weight dim 0; for ConvTranspose the weight is ``(C_in, C_out / groups, *k)`` and channel
``o = g * C_out / groups + j`` sits at ``[group g's inputs, j]``. The arithmetic runs in float64
and is cast back once.

Folding ``conv -> bn`` is exact only if the conv's output goes nowhere but the BatchNorm and
the conv is applied nowhere else: otherwise the other use would see the folded weights
(pytorch/pytorch#104593: ``torch.fx.experimental.optimization.fuse`` checks only the first).
:func:`fold_batchnorm` finds the pairs with ``torch.fx`` and checks both, and falls back to the
submodules it can trace and to consecutive pairs inside ``nn.Sequential`` containers when the
model cannot be traced. A BatchNorm fed by a Linear/Conv that it leaves is named in a warning.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import warnings
from collections import Counter
from typing import Any

import torch
from torch import Tensor, fx

from normdrop.errors import InputError
from normdrop.nn.batch_renorm import BatchRenorm1d, BatchRenorm2d
from normdrop.nn.frozen_batchnorm import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from normdrop.nn.ghost_batchnorm import GhostBatchNorm1d, GhostBatchNorm2d
from normdrop.nn.sync_batchnorm import _PLAIN_BATCHNORMS, SyncBatchNorm
from normdrop.nn.tracing import record_call
from normdrop.tools._model import check_model, deep_copy

__all__ = ["FoldedBatchNorm", "fold_batchnorm"]

# Exact types: a subclass may change the forward (weight standardization, a fused
# activation), and then folding would be wrong.
_LAYERS = (
    torch.nn.Linear,
    torch.nn.Conv1d,
    torch.nn.Conv2d,
    torch.nn.Conv3d,
    torch.nn.ConvTranspose1d,
    torch.nn.ConvTranspose2d,
    torch.nn.ConvTranspose3d,
)
# Every one of these is exactly BatchNorm with its running statistics in eval mode.
_BATCHNORMS = (
    *_PLAIN_BATCHNORMS,
    SyncBatchNorm,
    GhostBatchNorm1d,
    GhostBatchNorm2d,
    BatchRenorm1d,
    BatchRenorm2d,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
)
# Other libraries' frozen BatchNorms, known by their qualified names only (neither library is a
# dependency): buffers weight, bias, running_mean, running_var and an eps, and a forward that is
# exactly eval-mode BatchNorm. torchvision's has no num_features.
_FOREIGN_FROZEN = frozenset(
    {
        "torchvision.ops.misc.FrozenBatchNorm2d",
        "detectron2.layers.batch_norm.FrozenBatchNorm2d",
    }
)


# Wrappers that only run ``.module`` (on several devices or processes).
_WRAPPERS = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)


def _is_plain_batchnorm(module: torch.nn.Module) -> bool:
    """Exactly BatchNorm with running statistics in eval mode (see _BATCHNORMS)."""
    kind = type(module)
    return kind in _BATCHNORMS or f"{kind.__module__}.{kind.__qualname__}" in _FOREIGN_FROZEN


def _has_hooks(module: torch.nn.Module) -> bool:
    """Hooks may rewrite weights or outputs (old-style weight_norm does): leave such layers."""
    return bool(module._forward_pre_hooks or module._forward_hooks)


def _out_channels(layer: torch.nn.Module) -> int:
    return layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels


def _refusal(layer: torch.nn.Module, bn: torch.nn.Module) -> str | None:
    """Why ``bn`` cannot be folded into ``layer`` as modules, or None if it can."""
    if type(layer) not in _LAYERS:
        return f"{type(layer).__name__} is a subclass, whose forward may differ"
    if not _is_plain_batchnorm(bn):
        return f"{type(bn).__name__} is not a plain BatchNorm"
    if bn.running_mean is None:
        return "it has no running statistics"
    if _has_hooks(layer) or _has_hooks(bn):
        return "one of the two has a forward hook"
    if _out_channels(layer) != bn.running_mean.numel():
        return "it normalizes another dim than the layer's features"
    return None


def _can_fold(layer: torch.nn.Module, bn: torch.nn.Module) -> bool:
    return _refusal(layer, bn) is None


def _is_batchnorm(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm) or _is_plain_batchnorm(module)


class _Tracer(fx.Tracer):
    """Keeps BatchNorms, normdrop's layers and Linear/Conv subclasses whole: their forwards
    check shapes in Python, or may not trace."""

    def is_leaf_module(self, module: torch.nn.Module, qualname: str) -> bool:
        return (
            _is_batchnorm(module)
            or type(module).__module__.startswith("normdrop.nn.")
            # subclasses too (never folded, but reported): their forward may not trace
            or isinstance(module, torch.nn.Linear | torch.nn.modules.conv._ConvNd)
            or super().is_leaf_module(module, qualname)
        )


def _optional_arguments(model: torch.nn.Module) -> dict[str, Any]:
    """forward's parameters that have a default, with it."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in parameters if p.default is not p.empty and p.kind in kinds}


def _pairs_from_graph(
    model: torch.nn.Module, refused: dict[str, str], prefix: str = ""
) -> list[tuple[str, str]]:
    """``(layer, bn)`` paths where bn's only input is layer's output and nothing else uses
    either module or that output; a BatchNorm fed by a Linear/Conv that cannot be folded goes
    into ``refused`` with the reason. Paths start with ``prefix``. Raises whatever tracing
    raises.

    torch.fx evaluates ``if skip is None`` on a symbolic argument as False, so the graph of
    a forward with optional arguments shows the path they take when given, which may differ
    from the one a call without them takes. Such a forward is traced a second time with them
    at their defaults, and a pair folds only if both graphs allow it.
    """
    optional = _optional_arguments(model)
    pairs = [_pairs_traced(model, None, refused, prefix)]
    if optional:
        pairs.append(_pairs_traced(model, optional, refused, prefix))
    return [pair for pair in pairs[0] if all(pair in other for other in pairs[1:])]


def _pairs_traced(
    model: torch.nn.Module, concrete_args: dict | None, refused: dict[str, str], prefix: str
) -> list[tuple[str, str]]:
    """The pairs of one trace. It runs on a copy (sharing the tensors): a forward that stores
    what it computes (``self.features = y``, a list it appends to) stores Proxies while
    traced, which must not stay in the model, and which show which values escape the graph."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    scratch = copy.deepcopy(model, {id(t): t for t in tensors})
    graph = _Tracer().trace(scratch, concrete_args=concrete_args)
    return _pairs_in_graph(scratch, graph, _escaped(scratch), refused, prefix)


def _escaped(model: torch.nn.Module) -> set[fx.Node]:
    """The graph nodes whose values the traced forward kept in module attributes (directly or
    inside lists, tuples, sets and dicts): uses the graph does not show."""
    found: set[fx.Node] = set()

    def collect(value: Any, depth: int) -> None:
        if isinstance(value, fx.Proxy):
            found.add(value.node)
        elif depth and isinstance(value, list | tuple | set | frozenset):
            for item in value:
                collect(item, depth - 1)
        elif depth and isinstance(value, dict):
            for item in value.values():
                collect(item, depth - 1)

    for module in model.modules():
        for name, value in vars(module).items():
            if name not in ("_parameters", "_buffers", "_modules"):
                collect(value, 3)
    return found


def _pairs_in_graph(
    model: torch.nn.Module,
    graph: fx.Graph,
    escaped: set[fx.Node],
    refused: dict[str, str],
    prefix: str,
) -> list[tuple[str, str]]:
    modules = dict(model.named_modules())
    # A leaf calls its submodules unseen (DropConnect its layer): count them as called too.
    calls = Counter(
        path
        for node in graph.nodes
        if node.op == "call_module"
        for path, _ in modules[node.target].named_modules(prefix=node.target)
    )
    # A module whose tensors forward reads directly (F.conv2d(x, self.conv.weight)) would see
    # the folded ones there too.
    read = {node.target for node in graph.nodes if node.op == "get_attr"}
    pairs = []
    for node in graph.nodes:
        arguments = [*node.args, *node.kwargs.values()]  # bn(x) or bn(input=x)
        if node.op != "call_module" or not _is_batchnorm(modules[node.target]) or not arguments:
            continue
        source = arguments[0]
        if not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        layer, bn = modules[source.target], modules[node.target]
        if not isinstance(layer, torch.nn.Linear | torch.nn.modules.conv._ConvNd):
            continue
        reason = _refusal(layer, bn)
        if reason is None and len(arguments) != 1:
            reason = "it is called with more arguments"
        elif reason is None and calls[node.target] != 1:
            reason = "it is applied more than once"
        elif reason is None and calls[source.target] != 1:
            reason = f"{source.target!r} is applied more than once"
        elif reason is None and len(source.users) != 1:
            reason = f"the output of {source.target!r} is used elsewhere too"
        elif reason is None and source in escaped:
            reason = f"forward keeps the output of {source.target!r} in an attribute"
        elif reason is None and any(_within(t, (source.target, node.target)) for t in read):
            reason = "forward reads the tensors of one of the two directly"
        if reason is None:
            pairs.append((prefix + source.target, prefix + node.target))
        else:
            refused.setdefault(prefix + node.target, reason)
    return pairs


def _within(target: str, paths: tuple[str, ...]) -> bool:
    """Is the attribute ``target`` one of the modules ``paths`` or inside one?"""
    return any(target == path or target.startswith(path + ".") for path in paths)


def _pairs_in_parts(model: torch.nn.Module, refused: dict[str, str]) -> list[tuple[str, str]]:
    """For a model that torch.fx cannot trace: the pairs of each largest submodule it can
    trace (checked in that submodule's graph), and consecutive ``(layer, bn)`` inside plain
    ``nn.Sequential`` containers it cannot; each module registered once in the model."""
    registered = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    pairs: list[tuple[str, str]] = []

    def visit(path: str, module: torch.nn.Module) -> None:
        if not any(_is_batchnorm(m) for m in module.modules()):
            return
        prefix = f"{path}." if path else ""
        if path:  # the whole model has failed already
            found: dict[str, str] = {}
            try:
                part = _pairs_from_graph(module, found, prefix)
            except Exception:  # any tracing failure: look inside
                pass
            else:
                for pair in part:
                    if all(registered[id(model.get_submodule(p))] == 1 for p in pair):
                        pairs.append(pair)
                    else:
                        found.setdefault(pair[1], "the pair is registered in the model twice")
                refused.update(found)
                return
        if type(module) is torch.nn.Sequential:
            names = list(module._modules)
            for first, second in itertools.pairwise(names):
                layer, bn = module._modules[first], module._modules[second]
                once = registered[id(layer)] == 1 and registered[id(bn)] == 1
                if once and _can_fold(layer, bn):
                    pairs.append((prefix + first, prefix + second))
        for name, child in module._modules.items():
            if child is not None:
                visit(prefix + name, child)

    visit("", model)
    return pairs


@torch.no_grad()
def _fold(layer: torch.nn.Module, bn: torch.nn.Module) -> None:
    """Rewrite ``layer``'s weight and bias so that it computes ``bn(layer(x))`` in eval mode."""
    f64 = torch.float64
    scale = torch.rsqrt(bn.running_var.to(f64) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(f64)
    shift = -bn.running_mean.to(f64) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(f64)
    weight = layer.weight.to(f64)
    if isinstance(layer, torch.nn.modules.conv._ConvTransposeNd):
        groups, c_in = layer.groups, weight.shape[0]
        kernel = weight.shape[2:]
        grouped = weight.reshape(groups, c_in // groups, -1, *kernel)
        per_group = scale.reshape(groups, 1, -1, *([1] * len(kernel)))
        weight = (grouped * per_group).reshape(weight.shape)
    else:
        weight = weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    bias = shift if layer.bias is None else layer.bias.to(f64) * scale + shift
    dtype, trainable = layer.weight.dtype, layer.weight.requires_grad
    layer.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=trainable)
    layer.bias = torch.nn.Parameter(bias.to(dtype), requires_grad=trainable)


def _batched_rank(layer: torch.nn.Module) -> int:
    """The rank of ``layer``'s batched output: 2 for Linear's ``(N, C)``, 2 + k for a k-D conv."""
    if isinstance(layer, torch.nn.Linear):
        return 2
    return 2 + len(layer.kernel_size)


class FoldedBatchNorm(torch.nn.Identity):
    """What a folded BatchNorm becomes: the identity, for the layout the fold assumed.

    The fold scales ``layer``'s output channel, weight dim 0, which is dim 1 of the output
    only for a batched output: ``(N, C)`` from a Linear, ``(N, C, *)`` from a conv. A Linear
    applied to ``(N, L, F)`` gives ``(N, L, C)``, where the BatchNorm normalized dim 1 (``L``)
    and the fold scaled the last dim; an unbatched ``Conv1d`` output ``(C, L)`` is misread the
    same way. Both run without error when ``L == C``, so the folded model would be silently
    wrong: this layer refuses any other rank instead. It refuses training mode too, where the
    BatchNorm it replaces would have normalized with the batch's statistics. The forward is
    TorchScript-compatible, so a folded model scripts as the original does.
    """

    def __init__(self, rank: int, layer: str) -> None:
        super().__init__()
        self.rank, self.layer = rank, layer

    def extra_repr(self) -> str:
        return f"rank={self.rank}, folded_into={self.layer!r}"

    def forward(self, input: Tensor) -> Tensor:
        # Nested: TorchScript skips a branch under `not is_scripting()`, not half a condition
        # (it knows no fx.Proxy).
        if not torch.jit.is_scripting():  # noqa: SIM102
            if isinstance(input, fx.Proxy):
                return record_call(self, input)
        if self.training:
            raise InputError(
                "this model was made by fold_batchnorm and is eval-only: its BatchNorms are "
                "gone, so training mode would not normalize; call .eval(), or train the "
                "original model"
            )
        # len(shape), not dim(): TorchScript's shape analysis assumes a batched conv output
        # and would fold input.dim() != rank to False.
        if len(input.shape) != self.rank:
            shape = ", ".join([str(size) for size in input.shape])
            raise InputError(
                f"fold_batchnorm: the BatchNorm folded into '{self.layer}' expected that "
                f"layer's output to be {self.rank}-D with channels in dim 1, got shape "
                f"({shape}); the fold does not hold for this input: run the original model"
            )
        return input


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-only deep copy of ``model`` with every foldable BatchNorm folded.

    A BatchNorm is folded into the ``Linear``, ``Conv1d/2d/3d`` or ``ConvTranspose1d/2d/3d``
    that feeds it when that layer's output is used by the BatchNorm alone and neither module
    is applied anywhere else; the BatchNorm becomes a :class:`FoldedBatchNorm` (an
    ``nn.Identity``), under every name it is registered by. Only exact types fold (a Conv
    subclass may standardize its weights) and modules with hooks are left alone; a BatchNorm
    fed by a Linear/Conv that stays is named in a warning, with the reason. In eval mode the
    result computes the same function up to rounding; it refuses to run in training mode, and
    on a layer output that is not batched ``(N, C, *)`` (a Linear on ``(N, L, F)``), where the
    fold would not hold. The original model is not modified. When ``torch.fx`` cannot trace
    the model, the pairs inside its submodules that it can trace fold, and consecutive pairs
    inside ``nn.Sequential`` containers, with a warning.
    """
    check_model("fold_batchnorm", model)
    folded = deep_copy(
        model,
        "fold_batchnorm",
        "; copy.deepcopy(model) must work: run the model "
        "once under torch.no_grad() or clear its cached tensors",
    ).eval()
    modules = list(folded.modules())
    if not any(_is_batchnorm(m) for m in modules) or not any(
        isinstance(m, torch.nn.Linear | torch.nn.modules.conv._ConvNd) for m in modules
    ):
        return folded  # nothing to fold, nothing to trace
    refused: dict[str, str] = {}
    # DataParallel's forward (*inputs, **kwargs) does not trace; the model it wraps may
    root, prefix = (folded.module, "module.") if isinstance(folded, _WRAPPERS) else (folded, "")
    try:
        pairs = _pairs_from_graph(root, refused, prefix)
    except Exception as error:  # any tracing failure: fall back to what is safe without a graph
        warnings.warn(
            f"fold_batchnorm: torch.fx could not trace {type(model).__name__} "
            f"({type(error).__name__}: {error}); folded only the pairs inside the submodules "
            "it could trace and consecutive (layer, BatchNorm) pairs inside nn.Sequential "
            "containers. Without a graph of the whole forward it cannot check that it "
            "applies such a layer nowhere else and uses its output nowhere else: if it does, "
            "the result is wrong there. Compare the folded model's outputs with the original's",
            UserWarning,
            stacklevel=2,
        )
        pairs = _pairs_in_parts(folded, refused)
    replacements = {}
    for layer_path, bn_path in pairs:
        layer, bn = folded.get_submodule(layer_path), folded.get_submodule(bn_path)
        _fold(layer, bn)
        replacements[id(bn)] = FoldedBatchNorm(_batched_rank(layer), layer_path).eval()
    # Every name the BatchNorm is registered by: forward may call it by any of them.
    for module in list(folded.modules()):
        for name, child in module._modules.items():
            if child is not None and id(child) in replacements:
                module._modules[name] = replacements[id(child)]
    if refused:
        warnings.warn(
            f"fold_batchnorm: left {len(refused)} BatchNorm(s) after a Linear/Conv unfolded: "
            + "; ".join(f"{path!r} ({reason})" for path, reason in refused.items()),
            UserWarning,
            stacklevel=2,
        )
    return folded
