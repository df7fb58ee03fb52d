"""Argument checks shared by the library and the programs: errors name the argument, the value and what was expected.

No TensorFlow here: `trainers/checks.py` answers a bad config with these before
TensorFlow loads. Every message reads "NAME must be EXPECTED, got VALUE".
"""
from __future__ import annotations

import math
import numbers
from typing import Callable


def is_int(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite Python or NumPy real number, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def require(name: str, value, ok: Callable[[object], bool], expected: str):
    """`value` when `ok(value)`; else ValueError("NAME must be EXPECTED, got VALUE")."""
    if not ok(value):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return value


def positive_int(name: str, value) -> int:
    return int(require(name, value, lambda v: is_int(v) and v > 0, "a positive int"))


def non_negative_int(name: str, value) -> int:
    return int(require(name, value, lambda v: is_int(v) and v >= 0, "an int >= 0"))


def optional_seed(value, name: str = "seed") -> int | None:
    """An int seed or None (None: fresh randomness)."""
    return None if require(name, value, lambda v: v is None or is_int(v), "an int or None") is None else int(value)


def image_size(value) -> tuple[int, int]:
    """A positive int or a (height, width) pair of positive ints -> (height, width)."""
    size = (value, value) if is_int(value) else value
    try:
        height, width = size
        ok = is_int(height) and is_int(width) and height > 0 and width > 0
    except (TypeError, ValueError):
        ok = False
    require("image_size", value, lambda _: ok, "a positive int or a (height, width) pair of positive ints")
    return int(height), int(width)


def channels(value) -> int:
    return int(require("channels", value, lambda v: is_int(v) and v in (1, 3), "1 or 3"))


def crop_fraction(value) -> float:
    """The evaluation crop's share of the resized image's shorter side, in (0, 1]."""
    return float(require("crop_fraction", value, lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"))
