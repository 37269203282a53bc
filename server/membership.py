"""Which workers a shard knows: ids, clocks, leases, and who counts for the barriers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ranger_ps.wire.stats import WorkerStats


@dataclass
class WorkerRecord:
    """What the shard knows of one worker."""

    worker_id: int
    clock: int = 0
    pushes: int = 0
    last_seen: float = 0.0
    observer: bool = False
    live: bool = True
    # The clock the worker (re)joined at; under bsp it takes part in the barriers of later clocks.
    join_clock: int = 0
    pushed_since_join: bool = False
    # Pulls of this worker waiting at a barrier right now: a waiting worker is alive.
    waiting: int = 0
    # The view the worker last pulled: the slowest live clock then, and each block's version.
    view_clock: int = 0
    view_versions: torch.Tensor | None = None  # each block's version at the worker's last pull
    # Set while the worker's latest push is being applied: a retry of it is acknowledged once it is.
    applying: asyncio.Event | None = None
    # What the registration's later calls carry (None: a v1 worker, whose calls are not checked).
    secret: bytes | None = None
    # The worker keeps its place until then even if not heard from (a restored shard waits for it).
    held_until: float = 0.0


class Membership:
    """Registered workers with leases; id assignment for workers that do not bring one.

    A worker is live while it has been heard from (any call, or a heartbeat) within
    ``lease_seconds``; :meth:`expire` drops the others from the barriers. Observers never count.
    """

    def __init__(self, lease_seconds: float = 5.0, clock: Callable[[], float] | None = None) -> None:
        self.lease_seconds = lease_seconds
        self._now = clock or time.monotonic
        self._workers: dict[int, WorkerRecord] = {}
        self._next_id = 0
        self._expired_at: float | None = None  # when expire() last ran

    def register(self, requested_id: int, *, observer: bool = False) -> WorkerRecord:
        """Register (or re-register, reviving) a worker; ``requested_id < 0`` assigns the next free id.

        Observers get ids from a separate range (counting down from -2) so they never take an id
        a training worker might ask for.
        """
        if requested_id < 0:
            if observer:
                requested_id = -2 - sum(1 for r in self._workers.values() if r.observer)
                while requested_id in self._workers:
                    requested_id -= 1
            else:
                while self._next_id in self._workers:
                    self._next_id += 1
                requested_id = self._next_id
        record = self._workers.get(requested_id)
        if record is None:
            record = WorkerRecord(requested_id, observer=observer)
            self._workers[requested_id] = record
        record.live = True
        record.last_seen = self._now()
        return record

    def hold(self, worker_id: int, seconds: float) -> None:
        """Keep a worker live for ``seconds`` from now (at least), heard from or not."""
        record = self._workers[worker_id]
        record.live = True
        record.last_seen = self._now()
        record.held_until = record.last_seen + seconds

    def items(self) -> list[tuple[int, WorkerRecord]]:
        """Every known worker, live or not."""
        return list(self._workers.items())

    def get(self, worker_id: int) -> WorkerRecord | None:
        return self._workers.get(worker_id)

    def seen(self, worker_id: int) -> None:
        """Renew a worker's lease."""
        record = self._workers.get(worker_id)
        if record is not None and record.live:
            record.last_seen = self._now()

    def leave(self, worker_id: int) -> bool:
        """Drop a worker from the barriers now; returns whether it was live."""
        record = self._workers.get(worker_id)
        if record is None or not record.live:
            return False
        record.live = False
        return True

    def expire(self) -> list[int]:
        """Mark workers whose lease lapsed as gone; returns their ids.

        Called periodically (several times a lease). When the previous call was more than a lease ago,
        the shard itself was not running (paused, or its loop held up): the silence is its own, so every
        live worker gets a new lease instead of being dropped.
        """
        now = self._now()
        previous, self._expired_at = self._expired_at, now
        if previous is not None and now - previous > self.lease_seconds:
            for record in self._workers.values():
                if record.live:
                    record.last_seen = now
            return []
        deadline = now - self.lease_seconds
        for record in self._workers.values():
            if record.waiting:
                record.last_seen = now
        gone = [
            r.worker_id for r in self._workers.values() if r.live and r.last_seen < deadline and r.held_until <= now
        ]
        for worker_id in gone:
            self._workers[worker_id].live = False
        return gone

    def forget_departed(self, after_seconds: float, keep: int) -> int:
        """Drop records of workers gone (left or lease lapsed) for ``after_seconds``, and the oldest beyond
        ``keep`` departed ones; returns how many were dropped."""
        now = self._now()
        departed = sorted((r for r in self._workers.values() if not r.live), key=lambda r: r.last_seen)
        drop = [r for r in departed if r.last_seen < now - after_seconds]
        kept = [r for r in departed if r.last_seen >= now - after_seconds]
        drop += kept[: max(0, len(kept) - keep)]
        for record in drop:
            del self._workers[record.worker_id]
        return len(drop)

    def trainers(self) -> list[WorkerRecord]:
        """Live training workers (not observers), by id."""
        return [r for _, r in sorted(self._workers.items()) if r.live and not r.observer]

    def slowest_clock(self) -> int | None:
        """The smallest clock among live training workers (None when there are none)."""
        return min((r.clock for r in self.trainers()), default=None)

    def snapshot(self) -> tuple[WorkerStats, ...]:
        """Every known worker, by id, with how long ago it was last heard from."""
        now = self._now()
        return tuple(
            WorkerStats(r.worker_id, r.clock, r.pushes, now - r.last_seen, r.observer, r.live)
            for r in (self._workers[k] for k in sorted(self._workers))
        )
