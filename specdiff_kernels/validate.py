"""The scalar argument coercers of every layer: one convention, ``as_<kind>(name, value, ...)``.

Each returns the value as its plain Python type or raises a one-line error that names the
argument: TypeError for the wrong kind of value, ValueError for a value out of range. What they
refuse is what a silent conversion would get wrong: a bool is not an int (True would mean 1), a
float is not an int (2.7 would become 2), a string is not a flag ("no" is truthy).

This module sits below every layer (ops, sampling, integrations, models, cli): it imports no
project module (only the standard library, numpy and torch), so any module may use it.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Sequence

import numpy as np
import torch


def _int_kind(low: Optional[int], high: Optional[int]) -> str:
    """The words for an int in ``low..high`` (None: unbounded on that side)."""
    if low is not None and high is not None:
        return f"an int in {low}..{high}"
    if high is not None:
        return f"an int <= {high}"
    if low == 1:
        return "a positive int"
    if low == 0:
        return "a non-negative int"
    return "an int" if low is None else f"an int >= {low}"


def as_int(name: str, value, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """An int in ``low..high`` (bounds inclusive; None: unbounded). Bools, floats and strings
    are refused; numpy and torch integers (anything with ``__index__``) are accepted."""
    kind = _int_kind(low, high)
    if isinstance(value, bool):
        raise TypeError(f"{name} must be {kind}, got {value!r}")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be {kind}, got {value!r}") from None
    if (low is not None and n < low) or (high is not None and n > high):
        raise ValueError(f"{name} must be {kind}, got {n}")
    return n


def _is_real(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not (value.is_complex() or value.dtype == torch.bool)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _real_bound(low: float, high: float, open_low: bool, open_high: bool) -> str:
    if high < math.inf:
        lo, hi = f"{'(' if open_low else '['}{low:g}", f"{high:g}{')' if open_high else ']'}"
        return f" in {lo}, {hi}"
    if low > -math.inf:
        return f" {'>' if open_low else '>='} {low:g}"
    return ""


def as_real(
    name: str,
    value,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    open_low: bool = False,
    open_high: bool = False,
    finite: bool = True,
) -> float:
    """A float in the range (bounds closed unless ``open_*``), finite unless ``finite=False``
    (NaN is always refused); bools, strings and None are refused, a one-element tensor is
    accepted."""
    if not _is_real(value):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    ok = not math.isnan(v) and not (finite and math.isinf(v))
    ok = ok and (v > low if open_low else v >= low) and (v < high if open_high else v <= high)
    if not ok:
        bound = _real_bound(low, high, open_low, open_high)
        kind = "a finite number" if finite else ("a number" if bound else "a number, not NaN")
        raise ValueError(f"{name} must be {kind}{bound}, got {v}")
    return v


def as_flag(name: str, value) -> bool:
    """A bool (numpy's too); a string such as "no" would be truthy, 1 is not a flag."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def as_choice(name: str, value, options: Sequence[str]) -> str:
    """One of the strings ``options``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {tuple(options)}, got {value!r}")
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


__all__ = ["as_choice", "as_flag", "as_int", "as_real"]
