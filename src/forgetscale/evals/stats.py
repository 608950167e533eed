"""Intervals for rates measured on a few dozen items: Wilson for one rate, Newcombe for a paired
difference (base vs tuned on the same items). Closed forms, so the same rows always print the same
interval; a difference whose interval contains 0 is reported as within noise."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of k successes in n trials ((nan, nan) for n = 0)."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


@dataclass(frozen=True)
class PairedDifference:
    """tuned rate - base rate on the same items, with its 95% interval and the discordant counts."""

    diff: float
    lo: float
    hi: float
    gained: int  # items where only the tuned model scores 1
    lost: int  # items where only the base model scores 1
    n: int

    @property
    def within_noise(self) -> bool:
        return not (self.lo > 0 or self.hi < 0)


def paired_difference(tuned: Sequence[bool], base: Sequence[bool], z: float = Z95) -> PairedDifference:
    """Newcombe's hybrid score interval (1998, method 10) for a difference of paired proportions."""
    if len(tuned) != len(base):
        raise ValueError("paired_difference needs the same items for both models")
    n = len(tuned)
    a = sum(1 for t, b in zip(tuned, base, strict=True) if t and b)
    gained = sum(1 for t, b in zip(tuned, base, strict=True) if t and not b)
    lost = sum(1 for t, b in zip(tuned, base, strict=True) if b and not t)
    d = n - a - gained - lost
    if n == 0:
        return PairedDifference(math.nan, math.nan, math.nan, 0, 0, 0)
    k1, k2 = a + gained, a + lost  # tuned successes, base successes
    p1, p2 = k1 / n, k2 / n
    l1, u1 = wilson(k1, n, z)
    l2, u2 = wilson(k2, n, z)
    margins = (a + gained) * (lost + d) * (a + lost) * (gained + d)
    phi = (a * d - gained * lost) / math.sqrt(margins) if margins > 0 else 0.0
    delta = math.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    eps = math.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    diff = p1 - p2
    return PairedDifference(diff, max(-1.0, diff - delta), min(1.0, diff + eps), gained, lost, n)
