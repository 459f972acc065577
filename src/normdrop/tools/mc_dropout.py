r"""Monte Carlo dropout (Gal & Ghahramani 2016): predictive uncertainty from dropout at test time.

Keeping dropout active at inference and averaging ``T`` stochastic forward passes
approximates the predictive distribution of a Bayesian network. For class probabilities
``p_t = softmax(f_t(x))`` of pass ``t``::

    mean               = (1/T) sum_t p_t
    variance           = (1/(T-1)) sum_t (p_t - mean)^2          per class (unbiased)
    entropy            = H[mean] = - sum_k mean_k log mean_k      total (predictive) uncertainty
    mutual_information = H[mean] - (1/T) sum_t H[p_t]             the model's own (epistemic) part

(BALD, Houlsby et al. 2011). For ``activation="sigmoid"`` the entropies are those of a
Bernoulli per output; for ``activation=None`` (regression) only mean and variance are given.

The classic mistake is ``model.train()``: it also puts BatchNorm in training mode, so each
prediction is normalized with the statistics of the test batch (and updates the running
statistics). :func:`mc_dropout` turns on the dropout layers only.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor

from normdrop.errors import InputError
from normdrop.nn.drop import DropBlock2d, DropConnect, DropPath, GaussianDropout
from normdrop.tools._model import check_model
from normdrop.tools.rng import forked_rng

__all__ = ["MCPrediction", "mc_dropout", "mc_predict"]

DROPOUT_LAYERS = (
    torch.nn.modules.dropout._DropoutNd,
    DropPath,
    DropBlock2d,
    DropConnect,
    GaussianDropout,
)
# Other libraries' stochastic-depth and drop-block layers, known by class name (importing
# them would make those libraries dependencies): torchvision's StochasticDepth, timm's DropPath
# and DropBlock2d, Hugging Face's <Model>DropPath. Each drops only in training mode.
_THIRD_PARTY_NAMES = ("StochasticDepth", "DropBlock2d")
_THIRD_PARTY_SUFFIX = "DropPath"
_ACTIVATIONS = ("softmax", "sigmoid", None)


def is_dropout_layer(module: torch.nn.Module) -> bool:
    """A dropout layer of normdrop, torch or a known third-party library (by class name): the
    layers :func:`mc_dropout` puts in training mode."""
    if isinstance(module, DROPOUT_LAYERS):
        return True
    name = type(module).__name__
    return name in _THIRD_PARTY_NAMES or name.endswith(_THIRD_PARTY_SUFFIX)


class MCPrediction(NamedTuple):
    """What :func:`mc_predict` returns; tensors have the model output's shape, except the
    entropies of a softmax output, which drop the class dim 1. ``None`` for regression."""

    mean: Tensor
    variance: Tensor
    entropy: Tensor | None
    mutual_information: Tensor | None


@contextlib.contextmanager
def mc_dropout(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, dropout layers are in training mode and everything else in eval.

    Dropout layers are ``torch.nn``'s and normdrop's dropout family, DropPath, DropBlock2d,
    DropConnect and GaussianDropout, and other libraries' stochastic depth and drop-block
    layers, known by class name (torchvision's ``StochasticDepth``, timm's ``DropPath`` and
    ``DropBlock2d``, Hugging Face's ``...DropPath``). So are the ``torch.nn`` modules whose
    training mode changes nothing but dropout: ``MultiheadAttention`` (its attention dropout),
    the RNNs (dropout between layers) and the Transformer layers and stacks (whose eval fast
    path would skip their Dropout layers). Every module's mode is restored on exit.

    A dropout layer switched on that never runs while the model runs in the block is not
    sampled: its parent may apply the layer's rate itself, and only in its own training mode
    (timm's ``Attention`` passes ``attn_drop.p`` to ``F.scaled_dot_product_attention`` only
    when training). On leaving the block, such layers are named in a warning.
    """
    check_model("mc_dropout", model)
    dropouts = [m for m in model.modules() if is_dropout_layer(m)]
    gated = [m for m in model.modules() if isinstance(m, _GATED)]
    fused = _fused_dropouts(model)
    if not dropouts and not any(_gated_rate(m) > 0 for m in gated):
        also = f" (the dropout fused into {', '.join(fused)} cannot be sampled)" if fused else ""
        raise InputError(
            f"mc_dropout: {type(model).__name__} has no dropout layer, so every Monte Carlo "
            f"sample would be the same{also}"
        )
    if fused:
        warnings.warn(
            f"mc_dropout: the dropout fused into {', '.join(fused)} stays off: it runs only "
            "with its BatchNorm in training mode, which Monte Carlo dropout must avoid; use "
            "BatchNorm, activation and a separate Dropout layer to sample it",
            UserWarning,
            stacklevel=3,
        )
    modes = {m: m.training for m in model.modules()}
    ran: set[torch.nn.Module] = set()

    def record(module: torch.nn.Module, args: Any, output: Any) -> None:
        ran.add(module)

    handles = [m.register_forward_hook(record) for m in [model, *dropouts]]
    try:
        model.eval()
        for m in dropouts + gated:
            m.training = True  # not m.train(): that would recurse into DropConnect's layer
        yield model
        if model in ran:
            _warn_unsampled(model, [m for m in dropouts if m not in ran and _rate(m) != 0])
    finally:
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.training = training


def _rate(module: torch.nn.Module) -> float | None:
    """A dropout layer's rate (``p``, or timm's ``drop_prob``); None where it has neither."""
    rate = getattr(module, "p", getattr(module, "drop_prob", None))
    return float(rate) if isinstance(rate, int | float) else None


def _warn_unsampled(model: torch.nn.Module, idle: list[torch.nn.Module]) -> None:
    """Warn about dropout layers switched on that did not run while the model did."""
    if not idle:
        return
    paths = {m: path for path, m in model.named_modules()}
    names = ", ".join(f"'{paths[m] or '<model>'}' ({type(m).__name__})" for m in idle)
    warnings.warn(
        f"mc_dropout: dropout layers switched on never ran while the model did, so their "
        f"dropout is not sampled: {names}. Their parent may apply their rate itself, and only "
        "in its own training mode (timm's Attention passes attn_drop.p to "
        "F.scaled_dot_product_attention only when training: set its fused_attn = False so "
        "that attn_drop runs)",
        UserWarning,
        stacklevel=4,
    )


# torch.nn modules that drop out by a rate their own training flag gates, or whose eval-mode
# fast path (taken under no_grad) skips their Dropout layers; training mode changes nothing else.
_GATED = (
    torch.nn.MultiheadAttention,
    torch.nn.modules.rnn.RNNBase,
    torch.nn.TransformerEncoderLayer,
    torch.nn.TransformerDecoderLayer,
    torch.nn.TransformerEncoder,
    torch.nn.TransformerDecoder,
)


def _gated_rate(module: torch.nn.Module) -> float:
    """The dropout rate a ``_GATED`` module applies itself (not through a Dropout layer)."""
    if isinstance(module, torch.nn.MultiheadAttention | torch.nn.modules.rnn.RNNBase):
        return float(module.dropout)
    return 0.0


def _fused_dropouts(model: torch.nn.Module) -> list[str]:
    """Paths of BatchNorm -> activation -> Dropout modules with p > 0 (normdrop.nn.BatchNormAct)."""
    from normdrop.nn.norm_act import _BatchNormAct

    return [
        f"'{path or '<model>'}'"
        for path, m in model.named_modules()
        if isinstance(m, _BatchNormAct) and m.p > 0
    ]


def _probabilities(output: Any, activation: str | None) -> Tensor:
    if not isinstance(output, Tensor):
        # transformers' models return a ModelOutput whose logits are the prediction
        logits = getattr(output, "logits", None)
        if not isinstance(logits, Tensor):
            raise InputError(
                "mc_predict: the model must return a tensor (or an output with a tensor "
                f".logits, as transformers' models), got {type(output).__name__}; wrap it in a "
                "Module whose forward returns the prediction tensor"
            )
        output = logits
    if activation == "softmax":
        if output.dim() < 2:
            raise InputError(
                "mc_predict: activation='softmax' needs an (N, K, *) output with classes in "
                f"dim 1, got shape {tuple(output.shape)}"
            )
        return torch.softmax(output.to(torch.float64), dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(output.to(torch.float64))
    return output.to(torch.float64)


@torch.no_grad()
def mc_predict(
    model: torch.nn.Module,
    x: Tensor,
    samples: int = 30,
    *,
    activation: str | None = "softmax",
    seed: int | None = None,
) -> MCPrediction:
    """Mean, variance and entropies of ``samples`` dropout-perturbed predictions of ``x``.

    Args:
        model: a model with dropout layers; its modes are restored afterwards. It returns
            the prediction tensor, or an output with a tensor ``.logits`` (transformers').
        x: the input batch.
        samples: T, the number of stochastic passes, at least 2.
        activation: ``"softmax"`` (logits with classes in dim 1), ``"sigmoid"`` (binary or
            multi-label logits) or ``None`` (regression: entropies are ``None``).
        seed: makes the draws reproducible without touching the global RNG state or the
            generators that layers own (``DropPath(p, generator=g)``); each of those is seeded
            from ``seed`` too.

    Returns:
        :class:`MCPrediction` in float64 (see the module docstring for the formulas).
    """
    check_model("mc_predict", model)
    if not isinstance(x, Tensor):
        raise InputError(
            f"mc_predict: x must be the input tensor, got {type(x).__name__}; for a model "
            "with several inputs, wrap it in a Module whose forward takes one tensor"
        )
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise InputError(f"mc_predict: samples must be an int >= 2, got {samples!r}")
    if activation not in _ACTIVATIONS:
        raise InputError(
            f"mc_predict: activation must be one of {_ACTIVATIONS}, got {activation!r}"
        )
    rng = contextlib.nullcontext()
    if seed is not None:
        if x.device.type == "cpu":
            rng = forked_rng(model, devices=[], seed=seed)
        else:
            rng = forked_rng(model, [x.device], x.device.type, seed=seed)
    with rng, mc_dropout(model):
        draws = torch.stack([_probabilities(model(x), activation) for _ in range(samples)])
    mean, variance = draws.mean(0), draws.var(0, correction=1)
    if activation is None:
        return MCPrediction(mean, variance, None, None)
    entropy = _entropy_of(mean, activation)
    expected = torch.stack([_entropy_of(d, activation) for d in draws]).mean(0)
    return MCPrediction(mean, variance, entropy, entropy - expected)


def _entropy_of(p: Tensor, activation: str) -> Tensor:
    """Entropy in nats: over the class dim 1 for softmax, of Bernoulli(p) for sigmoid."""
    if activation == "softmax":
        return -torch.special.xlogy(p, p).sum(1)
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))
