"""Downloading data files into a cache, checked by SHA-256.

A file is fetched once into ``<cache>/<dataset>/<name>`` and trusted only if its SHA-256 matches
the published value: a truncated download, a proxy's error page or a substituted file fail
loudly instead of training on garbage. The bytes go to ``<name>.part`` first and are renamed
only once checked, so an interrupted download never leaves a file that looks complete.

Offline machines get an error that says where to put the file by hand.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DownloadError", "RemoteFile", "default_cache_dir", "fetch", "sha256_of"]

_CHUNK = 1 << 20


class DownloadError(ConnectionError):
    """A data file could not be downloaded, or its content is not the published one."""


@dataclass(frozen=True)
class RemoteFile:
    """One published file: its name, the URLs to try in order, and its SHA-256."""

    dataset: str
    name: str
    urls: tuple[str, ...]
    sha256: str


def default_cache_dir() -> Path:
    """``$NORMDROP_CACHE``, else ``$XDG_CACHE_HOME/normdrop``, else ``~/.cache/normdrop``."""
    if os.environ.get("NORMDROP_CACHE"):
        return Path(os.environ["NORMDROP_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "normdrop"


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(remote: RemoteFile, cache_dir: Path | str | None = None, timeout: float = 60.0) -> Path:
    """Path of ``remote`` in the cache, downloading it first if absent.

    Raises:
        DownloadError: every URL failed (the message says where to place the file by hand), the
            download's SHA-256 differs from the published one, or a cached file is corrupt.
    """
    target = Path(cache_dir or default_cache_dir()) / remote.dataset / remote.name
    if target.exists():
        actual = sha256_of(target)
        if actual != remote.sha256:
            # Never delete it ourselves: it may be the user's own copy placed by hand.
            raise DownloadError(
                f"{target}: SHA-256 is {actual}, expected {remote.sha256} "
                "(a corrupt or different file); delete it and rerun to download it again"
            )
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    failures, mismatches = [], []
    for url in remote.urls:
        try:
            _download(url, target, remote.sha256, timeout)
            return target
        except DownloadError as error:
            mismatches.append(str(error))
        except (urllib.error.URLError, OSError, ValueError) as error:
            failures.append(f"{url}: {getattr(error, 'reason', error)}")
    if mismatches:
        raise DownloadError("; ".join(mismatches))
    raise DownloadError(
        f"could not download {remote.dataset} file {remote.name} ({'; '.join(failures)}). "
        f"If this machine is offline, download it elsewhere and place it at {target} "
        f"(SHA-256 {remote.sha256}), or use an embedded dataset such as --data digits"
    )


def _download(url: str, target: Path, sha256: str, timeout: float) -> None:
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise DownloadError(
                f"{url}: downloaded SHA-256 is {digest.hexdigest()}, expected {sha256}; "
                "the file on the server is not the published one"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
