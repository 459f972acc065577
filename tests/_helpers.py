"""Assertions shared by the tests."""

from __future__ import annotations

import torch


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """``actual == expected`` to ``rtol`` relative to the scale of ``expected``.

    Sums over many elements (weight gradients, statistics) carry rounding error proportional to
    the tensor's magnitude, so the absolute tolerance is ``rtol * max(1, max|expected|)``.
    """
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def record_kernel_calls(monkeypatch, getter: str) -> list[str]:
    """The layout of every call of the kernels ``normdrop.kernels.cpu.<getter>`` hands out
    (``"forward_kernel"`` or ``"backward_kernel"``), recorded at the call, not the lookup: the
    modules' cache keeps a kernel and calls it again."""
    from normdrop.kernels import cpu

    calls: list[str] = []
    original = getattr(cpu, getter)

    def spy(layout):
        kernel = original(layout)

        def counted(*args):
            calls.append(layout)
            return kernel(*args)

        return counted

    monkeypatch.setattr(cpu, getter, spy)
    return calls


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)


class TorchvisionFrozenBatchNorm2d(torch.nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d (torchvision 0.2x) as torchvision defines it:
    buffers only, no ``num_features``, checkpoints without ``num_batches_tracked``, the affine
    folded into one scale and shift. Its qualified name is torchvision's, which the tools
    recognize (torchvision cannot be installed beside the torch wheel used here); see
    :func:`frozen_batchnorm_2d_in` for a look-alike elsewhere."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


TorchvisionFrozenBatchNorm2d.__module__ = "torchvision.ops.misc"
TorchvisionFrozenBatchNorm2d.__qualname__ = "FrozenBatchNorm2d"


def frozen_batchnorm_2d_in(module: str) -> type[torch.nn.Module]:
    """:class:`TorchvisionFrozenBatchNorm2d` under another qualified ``module`` path."""
    return type("FrozenBatchNorm2d", (TorchvisionFrozenBatchNorm2d,), {"__module__": module})
