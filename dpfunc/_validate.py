"""One place for argument checks: each argument name has one meaning and one check everywhere.

Every helper takes the public function's name ``fn``, the argument's ``name`` and its ``value``; it
returns the value converted to a plain ``float``/``int`` or raises ``ValueError`` with a message that
names all three and the allowed range, e.g.::

    epsilon: delta must be a number in (0, 1), got nan

Booleans are never numbers here (``True`` is not ``1``), NaN is never in range, and ``inf`` only where a
helper says so (``allow_inf=True``). numpy scalars (``np.float64``, ``np.int64``) are accepted.

Example:
    >>> check_probability("f", "sampling_rate", 0.25)
    0.25
    >>> check_int_range("f", "steps", 10, low=0)
    10
    >>> check_delta("f", "delta", 0.0)
    Traceback (most recent call last):
    ...
    ValueError: f: delta must be a number in (0, 1), got 0.0
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

__all__ = [
    "is_number",
    "check_number",
    "check_positive_finite",
    "check_nonnegative",
    "check_probability",
    "check_int_range",
    "check_delta",
    "check_enum",
    "check_device_spec",
]


def is_number(value: object) -> bool:
    """A real number that is not a bool (ints, floats, numpy scalars; NaN/inf included)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and not _is_np_bool(value)


def _is_np_bool(value: object) -> bool:
    return type(value).__name__ == "bool_"  # numpy.bool_ without importing numpy


def _fail(fn: str, name: str, what: str, value: object) -> ValueError:
    return ValueError(f"{fn}: {name} must be {what}, got {value!r}")


def _fmt(x: float) -> str:
    return f"{x:g}"


def _describe(low, high, low_open, high_open, allow_inf) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{_fmt(low)}, {_fmt(high)}{')' if high_open else ']'}"
    kind = "a number" if allow_inf else "a finite number"
    if low is not None:
        return f"{kind} {'>' if low_open else '>='} {_fmt(low)}"
    if high is not None:
        return f"{kind} {'<' if high_open else '<='} {_fmt(high)}"
    return kind


def check_number(fn: str, name: str, value: object, *, low: Optional[float] = None,
                 high: Optional[float] = None, low_open: bool = False, high_open: bool = False,
                 allow_inf: bool = False) -> float:
    """A real number (not bool, not NaN) in the interval given by ``low``/``high`` (closed unless
    ``low_open``/``high_open``); ``±inf`` only with ``allow_inf``. Returns ``float(value)``.

    Messages read ``"{fn}: {name} must be a finite number >= 0, got -1.0"``, ``"... must be in (0, 1],
    got 0.0"`` or, with ``allow_inf``, ``"... must be a number >= 0, got nan"``."""
    what = _describe(low, high, low_open, high_open, allow_inf)
    if not is_number(value):
        raise _fail(fn, name, what, value)
    v = float(value)
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise _fail(fn, name, what, value)
    if low is not None and (v < low or (low_open and v == low)):
        raise _fail(fn, name, what, value)
    if high is not None and (v > high or (high_open and v == high)):
        raise _fail(fn, name, what, value)
    return v


def check_positive_finite(fn: str, name: str, value: object) -> float:
    """A finite number > 0."""
    return check_number(fn, name, value, low=0.0, low_open=True)


def check_nonnegative(fn: str, name: str, value: object, *, allow_inf: bool = False) -> float:
    """A number ≥ 0 (finite unless ``allow_inf``)."""
    return check_number(fn, name, value, low=0.0, allow_inf=allow_inf)


def check_probability(fn: str, name: str, value: object, *, open_low: bool = True,
                      open_high: bool = False) -> float:
    """A probability: by default in (0, 1] (a sampling rate); ``open_low=False`` allows 0,
    ``open_high=True`` excludes 1."""
    return check_number(fn, name, value, low=0.0, high=1.0, low_open=open_low, high_open=open_high)


def check_delta(fn: str, name: str, value: object) -> float:
    """A δ of (ε, δ)-DP: a number in the open interval (0, 1)."""
    if not is_number(value) or not 0 < float(value) < 1:  # NaN fails the comparison
        raise _fail(fn, name, "a number in (0, 1)", value)  # (the words users search for)
    return float(value)


def warn_vacuous_delta(fn: str, delta: float, n: int, unit: str = "examples") -> None:
    """Warn when ``δ ≥ 1/n``: such a guarantee is met by publishing one random record in the clear (it is
    (0, 1/n)-DP), so it protects nobody; δ should be well below 1/n (e.g. 1/n² or 1e-5 for n ≤ 1e5).

    ``n`` counts the privacy units the run's ε is about (``unit`` names them in the message: training
    examples, one site's examples, patients, slices)."""
    if delta * n >= 1:
        import warnings

        warnings.warn(f"{fn}: delta={delta!r} is not below 1/n = 1/{n} ({n} training {unit}): an (ε, δ) guarantee "
                      f"with δ ≥ 1/n allows publishing a whole record; pass --delta well below {1 / n:.3g}",
                      UserWarning, stacklevel=3)


def check_int_range(fn: str, name: str, value: object, *, low: Optional[int] = None,
                    high: Optional[int] = None) -> int:
    """An integer (not bool; a float is refused even if integral) in ``[low, high]``."""
    lo_s = "-inf" if low is None else str(low)
    hi_s = "inf" if high is None else str(high)
    what = f"an int in [{lo_s}, {hi_s}]" if high is not None else f"an int >= {lo_s}"
    if low is None and high is None:
        what = "an int"
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or _is_np_bool(value):
        raise _fail(fn, name, what, value)
    v = int(value)
    if (low is not None and v < low) or (high is not None and v > high):
        raise _fail(fn, name, what, value)
    return v


def check_enum(fn: str, name: str, value: object, enum_type: type) -> object:
    """A member of ``enum_type``, or one of its values (e.g. the string ``"pld"``), returned as the member."""
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(value)
    except (ValueError, TypeError):
        allowed = ", ".join(repr(m.value) for m in enum_type)
        raise _fail(fn, name, f"a {enum_type.__name__} or one of {allowed}", value) from None


def check_device_spec(fn: str, name: str, value: object) -> str:
    """A device string: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (N an int >= 0), returned
    stripped and lower-cased. Only the spelling is checked here; whether this machine has the device is
    :func:`dpfunc.devices.resolve_device`'s check (a saved config names the device it ran on, and must
    still load on a machine without it)."""
    what = "'auto', 'cpu', 'cuda' or 'cuda:N' (N an int >= 0)"
    if not isinstance(value, str):
        raise _fail(fn, name, what, value)
    text = value.strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return text
    kind, sep, index = text.partition(":")
    if kind != "cuda" or not sep or not index.isdigit() or not index.isascii():
        raise _fail(fn, name, what, value)
    return f"cuda:{int(index)}"
