"""IDX and CIFAR-10 parsers on small files written here in the published formats."""

import gzip
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from normdrop.errors import InputError
from normdrop.lab.formats import read_cifar10, read_idx

_CODES = {">u1": 0x08, ">i1": 0x09, ">i2": 0x0B, ">i4": 0x0C, ">f4": 0x0D, ">f8": 0x0E}


def idx_bytes(array: np.ndarray, dtype: str) -> bytes:
    """An IDX file as LeCun specifies it: zero, zero, type code, ndim, big-endian sizes, data."""
    header = bytes([0, 0, _CODES[dtype], array.ndim])
    sizes = np.asarray(array.shape, ">u4").tobytes()
    return header + sizes + array.astype(dtype).tobytes()


@given(
    st.sampled_from(sorted(_CODES)),
    hnp.array_shapes(min_dims=1, max_dims=4, max_side=6),
    st.booleans(),
    st.data(),
)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_idx_round_trip(tmp_path, dtype, shape, compressed, data):
    native = np.dtype(dtype).newbyteorder("=")
    elements = (
        st.floats(-1e3, 1e3, width=32) if native.kind == "f" else st.integers(*_bounds(native))
    )
    array = data.draw(hnp.arrays(native, shape, elements=elements))
    raw = idx_bytes(array, dtype)
    path = tmp_path / ("a.idx.gz" if compressed else "a.idx")
    path.write_bytes(gzip.compress(raw) if compressed else raw)
    read = read_idx(path)
    assert read.shape == array.shape and read.dtype == native
    np.testing.assert_array_equal(read, array)


def _bounds(dtype):
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def test_idx_flaws(tmp_path):
    images = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    good = idx_bytes(images, ">u1")
    cases = {
        "truncated": (good[:-1], r"shape \(2, 3, 3\) \(18 bytes of data\), but the file holds 17"),
        "long": (good + b"\x00", "holds 19 bytes"),
        "magic": (b"\x01\x02" + good[2:], "not an IDX file"),
        "dtype": (b"\x00\x00\x07" + good[3:], "not an IDX file"),
        "header": (good[:6], "truncated"),
        "gzip": (b"\x1f\x8b" + b"garbage", "corrupt gzip"),
    }
    for name, (raw, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(raw)
        with pytest.raises(InputError, match=message) as raised:
            read_idx(path)
        assert name in str(raised.value)


def write_cifar(path, batch_size: int = 4, seed: int = 0, members=None):
    """A cifar-10-python.tar.gz in the published layout with ``batch_size`` images per batch."""
    rng = np.random.default_rng(seed)
    expected = {}
    with tarfile.open(path, "w:gz") as archive:
        for member in members or [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
            data = rng.integers(0, 256, (batch_size, 3072), dtype=np.uint8)
            labels = rng.integers(0, 10, batch_size).tolist()
            expected[member] = (data, labels)
            raw = pickle.dumps(
                {b"batch_label": member.encode(), b"labels": labels, b"data": data}, protocol=2
            )
            info = tarfile.TarInfo(f"cifar-10-batches-py/{member}")
            info.size = len(raw)
            archive.addfile(info, io.BytesIO(raw))
    return expected


def test_cifar_batches_are_read_in_order(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    expected = write_cifar(path)
    train_x, train_y, test_x, test_y = read_cifar10(path)
    assert train_x.shape == (20, 3, 32, 32) and test_x.shape == (4, 3, 32, 32)
    batches = [expected[f"data_batch_{i}"] for i in range(1, 6)]
    np.testing.assert_array_equal(train_x.reshape(20, -1), np.concatenate([d for d, _ in batches]))
    assert train_y.tolist() == [label for _, labels in batches for label in labels]
    # Channel planes: the first 1024 values are the red plane, row by row.
    np.testing.assert_array_equal(test_x[1, 0], expected["test_batch"][0][1, :1024].reshape(32, 32))
    assert test_y.tolist() == expected["test_batch"][1]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_pickles_cannot_run_code(tmp_path):
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        raw = pickle.dumps({b"data": _Exploit(), b"labels": []}, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(raw)
        archive.addfile(info, io.BytesIO(raw))
    with pytest.raises(InputError, match=r"refusing to load (posix|os)\.system"):
        read_cifar10(path)


def test_cifar_flaws(tmp_path):
    missing = tmp_path / "missing.tar.gz"
    write_cifar(missing, members=["data_batch_1"])
    with pytest.raises(InputError, match="no member cifar-10-batches-py/data_batch_2"):
        read_cifar10(missing)
    not_tar = tmp_path / "plain.tar.gz"
    not_tar.write_bytes(b"not a tar")
    with pytest.raises(InputError, match="not a readable tar archive"):
        read_cifar10(not_tar)
    wrong = tmp_path / "wrong.tar.gz"
    with tarfile.open(wrong, "w:gz") as archive:
        raw = pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2)
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(raw)
        archive.addfile(info, io.BytesIO(raw))
    with pytest.raises(InputError, match=r"data_batch_1: data must be uint8 of shape \(n, 3072\)"):
        read_cifar10(wrong)
