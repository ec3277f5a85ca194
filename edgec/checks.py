"""Range checks for option values, so a bad value fails where it is given, in one sentence
naming the option, and never deep in a pass. Names are given as the API field and its CLI
flag (``calib_samples (--calib-samples)``), since the same options come from both."""

from __future__ import annotations

import math
from collections.abc import Collection

from edgec.errors import OptionError


def option(field: str, flag: str | None = None) -> str:
    """How a message names an option: ``calib_samples (--calib-samples)``."""
    return f"{field} ({flag or '--' + field.replace('_', '-')})"


def finite(name: str, value: float) -> None:
    """``value`` is a finite number."""
    if not _number(value):
        raise OptionError(f"{name} must be a finite number, not {value!r}.")


def at_least(name: str, value: float | None, low: float) -> None:
    """``value`` (None: not given) is a number ≥ ``low``."""
    if value is not None and not (_number(value) and value >= low):
        raise OptionError(f"{name} must be at least {low:g}, not {value!r}.")


def above(name: str, value: float | None, low: float) -> None:
    """``value`` (None: not given) is a number > ``low``."""
    if value is not None and not (_number(value) and value > low):
        raise OptionError(f"{name} must be greater than {low:g}, not {value!r}.")


def within(name: str, value: float | None, low: float, high: float, *, include_high: bool = True) -> None:
    """``value`` (None: not given) lies in [low, high] (or [low, high) without ``include_high``)."""
    if value is not None and not (_number(value) and low <= value and (value <= high if include_high else value < high)):
        raise OptionError(f"{name} must be in [{low:g}, {high:g}{']' if include_high else ')'}, not {value!r}.")


def one_of(name: str, value: str | None, allowed: Collection[str]) -> None:
    """``value`` (None: not given) is one of ``allowed``."""
    if value is not None and value not in allowed:
        raise OptionError(f"{name} must be one of {', '.join(sorted(allowed))}, not {value!r}.")


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
