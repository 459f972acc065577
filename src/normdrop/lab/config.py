"""What an experiment is: its settings, its variants and seeds, and the identity of each run.

A run is one (settings, variant, seed) triple on one dataset. Its key is the SHA-256 of those,
after dropping what the variant does not use (a ``plain`` run does not depend on
``--dropout-p``), so a run is trained once and reused by every experiment that needs it, and
rerunning a command resumes instead of starting over.

Every field of :class:`TrainSettings` is the command-line option of the same name, with ``-``
for ``_`` (``dropout_p`` is ``--dropout-p``); :meth:`LabConfig.command` relies on it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from normdrop.backend import BACKENDS
from normdrop.errors import InputError

__all__ = ["OPTIMIZERS", "VARIANTS", "LabConfig", "RunSpec", "TrainSettings", "Variant"]

VARIANTS = ("plain", "bn", "dropout", "bn+dropout")
OPTIMIZERS = {"sgd": 0.01, "adam": 1e-3}  # name -> default learning rate
SELECTIONS = ("best", "last")
BN_TYPES = ("batchnorm", "ghost", "renorm")
# normdrop tune's search ranges: parameter -> (low, high)
TUNE_RANGES = {
    "dropout_p": (0.0, 0.7),
    "bn_momentum": (0.01, 0.5),
    "lr": (1e-3, 0.3),
    "weight_decay": (1e-6, 1e-2),
}


@dataclass(frozen=True)
class Variant:
    """Which of BatchNorm and Dropout a model has: plain, bn, dropout or bn+dropout."""

    batch_norm: bool
    dropout: bool

    @classmethod
    def parse(cls, text: str, option: str = "--variants") -> Variant:
        """``option`` is the one the error names: ``lab --variants``, ``tune --variant``."""
        parts = text.strip().lower().split("+")
        if parts == ["plain"]:
            return cls(False, False)
        if not parts or not set(parts) <= {"bn", "dropout"} or len(set(parts)) != len(parts):
            raise InputError(f"{option}: unknown variant {text!r}; expected one of {VARIANTS}")
        return cls("bn" in parts, "dropout" in parts)

    @property
    def name(self) -> str:
        return (
            "+".join(n for n, on in (("bn", self.batch_norm), ("dropout", self.dropout)) if on)
            or "plain"
        )


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise InputError(message)


# Seeds the lab takes: numpy's generators accept [0, 2^32).
SEED_LIMIT = 2**32


def check_seed(option: str, value: int) -> None:
    """``option`` (``--split-seed``, ``--data seed: option seed``...) is a seed the lab takes."""
    _require(0 <= value < SEED_LIMIT, f"{option} must be an integer in [0, 2^32), got {value}")


def check_step_settings(batch_size: int, lr: float, momentum: float) -> None:
    """The settings every training step needs (``lab``, ``tune``, ``seed``): batches of at
    least 2 (BatchNorm skips a batch of one: with 1 nothing would train), a positive learning
    rate, momentum in [0, 1)."""
    _require(batch_size >= 2, f"--batch-size must be >= 2, got {batch_size}")
    _require(_finite(lr) and lr > 0, f"--lr must be a positive finite number, got {lr}")
    _require(0 <= momentum < 1, f"--momentum must be in [0, 1), got {momentum}")


def check_path_options(**paths: str | None) -> None:
    """Options naming a folder (``out="runs"`` is ``--out``) must not be empty strings: an empty
    path is the working folder to ``Path``, and "not given" to ``if value:``, so either way
    the user's option would be silently replaced. None is "not given"."""
    for name, value in paths.items():
        option = f"--{name.replace('_', '-')}"
        _require(value is None or str(value) != "", f"{option} must name a folder, got ''")


# What the lab keeps in --out beside the experiments' folders (SQLite adds NAME-wal, NAME-shm).
RUN_DB, STUDY_DB, CHECKPOINTS = "normdrop.db", "optuna.db", "checkpoints"


def check_name(name: str | None) -> None:
    """``--name`` (None: derived from the settings) becomes a folder in ``--out``."""
    if name is None:
        return
    _require(
        re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name) is not None,
        f"--name must be letters, digits, '.', '_' or '-' (a directory name), got {name!r}",
    )
    files = (RUN_DB, STUDY_DB, CHECKPOINTS)
    _require(
        name not in files and not name.startswith((f"{RUN_DB}-", f"{STUDY_DB}-")),
        f"--name {name}: taken by the lab's own files in --out ({', '.join(files)})",
    )


def check_report_folder(out: str, name: str, ours: bool) -> None:
    """``out/name`` receives a report and plots: a folder there that holds files must be one
    the lab wrote (``ours``: the run database or the study database knows ``name``), or its
    files would be overwritten."""
    folder = Path(out) / name
    if ours or not folder.is_dir() or not any(folder.iterdir()):
        return
    raise InputError(
        f"{folder}: this folder holds files, and no experiment or study of the name {name!r} "
        f"is recorded in {out}, so they are not the lab's: its report and plots would "
        "overwrite them. Choose another --name, or move the folder"
    )


def check_out_folder(out: str) -> None:
    """``--out`` is a folder (created if missing), not a file; its ``checkpoints`` too."""
    _require(not Path(out).is_file(), f"--out {out}: is a file; --out must name a folder")
    checkpoints = Path(out) / CHECKPOINTS
    _require(
        not checkpoints.exists() or checkpoints.is_dir(),
        f"--out {out}: {checkpoints} is not a folder; the lab keeps its runs' checkpoints there "
        "(move that file, or choose another --out)",
    )


def _finite(value: float) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides what one run computes, except the variant and the seed."""

    data: str = "digits"
    target: str | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    split_seed: int = 0
    model: str = "mlp:2x512"
    epochs: int = 30
    batch_size: int = 64
    optimizer: str = "sgd"
    lr: float | None = None  # None: the optimizer's default in OPTIMIZERS
    momentum: float = 0.9
    weight_decay: float = 0.0
    dropout_p: float = 0.5
    bn_momentum: float = 0.1
    bn_type: str = "batchnorm"
    virtual_batch_size: int | None = None
    patience: int = 0  # early stopping after this many epochs without progress; 0: off
    select: str = "best"  # report the model of the best validation epoch, or of the last one
    backend: str = "fast"  # normdrop's kernels or its reference math (normdrop.set_backend)

    def __post_init__(self) -> None:
        from normdrop.lab.models import parse_model_spec

        _require(self.target != "", "--target must name a column (CSV, Parquet) or array (NPZ)")
        _require(self.epochs >= 1, f"--epochs must be a positive integer, got {self.epochs}")
        check_seed("--split-seed", self.split_seed)
        _require(
            self.optimizer in OPTIMIZERS,
            f"--optimizer must be one of {tuple(OPTIMIZERS)}, got {self.optimizer!r}",
        )
        if self.lr is None:
            object.__setattr__(self, "lr", OPTIMIZERS[self.optimizer])
        check_step_settings(self.batch_size, self.lr, self.momentum)
        _require(
            _finite(self.weight_decay) and self.weight_decay >= 0,
            f"--weight-decay must be >= 0, got {self.weight_decay}",
        )
        _require(0 <= self.dropout_p < 1, f"--dropout-p must be in [0, 1), got {self.dropout_p}")
        _require(
            0 < self.bn_momentum <= 1, f"--bn-momentum must be in (0, 1], got {self.bn_momentum}"
        )
        _require(
            self.bn_type in BN_TYPES, f"--bn-type must be one of {BN_TYPES}, got {self.bn_type!r}"
        )
        if self.virtual_batch_size is not None:
            _require(self.bn_type == "ghost", "--virtual-batch-size applies to --bn-type ghost")
            _require(self.virtual_batch_size >= 2, "--virtual-batch-size must be >= 2")
        if self.bn_type == "ghost":
            self._check_ghost_batches()
        _require(self.patience >= 0, f"--patience must be >= 0, got {self.patience}")
        _require(self.select in SELECTIONS, f"--select must be one of {SELECTIONS}")
        _require(self.backend in BACKENDS, f"--backend must be one of {BACKENDS}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            _require(0 < value < 1, f"--{name.replace('_', '-')} must be in (0, 1), got {value}")
        parse_model_spec(self.model)

    def _check_ghost_batches(self) -> None:
        """Ghost batch norm normalizes whole virtual batches: they must tile a batch exactly (a
        last, smaller batch of an epoch drops its remainder, see ``train._train_epoch``)."""
        from normdrop.nn.ghost_batchnorm import DEFAULT_VIRTUAL_BATCH_SIZE

        given = self.virtual_batch_size is not None
        virtual = self.virtual_batch_size if given else DEFAULT_VIRTUAL_BATCH_SIZE
        source = "" if given else " (the default; set it with --virtual-batch-size)"
        _require(
            self.batch_size % virtual == 0,
            f"--batch-size {self.batch_size} must be a multiple of the virtual batch size "
            f"{virtual}{source}: ghost batch norm normalizes whole virtual batches",
        )

    def replace(self, **changes) -> TrainSettings:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class RunSpec:
    """One run: settings, variant, seed, and the fingerprint of the data it trains on."""

    settings: TrainSettings
    variant: str
    seed: int
    data_fingerprint: str

    def to_dict(self) -> dict:
        return {
            **dataclasses.asdict(self.settings),
            "variant": self.variant,
            "seed": self.seed,
            "data_fingerprint": self.data_fingerprint,
        }

    @classmethod
    def from_dict(cls, values: dict) -> RunSpec:
        values = dict(values)
        own = {name: values.pop(name) for name in ("variant", "seed", "data_fingerprint")}
        return cls(TrainSettings(**values), **own)

    def key(self) -> str:
        """SHA-256 of what the run computes; settings the variant does not use are left out."""
        values = self.to_dict()
        variant = Variant.parse(self.variant)
        values["variant"] = variant.name
        if not variant.batch_norm:
            values.update(bn_momentum=None, bn_type=None, virtual_batch_size=None)
        if not variant.dropout:
            values["dropout_p"] = None
        text = json.dumps(values, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def slug(text: str) -> str:
    text = Path(text).stem if "/" in text or "." in text else text
    return re.sub(r"[^A-Za-z0-9]+", "", text.replace(":", "-").split(",")[0]) or "data"


@dataclass(frozen=True)
class LabConfig:
    """One ``normdrop lab`` invocation: settings, variants and seeds, and where results go."""

    settings: TrainSettings = field(default_factory=TrainSettings)
    variants: tuple[str, ...] = VARIANTS
    seeds: int = 5
    out: str = "runs"
    name: str | None = None
    workers: int | None = None  # None: decided by measurement (see experiment.py)
    cache_dir: str | None = None
    tensorboard: str | None = None

    def __post_init__(self) -> None:
        _require(self.seeds >= 1, f"--seeds must be a positive integer, got {self.seeds}")
        _require(len(self.variants) >= 1, "--variants: give at least one variant")
        names = tuple(Variant.parse(v).name for v in self.variants)
        _require(len(set(names)) == len(names), f"--variants: a variant is repeated in {names}")
        object.__setattr__(self, "variants", names)
        _require(self.workers is None or self.workers >= 1, "--workers must be >= 1")
        check_path_options(out=self.out, cache_dir=self.cache_dir, tensorboard=self.tensorboard)
        check_out_folder(self.out)
        check_name(self.name)

    @property
    def db_path(self) -> Path:
        return Path(self.out) / RUN_DB

    def run_specs(self, data_fingerprint: str) -> list[RunSpec]:
        return [
            RunSpec(self.settings, variant, seed, data_fingerprint)
            for variant in self.variants
            for seed in range(self.seeds)
        ]

    def experiment_name(self, data_fingerprint: str) -> str:
        """``--name``, or ``<data>-<model>-<hash of everything that shapes the results>``."""
        if self.name:
            return self.name
        identity = json.dumps(
            [dataclasses.asdict(self.settings), self.variants, self.seeds, data_fingerprint],
            sort_keys=True,
        )
        digest = hashlib.sha256(identity.encode()).hexdigest()[:8]
        return f"{slug(self.settings.data)}-{slug(self.settings.model)}-{digest}"

    def to_dict(self) -> dict:
        return {
            "settings": dataclasses.asdict(self.settings),
            "variants": list(self.variants),
            "seeds": self.seeds,
        }

    def command(self) -> str:
        """The ``normdrop lab`` command that reproduces these results, every option explicit."""
        argv = ["normdrop", "lab"]
        defaults_off = {"target": None, "virtual_batch_size": None}
        for name, value in dataclasses.asdict(self.settings).items():
            if name in defaults_off and value is None:
                continue
            argv += [f"--{name.replace('_', '-')}", str(value)]
        argv += ["--variants", ",".join(self.variants), "--seeds", str(self.seeds)]
        argv += ["--out", self.out]
        if self.name:
            argv += ["--name", self.name]
        return shlex.join(argv)
