"""Parsers for the published formats of MNIST, Fashion-MNIST (IDX) and CIFAR-10 (pickle batches).

IDX (LeCun et al.): two zero bytes, a type code, the number of dimensions ``d``, then ``d``
big-endian uint32 sizes, then the values in C order, big-endian. Files may be gzip-compressed.

CIFAR-10, python version: a ``.tar.gz`` holding ``cifar-10-batches-py/data_batch_1..5`` and
``test_batch``, each a pickled dict with ``b"data"`` (uint8, 10000 x 3072: the red, green and
blue 32 x 32 planes of each image) and ``b"labels"`` (10000 ints in 0..9). Pickles can run
arbitrary code, so ours are read by an unpickler that only rebuilds numpy arrays.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from normdrop.errors import InputError

__all__ = ["read_cifar10", "read_idx"]

# IDX type code -> big-endian numpy dtype.
_IDX_TYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: Path | str) -> np.ndarray:
    """The array stored in an IDX file (``.gz`` or raw), in native byte order.

    Raises:
        InputError: the header is not IDX, or the data are shorter or longer than it says.
    """
    raw = Path(path).read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise InputError(f"{path}: corrupt gzip stream ({error})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise InputError(
            f"{path}: not an IDX file (expected 0x00 0x00 <type code> <ndim>, got {raw[:4].hex()})"
        )
    dtype, ndim = _IDX_TYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise InputError(f"{path}: IDX header declares {ndim} dimensions but is truncated")
    shape = tuple(int(size) for size in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise InputError(
            f"{path}: IDX header says shape {shape} ({expected} bytes of data), "
            f"but the file holds {len(raw) - header} bytes"
        )
    return np.frombuffer(raw, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays, lists, dicts and strings; refuses every other global."""

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(archive: tarfile.TarFile, member: str, source: Path) -> tuple:
    try:
        stream = archive.extractfile(f"cifar-10-batches-py/{member}")
    except KeyError:
        raise InputError(f"{source}: no member cifar-10-batches-py/{member}") from None
    try:
        batch = _ArrayUnpickler(io.BytesIO(stream.read()), encoding="bytes").load()
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], np.int64)
    except (pickle.UnpicklingError, KeyError, TypeError, EOFError, ValueError) as error:
        raise InputError(f"{source}, {member}: not a CIFAR-10 batch ({error})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise InputError(
            f"{source}, {member}: data must be uint8 of shape (n, 3072), "
            f"got {data.dtype} {data.shape}"
        )
    if labels.shape != (len(data),) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
        raise InputError(f"{source}, {member}: labels must be {len(data)} ints in 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(path: Path | str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_images, train_labels, test_images, test_labels)`` from ``cifar-10-python.tar.gz``.

    Images are uint8 of shape (n, 3, 32, 32); labels int64 in 0..9.
    """
    source = Path(path)
    try:
        with tarfile.open(source, "r:*") as archive:
            parts = [_read_cifar_batch(archive, f"data_batch_{i}", source) for i in range(1, 6)]
            test_images, test_labels = _read_cifar_batch(archive, "test_batch", source)
    except (tarfile.TarError, OSError) as error:
        raise InputError(f"{source}: not a readable tar archive ({error})") from None
    train_images = np.concatenate([images for images, _ in parts])
    train_labels = np.concatenate([labels for _, labels in parts])
    return train_images, train_labels, test_images, test_labels
