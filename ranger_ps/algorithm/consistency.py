"""Consistency models: how stale a worker's view may be, and staleness bookkeeping.

- ``async``: every push is applied at once; pulls return the newest blocks.
- ``ssp:K`` (stale synchronous parallel): a worker whose clock is more than ``K`` ahead of the
  slowest live worker waits (its pull blocks) until the slowest catches up.
- ``bsp`` (bulk synchronous): for each clock the server waits for the push of every live worker,
  applies their mean once, and a pull for clock ``c`` returns only once clock ``c`` is applied.

A worker's clock is its step: every push carries the next clock, and a push always reaches every
shard (an empty one where none of the shard's blocks was chosen), so barriers count clock ticks,
never blocks, and sparse pushes cannot deadlock them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ConsistencyMode:
    """A parsed ``--consistency`` value."""

    kind: str  # "async", "ssp" or "bsp"
    bound: int = 0  # K of ssp:K

    def __str__(self) -> str:
        return f"ssp:{self.bound}" if self.kind == "ssp" else self.kind

    @property
    def waits(self) -> bool:
        return self.kind != "async"


def parse_consistency(text: str) -> ConsistencyMode:
    """Parse ``async``, ``ssp:K`` (K >= 0) or ``bsp``; raises ``ValueError`` with the accepted forms."""
    value = text.strip().lower()
    if value in ("async", "bsp"):
        return ConsistencyMode(value)
    match = re.fullmatch(r"ssp:(\d+)", value)
    if match:
        return ConsistencyMode("ssp", int(match.group(1)))
    raise ValueError(f"consistency must be async, ssp:K (K >= 0) or bsp, got {text!r}")


class Histogram:
    """Exact counts of small non-negative integers, with percentiles."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}

    def add(self, value: int, count: int = 1) -> None:
        value = max(0, value)
        self.counts[value] = self.counts.get(value, 0) + count

    def add_all(self, values: torch.Tensor) -> None:
        """Count every value of an integer tensor (negative ones as 0)."""
        if values.numel():
            found, counts = torch.unique(values.clamp(min=0), return_counts=True)
            for value, count in zip(found.tolist(), counts.tolist(), strict=True):
                self.add(int(value), int(count))

    def merge(self, counts: dict[int, int]) -> None:
        for value, count in counts.items():
            self.add(value, count)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def percentile(self, q: float) -> int:
        """The smallest value with at least ``q`` (0..1) of the mass at or below it; 0 when empty."""
        total = self.total
        if total == 0:
            return 0
        threshold = q * total
        seen = 0
        for value in sorted(self.counts):
            seen += self.counts[value]
            if seen >= threshold:
                return value
        return max(self.counts)

    def maximum(self) -> int:
        return max(self.counts, default=0)


def staleness_summary(count_maps: list[dict[int, int]], version_maps: list[dict[int, int]]) -> dict[str, int]:
    """The report's staleness keys from per-shard histograms (shard 0's pushes count once per push).

    Every push reaches every shard, so clock staleness is taken from the first shard alone; the
    per-block version lag is summed over shards (each block lives on one shard).
    """
    clocks = Histogram()
    if count_maps:
        clocks.merge(count_maps[0])
    versions = Histogram()
    for counts in version_maps:
        versions.merge(counts)
    return {
        "staleness_p50": clocks.percentile(0.5),
        "staleness_p99": clocks.percentile(0.99),
        "staleness_max": clocks.maximum(),
        "version_lag_p50": versions.percentile(0.5),
        "version_lag_p99": versions.percentile(0.99),
    }
