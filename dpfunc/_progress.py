"""Progress display for long commands: one helper over ``tqdm.auto`` that every part of dpfunc uses.

``tqdm.auto`` draws a text bar in a terminal and a widget in Jupyter, so research prototyping in a
notebook sees the same progress as the command line. Whether a bar is shown is decided in one place,
first match wins:

1. the ``enabled=`` argument of :func:`progress` (a function that takes ``progress=`` passes it on);
2. the innermost :func:`progress_enabled` context (the command line wraps every command in
   ``progress_enabled(False)`` for ``--quiet``);
3. the environment variable ``DPFUNC_PROGRESS`` (``0``/``false``/``off`` or ``1``/``true``/``on``);
4. otherwise on in a notebook or when stderr is a terminal, off when stderr is a file or pipe (logs
   and CI stay free of carriage-return noise).

Example:
    >>> from dpfunc._progress import progress, progress_enabled
    >>> with progress_enabled(False):
    ...     sum(progress(range(1000), desc="rounds"))
    499500

Usage from other modules (federated rounds, attacks, audits)::

    for r in progress(range(rounds), desc="federated rounds", unit="round"):
        ...
    bar = progress(total=steps, desc="training")      # manual updates: bar.update(1); bar.set_postfix_str(...)
    with bar.external_write_mode():                   # print a log line without breaking the bar
        print("epoch 1 done")
    bar.close()
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from tqdm.auto import tqdm

__all__ = ["progress", "progress_enabled", "progress_is_enabled", "ENV_VAR"]

ENV_VAR = "DPFUNC_PROGRESS"
_TRUE, _FALSE = frozenset({"1", "true", "on", "yes"}), frozenset({"0", "false", "off", "no"})
_DEFAULT: ContextVar[bool | None] = ContextVar("dpfunc_progress_enabled", default=None)


def _in_notebook() -> bool:
    return any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__)


def _from_env() -> bool | None:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"progress: {ENV_VAR} must be one of {sorted(_TRUE | _FALSE)}, got {value!r}")


def progress_is_enabled(enabled: bool | None = None) -> bool:
    """Whether a bar is shown, resolved in the order given in the module docstring.

    Args:
        enabled: True/False forces the choice; None defers to the context, the environment and
            the terminal.
    """
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"progress: enabled must be True, False or None, got {enabled!r}")
    for choice in (enabled, _DEFAULT.get(), _from_env()):
        if choice is not None:
            return choice
    stream = sys.stderr
    return _in_notebook() or bool(stream is not None and hasattr(stream, "isatty") and stream.isatty())


@contextmanager
def progress_enabled(enabled: bool | None) -> Iterator[None]:
    """Within the block, :func:`progress` bars default to ``enabled`` (None: back to automatic).

    Example:
        >>> with progress_enabled(False):
        ...     progress_is_enabled()
        False
    """
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"progress_enabled: enabled must be True, False or None, got {enabled!r}")
    token = _DEFAULT.set(enabled)
    try:
        yield
    finally:
        _DEFAULT.reset(token)


def progress(iterable: Iterable | None = None, *, enabled: bool | None = None, **kwargs: Any) -> tqdm:
    """A ``tqdm.auto`` bar over ``iterable`` (or a manual one with ``total=``), shown per the rules above.

    Args:
        iterable: what to iterate over; None for a bar driven by ``bar.update(n)``.
        enabled: force the bar on/off; None decides automatically.
        **kwargs: passed to ``tqdm`` (``total``, ``desc``, ``unit``, ``initial``, ``leave``, …).
            Defaults here: ``dynamic_ncols=True``, ``leave=False`` (the bar disappears when done;
            commands print their own summary line).

    Returns:
        The ``tqdm`` object; a disabled one still iterates and accepts ``update``/``set_postfix_str``.
    """
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=not progress_is_enabled(enabled), **kwargs)
