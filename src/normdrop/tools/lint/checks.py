r"""Find BatchNorm and Dropout pitfalls in a model, by looking at it and running it once.

``lint(model, example_input)`` returns a list of :class:`Finding`\ s, each with a severity
(``"error"``: wrong results or a crash; ``"warning"``: very likely a mistake; ``"info"``:
harmless but wasteful), the module path, what is wrong and how to fix it.

=========================== ======== ==========================================================
rule                        severity what
=========================== ======== ==========================================================
dropout-before-batchnorm    warning  a BatchNorm's input passed through a (unit-wise) dropout
                                     since the last normalization, directly or through Linear,
                                     Conv or activations: variance shift (Li et al. 2019)
batchnorm-training-in-eval  error    the model is in eval mode but a BatchNorm is training
dropout-training-in-eval    warning  the model is in eval mode but a dropout layer is training
                                     (unless that is Monte Carlo dropout on purpose)
functional-dropout-in-eval  warning  a module in eval mode called a dropout function with
                                     training=True (``F.dropout(x, p)``: training defaults to
                                     True)
dropout-output-unused       warning  a dropout layer's or function's result went nowhere
                                     (``F.dropout(x, p, self.training)`` on a line of its own:
                                     not in place, so it drops nothing)
batch-of-one                error    a BatchNorm using batch statistics (training, or no
                                     running statistics) got 1 value per channel
redundant-bias              info     BatchNorm right after a Linear/Conv that has a bias, whose
                                     output nothing else uses (nor returns)
batchnorm-momentum          warning  momentum 0 (running statistics never move), 1.0, or
                                     above 0.5 (a Keras momentum?)
dropout2d-3d-input          warning  Dropout2d got 3-D input (read as (N, C, L))
dropout-p                   info /   p = 0 (does nothing; not DropPath/DropBlock) /
                            warning  p >= 0.9 (almost everything dropped)
no-running-stats            warning  BatchNorm with track_running_stats=False in a model
                                     meant for deployment
=========================== ======== ==========================================================

How the data-flow rules see the graph: the example forward runs under a
``TorchFunctionMode`` that tags every tensor computed from a dropout layer's output with that
layer, through any torch operation (so ``x.flatten(1)``, ``x + y`` and ``F.relu`` keep the
tag); a normalization layer's output is clean again, and so is the output of torch's
normalization functions (``F.layer_norm``, ``F.group_norm``...), which normalization modules of
other libraries call. A hand-written normalization (mean and variance by hand) keeps the tag.
No tracing is needed, so models with Python control flow work. Alpha dropout, DropPath and
DropBlock are not tags: alpha dropout keeps the variance by design, and the other two are meant
for residual branches. ``dropout-output-unused`` watches each out-of-place dropout result (of a
dropout layer, or of a dropout function a module calls) for a torch operation that takes it,
or the model returning it; a layer that passes it on without any torch operation
(``nn.Identity``) passes the same tensor on, so its later use still counts.

The model is left exactly as it was: modes, buffers (running statistics), the global RNG state
and the generators layers own are restored, and the forward runs without gradients.

``normdrop lint module:factory [--input-shape 8,3,32,32]`` is the command line
(:mod:`normdrop.tools.lint.cli`); ``python -m normdrop.tools.lint`` runs it too.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from normdrop.errors import InputError
from normdrop.nn.norm_act import _BatchNormAct
from normdrop.tools._model import check_model
from normdrop.tools.mc_dropout import DROPOUT_LAYERS, is_dropout_layer
from normdrop.tools.rng import forked_rng

__all__ = ["SEVERITIES", "Finding", "lint"]

SEVERITIES = ("error", "warning", "info")

_BATCHNORM = torch.nn.modules.batchnorm._BatchNorm
# Layers whose output is normalized again in training and in evaluation alike.
_NORMALIZERS = (
    _BATCHNORM,
    torch.nn.modules.instancenorm._InstanceNorm,
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
    torch.nn.RMSNorm,
)
# The same, as functions (a module may normalize by calling them: ConvNeXt's LayerNorm2d).
_NORMALIZING_FUNCTIONS = frozenset(
    (
        torch.nn.functional.batch_norm,
        torch.nn.functional.instance_norm,
        torch.nn.functional.layer_norm,
        torch.nn.functional.group_norm,
        torch.nn.functional.rms_norm,
    )
)
_BIASED_LAYERS = (torch.nn.Linear, torch.nn.modules.conv._ConvNd)
_ALPHA = (torch.nn.AlphaDropout, torch.nn.FeatureAlphaDropout)
_F = torch.nn.functional
# Dropout functions a forward may call directly; the unit-wise ones tag their output as a
# dropout layer's output does. torch.nn.functional passes p and training by keyword to the
# mode; torch's own take (input, p, train) as the caller wrote them.
_TRAINING_BY_DEFAULT = frozenset((_F.dropout, _F.dropout1d, _F.dropout2d, _F.dropout3d))
_ATENS = frozenset(
    (torch.dropout, torch.feature_dropout, torch.alpha_dropout, torch.feature_alpha_dropout)
)
_UNIT_DROPOUT_FUNCTIONS = _TRAINING_BY_DEFAULT | {torch.dropout, torch.feature_dropout}
_DROPOUT_FUNCTIONS = _UNIT_DROPOUT_FUNCTIONS | _ATENS | {_F.alpha_dropout, _F.feature_alpha_dropout}


@dataclass(frozen=True)
class Finding:
    """One pitfall: ``severity`` in ("error", "warning", "info"), the ``rule`` name, the
    ``path`` of the module (``""`` is the model itself), ``message`` and ``fix``."""

    severity: str
    rule: str
    path: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.severity}: {self.path or '<model>'}: {self.message}\n  fix: {self.fix}"


# --------------------------------------------------------------------------------------------
# Rules that need no forward pass
# --------------------------------------------------------------------------------------------


def _static_findings(model: torch.nn.Module, deployment: bool) -> Iterator[Finding]:
    for path, module in model.named_modules():
        if isinstance(module, _BATCHNORM):
            yield from _batchnorm_config(path, module, model.training, deployment)
        if isinstance(module, DROPOUT_LAYERS):
            yield from _dropout_rate(path, module)
            if not model.training and module.training and module.p > 0:
                yield _dropout_training_in_eval(path, module)


def _batchnorm_config(
    path: str, bn: torch.nn.Module, model_training: bool, deployment: bool
) -> Iterator[Finding]:
    name = type(bn).__name__
    if not model_training and bn.training:
        yield Finding(
            "error",
            "batchnorm-training-in-eval",
            path,
            f"{name} is in training mode while the model is in eval mode: it normalizes each "
            "evaluation batch with that batch's own statistics and keeps overwriting its "
            "running statistics",
            "call model.eval() last, after anything that sets submodules to train mode; for "
            "Monte Carlo dropout use normdrop.tools.mc_dropout, which keeps BatchNorm in eval",
        )
    momentum = bn.momentum
    if momentum is not None and momentum == 0 and bn.track_running_stats:
        yield Finding(
            "warning",
            "batchnorm-momentum",
            path,
            f"{name}(momentum=0): the running statistics never move from their initial "
            "values (mean 0, variance 1), so evaluation normalizes with those instead of the "
            "data's statistics",
            "use PyTorch's default momentum=0.1, or momentum=None for a cumulative average",
        )
    elif momentum is not None and momentum == 1.0:
        yield Finding(
            "warning",
            "batchnorm-momentum",
            path,
            f"{name}(momentum=1.0): the running statistics are those of the last training "
            "batch alone",
            "use a small momentum such as PyTorch's default 0.1",
        )
    elif momentum is not None and momentum > 0.5:
        yield Finding(
            "warning",
            "batchnorm-momentum",
            path,
            f"{name}(momentum={momentum:g}): PyTorch's momentum weighs the NEW batch "
            "(running = (1 - momentum) * running + momentum * batch); this looks like a "
            "Keras/TensorFlow momentum, which weighs the old value",
            f"use momentum={1 - momentum:.3g} (1 minus the Keras value) or PyTorch's default 0.1",
        )
    if deployment and not bn.track_running_stats:
        yield Finding(
            "warning",
            "no-running-stats",
            path,
            f"{name}(track_running_stats=False) normalizes with the statistics of each "
            "inference batch: a prediction depends on the other samples in its batch, and a "
            "batch of one sample fails",
            "construct it with track_running_stats=True; the statistics can then be computed "
            "from training data with normdrop.tools.recalibrate_batchnorm",
        )


def _dropout_training_in_eval(path: str, module: torch.nn.Module) -> Finding:
    name = type(module).__name__
    return Finding(
        "warning",
        "dropout-training-in-eval",
        path,
        f"{name} is in training mode while the model is in eval mode: it keeps dropping "
        "values at evaluation, so predictions are random and scaled",
        "call model.eval() last, after anything that sets submodules to train mode; for "
        "Monte Carlo dropout on purpose use normdrop.tools.mc_dropout (which turns it on only "
        "inside its context)",
    )


def _dropout_rate(path: str, module: torch.nn.Module) -> Iterator[Finding]:
    from normdrop.nn.drop import DropBlock2d, DropPath

    p, name = module.p, type(module).__name__
    # Stochastic depth rates grow with depth from 0 (torchvision's EfficientNet/ConvNeXt
    # schedule): a DropPath(0) or DropBlock2d(0) in the first block is by design.
    if p == 0 and not isinstance(module, DropPath | DropBlock2d):
        yield Finding(
            "info",
            "dropout-p",
            path,
            f"{name}(p=0) does nothing",
            "remove it, or set the rate you meant",
        )
    elif p >= 0.9:
        yield Finding(
            "warning",
            "dropout-p",
            path,
            f"{name}(p={p:g}) drops {p:.0%} of its input in training and scales what is left "
            f"by {1 / (1 - p) if p < 1 else float('inf'):.3g}: the signal is mostly noise",
            "use p <= 0.5 (0.1 to 0.5 is usual); p is the probability of DROPPING, not keeping",
        )


# --------------------------------------------------------------------------------------------
# Rules seen while the example runs
# --------------------------------------------------------------------------------------------


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _dropout_call(func: Any, args: tuple, kwargs: dict) -> tuple[float, bool, bool]:
    """``(p, training, inplace)`` of a call to one of ``_DROPOUT_FUNCTIONS``."""
    if func in _ATENS:  # never in place: torch.dropout_ and the like are other functions
        named = dict(zip(("input", "p", "train"), args, strict=False)) | kwargs
        return float(named.get("p", 0.0)), bool(named.get("train", False)), False
    bound = inspect.signature(func).bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    return float(arguments["p"]), bool(arguments["training"]), bool(arguments["inplace"])


class _DropoutTags(TorchFunctionMode):
    """Tags each tensor with the dropout layers it was computed from, through any torch op;
    ``on_dropout(func, p, training)`` hears of each dropout function called and returns the
    tag for its output (an empty one: none)."""

    def __init__(self) -> None:
        super().__init__()
        self.on_dropout: Any = None
        self.tags: dict[int, frozenset[str]] = {}
        self._alive: list[Tensor] = []  # ids stay unique while the tensors live
        # Uses of watched tensors (a biased layer's outputs) by ops outside a BatchNorm call
        # (``paused`` counts the BatchNorm calls in progress).
        self.uses: dict[int, int] = {}
        self.paused = 0
        # Out-of-place dropout results not yet used by any op: id -> (module path, what)
        self.unused_dropouts: dict[int, tuple[str, str]] = {}

    def watch_dropout(self, output: Any, path: str, what: str) -> None:
        if isinstance(output, Tensor):
            self._alive.append(output)
            self.unused_dropouts[id(output)] = (path, what)

    def mark_used(self, value: Any) -> None:
        for tensor in _tensors(value):
            self.unused_dropouts.pop(id(tensor), None)

    def tag(self, tensor: Tensor, tags: frozenset[str]) -> None:
        self.tags[id(tensor)] = tags
        self._alive.append(tensor)

    def count_uses(self, value: Any) -> None:
        for tensor in _tensors(value):
            if id(tensor) in self.uses:
                self.uses[id(tensor)] += 1

    def of(self, value: Any) -> frozenset[str]:
        return frozenset().union(*(self.tags.get(id(t), frozenset()) for t in _tensors(value)))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused and self.uses:
            self.count_uses((args, kwargs))
        if self.unused_dropouts:
            self.mark_used((args, kwargs))
        output = func(*args, **kwargs)
        tags = frozenset() if func in _NORMALIZING_FUNCTIONS else self.of((args, kwargs))
        if func in _DROPOUT_FUNCTIONS and self.on_dropout is not None:
            p, training, in_place = _dropout_call(func, args, kwargs)
            own, caller = self.on_dropout(func, p, training)
            if isinstance(output, Tensor) and (own or caller is not None):
                if not training and args and output is args[0]:
                    output = output.view_as(output)  # returned its input: as for layers
                if caller is not None and not in_place:  # in place: nothing to assign
                    self.watch_dropout(output, caller, f"{func.__module__}.{func.__name__}")
                tags |= own
        if tags:
            for tensor in _tensors(output):
                self.tag(tensor, tags | self.tags.get(id(tensor), frozenset()))
        return output


class _Recorder:
    """Module hooks for the example forward: data-flow findings and the module stack."""

    def __init__(self, dropout_tags: _DropoutTags) -> None:
        self.dropout_tags = dropout_tags
        self.findings: list[Finding] = []
        self.stack: list[str] = []
        # id(output) -> (layer path, layer, output, the output's version when produced)
        self.producers: dict[int, tuple[str, torch.nn.Module, Tensor, int]] = {}
        # (BatchNorm path, its name, the producer): reported if nothing else used its output
        self.bias_candidates: list[tuple[str, str, tuple]] = []
        self.lent_statistics: list[torch.nn.Module] = []

    def install(self, model: torch.nn.Module) -> list[Any]:
        handles = []
        self.dropout_tags.on_dropout = self.dropout_called
        self.modules = dict(model.named_modules())
        for path, module in self.modules.items():
            handles.append(module.register_forward_pre_hook(functools.partial(self.pre, path)))
            handles.append(module.register_forward_hook(functools.partial(self.post, path)))
        return handles

    def pre(self, path: str, module: torch.nn.Module, args: tuple) -> None:
        self.stack.append(path)
        if isinstance(module, _BATCHNORM):
            self.dropout_tags.paused += 1
        x = args[0] if args and isinstance(args[0], Tensor) else None
        if x is None:
            return
        if isinstance(module, _BATCHNORM):
            self._check_batchnorm_input(path, module, x)
        if isinstance(module, torch.nn.Dropout2d) and x.dim() == 3:
            self.findings.append(
                Finding(
                    "warning",
                    "dropout2d-3d-input",
                    path,
                    f"Dropout2d got 3-D input of shape {tuple(x.shape)}: PyTorch reads it as "
                    "(N, C, L) and zeroes whole channels of 1-D sequences; an unbatched "
                    "(C, H, W) image is not treated as one",
                    "use Dropout1d for (N, C, L) input; add the batch dimension to (C, H, W) "
                    "images",
                )
            )

    def post(self, path: str, module: torch.nn.Module, args: tuple, output: Any) -> Any:
        self.stack.pop()
        if isinstance(module, _BATCHNORM):
            self.dropout_tags.paused -= 1
        dropout = isinstance(output, Tensor) and is_dropout_layer(module)
        if dropout and args and output is args[0]:
            # eval mode returns the input: a view of it stands for the layer's output, so that
            # the input's other users stay clean of its tag and its use
            output = output.view_as(output)
        if isinstance(output, Tensor) and isinstance(module, _NORMALIZERS):
            # a BatchNormAct with p > 0 normalizes, then drops out: its output is dropout's
            fused_dropout = isinstance(module, _BatchNormAct) and module.p > 0
            self.dropout_tags.tag(output, frozenset({path}) if fused_dropout else frozenset())
        elif isinstance(output, Tensor) and _is_unit_dropout(module):
            self.dropout_tags.tag(output, self.dropout_tags.of(args) | {path})
        elif isinstance(output, Tensor) and isinstance(module, _BIASED_LAYERS):
            self.producers[id(output)] = (path, module, output, output._version)
            self.dropout_tags.uses[id(output)] = 0
        if dropout and not getattr(module, "inplace", False):  # in place: nothing to assign
            self.dropout_tags.watch_dropout(output, path, type(module).__name__)
        return output

    def dropout_called(
        self, func: Any, p: float, training: bool
    ) -> tuple[frozenset[str], str | None]:
        """A dropout function called from a module's forward: ``functional-dropout-in-eval``
        if that module is in eval mode yet asked for training. Returns the tag of its output
        and the path of the module whose forward called it (None: not a module's own call,
        or p = 0), whose result :class:`_DropoutTags` watches for a use."""
        if not self.stack:
            return frozenset(), None
        path = self.stack[-1]
        module = self.modules[path]
        if is_dropout_layer(module):
            return frozenset(), None  # the layer's own call: its forward hook sees the output
        if p <= 0:
            return frozenset(), None
        name = f"{func.__module__}.{func.__name__}"
        if training and not module.training:
            default = (
                " (its training argument defaults to True)" if func in _TRAINING_BY_DEFAULT else ""
            )
            self.findings.append(
                Finding(
                    "warning",
                    "functional-dropout-in-eval",
                    path,
                    f"{type(module).__name__} is in eval mode but calls {name}(p={p:g}) with "
                    f"training=True{default}, so it keeps dropping values at evaluation",
                    "pass training=self.training, or use a dropout layer",
                )
            )
        unit = func in _UNIT_DROPOUT_FUNCTIONS
        return (frozenset({f"{path or '<model>'} ({name})"}) if unit else frozenset()), path

    def unused_dropout_findings(self) -> Iterator[Finding]:
        """``dropout-output-unused``: dropout results that no op took nor the model returned."""
        for path, what in self.dropout_tags.unused_dropouts.values():
            layer = is_dropout_layer(self.modules[path])
            whose = f"the output of {what}" if layer else f"the result of {what} in its forward"
            fix = (
                "use the layer's output (x = self.dropout(x)) or remove the layer"
                if layer
                else "assign the result (x = F.dropout(x, p, self.training)) or pass inplace=True"
            )
            yield Finding(
                "warning",
                "dropout-output-unused",
                path,
                f"{whose} is never used: dropout works out of place, so the values that go on "
                "were not dropped and this dropout does nothing",
                fix,
            )

    def _check_batchnorm_input(self, path: str, bn: torch.nn.Module, x: Tensor) -> None:
        name = type(bn).__name__
        sources = self.dropout_tags.of(x)
        if sources:
            self.findings.append(
                Finding(
                    "warning",
                    "dropout-before-batchnorm",
                    path,
                    f"{name} receives the output of dropout {_quoted(sources)} with no "
                    "normalization in between: dropout changes the variance of its output "
                    "between training and evaluation, so the running variance learned in "
                    "training does not fit at test time (variance shift, Li et al. 2019)",
                    "put dropout after the last BatchNorm (right before the output layer), or "
                    "remove it",
                )
            )
        producer = self.producers.get(id(x))
        if (
            producer is not None
            and producer[1].bias is not None
            and _aligned(producer[1], x)
            and x._version == producer[3]  # not changed in place since (ReLU(inplace=True))
        ):
            self.bias_candidates.append((path, name, producer))
        batch_statistics = bn.training or bn.running_mean is None
        if batch_statistics and x.shape[1] and x.numel() // x.shape[1] == 1:
            mode = "is in training mode" if bn.training else "has no running statistics"
            self.findings.append(
                Finding(
                    "error",
                    "batch-of-one",
                    path,
                    f"{name} {mode}, so it normalizes with batch statistics, and got input of "
                    f"shape {tuple(x.shape)}: one value per channel, whose variance is 0 "
                    "(PyTorch raises 'Expected more than 1 value per channel when training')",
                    "train with batches of 2 or more (DataLoader(drop_last=True) drops a last "
                    "batch of one), or call model.eval() for inference",
                )
            )
            self._run_in_eval(bn, x)

    def bias_findings(self) -> Iterator[Finding]:
        """``redundant-bias`` where the layer's output went to the BatchNorm only: a skip
        connection or any other use of it keeps the bias meaningful."""
        for path, name, (layer_path, layer, output, _) in self.bias_candidates:
            if self.dropout_tags.uses.get(id(output)):
                continue
            yield Finding(
                "info",
                "redundant-bias",
                path,
                f"{name} follows '{layer_path}' ({type(layer).__name__}), which has a bias: "
                "BatchNorm subtracts the per-channel mean, so that bias has no effect",
                f"construct '{layer_path}' with bias=False",
            )

    def _run_in_eval(self, bn: torch.nn.Module, x: Tensor) -> None:
        """Let the example run on past a batch of one; :func:`lint` undoes this."""
        bn.training = False
        if bn.running_mean is None:  # eval would still use batch statistics: lend some
            self.lent_statistics.append(bn)
            like = bn.weight if bn.weight is not None else x  # affine=False has no weight
            options = {"device": x.device, "dtype": like.dtype}
            bn.running_mean = torch.zeros(bn.num_features, **options)
            bn.running_var = torch.ones(bn.num_features, **options)


def _quoted(paths: frozenset[str]) -> str:
    return ", ".join(f"'{path}'" for path in sorted(paths))


def _is_unit_dropout(module: torch.nn.Module) -> bool:
    from normdrop.nn.drop import GaussianDropout

    unit = isinstance(module, torch.nn.modules.dropout._DropoutNd | GaussianDropout)
    return unit and not isinstance(module, _ALPHA) and module.p > 0


def _aligned(layer: torch.nn.Module, output: Tensor) -> bool:
    """Does BatchNorm's channel dim 1 hold the layer's output features?"""
    if isinstance(layer, torch.nn.Linear):
        return output.dim() == 2
    return True  # Conv outputs are (N, C_out, *)


# --------------------------------------------------------------------------------------------
# lint()
# --------------------------------------------------------------------------------------------


def _call(model: torch.nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, list | tuple):
        return model(*example_input)
    return model(example_input)


def _describe(example_input: Any) -> str:
    shapes = [tuple(t.shape) for t in _tensors(example_input)]
    return f"shape {shapes[0]}" if len(shapes) == 1 else f"shapes {shapes}"


@torch.no_grad()
def _run_example(model: torch.nn.Module, example_input: Any) -> list[Finding]:
    tags = _DropoutTags()
    recorder = _Recorder(tags)
    handles = recorder.install(model)
    try:
        with tags:
            output = _call(model, example_input)
        tags.count_uses(output)  # a layer output the model returns is used
        tags.mark_used(output)
    except Exception as error:
        where = recorder.stack[-1] if recorder.stack else ""
        failing = model.get_submodule(where) if where else model
        location = f" in module '{where}' ({type(failing).__name__})" if where else ""
        raise InputError(
            f"lint: the model does not run on the example input ({_describe(example_input)})"
            f"{location}: {type(error).__name__}: {error}"
        ) from error
    finally:
        for handle in handles:
            handle.remove()
        for bn in recorder.lent_statistics:
            bn.running_mean = bn.running_var = None
    return (
        recorder.findings
        + list(recorder.bias_findings())
        + list(recorder.unused_dropout_findings())
    )


def lint(model: torch.nn.Module, example_input: Any, *, deployment: bool = True) -> list[Finding]:
    """Check ``model`` for BatchNorm/Dropout pitfalls; see the module docstring for the rules.

    Args:
        model: checked in its current mode (``model.eval()`` first to check an evaluation
            setup); left unchanged.
        example_input: a tensor, a tuple/list of positional inputs, or a dict of keyword
            inputs, such that ``model(example_input)`` runs.
        deployment: the model is meant for deployment (enables ``no-running-stats``).

    Returns:
        Findings, errors first, then by module order; one per rule and module.

    Raises:
        InputError: the model fails on ``example_input`` (the message names the module).
    """
    check_model("lint", model)
    if not any(True for _ in _tensors(example_input)):
        raise InputError(
            "lint: example_input must be a tensor, or a tuple/list/dict holding tensors, got "
            f"{type(example_input).__name__}"
        )
    findings = list(_static_findings(model, deployment))
    modes = {m: m.training for m in model.modules()}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({t.device.index or 0 for t in _tensors(example_input) if t.is_cuda})
    try:
        with forked_rng(model, devices):
            findings += _run_example(model, example_input)
    finally:
        for module, training in modes.items():
            module.training = training
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return _ordered(model, findings)


def _ordered(model: torch.nn.Module, findings: list[Finding]) -> list[Finding]:
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    unique = {(f.rule, f.path): f for f in findings}
    return sorted(
        unique.values(),
        key=lambda f: (SEVERITIES.index(f.severity), order.get(f.path, len(order)), f.rule),
    )
