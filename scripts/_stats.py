"""The one percentile definition of the benchmark scripts.

``percentile(values, p)`` is ``statistics.quantiles(values, n=100, method="inclusive")[p - 1]``:
the linear interpolation between the closest ranks of the sorted sample (method "inclusive",
the same as numpy's default), so a percentile never lies outside the smallest and largest
value measured, even for a small sample. Imported by the scripts as ``from _stats import
percentile`` (they run with ``scripts/`` first on ``sys.path``).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

__all__ = ["percentile"]


def percentile(values: Sequence[float], p: int) -> float:
    """The ``p``-th percentile (1 <= p <= 99) of ``values``; NaN if there are none."""
    if not 1 <= p <= 99:
        raise ValueError("p is a whole percentile, 1..99")
    if not values:
        return float("nan")
    if len(values) == 1:
        return float(values[0])
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]
