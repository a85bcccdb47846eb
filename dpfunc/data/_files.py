"""Where the PneumoniaMNIST file lives, how it is checked, and how it is (optionally) downloaded.

Lookup order (:func:`search_path`; the first folder holding ``pneumoniamnist.npz`` wins):

1. the ``data_dir`` argument (``--data-dir``) -- when given, the only place looked at;
2. else the ``DPFUNC_DATA`` environment variable -- when set, the only place looked at;
3. else the project's data folder ``../shared/data`` beside a source checkout (the folder that holds
   ``pyproject.toml`` and ``dpfunc/``), when dpfunc runs from one;
4. else the user cache ``$XDG_CACHE_HOME/dpfunc`` (``~/.cache/dpfunc`` when unset).

Downloads go to :func:`resolve_data_dir`: the argument, else ``DPFUNC_DATA``, else the user cache.
Error messages speak the interface in use: Python names (``data_dir=``, ``download=True``) by
default, the command line's flags (``--data-dir``, ``--download``) inside :func:`cli_messages`.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "PNEUMONIAMNIST_FILENAME",
    "PNEUMONIAMNIST_URL",
    "KNOWN_MD5",
    "KNOWN_SHA256",
    "DOWNLOAD_TIMEOUT_S",
    "DataNotFoundError",
    "resolve_data_dir",
    "project_data_dir",
    "search_path",
    "locate_pneumoniamnist",
    "cli_messages",
    "how_to_get",
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

#: Seconds without an answer (connect or read) before a download gives up.
DOWNLOAD_TIMEOUT_S = 15.0

_ENV_VAR = "DPFUNC_DATA"
_DIGEST_CACHE: dict[tuple[str, int, int], tuple[str, str]] = {}
_CLI_MESSAGES: ContextVar[bool] = ContextVar("dpfunc_data_cli_messages", default=False)

#: The Python-API version of :func:`how_to_get` (kept for callers that import the constant).
HOW_TO_GET = (
    f"Get it with `pneumoniamnist(..., download=True)` (downloads {PNEUMONIAMNIST_URL} and checks "
    f"its md5), or put `{PNEUMONIAMNIST_FILENAME}` in a folder and pass `data_dir=` or set "
    f"{_ENV_VAR}=<folder>."
)
_HOW_TO_GET_CLI = (
    f"Pass --data-dir FOLDER (a folder holding {PNEUMONIAMNIST_FILENAME}), set {_ENV_VAR}=FOLDER, or add "
    f"--download to fetch the official MedMNIST file (needs internet; its md5 is checked)."
)


@contextmanager
def cli_messages() -> Iterator[None]:
    """Within the block, data errors name the command line's flags instead of Python arguments."""
    token = _CLI_MESSAGES.set(True)
    try:
        yield
    finally:
        _CLI_MESSAGES.reset(token)


def how_to_get() -> str:
    """How to obtain the file, in the terms of the interface in use (see :func:`cli_messages`)."""
    return _HOW_TO_GET_CLI if _CLI_MESSAGES.get() else HOW_TO_GET


class DataNotFoundError(FileNotFoundError):
    """``pneumoniamnist.npz`` is in none of the folders searched.

    Attributes:
        searched: ``((folder, why it was searched), ...)`` in lookup order.
    """

    def __init__(self, message: str, searched: tuple[tuple[Path, str], ...]):
        super().__init__(message)
        self.searched = searched


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


def project_data_dir() -> Path | None:
    """``../shared/data`` beside the source checkout dpfunc runs from; None for an installed wheel.

    A checkout is recognised by ``pyproject.toml`` next to the ``dpfunc`` package folder.
    """
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "dpfunc").is_dir():
        return root.parent / "shared" / "data"
    return None


def search_path(data_dir: str | os.PathLike | None = None) -> tuple[tuple[Path, str], ...]:
    """The folders searched for the data file, in order, each with the reason it is searched.

    Example:
        >>> search_path("/data/medmnist")
        ((PosixPath('/data/medmnist'), 'the data_dir argument'),)
    """
    cli = _CLI_MESSAGES.get()
    if data_dir is not None:
        return ((resolve_data_dir(data_dir), "--data-dir" if cli else "the data_dir argument"),)
    if os.environ.get(_ENV_VAR):
        return ((resolve_data_dir(None), f"${_ENV_VAR}"),)
    project = project_data_dir()
    found = ((project, "the project's data folder beside the checkout"),) if project is not None else ()
    return found + ((resolve_data_dir(None), "the user cache"),)


def locate_pneumoniamnist(data_dir: str | os.PathLike | None = None, *, download: bool = False,
                          fn: str = "pneumoniamnist") -> Path:
    """The path of ``pneumoniamnist.npz``: ``data_dir`` itself when it is a file, else the first
    folder of :func:`search_path` holding it, else (``download=True``) a fresh download into
    :func:`resolve_data_dir`. The checksum is not checked here (the loader does it). ``fn`` prefixes
    the error message ("" for none).

    Raises:
        DataNotFoundError: not found and ``download`` is False; the message lists every folder
            searched and how to get the file.
    """
    if data_dir is not None and Path(data_dir).expanduser().is_file():
        return Path(data_dir).expanduser().absolute()  # a path to the file itself
    searched = search_path(data_dir)
    for folder, _ in searched:
        if (folder / PNEUMONIAMNIST_FILENAME).is_file():
            return folder / PNEUMONIAMNIST_FILENAME
    if download:
        return download_pneumoniamnist(data_dir)
    where = "; ".join(f"{folder} ({why})" for folder, why in searched)
    prefix = f"{fn}: " if fn else ""
    raise DataNotFoundError(f"{prefix}{PNEUMONIAMNIST_FILENAME} not found; looked in {where}. {how_to_get()}", searched)


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
            f"truncated or not PneumoniaMNIST. "
            + ("Delete it and run again with --download, or point --data-dir at a good copy."
               if _CLI_MESSAGES.get() else
               "Delete it and download again (`pneumoniamnist(..., download=True)`), or pass "
               "`verify_checksum=False` if you built it yourself on purpose.")
        )


def _urlopen_copy(url: str, out: BinaryIO) -> None:
    """Copy ``url`` (http(s):// or file://) into the open binary file ``out``."""
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:  # noqa: S310 - fixed or user URL
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
                reason = getattr(err, "reason", None) or err
                if isinstance(reason, TimeoutError) or "timed out" in str(reason):
                    reason = f"no answer within {DOWNLOAD_TIMEOUT_S:g} s"
                hint = (f"Without internet, copy {PNEUMONIAMNIST_FILENAME} from a machine that has it into a "
                        f"folder and pass --data-dir FOLDER (or set {_ENV_VAR}=FOLDER)."
                        if _CLI_MESSAGES.get() else
                        f"Check the connection, or download it by hand and set {_ENV_VAR}.")
                who = "--download" if _CLI_MESSAGES.get() else "download_pneumoniamnist"
                raise OSError(f"{who}: could not fetch {url} into {folder}: {reason}. {hint}") from err
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
