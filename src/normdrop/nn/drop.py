r"""Structured and multiplicative relatives of Dropout: DropPath, DropBlock2d, DropConnect and
GaussianDropout, as functions and modules.

All are identities in eval mode, take ``p`` in [0, 1] (GaussianDropout: [0, 1)), and accept a
``generator`` so that a seeded ``torch.Generator`` reproduces the noise exactly; without one
the global generator is used (``torch.manual_seed`` governs). Masks are drawn with
``bernoulli_`` in the input's dtype, the way torchvision and timm draw theirs, so the same seed
gives the same mask as their implementations.

DropPath / stochastic depth (Huang et al. 2016; timm's ``drop_path``, torchvision's
``StochasticDepth``), for a residual branch ``f`` in ``x + f(x)``::

    row mode:    y[n] = f(x)[n] * b_n / (1 - p),   b_n ~ Bernoulli(1 - p), one per sample
    batch mode:  y    = f(x)    * b   / (1 - p),   b   ~ Bernoulli(1 - p), one per call

(without ``scale_by_keep`` the ``1 / (1 - p)`` is left out).

DropBlock (Ghiasi, Lin & Le 2018) drops ``block_size x block_size`` squares of a feature map.
Block seeds are drawn where a whole block fits, on an ``(H - b + 1) x (W - b + 1)`` grid, with
the rate of the paper's eq. (1), generalized to rectangles, chosen so that about a fraction p
of the units is dropped::

    gamma = p / b^2 * (H W) / ((H - b + 1)(W - b + 1))
    M     = 1 - maxpool_b(pad_{b-1}(seeds)),       seeds ~ Bernoulli(gamma)
    y     = x * M * numel(M) / sum(M)

Each seed at ``(i, j)`` clears ``[i, i + b) x [j, j + b)``; padding by ``b - 1`` on every side
makes this exact for odd and even block sizes alike. One mask per (sample, channel) by default
(``per_channel=True``: the paper samples a mask "on every feature map", as its reference TF
code, ``torchvision.ops.drop_block2d`` and timm do), or one per sample, shared by all channels
(``per_channel=False``, the coupled-channel mask).

DropConnect (Wan et al. 2013) drops *weights* of a Linear or Conv layer instead of activations:
``W' = W * M / (1 - p)``, ``M ~ Bernoulli(1 - p)`` per weight, one mask per forward call
(shared by the batch, as AWD-LSTM's WeightDrop; the paper draws one per sample). The bias is
kept. Inference uses ``W`` (the inverted scaling replaces the paper's Gaussian moment matching).

Gaussian dropout (Srivastava et al. 2014, section 10) multiplies by continuous noise with the
mean and variance of the dropout mask ``b / (1 - p)``::

    y = x * e,   e ~ N(1, p / (1 - p))
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, fx
from torch.func import functional_call
from torch.nn.utils import parametrize

from normdrop import functional as F
from normdrop.errors import InputError, InputTypeError
from normdrop.functional import _check_dropout_args, _check_dropout_p, _compute_dtype
from normdrop.nn.tracing import is_proxy, not_scriptable, record_call

__all__ = [
    "DropBlock2d",
    "DropConnect",
    "DropPath",
    "GaussianDropout",
    "drop_block2d",
    "drop_block_gamma",
    "drop_path",
    "gaussian_dropout",
]

_DROP_PATH_MODES = ("row", "batch")


def _check_flag(name: str, argument: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise InputTypeError(f"{name}: {argument} must be True or False, got {value!r}")


def _check_generator(name: str, generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise InputTypeError(
            f"{name}: generator must be a torch.Generator or None, got {type(generator).__name__}"
        )


def _check_eps(name: str, eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise InputTypeError(f"{name}: eps must be a finite real number >= 0, got {eps!r}")
    if not (math.isfinite(eps) and eps >= 0):
        raise InputError(f"{name}: eps must be a finite real number >= 0, got {eps!r}")


# --------------------------------------------------------------------------------------------
# DropPath
# --------------------------------------------------------------------------------------------


def drop_path(
    input: Tensor,
    p: float = 0.1,
    training: bool = True,
    mode: str = "row",
    scale_by_keep: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Zero whole samples (``mode="row"``) or the whole batch (``"batch"``) with probability p.

    Args:
        input: ``(N, *)``, the output of a residual branch.
        p: probability of dropping, in [0, 1].
        mode: ``"row"``: one draw per sample; ``"batch"``: one draw for the whole input.
        scale_by_keep: divide the survivors by ``1 - p`` so the expectation is unchanged.
    """
    _check_dropout_args("drop_path", input, p, training)
    _check_flag("drop_path", "scale_by_keep", scale_by_keep)
    if mode not in _DROP_PATH_MODES:
        raise InputError(f"drop_path: mode must be one of {_DROP_PATH_MODES}, got {mode!r}")
    if input.dim() < 1:
        raise InputError("drop_path: input must have a batch dimension, got a 0-D tensor")
    if not training or p == 0:
        return input
    keep = 1.0 - p
    ones = (1,) * (input.dim() - 1)
    shape = (input.shape[0], *ones) if mode == "row" else (1, *ones)
    noise = input.new_empty(shape)  # as timm; vmap batches new_empty's result
    noise.bernoulli_(keep, generator=generator)
    if scale_by_keep and keep > 0:
        noise.div_(keep)
    return input * noise


class DropPath(torch.nn.Module):
    """Stochastic depth on a residual branch; see :func:`drop_path`.

    Args:
        p: probability of dropping the branch, in [0, 1].
        mode: ``"row"`` (per sample, timm's DropPath) or ``"batch"`` (whole batch).
        scale_by_keep: rescale survivors by ``1 / (1 - p)``.
        generator: draws the masks; the global generator if ``None``.
    """

    def __init__(
        self,
        p: float = 0.1,
        mode: str = "row",
        scale_by_keep: bool = True,
        *,
        generator: torch.Generator | None = None,
    ) -> None:
        _check_dropout_p("DropPath", p)
        if mode not in _DROP_PATH_MODES:
            raise InputError(f"DropPath: mode must be one of {_DROP_PATH_MODES}, got {mode!r}")
        _check_flag("DropPath", "scale_by_keep", scale_by_keep)
        _check_generator("DropPath", generator)
        super().__init__()
        self.p, self.mode, self.scale_by_keep = p, mode, scale_by_keep
        self.generator = generator

    def __prepare_scriptable__(self) -> torch.nn.Module:
        raise not_scriptable(self, twin=False)

    def extra_repr(self) -> str:
        return f"p={self.p}, mode={self.mode!r}, scale_by_keep={self.scale_by_keep}"

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return record_call(self, input)
        return drop_path(
            input, self.p, self.training, self.mode, self.scale_by_keep, generator=self.generator
        )


# --------------------------------------------------------------------------------------------
# DropBlock
# --------------------------------------------------------------------------------------------


def drop_block_gamma(p: float, block_size: int, height: int, width: int) -> float:
    """Seed rate of DropBlock (Ghiasi et al. 2018, eq. 1, for an ``height x width`` map).

    ``gamma = p / b^2 * H W / ((H - b + 1)(W - b + 1))``; always <= p, so a valid probability.
    """
    valid = (height - block_size + 1) * (width - block_size + 1)
    return p * height * width / (block_size**2 * valid)


def _check_block_size(name: str, block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise InputTypeError(f"{name}: block_size must be a positive int, got {block_size!r}")
    if block_size < 1:
        raise InputError(f"{name}: block_size must be a positive int, got {block_size}")


def block_mask(seeds: Tensor, block_size: int) -> Tensor:
    """Dilate block seeds into the drop mask: 1 wherever some seed's block covers.

    ``seeds``: ``(N, C, H - b + 1, W - b + 1)`` of 0/1; a 1 at ``(i, j)`` covers
    ``[i, i + b) x [j, j + b)``. Returns ``(N, C, H, W)``.
    """
    padded = torch.nn.functional.pad(seeds, [block_size - 1] * 4)
    return torch.nn.functional.max_pool2d(padded, kernel_size=block_size, stride=1)


def drop_block2d(
    input: Tensor,
    p: float = 0.1,
    block_size: int = 7,
    training: bool = True,
    *,
    per_channel: bool = True,
    eps: float = 1e-6,
    generator: torch.Generator | None = None,
) -> Tensor:
    """DropBlock on an ``(N, C, H, W)`` input; see the module docstring.

    Args:
        p: about the fraction of units dropped, in [0, 1].
        block_size: side b of the square blocks, ``1 <= b <= min(H, W)`` (odd or even).
        per_channel: one mask per (sample, channel), as the paper and torchvision (default);
            False: one per sample, shared by the channels.
        eps: keeps the rescaling finite when everything is dropped.
    """
    _check_dropout_args("drop_block2d", input, p, training)
    _check_flag("drop_block2d", "per_channel", per_channel)
    _check_eps("drop_block2d", eps)
    _check_block_size("drop_block2d", block_size)
    if input.dim() != 4:
        raise InputError(
            f"drop_block2d: input must have shape (N, C, H, W), got {input.dim()}-D input of "
            f"shape {tuple(input.shape)}"
        )
    if not training or p == 0:
        return input  # the identity for any map size: a model evaluated on smaller inputs
    n, c, height, width = input.shape
    if block_size > min(height, width):
        raise InputError(
            f"drop_block2d: block_size={block_size} is larger than the {height}x{width} "
            f"feature map of input shape {tuple(input.shape)}; use block_size <= "
            f"{min(height, width)}"
        )
    gamma = drop_block_gamma(p, block_size, height, width)
    grid = (n, c if per_channel else 1, height - block_size + 1, width - block_size + 1)
    seeds = input.new_empty(grid)  # not torch.empty: vmap batches new_empty's result
    seeds.bernoulli_(gamma, generator=generator)
    keep = 1 - block_mask(seeds, block_size)
    compute = _compute_dtype(input)
    scale = keep.numel() / (eps + keep.sum(dtype=compute))
    # keep * scale in float32 for half inputs: with everything dropped the scale (numel / eps)
    # overflows float16, and 0 * inf would be NaN (forward and gradient). Exact: keep is 0 or 1.
    return input * (keep.to(compute) * scale).to(input.dtype)


class DropBlock2d(torch.nn.Module):
    """DropBlock for ``(N, C, H, W)`` feature maps; see :func:`drop_block2d`.

    Args:
        p: about the fraction of units dropped, in [0, 1]. The paper raises it linearly from 0
            during training; set ``module.p`` from your schedule.
        block_size: side of the dropped squares, at most the feature map's smaller side.
        per_channel: independent masks per channel, as the paper and torchvision (default);
            False: one per sample, shared by the channels.
        eps: keeps the rescaling finite when everything is dropped.
        generator: draws the masks; the global generator if ``None``.
    """

    def __init__(
        self,
        p: float = 0.1,
        block_size: int = 7,
        *,
        per_channel: bool = True,
        eps: float = 1e-6,
        generator: torch.Generator | None = None,
    ) -> None:
        _check_dropout_p("DropBlock2d", p)
        _check_block_size("DropBlock2d", block_size)
        _check_flag("DropBlock2d", "per_channel", per_channel)
        _check_eps("DropBlock2d", eps)
        _check_generator("DropBlock2d", generator)
        super().__init__()
        self.p, self.block_size, self.per_channel, self.eps = p, block_size, per_channel, eps
        self.generator = generator

    def __prepare_scriptable__(self) -> torch.nn.Module:
        raise not_scriptable(self, twin=False)

    def extra_repr(self) -> str:
        return f"p={self.p}, block_size={self.block_size}, per_channel={self.per_channel}"

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return record_call(self, input)
        return drop_block2d(
            input,
            self.p,
            self.block_size,
            self.training,
            per_channel=self.per_channel,
            eps=self.eps,
            generator=self.generator,
        )


# --------------------------------------------------------------------------------------------
# DropConnect
# --------------------------------------------------------------------------------------------

_WEIGHT_LAYERS = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)


class DropConnect(torch.nn.Module):
    """Wrap a Linear, Conv or ConvTranspose layer and drop its weights in training.

    ``DropConnect(torch.nn.Linear(128, 64), p=0.3)``. In training each forward draws
    ``M ~ Bernoulli(1 - p)`` of the weight's shape and runs the layer with
    ``weight * M / (1 - p)`` (:func:`normdrop.functional.dropout` applied to the weight, so the
    gradient reaches the kept weights only); in eval the layer runs unchanged. The wrapped
    layer is ``self.module``; its ``state_dict`` keys get the prefix ``module.``.
    """

    def __init__(
        self, module: torch.nn.Module, p: float = 0.5, *, generator: torch.Generator | None = None
    ) -> None:
        if not isinstance(module, _WEIGHT_LAYERS):
            raise InputTypeError(
                "DropConnect: module must be a torch.nn.Linear, Conv1d/2d/3d or "
                f"ConvTranspose1d/2d/3d, got {type(module).__name__}"
            )
        _check_dropout_p("DropConnect", p)
        _check_generator("DropConnect", generator)
        super().__init__()
        self.module, self.p, self.generator = module, p, generator

    def __prepare_scriptable__(self) -> torch.nn.Module:
        raise not_scriptable(self, twin=False)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, *args, **kwargs) -> Tensor:
        if is_proxy(*args, **kwargs):
            return record_call(self, *args, **kwargs)
        if not self.training or self.p == 0:
            return self.module(*args, **kwargs)
        if parametrize.is_parametrized(self.module, "weight"):
            # functional_call would restore a parametrized weight through right_inverse, which
            # writes into the parameters (spectral_norm's changes) and breaks the backward; the
            # mask joins the parametrization chain for this call instead.
            chain = self.module.parametrizations["weight"]
            chain.append(_DropWeight(self.p, self.generator))
            try:
                return self.module(*args, **kwargs)
            finally:
                del chain[-1]
        if "weight" not in self.module._parameters:
            return self._drop_after_hooks(args, kwargs)
        weight = F.dropout(self.module.weight, self.p, True, generator=self.generator)
        return functional_call(self.module, {"weight": weight}, args, kwargs)

    def _drop_after_hooks(self, args: tuple, kwargs: dict) -> Tensor:
        """The weight is no parameter but made by a forward pre-hook before each call
        (``torch.nn.utils.prune``, the hook-based ``weight_norm``), which would overwrite a
        weight given to ``functional_call``: the mask goes on in a pre-hook that runs after
        theirs, and the layer's weight is put back after the call."""
        made = []

        def drop(module: torch.nn.Module, inputs: tuple) -> None:
            made.append(module.weight)
            module.weight = F.dropout(module.weight, self.p, True, generator=self.generator)

        handle = self.module.register_forward_pre_hook(drop)
        try:
            return self.module(*args, **kwargs)
        finally:
            handle.remove()
            if made:
                self.module.weight = made[0]


class _DropWeight(torch.nn.Module):
    """DropConnect's mask as the last step of a parametrized weight (one call only)."""

    def __init__(self, p: float, generator: torch.Generator | None) -> None:
        super().__init__()
        self.p, self.generator = p, generator

    def forward(self, weight: Tensor) -> Tensor:
        return F.dropout(weight, self.p, True, generator=self.generator)


# --------------------------------------------------------------------------------------------
# Gaussian dropout
# --------------------------------------------------------------------------------------------


def gaussian_dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Multiply by ``N(1, p / (1 - p))`` noise, one draw per element; identity in eval.

    ``p`` in [0, 1): the noise variance ``p / (1 - p)`` is that of the dropout mask
    ``Bernoulli(1 - p) / (1 - p)``, and is infinite at ``p = 1``.
    """
    _check_dropout_args("gaussian_dropout", input, p, training)
    if p == 1:
        raise InputError(
            "gaussian_dropout: p must be < 1 (the noise variance p / (1 - p) is infinite at 1)"
        )
    if not training or p == 0:
        return input
    noise = torch.empty_like(input).normal_(1.0, math.sqrt(p / (1 - p)), generator=generator)
    return input * noise


class GaussianDropout(torch.nn.Module):
    """Multiplicative Gaussian noise ``N(1, p / (1 - p))``; see :func:`gaussian_dropout`.

    Args:
        p: equivalent drop rate, in [0, 1).
        generator: draws the noise; the global generator if ``None``.
    """

    def __init__(self, p: float = 0.5, *, generator: torch.Generator | None = None) -> None:
        _check_dropout_p("GaussianDropout", p)
        if p == 1:
            raise InputError(
                "GaussianDropout: p must be < 1 (the noise variance p / (1 - p) is infinite at 1)"
            )
        _check_generator("GaussianDropout", generator)
        super().__init__()
        self.p, self.generator = p, generator

    def __prepare_scriptable__(self) -> torch.nn.Module:
        raise not_scriptable(self, twin=False)

    def extra_repr(self) -> str:
        return f"p={self.p}"

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return record_call(self, input)
        return gaussian_dropout(input, self.p, self.training, generator=self.generator)
