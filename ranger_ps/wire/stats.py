"""A shard's counters as plain typed values, and their wire form (``StatsReply``).

The shard produces :class:`ShardStats`; the servicer sends it as a ``StatsReply``; clients turn the
reply back into :class:`ShardStats`. Nothing above the wire ever handles the protobuf message.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ranger_ps.wire._proto import ranger_ps_pb2 as pb


@dataclass(frozen=True)
class WorkerStats:
    """What a shard knows of one worker at one moment."""

    worker_id: int
    clock: int
    pushes: int
    seconds_since_seen: float
    observer: bool
    live: bool


@dataclass(frozen=True)
class ShardStats:
    """A snapshot of a shard's counters."""

    shard_id: int
    num_shards: int
    initialized: bool
    layout_fingerprint: str
    rule: str
    num_blocks: int
    num_elements: int
    nbytes: int
    version_sum: int
    pushes_applied: int
    blocks_applied: int
    pulls_served: int
    bytes_received: int
    bytes_sent: int
    uptime_seconds: float
    workers: tuple[WorkerStats, ...]
    version: str
    consistency: str
    applied_clock: int
    staleness_counts: dict[int, int]
    version_lag_counts: dict[int, int]

    @property
    def trainers(self) -> list[WorkerStats]:
        """The live training workers (not observers)."""
        return [w for w in self.workers if w.live and not w.observer]

    def to_plain(self) -> dict[str, Any]:
        """JSON-ready values (``status --json``): histograms keyed by decimal strings, in order."""
        out = dataclasses.asdict(self)
        out["workers"] = [dataclasses.asdict(w) for w in self.workers]
        for name in ("staleness_counts", "version_lag_counts"):
            out[name] = {str(k): v for k, v in sorted(getattr(self, name).items())}
        return out

    def to_proto(self) -> pb.StatsReply:
        """The wire message."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "workers"}
        return pb.StatsReply(workers=[pb.WorkerStats(**dataclasses.asdict(w)) for w in self.workers], **fields)

    @classmethod
    def from_proto(cls, reply: pb.StatsReply) -> ShardStats:
        """Plain values from the wire message."""
        scalars = {
            f.name: getattr(reply, f.name)
            for f in dataclasses.fields(cls)
            if f.name not in ("workers", "staleness_counts", "version_lag_counts")
        }
        workers = tuple(
            WorkerStats(
                worker_id=w.worker_id,
                clock=w.clock,
                pushes=w.pushes,
                seconds_since_seen=w.seconds_since_seen,
                observer=w.observer,
                live=w.live,
            )
            for w in reply.workers
        )
        return cls(
            workers=workers,
            staleness_counts=dict(reply.staleness_counts),
            version_lag_counts=dict(reply.version_lag_counts),
            **scalars,
        )
