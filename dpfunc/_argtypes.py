"""Argument types for the ``dpfunc`` command line: each flag is checked where it is parsed, and the
message names the flag, the allowed range and what was given (argparse prints it with the usage line).

Example:
    >>> int_at_least("--epochs", 1)("3")
    3
    >>> unit_interval("--delta")("0.5")
    0.5
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["positive_float", "unit_interval", "int_at_least", "device_spec"]


def _number(name: str, text: str, kind: type, word: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be {word}, got {text!r}") from None


def positive_float(name: str) -> Callable[[str], float]:
    """A finite number > 0."""

    def parse(text: str) -> float:
        v = _number(name, text, float, "a number")
        if not (v > 0 and math.isfinite(v)):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number > 0, got {text!r}")
        return v

    return parse


def unit_interval(name: str, *, closed_right: bool = False) -> Callable[[str], float]:
    """A number in (0, 1), or (0, 1] with ``closed_right``."""

    def parse(text: str) -> float:
        v = _number(name, text, float, "a number")
        if not (0 < v <= 1 if closed_right else 0 < v < 1):
            raise argparse.ArgumentTypeError(f"{name} must be in (0, 1{']' if closed_right else ')'}, got {text!r}")
        return v

    return parse


def int_at_least(name: str, low: int) -> Callable[[str], int]:
    """An integer ≥ ``low``."""

    def parse(text: str) -> int:
        v = _number(name, text, int, "an integer")
        if v < low:
            raise argparse.ArgumentTypeError(f"{name} must be >= {low}, got {text!r}")
        return v

    return parse


def device_spec(name: str) -> Callable[[str], str]:
    """A device spelling: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (whether the machine has it is
    checked when the command runs, by :func:`dpfunc.devices.resolve_device`)."""
    from dpfunc._validate import check_device_spec

    def parse(text: str) -> str:
        try:
            return check_device_spec("", name, text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(": ")) from None

    return parse
