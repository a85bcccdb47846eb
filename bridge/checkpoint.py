"""Atomic, versioned checkpoints of a training state: tensors and plain containers, no pickled code.

A state is any nesting of ``dict`` (str or int keys), ``list``, ``tuple``, tensors, numbers, strings,
``None``, and dpfunc's own values: NamedTuple optimizer states (``TraceState``, ``DPAggregateState``
…), frozen dataclasses (``PrivacyLedger``, ``Key``, ``DPConfig``, ``FlatClipping`` …) and enums. dpfunc
values are written as tagged dicts and rebuilt on load; only classes defined in ``dpfunc`` modules are
ever rebuilt, and the file is read with ``torch.load(weights_only=True)``, which executes no code.

Guarantees:

    ================================  ===============================================================
    crash or error during a write     the previous file at ``path`` is intact and no temp file is left
                                      (temp file in the same directory, ``fsync``, ``os.replace``)
    truncated / corrupt / foreign     :class:`CheckpointError` naming the file and what is wrong
    file from a newer format          :class:`CheckpointError` (``FORMAT_VERSION`` is checked)
    privacy ledger                    stored as-is; a :class:`~dpfunc.PrivacyLedger` inside the state
                                      comes back equal, never reset (a ``DPAggregateState`` carries it)
    ================================  ===============================================================

Example:
    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
    >>> tx = dpsgd(0.1, noise_multiplier=1.0, max_grad_norm=1.0, sampling_rate=0.1, num_examples=100, key=Key(0))
    >>> save_checkpoint(path, {"params": {"w": torch.zeros(2)}, "opt_state": tx.init({"w": torch.zeros(2)}), "key": Key(3), "step": 12})
    >>> state = load_checkpoint(path)
    >>> state["step"], state["key"], privacy_ledger(state["opt_state"]).total_steps
    (12, Key(seed=3), 0)
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "atomic_write", "CheckpointError", "FORMAT_VERSION", "to_plain", "from_plain"]

FORMAT_VERSION = 1
_FORMAT = "dpfunc-checkpoint"
_TAG = "__dpfunc__"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read as a dpfunc checkpoint (truncated, corrupt, foreign, newer)."""


def _type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve(name: str) -> type:
    module, _, qual = name.partition(":")
    if not (module == "dpfunc" or module.startswith("dpfunc.")):
        raise CheckpointError(f"load_checkpoint: refusing to rebuild {name!r}: only dpfunc classes are allowed")
    obj: Any = importlib.import_module(module)
    for part in qual.split("."):
        obj = getattr(obj, part)
    if not isinstance(obj, type):
        raise CheckpointError(f"load_checkpoint: {name!r} is not a class")
    return obj


def to_plain(obj: Any, _path: str = "state") -> Any:
    """Encode ``obj`` into tensors and plain containers (what ``torch.load(weights_only=True)`` reads)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach() if isinstance(obj, torch.nn.Parameter) or obj.requires_grad else obj
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, enum.Enum):
        return {_TAG: "enum", "type": _type_name(type(obj)), "value": to_plain(obj.value, _path)}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        fields = {f: to_plain(getattr(obj, f), f"{_path}.{f}") for f in obj._fields}
        return {_TAG: "namedtuple", "type": _type_name(type(obj)), "fields": fields}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: to_plain(getattr(obj, f.name), f"{_path}.{f.name}") for f in dataclasses.fields(obj)}
        return {_TAG: "dataclass", "type": _type_name(type(obj)), "fields": fields}
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise TypeError(f"save_checkpoint: dict keys must be str or int, got {k!r} at {_path}")
            if k == _TAG:
                raise TypeError(f"save_checkpoint: the key {_TAG!r} is reserved, found at {_path}")
            out[k] = to_plain(v, f"{_path}[{k!r}]")
        return out
    if isinstance(obj, list):
        return [to_plain(v, f"{_path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return tuple(to_plain(v, f"{_path}[{i}]") for i, v in enumerate(obj))
    raise TypeError(
        f"save_checkpoint: cannot store {type(obj).__name__} at {_path}; use tensors, numbers, strings, None, "
        "dict/list/tuple, or dpfunc NamedTuple/dataclass/enum values (not modules or optimizers: store their state_dict())"
    )


def from_plain(obj: Any) -> Any:
    """Inverse of :func:`to_plain`."""
    if isinstance(obj, dict):
        tag = obj.get(_TAG)
        if tag is None:
            return {k: from_plain(v) for k, v in obj.items()}
        try:
            cls = _resolve(obj["type"])
            if tag == "enum" and issubclass(cls, enum.Enum):
                return cls(from_plain(obj["value"]))
            if tag == "namedtuple" and issubclass(cls, tuple) and hasattr(cls, "_fields"):
                renamed = getattr(cls, "_renamed_fields", {})  # old field name → new (e.g. ClippedSum.num_examples)
                fields = {renamed.get(k, k): from_plain(v) for k, v in obj["fields"].items()}
                required = {k for k in cls._fields if k not in cls._field_defaults}
                if not required <= set(fields) <= set(cls._fields):
                    raise CheckpointError(
                        f"load_checkpoint: fields of {obj['type']} changed: stored {sorted(fields)}, this dpfunc "
                        f"has {list(cls._fields)}. The file was written by another dpfunc version (its privacy "
                        f"ledger is intact in it); resume it with that version.")
                return cls(**fields)
            if tag == "dataclass" and dataclasses.is_dataclass(cls):
                fields = {k: from_plain(v) for k, v in obj["fields"].items()}
                known = {f.name: f for f in dataclasses.fields(cls)}
                # A field added later with a default (e.g. Phase.mechanism) takes it; anything else is refused.
                missing = {k for k in known if k not in fields}
                if set(fields) - set(known) or any(known[k].default is dataclasses.MISSING for k in missing):
                    raise CheckpointError(f"load_checkpoint: fields of {obj['type']} changed: stored {sorted(fields)}")
                fields.update({k: known[k].default for k in missing})
                # Set the stored (already validated) field values; __post_init__ normalisations are not re-run.
                inst = cls.__new__(cls)
                for k, v in fields.items():
                    object.__setattr__(inst, k, v)
                return inst
        except (KeyError, AttributeError, ImportError, TypeError, ValueError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"load_checkpoint: malformed {tag!r} entry {obj.get('type')!r}: {e}") from e
        raise CheckpointError(f"load_checkpoint: unknown entry kind {tag!r} for {obj.get('type')!r}")
    if isinstance(obj, list):
        return [from_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(from_plain(v) for v in obj)
    return obj


def _write(payload: Any, f: BinaryIO) -> None:
    """Serialise ``payload`` into the open file ``f`` (a seam for tests that simulate a failed write)."""
    torch.save(payload, f)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Write a file so that a crash leaves either the old file or the whole new one, never a torn one.

    ``write(f)`` fills a temp file in the same directory, which is flushed, ``fsync``-ed and renamed over
    ``path`` (``os.replace``); then the directory is ``fsync``-ed so the rename itself survives a power
    loss (POSIX; best effort elsewhere). If ``write`` raises, the temp file is removed and an existing
    file at ``path`` is left as it was.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
        >>> atomic_write(target, lambda f: f.write(b"ledger"))
        >>> target.read_bytes()
        b'ledger'
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (POSIX); best effort elsewhere
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def save_checkpoint(path: str | os.PathLike, state: Any) -> None:
    """Write ``state`` to ``path`` atomically.

    The state is encoded first (a ``TypeError`` for an unsupported value leaves the disk untouched),
    written to a temp file in the same directory, flushed and ``fsync``-ed, then renamed over ``path``
    with ``os.replace``. If anything fails, the temp file is removed and an existing file at ``path``
    is left as it was.

    Args:
        path: target file; its directory must exist.
        state: see the module docstring.

    Raises:
        ValueError: a non-finite gradient check still in flight on a GPU failed (checked first, see
            :func:`dpfunc.clipping.flush_nonfinite_checks`): nothing is written.
    """
    from dpfunc.clipping import flush_nonfinite_checks

    flush_nonfinite_checks()  # a model that a pending check would refuse is never saved
    payload = {"format": _FORMAT, "version": FORMAT_VERSION, "torch": str(torch.__version__), "state": to_plain(state)}
    atomic_write(path, lambda f: _write(payload, f))


def load_checkpoint(path: str | os.PathLike, *, map_location: Any = None) -> Any:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the file.
        map_location: as for ``torch.load`` (e.g. a device for the tensors).

    Raises:
        FileNotFoundError: no file at ``path``.
        CheckpointError: the file is truncated, corrupt, not a dpfunc checkpoint, or of a newer format.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_checkpoint: no checkpoint at {path!r}")
    try:
        raw = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises RuntimeError / EOFError / UnpicklingError for damaged files
        raise CheckpointError(
            f"load_checkpoint: {path!r} is truncated, corrupt or not a dpfunc checkpoint ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(raw, dict) or raw.get("format") != _FORMAT or "state" not in raw:
        raise CheckpointError(f"load_checkpoint: {path!r} is not a dpfunc checkpoint (no {_FORMAT!r} header)")
    version = raw.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointError(f"load_checkpoint: {path!r} has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"load_checkpoint: {path!r} has format version {version}, newer than this dpfunc's {FORMAT_VERSION}; upgrade dpfunc"
        )
    return from_plain(raw["state"])
