"""BatchNorm -> activation -> Dropout in one module, on one fused kernel.

``BatchNormAct2d(C, activation="relu", p=0.1)`` computes what ``nn.Sequential(BatchNorm2d(C),
nn.ReLU(), nn.Dropout(0.1))`` computes, in one pass over the data after the statistics and one
backward that keeps only the input, the per-channel statistics and a dropout seed (not the
activation output and the mask). Parameters and buffers are exactly BatchNorm's, so a
``state_dict`` moves freely between this module and a plain BatchNorm (timm's ``BatchNormAct2d``
is the same idea).

The dropout mask comes from the Philox stream of a seed drawn from torch's generator
(:mod:`normdrop.kernels.philox`), so ``torch.manual_seed`` makes it reproducible, but it is not
the mask ``nn.Dropout`` would draw. Under ``normdrop.use_backend("reference")`` the module runs
the unfused chain of :mod:`normdrop.functional` calls, with torch's masks.
"""

from __future__ import annotations

from torch import Tensor, fx

from normdrop.functional import _check_dropout_p
from normdrop.kernels import dispatch
from normdrop.kernels.activations import check_activation
from normdrop.nn.batchnorm import BatchNorm1d, BatchNorm2d, _BatchNorm
from normdrop.nn.tracing import record_call

__all__ = ["BatchNormAct1d", "BatchNormAct2d"]


class _BatchNormAct(_BatchNorm):
    r"""``dropout(act(batch_norm(x)), p)`` over the channel dim 1 of ``(N, C, *)`` input.

    .. math::
        y = \mathrm{dropout}_p\left(\mathrm{act}\left(
            \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta
        \right)\right)

    Args:
        num_features: C, the number of channels.
        activation: ``"relu"``, ``"leaky_relu"``, ``"identity"`` or ``"gelu"`` (exact, erf).
        p: dropout probability in [0, 1], applied in training only.
        negative_slope: the slope of ``leaky_relu`` for negative inputs.
        **batchnorm_kwargs: ``eps``, ``momentum``, ``affine``, ``track_running_stats``,
            ``device``, ``dtype``, ``bias``, as for :class:`normdrop.nn.BatchNorm2d`.
    """

    def __init__(
        self,
        num_features: int,
        activation: str = "relu",
        p: float = 0.0,
        *,
        negative_slope: float = 0.01,
        **batchnorm_kwargs,
    ) -> None:
        name = type(self).__name__
        check_activation(name, activation, negative_slope)
        _check_dropout_p(name, p)
        super().__init__(num_features, **batchnorm_kwargs)
        self.activation = activation
        self.p = float(p)
        self.negative_slope = float(negative_slope)

    def extra_repr(self) -> str:
        slope = f", negative_slope={self.negative_slope}" if self.activation == "leaky_relu" else ""
        return f"{super().extra_repr()}, activation={self.activation!r}, p={self.p}{slope}"

    def forward(self, input: Tensor) -> Tensor:
        if isinstance(input, fx.Proxy):
            return record_call(self, input)
        self._check_input_dim(input)
        arguments = self._call_arguments()
        self._count_batch()
        return dispatch.batch_norm_act_dropout(
            input,
            *arguments,
            self.eps,
            self.activation,
            self.negative_slope,
            self.p if self.training else 0.0,
        )


class BatchNormAct1d(_BatchNormAct, BatchNorm1d):
    """BatchNorm1d -> activation -> Dropout over ``(N, C)`` or ``(N, C, L)``; see
    :class:`_BatchNormAct`."""


class BatchNormAct2d(_BatchNormAct, BatchNorm2d):
    """BatchNorm2d -> activation -> Dropout over ``(N, C, H, W)``; see :class:`_BatchNormAct`."""
