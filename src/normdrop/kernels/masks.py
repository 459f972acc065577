"""The Philox stream (:mod:`normdrop.kernels.philox`) on torch's side: dropout seeds drawn from
torch's generator, and a stream's keep masks and uniforms as tensors (what the tests compare
the kernels' masks with).

Apart from :mod:`normdrop.kernels.philox` so that the generator, and the kernels built on it,
import without torch: a helper process that only compiles kernels starts in a fraction of a
second (:mod:`normdrop.kernels.compile_ahead`).
"""

from __future__ import annotations

import numpy as np
import torch

from normdrop.kernels.philox import UNIFORM_SCALE, keep_threshold, words

__all__ = ["MIN_KEEP", "draw_seed", "keep_mask", "uniform"]

_SEED_LIMIT = 2**63 - 1
# The stream's uniforms are float32 (24-bit significand), so near 1 they step by 2^-24, and the
# threshold rounds p to float32: a keep probability 1 - p is met within about two such steps,
# 1.2e-7 absolute, 1.25e-4 of 1 - p at MIN_KEEP (tested). Below it the error would grow past that
# (p = 1 - 1e-7 would keep 0.3 of what it should): such p takes torch's bernoulli_ on the
# reference path instead.
MIN_KEEP = 2.0**-10


def draw_seed(generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh 63-bit seed from torch's generator (``torch.manual_seed`` governs it).

    Returned as a 0-dim int64 tensor so that it flows through ``torch.compile`` graphs and
    autograd contexts without a host round trip.
    """
    if generator is None:
        return torch.randint(0, _SEED_LIMIT, (), dtype=torch.int64)
    return torch.randint(0, _SEED_LIMIT, (), dtype=torch.int64, generator=generator)


def _folded(seed: int, offset: int, n: int) -> np.ndarray:
    """The stream's words as :func:`normdrop.kernels.philox.fold31` folds them (int64)."""
    signed = words(seed, offset, n).view(np.int32).astype(np.int64)
    return np.where(signed < 0, -signed - 1, signed)


def keep_mask(seed: int, offset: int, n: int, p: float) -> torch.Tensor:
    """The dropout keep mask (bool) of stream elements ``offset ... offset + n - 1``."""
    return torch.from_numpy(_folded(seed, offset, n) > keep_threshold(p))


def uniform(seed: int, offset: int, n: int) -> torch.Tensor:
    """The float32 uniforms in [0, 1) of stream elements ``offset ... offset + n - 1``."""
    return torch.from_numpy(_folded(seed, offset, n).astype(np.float32) * UNIFORM_SCALE)
