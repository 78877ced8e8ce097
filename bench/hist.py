"""Exact latency histograms at microsecond resolution.

Both load generators report per-request latencies as a :class:`Histogram`
(value in µs -> count), so runs can be merged exactly: the closed-loop
benchmark interleaves several short rounds per target and merges them, and
the multi-process generator merges its workers. Percentiles use the
nearest-rank rule, as wrk does (``rank = ceil(p / 100 * count)``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

__all__ = ["Histogram"]


class Histogram:
    """Counts of latencies in whole microseconds."""

    __slots__ = ("_counts", "_sorted")

    def __init__(self, counts: Mapping[int, int] | None = None) -> None:
        self._counts: dict[int, int] = {}
        self._sorted: list[tuple[int, int]] | None = None
        if counts:
            for value, n in counts.items():
                if n > 0:
                    self._counts[int(value)] = self._counts.get(int(value), 0) + int(n)

    @classmethod
    def from_samples(cls, samples_us: Iterable[int]) -> Histogram:
        """A histogram of raw samples (µs)."""
        hist = cls()
        counts = hist._counts
        for value in samples_us:
            counts[value] = counts.get(value, 0) + 1
        return hist

    @classmethod
    def merged(cls, parts: Iterable[Histogram]) -> Histogram:
        """The exact union of several histograms."""
        out = cls()
        for part in parts:
            out.update(part)
        return out

    def update(self, other: Histogram) -> None:
        """Add every sample of ``other`` to this histogram."""
        counts = self._counts
        for value, n in other._counts.items():
            counts[value] = counts.get(value, 0) + n
        self._sorted = None

    def items(self) -> list[tuple[int, int]]:
        """``(value_us, count)`` pairs in ascending order of value."""
        if self._sorted is None:
            self._sorted = sorted(self._counts.items())
        return self._sorted

    @property
    def count(self) -> int:
        return sum(self._counts.values())

    def mean_us(self) -> float:
        total = self.count
        return sum(v * n for v, n in self._counts.items()) / total if total else math.nan

    def max_us(self) -> int:
        return max(self._counts) if self._counts else 0

    def percentile_us(self, p: float) -> float:
        """The nearest-rank ``p``-th percentile (0 < p <= 100); NaN when empty."""
        total = self.count
        if total == 0:
            return math.nan
        rank = max(1, math.ceil(p / 100.0 * total))
        seen = 0
        for value, n in self.items():
            seen += n
            if seen >= rank:
                return float(value)
        return float(self.items()[-1][0])

    def percentiles_ms(self, ps: Iterable[float] = (50, 90, 99)) -> dict[str, float]:
        """``{"p50": ms, ...}`` for JSON reports (rounded to 1 µs)."""
        return {f"p{p:g}": round(self.percentile_us(p) / 1000.0, 3) for p in ps}

    def __repr__(self) -> str:
        return f"<Histogram n={self.count} p50={self.percentile_us(50):.0f}us max={self.max_us()}us>"
