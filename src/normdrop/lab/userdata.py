"""The user's own data: CSV, NPZ and Parquet files, checked cell by cell.

Every problem is reported with the file and the place in it: the CSV line (the header is line 1),
the Parquet row (1-based, not counting the header), the NPZ array index, and the column. Features
must be finite numbers; labels may be integers or strings and are numbered in sorted order.
"""

from __future__ import annotations

import csv
import math
import re
import zipfile
import zlib
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from normdrop.errors import InputError

__all__ = ["FILE_SUFFIXES", "encode_labels", "read_user_file"]

FILE_SUFFIXES = (".csv", ".npz", ".parquet", ".pq")


def read_user_file(
    path: Path | str, target: str | None
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """``(features, labels, classes)`` from a CSV, NPZ or Parquet file.

    ``features`` is float32 of shape (n, *sample_shape), (n, C, H, W) for images (an NPZ ``X``
    of 3 dimensions gets its one channel); ``labels`` int64 in [0, len(classes)).
    ``target`` names the label column (CSV, Parquet) or array (NPZ, default ``"y"``).
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"--data {path}: is a folder; give a .csv, .npz or .parquet file")
    if not path.is_file():
        raise InputError(f"--data {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        features, raw_labels = _read_csv(path, target)
    elif suffix == ".npz":
        features, raw_labels = _read_npz(path, target)
    elif suffix in (".parquet", ".pq"):
        features, raw_labels = _read_parquet(path, target)
    else:
        raise InputError(f"--data {path}: unknown file type; expected one of {FILE_SUFFIXES}")
    labels, classes = encode_labels(raw_labels, f"{path}, target {target or 'y'!r}")
    return features, labels, classes


def encode_labels(values: Sequence | np.ndarray, where: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Class indices (int64) and class names for labels given as integers or strings.

    Integer-valued labels are ordered numerically, strings alphabetically. Non-integer numbers
    (a regression target) and a single class are errors: the lab classifies. Numbers are read
    exactly, so labels beyond 2^53 (ids) that float64 would merge stay distinct classes.
    """
    raw = [_text_if_bytes(value, where) for value in np.asarray(values).tolist()]
    texts = [str(value).strip() for value in raw]
    numbers = [_label_number(value, text) for value, text in zip(raw, texts, strict=True)]
    if all(number is not None for number in numbers):
        fractional = next(
            (t for t, n in zip(texts, numbers, strict=True) if n.denominator != 1), None
        )
        if fractional is not None:
            raise InputError(
                f"{where}: holds non-integer numbers (e.g. {fractional!r}); the lab classifies, "
                "so labels must be integers or names"
            )
        keys = [int(number) for number in numbers]
    else:
        keys = texts
    ordered = sorted(set(keys))
    if len(ordered) < 2:
        raise InputError(
            f"{where}: a single class ({ordered[0]!r}) in every row; classification needs at "
            "least 2 classes"
        )
    index = {key: i for i, key in enumerate(ordered)}
    labels = np.fromiter((index[key] for key in keys), np.int64, len(keys))
    return labels, tuple(str(key) for key in ordered)


def _text_if_bytes(value: object, where: str) -> object:
    """NPZ byte-string labels (dtype ``S``) as text: class ``a``, not ``b'a'``."""
    if not isinstance(value, bytes):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(
            f"{where}: label {value!r} is not UTF-8 text; save labels as integers or strings"
        ) from None


def _label_number(value: object, text: str) -> int | Fraction | None:
    """A numeric label's exact value (``denominator`` 1 if whole), or None for a name."""
    if isinstance(value, bool):  # numpy's bools arrive as Python bools: names, as ever
        return None
    if isinstance(value, int):  # NPZ and Parquet integers: exact, never through float64
        return value
    if isinstance(value, float):
        return Fraction(value) if math.isfinite(value) else None
    if not _PLAIN_NUMBER.fullmatch(text):  # "1_000", "１": names, as the features refuse them
        return None
    try:  # float() rounds beyond 2^53: "9007199254740993" would be "9007199254740992"
        return int(text)
    except ValueError:
        pass
    if _as_float(text) is None:  # also keeps "1e999" a name, not a 1000-digit integer
        return None
    return Fraction(text)  # "1.0", "2e3", whole numbers written so beyond 2^53: exactly


# The spellings of a number in a file: Python's float() also takes "1_000", non-ASCII digits and
# "infinity", which no other tool writes or reads as numbers.
_PLAIN_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_NON_FINITE = re.compile(r"[+-]?(?:nan|inf|infinity)", re.IGNORECASE)


def _as_float(text: str) -> float | None:
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


# The lab computes in float32: a finite value beyond its range would become infinity.
_FLOAT32_MAX = float(np.finfo(np.float32).max)


_TOO_LARGE = (
    f"too large for float32 (the lab computes in float32, largest {_FLOAT32_MAX:.4g}); "
    "rescale the feature"
)


def _missing_target(path: Path, columns: Sequence[str], target: str | None) -> InputError:
    listing = ", ".join(repr(c) for c in columns)
    if target is None:
        return InputError(f"{path}: pass --target COLUMN to name the labels (columns: {listing})")
    return InputError(f"{path}: no column {target!r} for --target (columns: {listing})")


def _cell_number(cell: str, where: str) -> float:
    text = cell.strip()
    if not text:
        raise InputError(f"{where}: empty value; every feature must be a number")
    if not (_PLAIN_NUMBER.fullmatch(text) or _NON_FINITE.fullmatch(text)):
        raise InputError(
            f"{where}: {text!r} is not a number (expected a decimal number such as 1000, -2.5 "
            "or 1e-3)"
        )
    value = float(text)
    if not math.isfinite(value):
        raise InputError(f"{where}: {text} is not a finite number; remove or impute it")
    if abs(value) > _FLOAT32_MAX:
        raise InputError(f"{where}: {text} is {_TOO_LARGE}")
    return value


def _read_csv(path: Path, target: str | None) -> tuple[np.ndarray, list[str]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            return _parse_csv(csv.reader(stream), path, target)
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not a UTF-8 text CSV file ({error.reason})") from None
    except csv.Error as error:
        raise InputError(f"{path}: malformed CSV ({error})") from None


def _parse_csv(reader, path: Path, target: str | None) -> tuple[np.ndarray, list[str]]:
    header = [name.strip() for name in next(reader, [])]
    if not header:
        raise InputError(f"{path}: empty file; expected a header line naming the columns")
    if target is None or target not in header:
        raise _missing_target(path, header, target)
    if len(set(header)) != len(header):
        duplicate = next(name for name in header if header.count(name) > 1)
        raise InputError(f"{path}, line 1: column {duplicate!r} appears twice in the header")
    if len(header) < 2:
        raise InputError(f"{path}: no feature columns besides the target {target!r}")
    label_at = header.index(target)
    rows, labels = [], []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue  # blank lines carry no sample
        line = reader.line_num
        if len(row) != len(header):
            raise InputError(
                f"{path}, line {line}: {len(row)} fields, but the header has {len(header)}"
            )
        if not row[label_at].strip():
            raise InputError(f"{path}, line {line}, column {target!r}: empty label")
        labels.append(row[label_at])
        rows.append(
            [
                _cell_number(cell, f"{path}, line {line}, column {header[j]!r}")
                for j, cell in enumerate(row)
                if j != label_at
            ]
        )
    if not rows:
        raise InputError(f"{path}: a header but no data lines")
    return np.asarray(rows, np.float32), labels


def _read_npz(path: Path, target: str | None) -> tuple[np.ndarray, np.ndarray]:
    label_key = target or "y"
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, NotImplementedError) as error:
        # numpy reads a file that is neither a zip nor a .npy array as a pickle, and says so
        why = "not a zip of .npy arrays" if "pickled" in str(error) else str(error)
        raise InputError(f"{path}: not a valid .npz file ({why})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise InputError(f"{path}: holds a single array; save X and y with np.savez(path, X=, y=)")
    with archive:
        for key in ("X", label_key):
            if key not in archive.files:
                raise InputError(
                    f"{path}: no array {key!r} (arrays: {', '.join(archive.files) or 'none'}); "
                    "save features as X and labels as y: np.savez(path, X=X, y=y)"
                )
        features, labels = _npz_member(path, archive, "X"), _npz_member(path, archive, label_key)
    return _check_npz_arrays(path, features, labels, label_key), labels


def _npz_member(path: Path, archive, key: str) -> np.ndarray:
    """One array of an open NPZ; a damaged member (bad CRC or compressed data, a truncated or
    non-.npy member) is an InputError naming the array, not zipfile's or zlib's traceback."""
    try:
        value = archive[key]
    except ValueError as error:
        if "allow_pickle" in str(error):  # object arrays need pickle, which we refuse
            raise InputError(f"{path}: {error}; save plain numeric arrays") from None
        raise _damaged_npz(path, key, error) from None
    except MemoryError as error:  # a header declaring a huge shape, or an array too large
        raise InputError(
            f"{path}: cannot load array {key!r} ({error}); the file is damaged or too large "
            "for this machine's memory"
        ) from None
    # zipfile: BadZipFile (bad CRC), RuntimeError (encrypted), NotImplementedError (compression
    # method); zlib.error (damaged deflate data); EOFError and OSError (truncated member).
    except (
        zipfile.BadZipFile,
        zlib.error,
        EOFError,
        OSError,
        RuntimeError,
        NotImplementedError,
    ) as error:
        raise _damaged_npz(path, key, error) from None
    if not isinstance(value, np.ndarray):  # numpy hands back the raw bytes of a non-.npy member
        raise _damaged_npz(path, key, "not a .npy array")
    return value


def _damaged_npz(path: Path, key: str, why: object) -> InputError:
    return InputError(f"{path}: not a valid .npz file (array {key!r} is damaged: {why})")


def _check_npz_arrays(path: Path, features: np.ndarray, labels: np.ndarray, key: str) -> np.ndarray:
    # Complex arrays are numbers to numpy, but casting them drops the imaginary part (with only
    # a ComplexWarning): refused before any cast.
    for name, array in (("X", features), (key, labels)):
        if np.iscomplexobj(array):
            raise InputError(
                f"{path}: array {name} has complex dtype {array.dtype}; the lab needs real numbers"
            )
    if not (np.issubdtype(features.dtype, np.number) or features.dtype == np.bool_):
        raise InputError(f"{path}: X has dtype {features.dtype}; features must be numbers")
    if features.ndim < 2 or features.shape[0] == 0 or 0 in features.shape[1:]:
        raise InputError(
            f"{path}: X must have shape (samples, features...) with samples > 0 and at least "
            f"one feature, got {features.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(features):
        raise InputError(
            f"{path}: {key} must have shape ({len(features)},) to match X, got {labels.shape}"
        )
    if np.issubdtype(labels.dtype, np.floating) and not np.isfinite(labels).all():
        bad = int(np.flatnonzero(~np.isfinite(labels))[0])
        raise InputError(f"{path}: {key}[{bad}] is {labels[bad]}; every label must be given")
    # Checked in X's own dtype: after the float32 cast, 1e300 would read as inf.
    unusable = ~np.isfinite(features)
    wide = np.issubdtype(features.dtype, np.floating) and features.dtype.itemsize > 4
    if wide:
        unusable |= np.abs(features) > _FLOAT32_MAX  # finite float16/32 never exceed it
    if unusable.any():
        bad = tuple(int(i) for i in np.argwhere(unusable)[0])
        value = features[bad]
        why = _TOO_LARGE if np.isfinite(value) else "features must be finite numbers"
        raise InputError(
            f"{path}: X[{', '.join(map(str, bad))}] is {value:g} (sample {bad[0]}); {why}"
        )
    if features.ndim == 3:  # one-channel images (docs/lab.md): (n, 1, H, W), as cnn:small takes
        features = features[:, None]
    return features.astype(np.float32)


def _read_parquet(path: Path, target: str | None) -> tuple[np.ndarray, list]:
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(
            f"{path}: reading .parquet files needs pyarrow: pip install 'normdrop[parquet]'"
        ) from None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise InputError(f"{path}: not a readable Parquet file ({error})") from None
    if target is None or target not in table.column_names:
        raise _missing_target(path, table.column_names, target)
    if table.num_rows == 0 or table.num_columns < 2:
        raise InputError(f"{path}: needs at least one row and one feature column besides {target}")
    columns = []
    for name in table.column_names:
        column = table.column(name)
        if column.null_count:
            row = int(pc.index(pc.is_null(column), True).as_py()) + 1
            raise InputError(f"{path}, row {row}, column {name!r}: missing value")
        if name == target:
            continue
        if not (
            pa.types.is_integer(column.type)
            or pa.types.is_floating(column.type)
            or pa.types.is_boolean(column.type)
        ):
            raise InputError(f"{path}, column {name!r}: type {column.type} is not numeric")
        values = column.to_numpy().astype(np.float64)
        if not np.isfinite(values).all():
            row = int(np.flatnonzero(~np.isfinite(values))[0]) + 1
            raise InputError(
                f"{path}, row {row}, column {name!r}: {values[row - 1]} is not a finite number"
            )
        if (np.abs(values) > _FLOAT32_MAX).any():
            row = int(np.flatnonzero(np.abs(values) > _FLOAT32_MAX)[0]) + 1
            raise InputError(
                f"{path}, row {row}, column {name!r}: {values[row - 1]:g} is {_TOO_LARGE}"
            )
        columns.append(values)
    return np.stack(columns, axis=1).astype(np.float32), table.column(target).to_pylist()
