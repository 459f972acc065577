"""Downloads into the cache with SHA-256 checks, the offline error, and the MNIST, Fashion-MNIST
and CIFAR-10 loaders end to end on small files served from this machine (file:// URLs)."""

import gzip
import hashlib
import socket

import numpy as np
import pytest

from normdrop.lab import data
from normdrop.lab.downloads import DownloadError, RemoteFile, default_cache_dir, fetch
from test_lab_formats import idx_bytes, write_cifar


def _sha(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/file.bin"  # nothing listens there any more


def test_fetch_downloads_once_and_checks_the_hash(tmp_path):
    source = tmp_path / "server" / "file.bin"
    source.parent.mkdir()
    source.write_bytes(b"published bytes")
    remote = RemoteFile("demo", "file.bin", (source.as_uri(),), _sha(b"published bytes"))
    cache = tmp_path / "cache"
    path = fetch(remote, cache)
    assert path == cache / "demo" / "file.bin" and path.read_bytes() == b"published bytes"
    source.unlink()  # the second call must not need the network
    assert fetch(remote, cache) == path
    assert not list((cache / "demo").glob("*.part"))


def test_fetch_tries_the_next_mirror(tmp_path):
    source = tmp_path / "file.bin"
    source.write_bytes(b"abc")
    remote = RemoteFile("demo", "file.bin", (_closed_port_url(), source.as_uri()), _sha(b"abc"))
    assert fetch(remote, tmp_path / "cache").read_bytes() == b"abc"


def test_wrong_content_is_rejected_and_not_kept(tmp_path):
    source = tmp_path / "file.bin"
    source.write_bytes(b"tampered")
    remote = RemoteFile("demo", "file.bin", (source.as_uri(),), _sha(b"original"))
    with pytest.raises(DownloadError, match=r"downloaded SHA-256 is \w+, expected"):
        fetch(remote, tmp_path / "cache")
    assert not (tmp_path / "cache" / "demo" / "file.bin").exists()
    assert not list((tmp_path / "cache" / "demo").glob("*"))


def test_offline_error_says_where_to_put_the_file(tmp_path):
    remote = RemoteFile("demo", "file.bin", (_closed_port_url(),), "0" * 64)
    with pytest.raises(DownloadError) as raised:
        fetch(remote, tmp_path / "cache", timeout=5)
    message = str(raised.value)
    assert "could not download demo file file.bin" in message
    assert "offline" in message and str(tmp_path / "cache" / "demo" / "file.bin") in message
    assert "0" * 64 in message and "--data digits" in message


def test_corrupt_cached_file_is_reported_and_kept(tmp_path):
    cached = tmp_path / "demo" / "file.bin"
    cached.parent.mkdir()
    cached.write_bytes(b"half a file")
    remote = RemoteFile("demo", "file.bin", (_closed_port_url(),), _sha(b"the whole file"))
    with pytest.raises(DownloadError, match="delete it and rerun"):
        fetch(remote, tmp_path)
    assert cached.read_bytes() == b"half a file"


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("NORMDROP_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("NORMDROP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "normdrop"


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_datasets_end_to_end(tmp_path, monkeypatch, name):
    rng = np.random.default_rng(0)
    server = tmp_path / "server"
    server.mkdir()
    sizes = {"train": 100, "t10k": 12}
    checksums, expected = {}, {}
    for prefix, n in sizes.items():
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        expected[prefix] = (images, labels)
        for kind, array, ndim in (("images", images, 3), ("labels", labels, 1)):
            file_name = f"{prefix}-{kind}-idx{ndim}-ubyte.gz"
            raw = gzip.compress(idx_bytes(array, ">u1"))
            (server / file_name).write_bytes(raw)
            checksums[file_name] = _sha(raw)
    monkeypatch.setitem(data._IDX_SHA256, name, checksums)
    base = server.as_uri() + "/"
    monkeypatch.setattr(data, "_MNIST_URLS" if name == "mnist" else "_FASHION_URLS", (base,))
    dataset = data.load_dataset(name, cache_dir=tmp_path / "cache")
    assert dataset.features.shape == (100, 1, 28, 28)
    np.testing.assert_allclose(dataset.features[:, 0] * 255, expected["train"][0], atol=1e-4)
    np.testing.assert_array_equal(dataset.test_labels, expected["t10k"][1])
    assert len(dataset.classes) == 10
    splits = data.split(dataset, 0.2, 0.2, 0)
    assert len(splits.test[0]) == 12 and len(splits.val[0]) == 20  # the published test split
    assert (tmp_path / "cache" / name / "train-images-idx3-ubyte.gz").exists()


def test_cifar10_end_to_end(tmp_path, monkeypatch):
    archive = tmp_path / "cifar-10-python.tar.gz"
    write_cifar(archive, batch_size=10)
    remote = RemoteFile("cifar10", archive.name, (archive.as_uri(),), _sha(archive.read_bytes()))
    monkeypatch.setattr(data, "CIFAR10", remote)
    dataset = data.load_dataset("cifar10", cache_dir=tmp_path / "cache")
    assert dataset.features.shape == (50, 3, 32, 32) and dataset.test_features.shape == (
        10,
        3,
        32,
        32,
    )
    assert dataset.features.max() <= 1.0 and dataset.classes[0] == "airplane"


def test_published_checksums_are_well_formed():
    for files in data._IDX_SHA256.values():
        assert len(files) == 4
        assert all(len(sha) == 64 and int(sha, 16) >= 0 for sha in files.values())
    assert len(data.CIFAR10.sha256) == 64
    assert all(url.startswith("https://") for url in (*data._MNIST_URLS, *data.CIFAR10.urls))
