"""Mean and spread of a figure over seeds, and the range a new seed's figure should fall in.

One seed is one draw: FlexDeMo's final loss moves by about 1% between seeds, as much as the
differences between schemes that a benchmark reports. Every headline figure is therefore a
mean with its spread, and a re-run is judged against the spread, not against one number.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
"""Student's t 97.5% quantiles for 1..10 degrees of freedom; beyond, the last (conservative)."""


def spread(values: Sequence[float]) -> dict[str, Any] | None:
    """``n``, ``mean``, ``std`` (sample, n-1; ``None`` for one value), ``min`` and ``max``;
    ``None`` for no values."""
    if not values:
        return None
    vals = [float(v) for v in values]
    return {
        "n": len(vals),
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else None,
        "min": min(vals),
        "max": max(vals),
    }


def prediction_interval(values: Sequence[float]) -> tuple[float, float] | None:
    """Where a new draw falls with 95% probability, for normally distributed draws:
    ``mean +- t * s * sqrt(1 + 1/n)``, widened to the observed min-max; ``None`` for n < 2."""
    s = spread(values)
    if s is None or s["n"] < 2:
        return None
    n = s["n"]
    half = T_975[min(n - 1, len(T_975)) - 1] * s["std"] * math.sqrt(1 + 1 / n)
    return min(s["mean"] - half, s["min"]), max(s["mean"] + half, s["max"])


def ratio_of_means(a: Sequence[float | None], b: Sequence[float | None]) -> float | None:
    """mean(a) / mean(b), or ``None`` when either has a missing value or b's mean is 0."""
    if not a or not b or any(v is None for v in (*a, *b)):
        return None
    den = statistics.fmean(float(v) for v in b if v is not None)
    return statistics.fmean(float(v) for v in a if v is not None) / den if den else None
