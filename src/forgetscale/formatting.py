"""Numbers as forgetscale prints them, in the terminal tables and the report: one set, so a value reads
the same in every verb. Imports nothing of forgetscale (and no torch), so any layer may use it.

A missing number (None, which is how laws.json stores NaN; NaN; infinite) prints as "-", except where
`measured` and `cell` say otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def missing(x: Any) -> bool:
    """None, NaN or infinite: nothing to print."""
    return x is None or not math.isfinite(x)


def num(x: Any, digits: int = 4) -> str:
    """Significant digits ('1.234', '5.6e-05'): constants and losses of any scale."""
    return "-" if missing(x) else f"{x:.{digits}g}"


def fixed(x: Any, digits: int = 4) -> str:
    """Fixed decimals: losses in nats side by side in a column."""
    return "-" if missing(x) else f"{x:.{digits}f}"


def signed(x: Any, digits: int = 4) -> str:
    """Fixed decimals with a sign: differences (arm minus control)."""
    return "-" if missing(x) else f"{x:+.{digits}f}"


def pct(x: Any, digits: int = 2) -> str:
    """A share as a percentage ('12.34%')."""
    return "-" if missing(x) else f"{100 * x:.{digits}f}%"


def bracket(lo: Any, hi: Any, fmt: Callable[[Any], str] = num) -> str:
    """'[lo, hi]' in `fmt`, a missing end as `fmt` prints it ('[-, -]'): a column of constants."""
    return f"[{fmt(lo)}, {fmt(hi)}]"


def interval(lo: Any, hi: Any, fmt: Callable[[Any], str] = fixed, none: str = "none") -> str:
    """'[lo, hi]' in `fmt`, or `none` when either end is missing."""
    return none if missing(lo) or missing(hi) else bracket(lo, hi, fmt)


def ci_suffix(lo: Any, hi: Any, fmt: Callable[[Any], str] = num) -> str:
    """' [lo, hi]' to follow a value, or nothing when either end is missing."""
    return "" if missing(lo) or missing(hi) else f" {interval(lo, hi, fmt)}"


def measured(x: Any, digits: int = 4) -> str:
    """A freshly measured value: '-' only when not measured (None); a NaN shows as 'nan', it is a fault."""
    return "-" if x is None else f"{x:.{digits}g}"


def cell(value: Any, digits: int = 4) -> str:
    """A stored row's value: floats with fixed decimals ('nan' shows), counts with thousands separators."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)
