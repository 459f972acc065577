r"""Frozen Batch Normalization: BatchNorm's inference transform with nothing left to learn.

Fine-tuning a detector or segmenter with a few images per GPU makes batch statistics useless,
so the pretrained BatchNorms are frozen: statistics AND affine become constants (buffers)::

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias

in training and evaluation alike; the input still gets its gradient
``dL/dx = dy * weight / sqrt(running_var + eps)``. The forward is
:func:`normdrop.functional.batch_norm` in inference mode.

Design note: these classes are plain ``torch.nn.Module``\ s, NOT subclasses of
``torch.nn.modules.batchnorm._BatchNorm``, on purpose (torchvision and detectron2 do the same):
code that finds BatchNorms by ``isinstance`` would otherwise silently unfreeze them
(``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` turns every ``_BatchNorm`` into a trainable
layer, ``torch.optim.swa_utils.update_bn`` resets and recomputes their statistics). The
``state_dict`` keys are BatchNorm's (``weight``, ``bias``, ``running_mean``, ``running_var``,
``num_batches_tracked``), so checkpoints load either way; a checkpoint without
``num_batches_tracked`` (torchvision's FrozenBatchNorm2d) loads too.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import Tensor, fx

from normdrop import functional as F
from normdrop.errors import InputError, InputTypeError
from normdrop.nn.batchnorm import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    _check_batch_norm_config,
    check_input,
)
from normdrop.nn.swap import swap_layers
from normdrop.nn.tracing import record_call

__all__ = [
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "freeze_batchnorm",
    "unfreeze_batchnorm",
]


class _FrozenBatchNorm(torch.nn.Module):
    """BatchNorm with fixed statistics and affine, all buffers; see the module docstring.

    Args:
        num_features: C.
        eps: added to ``running_var``; non-negative.
        device, dtype: of the buffers, initialized as a fresh BatchNorm's (weight 1, bias 0,
            mean 0, variance 1).

    Made by :func:`freeze_batchnorm` or :meth:`from_batchnorm`, it keeps how to rebuild the
    layer it came from (its class and settings, not its hooks; a plain attribute, not in
    ``state_dict`` or ``modules()``), so that :meth:`to_batchnorm` gives that layer back. From an
    ``affine=False`` layer, ``weight`` and ``bias`` (ones and zeros) stay out of ``state_dict``,
    whose keys are then that layer's.
    """

    _input_ranks: tuple[int, ...] = ()
    _input_shapes: str = ""
    _unfrozen_class: type[torch.nn.Module]
    # what the scripted forward reads of the class (TorchScript sees only declared ones)
    __constants__ = ("_input_ranks", "_input_shapes")

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        _check_batch_norm_config(num_features, eps, None)
        if eps < 0:  # eval-only, so eps = 0 is allowed as in torch.nn's eval mode
            raise InputError(f"{type(self).__name__}: eps must be non-negative, got {eps}")
        super().__init__()
        self.num_features, self.eps = int(num_features), float(eps)
        self._name = type(self).__name__  # for the scripted forward's messages
        self.momentum: float | None = 0.1
        self.affine = True
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer(
            "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        # pickled before the scripted forward, which reads the name, existed
        self.__dict__.setdefault("_name", type(self).__name__)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        # torchvision's FrozenBatchNorm2d saves no num_batches_tracked; keep ours (0).
        key = prefix + "num_batches_tracked"
        if key not in state_dict:
            state_dict[key] = self.num_batches_tracked.clone()
        # Checkpoints of affine=False frozen layers made before their weight and bias left
        # state_dict hold the ones and zeros; anything else stays an unexpected key.
        for name, fill in (("weight", 1.0), ("bias", 0.0)):
            saved = state_dict.get(prefix + name)
            old_filler = isinstance(saved, Tensor) and bool((saved == fill).all())
            if name in self._non_persistent_buffers_set and old_filler:
                del state_dict[prefix + name]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():
            return self._scripted_forward(input)
        return self._forward(input)

    @torch.jit.unused
    def _forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return record_call(self, input)
        check_input(
            type(self).__name__, input, self.num_features, self._input_ranks, self._input_shapes
        )
        return F.batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )

    def _scripted_forward(self, input: Tensor) -> Tensor:
        """The forward under ``torch.jit.script`` (frozen layers are scripted in detection
        models, as torchvision's are): the same rank, channel, dtype and device checks and,
        written out, the inference formula of :func:`normdrop.functional.batch_norm`
        (``(x - mean) * invstd * weight + bias``, in float32 for half inputs), whose Python
        dispatch TorchScript cannot compile."""
        rank = len(input.shape)
        if rank not in self._input_ranks:
            raise InputError(
                self._name + " expects input of shape " + self._input_shapes + ", got "
                + str(rank) + "-D input of shape " + str(input.shape)
            )  # fmt: skip
        if input.shape[1] != self.num_features:
            raise InputError(
                self._name + "(num_features=" + str(self.num_features) + ") got input with "
                + str(input.shape[1]) + " channels (dim 1) in shape " + str(input.shape)
            )  # fmt: skip
        half = input.dtype == torch.float16 or input.dtype == torch.bfloat16
        stored = self.running_mean.dtype
        if input.numel() > 0 and not input.is_floating_point():
            raise InputTypeError(
                "batch_norm: input must be a floating-point tensor (float16, bfloat16, float32 "
                "or float64), got dtype " + str(input.dtype)
            )
        if input.numel() > 0 and stored != input.dtype and not (half and stored == torch.float32):
            raise InputTypeError(
                "batch_norm: running_mean has dtype " + str(stored) + " but input has dtype "
                + str(input.dtype) + "; convert the layer or the input"
            )  # fmt: skip
        if self.running_mean.device != input.device:
            raise InputError(
                "batch_norm: running_mean is on " + str(self.running_mean.device) + " but input "
                "is on " + str(input.device) + "; move them to the same device"
            )  # fmt: skip
        compute = torch.float32 if half else input.dtype
        shape = [1, self.num_features] + [1] * (rank - 2)
        invstd = torch.rsqrt(self.running_var.to(compute) + self.eps)
        scale = (invstd * self.weight.to(compute)).view(shape)
        centered = input.to(compute) - self.running_mean.to(compute).view(shape)
        return (centered * scale + self.bias.to(compute).view(shape)).to(input.dtype)

    @classmethod
    def from_batchnorm(cls, bn: torch.nn.modules.batchnorm._BatchNorm) -> _FrozenBatchNorm:
        """A frozen copy of ``bn``'s current statistics and affine (tensors are copied)."""
        if bn.running_mean is None:
            raise InputError(
                f"cannot freeze {type(bn).__name__}(track_running_stats=False): it has no "
                "running statistics to freeze"
            )
        frozen = cls(bn.num_features, bn.eps, device=bn.running_mean.device)
        with torch.no_grad():
            frozen.running_mean = bn.running_mean.detach().clone()
            frozen.running_var = bn.running_var.detach().clone()
            frozen.num_batches_tracked = bn.num_batches_tracked.detach().clone()
            affine = (
                bn.running_mean.new_ones(bn.num_features),
                bn.running_mean.new_zeros(bn.num_features),
            )
            weight = affine[0] if bn.weight is None else bn.weight.detach().clone()
            bias = affine[1] if bn.bias is None else bn.bias.detach().clone()
            frozen.weight, frozen.bias = weight, bias
        frozen.momentum, frozen.affine = bn.momentum, bn.affine
        frozen.had_bias = bn.bias is not None
        # the keys of the layer it came from: no weight and bias without affine, no bias with
        # bias=False (torch 2.13's BatchNorm option)
        if bn.weight is None:
            frozen._non_persistent_buffers_set.add("weight")
        if bn.bias is None:
            frozen._non_persistent_buffers_set.add("bias")
        frozen.__dict__["_unfrozen_recipe"] = _recipe_of(bn)
        return frozen

    def to_batchnorm(self) -> torch.nn.modules.batchnorm._BatchNorm:
        """A trainable BatchNorm with these statistics, affine, eps and momentum (tensors
        copied, in this layer's device and dtype): the class and settings of the layer this one
        was frozen from, or, for a frozen layer built directly (or from a layer that cannot be
        rebuilt), a normdrop BatchNorm of its rank."""
        recipe = self.__dict__.get("_unfrozen_recipe") or _recipe_of(self._batchnorm_of_rank())
        bn = _rebuild(recipe, self)
        bn.eps, bn.momentum = self.eps, self.momentum  # as set on the frozen layer
        return bn

    def _batchnorm_of_rank(self) -> torch.nn.modules.batchnorm._BatchNorm:
        had_bias = getattr(self, "had_bias", True)
        extra = {} if not self.affine or had_bias else {"bias": False}
        return self._unfrozen_class(self.num_features, affine=self.affine, **extra)


_FROZEN_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _recipe_of(bn: torch.nn.Module) -> tuple | None:
    """How to rebuild ``bn`` when thawing: its class, its settings (the attributes that
    ``torch.nn.Module.__init__`` does not make, copied), and which of its tensors are
    parameters (with ``requires_grad``) and buffers; the values of the frozen ones come from
    the frozen layer then, others are copied now. Hooks are not kept (they may hold anything;
    the frozen layer never ran them). None when ``bn`` cannot be rebuilt this way
    (parametrized weights, submodules, settings that do not copy such as a process group): the
    frozen layer then thaws to a normdrop BatchNorm of its rank."""
    if bn._modules or torch.nn.utils.parametrize.is_parametrized(bn):
        return None
    internal = vars(torch.nn.Module()).keys()
    try:
        settings = copy.deepcopy({k: v for k, v in vars(bn).items() if k not in internal})
    except Exception:  # whatever deepcopy refuses (a process group...) means no recipe
        return None

    def kept(name: str, tensor: Tensor | None) -> Tensor | None:
        return None if tensor is None or name in _FROZEN_TENSORS else tensor.detach().clone()

    parameters = {
        name: None if p is None else (p.requires_grad, kept(name, p))
        for name, p in bn._parameters.items()
    }
    buffers = {name: (b is None, kept(name, b)) for name, b in bn._buffers.items()}
    return type(bn), settings, parameters, buffers, set(bn._non_persistent_buffers_set)


def _rebuild(recipe: tuple, frozen: _FrozenBatchNorm) -> torch.nn.Module:
    """The layer of :func:`_recipe_of`, with the frozen layer's statistics and affine, in its
    device and floating dtype."""
    kind, settings, parameters, buffers, non_persistent = recipe
    device, dtype = frozen.running_mean.device, frozen.running_mean.dtype

    def value(name: str, kept: Tensor | None) -> Tensor:
        tensor = getattr(frozen, name) if kept is None else kept
        tensor = tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)
        return tensor.detach().clone()

    bn = kind.__new__(kind)
    torch.nn.Module.__init__(bn)
    bn.__dict__.update(copy.deepcopy(settings))
    for name, entry in parameters.items():
        if entry is None:
            bn.register_parameter(name, None)
        else:
            requires_grad, kept = entry
            bn.register_parameter(name, torch.nn.Parameter(value(name, kept), requires_grad))
    for name, (absent, kept) in buffers.items():
        tensor = None if absent else value(name, kept)
        bn.register_buffer(name, tensor, persistent=name not in non_persistent)
    return bn


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen BatchNorm over ``(N, C)`` or ``(N, C, L)`` input."""

    _input_ranks = (2, 3)
    _input_shapes = "(N, C) or (N, C, L)"
    _unfrozen_class = BatchNorm1d


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen BatchNorm over ``(N, C, H, W)`` input."""

    _input_ranks = (4,)
    _input_shapes = "(N, C, H, W)"
    _unfrozen_class = BatchNorm2d


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen BatchNorm over ``(N, C, D, H, W)`` input."""

    _input_ranks = (5,)
    _input_shapes = "(N, C, D, H, W)"
    _unfrozen_class = BatchNorm3d


def _frozen_class_for(module: torch.nn.Module) -> type[_FrozenBatchNorm] | None:
    """Which frozen class replaces ``module``, by the input rank it takes; None if unknown."""
    from normdrop.nn.sync_batchnorm import SyncBatchNorm  # sync imports batchnorm, not us

    kind = getattr(module, "_unsynced_class", None) if isinstance(module, SyncBatchNorm) else None
    kind = kind or type(module)
    ranks = {
        torch.nn.BatchNorm1d: FrozenBatchNorm1d,
        torch.nn.BatchNorm2d: FrozenBatchNorm2d,
        torch.nn.BatchNorm3d: FrozenBatchNorm3d,
    }
    for base, frozen in ranks.items():
        if issubclass(kind, base):
            return frozen
    # normdrop's variants (ghost, renorm) say their ranks instead of subclassing torch's.
    by_rank = {(2, 3): FrozenBatchNorm1d, (4,): FrozenBatchNorm2d, (5,): FrozenBatchNorm3d}
    return by_rank.get(getattr(kind, "_input_ranks", None))


def _is_freezable(module: torch.nn.Module) -> bool:
    """BatchNorms whose eval forward is exactly BatchNorm: torch's, normdrop's and variants, and
    their subclasses that keep that forward (another default, a custom init)."""
    from normdrop.nn.batch_renorm import _BatchRenorm
    from normdrop.nn.batchnorm import _BatchNorm
    from normdrop.nn.ghost_batchnorm import _GhostBatchNorm
    from normdrop.nn.sync_batchnorm import SyncBatchNorm

    plain = (
        torch.nn.modules.batchnorm._BatchNorm,
        torch.nn.SyncBatchNorm,
        _BatchNorm,
        SyncBatchNorm,
        _GhostBatchNorm,
        _BatchRenorm,
    )
    return any(type(module).forward is cls.forward for cls in plain)


def freeze_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every BatchNorm in ``module`` by a :class:`FrozenBatchNorm1d` / ``2d`` / ``3d``.

    Works in place and returns ``module`` (or the frozen layer when ``module`` is itself a
    BatchNorm). Each frozen layer holds a copy of the statistics and affine as they are now.
    A BatchNorm subclass with its own forward (e.g. a fused activation) is left as it is, with a
    warning: freezing it would drop what it adds. A SyncBatchNorm built directly (not by
    ``convert_sync_batchnorm``) has no known input rank: revert it first. A BatchNorm held
    under several names (of one parent or of several) becomes one frozen layer under all of
    them; a layer that cannot be frozen (``track_running_stats=False``) raises before the model
    is changed.
    """
    skipped: list[str] = []

    def frozen(layer: torch.nn.Module, path: str) -> torch.nn.Module | None:
        if not isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            return None
        frozen_class = _frozen_class_for(layer) if _is_freezable(layer) else None
        if frozen_class is None:
            skipped.append(path or "<root>")
            return layer
        new = frozen_class.from_batchnorm(layer)
        new.train(layer.training)
        return new

    result = swap_layers(module, frozen)
    if skipped:
        warnings.warn(
            "freeze_batchnorm: left these BatchNorms unfrozen (a subclass whose forward is not "
            "plain BatchNorm, or a SyncBatchNorm of unknown input rank: revert it first): "
            f"{', '.join(skipped)}",
            UserWarning,
            stacklevel=2,
        )
    return result


def unfreeze_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every frozen BatchNorm in ``module`` by a trainable BatchNorm.

    The new layer is the layer that was frozen (its class and settings: a
    ``torch.nn.BatchNorm2d`` comes back as one, a ``GhostBatchNorm2d`` with its virtual batch
    size; not its hooks, which the frozen layer never ran) with the frozen statistics and
    affine; a frozen layer built directly becomes a normdrop BatchNorm of its rank (momentum
    0.1, affine). In place, under every name the layer has; returns ``module`` or the new layer.
    """

    def thawed(layer: torch.nn.Module, path: str) -> torch.nn.Module | None:
        if not isinstance(layer, _FrozenBatchNorm):
            return None
        bn = layer.to_batchnorm()
        bn.train(layer.training)
        return bn

    return swap_layers(module, thawed)
