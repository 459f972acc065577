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
:func:`fold_batchnorm` finds the pairs with ``torch.fx`` and checks both, and falls back to
consecutive pairs inside ``nn.Sequential`` containers when the model cannot be traced.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from collections import Counter

import torch
from torch import Tensor, fx

from normdrop.errors import InputError
from normdrop.nn.batch_renorm import BatchRenorm1d, BatchRenorm2d
from normdrop.nn.frozen_batchnorm import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from normdrop.nn.ghost_batchnorm import GhostBatchNorm1d, GhostBatchNorm2d
from normdrop.nn.sync_batchnorm import _PLAIN_BATCHNORMS, SyncBatchNorm

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


def _has_hooks(module: torch.nn.Module) -> bool:
    """Hooks may rewrite weights or outputs (old-style weight_norm does): leave such layers."""
    return bool(module._forward_pre_hooks or module._forward_hooks)


def _out_channels(layer: torch.nn.Module) -> int:
    return layer.out_features if isinstance(layer, torch.nn.Linear) else layer.out_channels


def _can_fold(layer: torch.nn.Module, bn: torch.nn.Module) -> bool:
    return (
        type(layer) in _LAYERS
        and type(bn) in _BATCHNORMS
        and bn.running_mean is not None
        and not _has_hooks(layer)
        and not _has_hooks(bn)
        and _out_channels(layer) == bn.num_features
    )


class _Tracer(fx.Tracer):
    """Keeps BatchNorms and normdrop's layers whole: their forwards check shapes in Python."""

    def is_leaf_module(self, module: torch.nn.Module, qualname: str) -> bool:
        return (
            isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            or type(module) in _BATCHNORMS
            or type(module).__module__.startswith("normdrop.nn.")
            or super().is_leaf_module(module, qualname)
        )


def _pairs_from_graph(model: torch.nn.Module) -> list[tuple[str, str]]:
    """``(layer, bn)`` paths where bn's only input is layer's output and nothing else uses
    either module or that output. Raises whatever tracing raises."""
    graph = _Tracer().trace(model)
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    # A module whose tensors forward reads directly (F.conv2d(x, self.conv.weight)) would see
    # the folded ones there too.
    read = {node.target for node in graph.nodes if node.op == "get_attr"}
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module":
            continue
        layer, bn = modules[source.target], modules[node.target]
        alone = len(source.users) == 1 and calls[source.target] == 1 and calls[node.target] == 1
        untouched = not any(_within(target, (source.target, node.target)) for target in read)
        if alone and untouched and _can_fold(layer, bn):
            pairs.append((source.target, node.target))
    return pairs


def _within(target: str, paths: tuple[str, ...]) -> bool:
    """Is the attribute ``target`` one of the modules ``paths`` or inside one?"""
    return any(target == path or target.startswith(path + ".") for path in paths)


def _pairs_in_sequentials(model: torch.nn.Module) -> list[tuple[str, str]]:
    """Consecutive ``(layer, bn)`` inside plain ``nn.Sequential`` containers, each module
    registered once in the model."""
    registered = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    pairs = []
    for path, container in model.named_modules():
        if type(container) is not torch.nn.Sequential:
            continue
        names = list(container._modules)
        for first, second in itertools.pairwise(names):
            layer, bn = container._modules[first], container._modules[second]
            once = registered[id(layer)] == 1 and registered[id(bn)] == 1
            if once and _can_fold(layer, bn):
                prefix = f"{path}." if path else ""
                pairs.append((prefix + first, prefix + second))
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
    wrong: this layer refuses any other rank instead.
    """

    def __init__(self, rank: int, layer: str) -> None:
        super().__init__()
        self.rank, self.layer = rank, layer

    def extra_repr(self) -> str:
        return f"rank={self.rank}, folded_into={self.layer!r}"

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() != self.rank:
            raise InputError(
                f"fold_batchnorm: the BatchNorm folded into {self.layer!r} expected that layer's "
                f"output to be {self.rank}-D with channels in dim 1, got shape "
                f"{tuple(input.shape)}; the fold does not hold for this input: run the "
                "original model"
            )
        return input


def _refuse_training(module: torch.nn.Module, args: tuple) -> None:
    if module.training:
        raise InputError(
            "this model was made by fold_batchnorm and is eval-only: its BatchNorms are gone, "
            "so training mode would not normalize; call .eval(), or train the original model"
        )


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-only deep copy of ``model`` with every foldable BatchNorm folded.

    A BatchNorm is folded into the ``Linear``, ``Conv1d/2d/3d`` or ``ConvTranspose1d/2d/3d``
    that feeds it when that layer's output is used by the BatchNorm alone and neither module
    is applied anywhere else; the BatchNorm becomes a :class:`FoldedBatchNorm` (an
    ``nn.Identity``). Only exact types fold (a Conv subclass may standardize its weights) and
    modules with hooks are left alone. In eval mode the result computes the same function up
    to rounding; it refuses to run in training mode, and on a layer output that is not batched
    ``(N, C, *)`` (a Linear on ``(N, L, F)``), where the fold would not hold. The original
    model is not modified. Models that ``torch.fx`` cannot trace fold only inside ``nn.Sequential``
    containers, with a warning.
    """
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"fold_batchnorm: model must be a torch.nn.Module, got {type(model)}")
    folded = copy.deepcopy(model).eval()
    try:
        pairs = _pairs_from_graph(folded)
    except Exception as error:  # any tracing failure: fall back to what is safe without a graph
        warnings.warn(
            f"fold_batchnorm: torch.fx could not trace {type(model).__name__} "
            f"({type(error).__name__}: {error}); folded only consecutive (layer, BatchNorm) "
            "pairs inside nn.Sequential containers. Without a graph it cannot check that "
            "forward applies such a layer nowhere else and uses its output nowhere else: if "
            "it does, the result is wrong there. Compare the folded model's outputs with the "
            "original's",
            UserWarning,
            stacklevel=2,
        )
        pairs = _pairs_in_sequentials(folded)
    for layer_path, bn_path in pairs:
        layer = folded.get_submodule(layer_path)
        _fold(layer, folded.get_submodule(bn_path))
        parent, _, name = bn_path.rpartition(".")
        replacement = FoldedBatchNorm(_batched_rank(layer), layer_path)
        folded.get_submodule(parent).add_module(name, replacement)
    folded.register_forward_pre_hook(_refuse_training)
    return folded
