"""Where the PneumoniaMNIST file lives, how it is checked, and how it is (optionally) downloaded.

Folder resolution, in order: the ``data_dir`` argument, the ``DPFUNC_DATA`` environment variable,
then the user cache folder ``$XDG_CACHE_HOME/dpfunc`` (``~/.cache/dpfunc`` when unset).

A file is accepted when its md5 is the official MedMNIST one or its sha256 is that of the project's
shared copy (same pixels and labels, training images in another order). Digests are cached by
``(path, size, mtime)``, so a load costs one hash per file change, not one per call.

Downloading is opt-in (``download=True``); it writes to a temporary file in the target folder, checks
the digest, then renames it into place, so an interrupted or corrupt download never leaves a file
that looks valid.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "PNEUMONIAMNIST_FILENAME",
    "PNEUMONIAMNIST_URL",
    "KNOWN_MD5",
    "KNOWN_SHA256",
    "resolve_data_dir",
    "file_digests",
    "verify_checksum",
    "download_pneumoniamnist",
]

PNEUMONIAMNIST_FILENAME = "pneumoniamnist.npz"
#: MedMNIST v2's Zenodo record (``medmnist.INFO["pneumoniamnist"]["url"]``).
PNEUMONIAMNIST_URL = "https://zenodo.org/records/10519652/files/pneumoniamnist.npz?download=1"
#: md5 of the official file (``medmnist.INFO["pneumoniamnist"]["MD5"]``, 4,170,669 bytes).
KNOWN_MD5 = frozenset({"28209eda62fecd6e6a2d98b1501bb15f"})
#: sha256 of the project's shared copy (official pixels/labels, training images reordered).
KNOWN_SHA256 = frozenset({"7eb67efa242e38883d038c61d4bb9d1b5b60a08aa2749d45ad167b79b5fa9987"})

_ENV_VAR = "DPFUNC_DATA"
_DIGEST_CACHE: dict[tuple[str, int, int], tuple[str, str]] = {}

HOW_TO_GET = (
    f"Get it with `pneumoniamnist(..., download=True)` (downloads {PNEUMONIAMNIST_URL} and checks "
    f"its md5), or put `{PNEUMONIAMNIST_FILENAME}` in a folder and pass `data_dir=` or set "
    f"{_ENV_VAR}=<folder>."
)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder to read data from: argument, then ``$DPFUNC_DATA``, then the user cache.

    Args:
        data_dir: a folder, or None to fall back to the environment and then the cache.

    Returns:
        The folder as an absolute ``Path`` (it need not exist).

    Example:
        >>> resolve_data_dir("/data/medmnist")
        PosixPath('/data/medmnist')
    """
    if data_dir is not None:
        return Path(data_dir).expanduser().absolute()
    env = os.environ.get(_ENV_VAR)
    if env:
        return Path(env).expanduser().absolute()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache, "dpfunc").absolute()


def _hash_stream(stream: BinaryIO) -> tuple[str, str]:
    md5, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    for chunk in iter(lambda: stream.read(1 << 20), b""):
        md5.update(chunk)
        sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()


def file_digests(path: str | os.PathLike) -> tuple[str, str]:
    """``(md5, sha256)`` hex digests of a file, cached by ``(path, size, mtime_ns)``.

    Example:
        >>> md5, sha256 = file_digests("pneumoniamnist.npz")  # doctest: +SKIP
    """
    path = Path(path).absolute()
    stat = path.stat()
    cache_key = (str(path), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _DIGEST_CACHE:
        with open(path, "rb") as f:
            _DIGEST_CACHE[cache_key] = _hash_stream(f)
    return _DIGEST_CACHE[cache_key]


def verify_checksum(path: str | os.PathLike, *, fn: str = "verify_checksum") -> None:
    """Raise ``ValueError`` unless the file has a known PneumoniaMNIST md5 or sha256.

    Args:
        path: the ``.npz`` file.
        fn: name of the calling function, used as the prefix of the error message.
    """
    md5, sha = file_digests(path)
    if md5 not in KNOWN_MD5 and sha not in KNOWN_SHA256:
        raise ValueError(
            f"{fn}: checksum mismatch for {path}: md5 {md5}, sha256 {sha}; expected md5 in "
            f"{sorted(KNOWN_MD5)} or sha256 in {sorted(KNOWN_SHA256)}. The file is corrupt, "
            f"truncated or not PneumoniaMNIST. Delete it and download again "
            f"(`pneumoniamnist(..., download=True)`), or pass `verify_checksum=False` if you "
            f"built it yourself on purpose."
        )


def _urlopen_copy(url: str, out: BinaryIO) -> None:
    """Copy ``url`` (http(s):// or file://) into the open binary file ``out``."""
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - fixed or user URL
        for chunk in iter(lambda: response.read(1 << 20), b""):
            out.write(chunk)


def download_pneumoniamnist(
    data_dir: str | os.PathLike | None = None,
    *,
    url: str | None = None,
    force: bool = False,
    fetch: Callable[[str, BinaryIO], None] | None = None,
) -> Path:
    """Download ``pneumoniamnist.npz`` into the data folder and check its checksum.

    The file is written to a temporary name in the target folder, verified, then renamed into
    place (``os.replace``), so readers never see a partial file.

    Args:
        data_dir: target folder (resolved as in :func:`resolve_data_dir`); created if missing.
        url: where to fetch from, default :data:`PNEUMONIAMNIST_URL`; ``file://`` URLs work
            (mirrors, tests).
        force: download even if a verified file is already there.
        fetch: ``fetch(url, binary_file)`` writes the bytes at ``url`` into the open file; default
            ``urllib.request.urlopen``. Replace it to use another transport.

    Returns:
        The path of the verified file.

    Raises:
        ValueError: the downloaded bytes have an unknown checksum (nothing is left behind).
        OSError: the fetch failed (network, permissions); the message names the URL.

    Example:
        >>> path = download_pneumoniamnist()  # doctest: +SKIP

    References:
        J. Yang et al., "MedMNIST v2", Scientific Data 10:41 (2023); data on Zenodo, record 10519652.
    """
    url = PNEUMONIAMNIST_URL if url is None else url
    fetch = _urlopen_copy if fetch is None else fetch
    folder = resolve_data_dir(data_dir)
    target = folder / PNEUMONIAMNIST_FILENAME
    if target.is_file() and not force:
        try:
            verify_checksum(target, fn="download_pneumoniamnist")
            return target
        except ValueError:
            pass  # a stale or corrupt file: replace it
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".pneumoniamnist.", suffix=".part", dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                fetch(url, out)
            except OSError as err:
                raise OSError(
                    f"download_pneumoniamnist: could not fetch {url} into {folder}: {err}. "
                    f"Check the connection, or download it by hand and set {_ENV_VAR}."
                ) from err
            out.flush()
            os.fsync(out.fileno())
        md5, sha = file_digests(tmp)
        if md5 not in KNOWN_MD5 and sha not in KNOWN_SHA256:
            raise ValueError(
                f"download_pneumoniamnist: the file fetched from {url} has md5 {md5} and sha256 "
                f"{sha}, neither of which is a known PneumoniaMNIST checksum; it was discarded. "
                f"Retry, or check the URL."
            )
        os.replace(tmp, target)
        stat = target.stat()  # rename keeps the bytes and mtime: reuse the digest just computed
        _DIGEST_CACHE[(str(target), stat.st_size, stat.st_mtime_ns)] = (md5, sha)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target
