"""Which workers a shard knows: ids, clocks and when each was last heard from."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class WorkerRecord:
    """What the shard knows of one worker."""

    worker_id: int
    clock: int = 0
    pushes: int = 0
    last_seen: float = 0.0
    observer: bool = False


@dataclass(frozen=True)
class WorkerSnapshot:
    """A read-only view of a worker record at one moment."""

    worker_id: int
    clock: int
    pushes: int
    seconds_since_seen: float
    observer: bool


class Membership:
    """Registered workers, with id assignment for workers that do not bring one."""

    def __init__(self) -> None:
        self._workers: dict[int, WorkerRecord] = {}
        self._next_id = 0

    def register(self, requested_id: int, *, observer: bool = False) -> WorkerRecord:
        """Register (or re-register) a worker; ``requested_id < 0`` assigns the next free id.

        Observers get ids from a separate range (counting down from -2) so they never take an id
        a training worker might ask for.
        """
        if observer and requested_id < 0:
            requested_id = -2 - sum(1 for r in self._workers.values() if r.observer)
            while requested_id in self._workers:
                requested_id -= 1
        if requested_id < 0:
            while self._next_id in self._workers:
                self._next_id += 1
            requested_id = self._next_id
        record = self._workers.get(requested_id)
        if record is None:
            record = WorkerRecord(requested_id, observer=observer)
            self._workers[requested_id] = record
        record.last_seen = time.monotonic()
        return record

    def get(self, worker_id: int) -> WorkerRecord | None:
        return self._workers.get(worker_id)

    def seen(self, worker_id: int, clock: int | None = None) -> None:
        """Note that a worker was heard from, at ``clock`` when given."""
        record = self._workers.get(worker_id)
        if record is None:
            return
        record.last_seen = time.monotonic()
        if clock is not None:
            record.clock = max(record.clock, clock)
            record.pushes += 1

    def snapshot(self) -> tuple[WorkerSnapshot, ...]:
        """Every known worker, by id, with how long ago it was last heard from."""
        now = time.monotonic()
        return tuple(
            WorkerSnapshot(r.worker_id, r.clock, r.pushes, now - r.last_seen, r.observer)
            for r in (self._workers[k] for k in sorted(self._workers))
        )
