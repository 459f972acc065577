"""The lab's models, and where each variant puts BatchNorm and Dropout.

Specs: ``simplenet`` (the seed's: one hidden layer of 50), ``mlp:DEPTHxWIDTH`` (DEPTH hidden
layers of WIDTH units), ``cnn:small`` (two conv blocks and one hidden dense layer, for images).
Input and output sizes come from the data: one logit for two classes, one per class otherwise.

Placement, the same in every model:

- BatchNorm right after the Linear/Conv, before the activation (Ioffe & Szegedy 2015: it
  normalizes the pre-activation). That Linear/Conv has no bias: BN's mean subtraction would
  cancel it, and BN's own shift beta replaces it.
- Dropout right after the activation.
- With both, Dropout only after the *last* BN layer's activation, right before the output layer:
  dropout feeding a BN (directly or through a Linear) shifts the variance BN sees between
  training and inference (Li et al. 2019, "Understanding the disharmony between dropout and
  batch normalization by variance shift"). Without BN, Dropout follows every hidden activation.
- In conv blocks Dropout is channel-wise (``Dropout2d``: neighbouring pixels are correlated, so
  dropping single pixels hardly regularizes) and comes after the pooling.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from normdrop.errors import InputError
from normdrop.lab.config import Variant
from normdrop.lab.norms import norm_factory
from normdrop.lab.seed import SEED_HIDDEN
from normdrop.nn import Dropout, Dropout2d

__all__ = ["ModelSpec", "build_model", "last_activation", "parse_model_spec"]

NormFactory = Callable[[int, bool], nn.Module]
_CNN_CHANNELS = (32, 64)
_CNN_HIDDEN = 128


@dataclass(frozen=True)
class ModelSpec:
    """``kind`` is ``"mlp"`` (simplenet is the MLP with one hidden layer of 50) or ``"cnn"``."""

    kind: str
    widths: tuple[int, ...] = ()


def parse_model_spec(text: str) -> ModelSpec:
    """Parse ``simplenet``, ``mlp:DEPTHxWIDTH`` or ``cnn:small``."""
    if text == "simplenet":
        return ModelSpec("mlp", (SEED_HIDDEN,))
    if text == "cnn:small":
        return ModelSpec("cnn")
    match = re.fullmatch(r"mlp:(\d+)x(\d+)", text)
    if match:
        depth, width = int(match[1]), int(match[2])
        if 1 <= depth <= 64 and 1 <= width <= 1 << 16:
            return ModelSpec("mlp", (width,) * depth)
    raise InputError(
        f"--model must be simplenet, mlp:DEPTHxWIDTH (1-64 layers of 1-65536 units, "
        f"e.g. mlp:2x512) or cnn:small, got {text!r}"
    )


def _hidden_block(
    layer: nn.Module, width: int, variant: Variant, dropout: nn.Module | None, norm, spatial: bool
) -> list[nn.Module]:
    block = [layer]
    if variant.batch_norm:
        block.append(norm(width, spatial))
    block.append(nn.ReLU())
    if spatial:
        block.append(nn.MaxPool2d(2))
    if dropout is not None:
        block.append(dropout)
    return block


def _wants_dropout(variant: Variant, is_last_hidden: bool) -> bool:
    # With BN, only after the last BN: dropout must never feed a BN (variance shift).
    return variant.dropout and (is_last_hidden or not variant.batch_norm)


def _mlp(widths, in_features, n_outputs, variant, p, norm) -> list[nn.Module]:
    layers: list[nn.Module] = []
    previous = in_features
    for i, width in enumerate(widths):
        linear = nn.Linear(previous, width, bias=not variant.batch_norm)
        dropout = Dropout(p) if _wants_dropout(variant, i == len(widths) - 1) else None
        layers += _hidden_block(linear, width, variant, dropout, norm, spatial=False)
        previous = width
    return [*layers, nn.Linear(previous, n_outputs)]


def _cnn(sample_shape, n_outputs, variant, p, norm) -> list[nn.Module]:
    if len(sample_shape) != 3 or min(sample_shape[1:]) < 4:
        raise InputError(
            "--model cnn:small needs image data: an NPZ X of shape (samples, height, width) or "
            "(samples, channels, height, width), channels first, height and width >= 4, or "
            "digits, mnist5k, mnist, fashion-mnist, cifar10; got samples of shape "
            f"{tuple(sample_shape)}"
        )
    channels, height, width = sample_shape
    layers: list[nn.Module] = []
    for out_channels in _CNN_CHANNELS:
        conv = nn.Conv2d(channels, out_channels, 3, padding=1, bias=not variant.batch_norm)
        dropout = Dropout2d(p) if _wants_dropout(variant, False) else None
        layers += _hidden_block(conv, out_channels, variant, dropout, norm, spatial=True)
        channels, height, width = out_channels, height // 2, width // 2
    layers.append(nn.Flatten())
    return layers + _mlp((_CNN_HIDDEN,), channels * height * width, n_outputs, variant, p, norm)


def build_model(
    spec: str,
    variant: Variant,
    sample_shape: tuple[int, ...],
    n_outputs: int,
    dropout_p: float = 0.5,
    norm: NormFactory | None = None,
) -> nn.Sequential:
    """The model ``spec`` for samples of ``sample_shape``, with the variant's BN and Dropout.

    ``norm(num_features, spatial)`` builds the BN layers (default: normdrop's BatchNorm1d/2d).
    Returns an ``nn.Sequential`` mapping (N, *sample_shape) to (N, n_outputs) logits.
    """
    parsed = parse_model_spec(spec)
    norm = norm or norm_factory()
    if parsed.kind == "cnn":
        return nn.Sequential(*_cnn(sample_shape, n_outputs, variant, dropout_p, norm))
    in_features = 1
    for size in sample_shape:
        in_features *= size
    flatten = [nn.Flatten()] if len(sample_shape) > 1 else []
    return nn.Sequential(
        *flatten, *_mlp(parsed.widths, in_features, n_outputs, variant, dropout_p, norm)
    )


def last_activation(model: nn.Module) -> nn.Module:
    """The last ReLU: its input is the pre-activation of the last hidden layer."""
    activations = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if not activations:
        raise InputError("the model has no ReLU activation to observe")
    return activations[-1]
