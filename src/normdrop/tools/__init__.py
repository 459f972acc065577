"""Tools for models that use BatchNorm and Dropout.

- :func:`fold_batchnorm`: fold eval-mode BatchNorm into the preceding Linear/Conv.
- :func:`recalibrate_batchnorm`: recompute running statistics from data.
- :func:`convert`: swap BatchNorm/Dropout layers between ``torch.nn`` and ``normdrop.nn``.
- :func:`mc_dropout` / :func:`mc_predict`: Monte Carlo dropout with BatchNorm kept in eval.
- :func:`lint`: find BatchNorm/Dropout pitfalls (also ``normdrop lint`` on the command line).
"""

# Imported eagerly: `convert`, `lint` and `mc_dropout` are both functions and submodules, and
# binding the function after its submodule has loaded is what keeps the function in place.
from normdrop.tools.convert import convert
from normdrop.tools.fold import FoldedBatchNorm, fold_batchnorm
from normdrop.tools.lint import Finding, lint
from normdrop.tools.mc_dropout import MCPrediction, mc_dropout, mc_predict
from normdrop.tools.recalibrate import recalibrate_batchnorm

__all__ = [
    "Finding",
    "FoldedBatchNorm",
    "MCPrediction",
    "convert",
    "fold_batchnorm",
    "lint",
    "mc_dropout",
    "mc_predict",
    "recalibrate_batchnorm",
]
