"""The user's own CSV, NPZ and Parquet files: read exactly, and every flaw named precisely."""

import builtins
import io
import struct
import warnings
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from normdrop.errors import InputError
from normdrop.lab.data import load_dataset
from normdrop.lab.userdata import encode_labels, read_user_file


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@given(
    hnp.arrays(
        np.float32,
        st.tuples(st.integers(2, 20), st.integers(1, 5)),
        elements=st.floats(-1e6, 1e6, width=32),
    ),
    st.data(),
)
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_csv_round_trip_is_exact(tmp_path, features, data):
    labels = data.draw(
        st.lists(
            st.sampled_from(["cat", "dog", "emu"]), min_size=len(features), max_size=len(features)
        )
    )
    if len(set(labels)) < 2:
        labels[:2] = ["cat", "dog"]
    columns = [f"f{j}" for j in range(features.shape[1])]
    lines = [",".join([*columns[:1], "label", *columns[1:]])]
    for row, label in zip(features, labels, strict=True):
        cells = [repr(float(v)) for v in row]
        lines.append(",".join([*cells[:1], label, *cells[1:]]))
    path = _write(tmp_path, "data.csv", "\n".join(lines) + "\n")
    read, encoded, classes = read_user_file(path, "label")
    np.testing.assert_array_equal(read, features)
    assert list(classes) == sorted(set(labels))
    assert [classes[i] for i in encoded] == labels


def test_csv_integer_labels_sort_numerically(tmp_path):
    path = _write(tmp_path, "d.csv", "x,y\n1,10\n2,9\n3,10\n4,2\n")
    _, labels, classes = read_user_file(path, "y")
    assert classes == ("2", "9", "10")
    assert labels.tolist() == [2, 1, 2, 0]


@pytest.mark.parametrize(
    ("text", "target", "message"),
    [
        ("", "y", "empty file"),
        ("a,y\n", "y", "a header but no data lines"),
        ("a,b\n1,2\n", "y", r"no column 'y' for --target \(columns: 'a', 'b'\)"),
        ("a,b\n1,2\n", None, "pass --target COLUMN"),
        ("a,y\n1,0\n2\n", "y", "line 3: 1 fields, but the header has 2"),
        ("a,y\n1,0\nabc,1\n", "y", r"line 3, column 'a': 'abc' is not a number"),
        ("a,y\n1,0\n,1\n", "y", "line 3, column 'a': empty value"),
        ("a,y\n1,0\nnan,1\n", "y", "line 3, column 'a': nan is not a finite number"),
        ("a,b,y\n1,2,0\n1,inf,1\n", "y", "line 3, column 'b': inf is not a finite number"),
        ("a,y\n1,0\n2,\n", "y", "line 3, column 'y': empty label"),
        ("a,y\n1,0\n2,0\n", "y", "a single class"),
        ("a,y\n1,0.5\n2,1\n", "y", "non-integer numbers"),
        ("a,a,y\n1,2,0\n", "y", "column 'a' appears twice"),
        ("y\n1\n2\n", "y", "no feature columns"),
        # Python's float() reads these; no other tool writes them as numbers
        ("a,y\n1,0\n1_000,1\n", "y", r"line 3, column 'a': '1_000' is not a number \(expected"),
        ("a,y\n1,0\n\uff11,1\n", "y", "line 3, column 'a': '\uff11' is not a number"),
        ("a,y\n1,0\n-Infinity,1\n", "y", "line 3, column 'a': -Infinity is not a finite number"),
    ],
)
def test_csv_flaws_are_named(tmp_path, text, target, message):
    path = _write(tmp_path, "bad.csv", text)
    with pytest.raises(InputError, match=message) as raised:
        read_user_file(path, target)
    assert "bad.csv" in str(raised.value)


def test_csv_blank_lines_are_skipped_and_line_numbers_stay_true(tmp_path):
    path = _write(tmp_path, "d.csv", "a,y\n1,0\n\n2,1\nx,1\n")
    with pytest.raises(InputError, match="line 5"):
        read_user_file(path, "y")


def test_binary_file_is_not_csv(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b"\xff\xfe\x00\x81binary")
    with pytest.raises(InputError, match="not a UTF-8 text CSV"):
        read_user_file(path, "y")


def test_npz_images_and_labels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(12, 1, 5, 5))
    labels = np.array(["a", "b", "c"] * 4)
    np.savez(tmp_path / "d.npz", X=images, y=labels)
    dataset = load_dataset(str(tmp_path / "d.npz"))
    assert dataset.features.shape == (12, 1, 5, 5)
    np.testing.assert_array_equal(dataset.features, images.astype(np.float32))
    assert dataset.classes == ("a", "b", "c")
    np.savez(tmp_path / "e.npz", X=images[:, 0], labels=np.arange(12) % 2)
    _, encoded, _ = read_user_file(tmp_path / "e.npz", "labels")
    assert encoded.tolist() == [0, 1] * 6


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"X": np.zeros((4, 2))}, r"no array 'y' \(arrays: X\)"),
        ({"X": np.zeros(4), "y": np.arange(4) % 2}, "shape \\(samples, features"),
        ({"X": np.zeros((4, 0)), "y": np.arange(4) % 2}, "at least one feature, got \\(4, 0\\)"),
        ({"X": np.zeros((4, 2)), "y": np.arange(3) % 2}, r"y must have shape \(4,\)"),
        ({"X": np.array([["a", "b"]] * 4), "y": np.arange(4) % 2}, "features must be numbers"),
        (
            {"X": np.array([[0, 1], [2, np.nan], [0, 0], [1, 1]]), "y": np.arange(4) % 2},
            r"X\[1, 1\] is nan \(sample 1\)",
        ),
        ({"X": np.zeros((4, 2)), "y": np.array([0, 1, np.nan, 1])}, r"y\[2\] is nan"),
        (
            {"X": np.zeros((4, 2)), "y": np.array([1, 2, "x", None], dtype=object)},
            "Python objects|pickle",
        ),
    ],
)
def test_npz_flaws_are_named(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError, match=message):
        read_user_file(path, None)


def test_corrupt_npz(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputError, match=r"not a valid \.npz"):
        read_user_file(path, None)
    path.write_bytes(bytes(range(256)) * 4)  # numpy would call it pickled data
    with pytest.raises(InputError, match=r"not a valid \.npz file \(not a zip of \.npy arrays\)$"):
        read_user_file(path, None)


def _npy(array) -> bytes:
    stream = io.BytesIO()
    np.save(stream, array)
    return stream.getvalue()


def test_damaged_npz_members_are_named_not_a_traceback(tmp_path):
    X, y = np.arange(40, dtype=np.float32).reshape(10, 4), np.arange(10) % 2
    path = tmp_path / "bad.npz"
    np.savez(path, X=X, y=y)  # stored: X's data is in the file as is
    data = bytearray(path.read_bytes())
    data[data.index(_npy(X)) + len(_npy(X)) - 1] ^= 0xFF  # X's last value
    path.write_bytes(bytes(data))
    with pytest.raises(
        InputError, match=r"bad\.npz: not a valid \.npz file \(array 'X' is damaged: Bad CRC-32"
    ):
        read_user_file(path, None)  # was zipfile.BadZipFile
    with zipfile.ZipFile(path, "w") as archive:  # numpy hands back a non-.npy member as bytes
        archive.writestr("X.npy", b"garbage" * 10)
        archive.writestr("y.npy", _npy(y))
    with pytest.raises(InputError, match=r"array 'X' is damaged: not a \.npy array\)$"):
        read_user_file(path, None)  # was AttributeError: 'bytes' object has no attribute 'dtype'
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("X.npy", _npy(X)[:-8])
        archive.writestr("y.npy", _npy(y))
    with pytest.raises(
        InputError, match=r"array 'X' is damaged: EOF.*expected 160 bytes got 152\)$"
    ):
        read_user_file(path, None)


def test_damaged_compressed_npz_is_named_wherever_the_damage_is(tmp_path):
    # A flipped byte in deflate data: zipfile's BadZipFile or zlib.error, or a short member.
    X = np.random.default_rng(0).normal(size=(10, 4))
    good = tmp_path / "good.npz"
    np.savez_compressed(good, X=X, y=np.arange(10) % 2)
    with zipfile.ZipFile(good) as archive:
        info = archive.getinfo("X.npy")
    header = good.read_bytes()[info.header_offset : info.header_offset + 30]
    name_size, extra_size = struct.unpack("<HH", header[26:30])  # the local header's own
    start = info.header_offset + 30 + name_size + extra_size
    path = tmp_path / "bad.npz"
    for offset in range(start, start + info.compress_size):
        data = bytearray(good.read_bytes())
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(InputError, match=r"not a valid \.npz file \(array 'X' is damaged: "):
            read_user_file(path, None)


def test_npz_byte_string_labels_are_text(tmp_path):
    path = tmp_path / "bytes.npz"
    np.savez(path, X=np.zeros((4, 2)), y=np.array([b"cat", b"dog", b"cat", b"dog"]))
    _, labels, classes = read_user_file(path, None)
    assert classes == ("cat", "dog")  # was ("b'cat'", "b'dog'")
    assert labels.tolist() == [0, 1, 0, 1]
    np.savez(path, X=np.zeros((4, 2)), y=np.array([b"2", b"10", b"2", b"10"]))
    assert read_user_file(path, None)[2] == ("2", "10")  # numbers, as in a CSV
    np.savez(path, X=np.zeros((4, 2)), y=np.array([b"\xff", b"a", b"a", b"b"]))
    with pytest.raises(InputError, match=r"label b'\\xff' is not UTF-8 text"):
        read_user_file(path, None)


def test_labels_in_python_only_spellings_are_names():
    # "1_000" is not the number 1000 (nor is it for the features): a name, kept as written
    labels, classes = encode_labels(["1_000", "2", "1000"], "w")
    assert classes == ("1000", "1_000", "2") and labels.tolist() == [1, 2, 0]


def test_a_float16_npz_reads_without_numpy_warnings(tmp_path):
    path = tmp_path / "half.npz"
    X = np.arange(24, dtype=np.float16).reshape(6, 4)
    np.savez(path, X=X, y=np.array([0, 1, 0, 1, 0, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was: overflow encountered in cast (float32 max)
        features, _, _ = read_user_file(path, None)
    assert np.array_equal(features, X.astype(np.float32))


def test_parquet_reads_and_names_flaws(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="parquet is an optional extra (pyarrow)")
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(
        pa.table({"a": [1.5, 2.5, 3.5, 4.5], "b": [1, 2, 3, 4], "y": ["u", "v"] * 2}), good
    )
    features, labels, classes = read_user_file(good, "y")
    np.testing.assert_array_equal(features, [[1.5, 1], [2.5, 2], [3.5, 3], [4.5, 4]])
    assert classes == ("u", "v") and labels.tolist() == [0, 1, 0, 1]
    cases = [
        ({"a": [1.0, None, 3.0], "y": [0, 1, 0]}, "row 2, column 'a': missing value"),
        ({"a": [1.0, float("nan"), 3.0], "y": [0, 1, 0]}, "row 2, column 'a': nan"),
        ({"a": ["x", "y", "z"], "y": [0, 1, 0]}, "column 'a': type string is not numeric"),
        ({"a": [1.0, 2.0, 3.0], "y": [0, None, 1]}, "row 2, column 'y': missing value"),
        ({"a": [1.0, 2.0, 3.0], "z": [0, 1, 0]}, "no column 'y'"),
    ]
    for i, (columns, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.parquet"
        pq.write_table(pa.table(columns), path)
        with pytest.raises(InputError, match=message):
            read_user_file(path, "y")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 nonsense")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        read_user_file(corrupt, "y")


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(InputError, match=r"pip install 'normdrop\[parquet\]'"):
        read_user_file(path, "y")


def test_unknown_suffix(tmp_path):
    path = _write(tmp_path, "d.txt", "a,y\n1,0\n")
    with pytest.raises(InputError, match="unknown file type"):
        read_user_file(path, "y")


def test_encode_labels_mixed_numbers_and_names_are_names():
    labels, classes = encode_labels(["10", "x", "9"], "somewhere")
    assert classes == ("10", "9", "x") and labels.tolist() == [0, 2, 1]


BIG = 2**53  # float64 cannot tell BIG + 1 from BIG


def test_integer_labels_beyond_2_to_the_53_stay_distinct_classes(tmp_path):
    ids = [BIG + 1, BIG, 2**63 - 1, BIG]

    def check(path, target):
        _, labels, classes = read_user_file(path, target)
        assert classes == (str(BIG), str(BIG + 1), str(2**63 - 1)), path
        assert labels.tolist() == [1, 0, 2, 0], path

    text = "x,y\n" + "".join(f"{i},{y}\n" for i, y in enumerate(ids))
    check(_write(tmp_path, "d.csv", text), "y")
    np.savez(tmp_path / "d.npz", X=np.zeros((4, 2)), y=np.array(ids, np.int64))
    check(tmp_path / "d.npz", None)
    pa = pytest.importorskip("pyarrow", reason="parquet is an optional extra (pyarrow)")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": [0.0] * 4, "y": pa.array(ids, pa.int64())}), tmp_path / "d.pq")
    check(tmp_path / "d.pq", "y")


def test_whole_numbers_in_any_spelling_are_one_class_and_read_exactly():
    labels, classes = encode_labels(["1", "1.0", "2e0", " 3 ", f"{BIG + 1}.0", str(BIG)], "w")
    assert classes == ("1", "2", "3", str(BIG), str(BIG + 1))
    assert labels.tolist() == [0, 0, 1, 2, 4, 3]
    labels, classes = encode_labels(np.array([2.0, 1.0, 2.0], np.float32), "w")
    assert classes == ("1", "2") and labels.tolist() == [1, 0, 1]
    with pytest.raises(InputError, match=f"w: holds non-integer numbers \\(e.g. '{BIG}.5'\\)"):
        encode_labels([f"{BIG}.5", "1"], "w")  # float64 would read it as whole


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"X": np.ones((4, 2)) + 1j, "y": np.arange(4) % 2}, "array X has complex dtype"),
        ({"X": np.ones((4, 2)), "y": np.arange(4) % 2 + 0j}, "array y has complex dtype"),
    ],
)
def test_complex_npz_arrays_are_refused(tmp_path, arrays, message):
    # numpy's cast would drop the imaginary part with only a ComplexWarning
    path = tmp_path / "complex.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputError, match=f"{path}: {message}.*real numbers"):
        read_user_file(path, None)


def test_npz_value_beyond_float32_is_named_not_called_inf(tmp_path):
    features = np.zeros((4, 2))
    features[2, 1] = -1e300  # finite in float64, infinity after the float32 cast
    path = tmp_path / "huge.npz"
    np.savez(path, X=features, y=np.arange(4) % 2)
    with pytest.raises(InputError, match=rf"{path}: X\[2, 1\] is -1e\+300 .*too large for float32"):
        read_user_file(path, None)


def test_csv_and_parquet_values_beyond_float32_are_refused(tmp_path):
    # Both were accepted and became inf: NaN losses, exit 0.
    path = _write(tmp_path, "huge.csv", "a,y\n1,0\n1e39,1\n2,0\n")
    with pytest.raises(InputError, match=r"line 3, column 'a': 1e39 is too large for float32"):
        read_user_file(path, "y")
    pa = pytest.importorskip("pyarrow", reason="parquet is an optional extra (pyarrow)")
    import pyarrow.parquet as pq

    path = tmp_path / "huge.parquet"
    pq.write_table(pa.table({"a": [1.0, 2.0, 1e300], "y": [0, 1, 0]}), path)
    with pytest.raises(InputError, match=r"row 3, column 'a': 1e\+300 is too large for float32"):
        read_user_file(path, "y")


def test_a_3d_npz_x_is_one_channel_images_for_cnn_small(tmp_path):
    from normdrop.lab.config import Variant
    from normdrop.lab.models import build_model

    images = np.random.default_rng(0).normal(size=(6, 8, 8))
    np.savez(tmp_path / "gray.npz", X=images, y=np.arange(6) % 2)
    dataset = load_dataset(str(tmp_path / "gray.npz"))
    assert dataset.sample_shape == (1, 8, 8)  # docs/lab.md: 3-D X is one-channel images
    np.testing.assert_array_equal(dataset.features[:, 0], images.astype(np.float32))
    model = build_model("cnn:small", Variant(True, False), dataset.sample_shape, 1)
    assert model(torch.from_numpy(dataset.features)).shape == (6, 1)
