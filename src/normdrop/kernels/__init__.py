"""Fast CPU kernels: BatchNorm, Dropout and the fused BatchNorm -> activation -> Dropout.

- :mod:`normdrop.kernels.philox`: the Philox4x32-10 counter-based generator of the masks.
- :mod:`normdrop.kernels.masks`: its torch side (seeds from torch's generator, masks as tensors).
- :mod:`normdrop.kernels.cpu`: the numba kernels.
- :mod:`normdrop.kernels.ops`: the kernels as ``torch.library`` custom ops (autograd,
  ``torch.compile``, ``torch.export``).
- :mod:`normdrop.kernels.dispatch`: chooses the kernels or the reference per call; the
  ``normdrop.nn`` modules go through it.
- :mod:`normdrop.kernels.eager`: the modules' cached eager BatchNorm path.
- :mod:`normdrop.kernels.compile_ahead`: the backward kernel compiled in a helper process
  while the forward compiles.

See ``docs/kernels.md``.
"""

from normdrop.kernels.dispatch import (
    batch_norm,
    batch_norm_act_dropout,
    dropout,
    fast_path_available,
)

__all__ = ["batch_norm", "batch_norm_act_dropout", "dropout", "fast_path_available"]
