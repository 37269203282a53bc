"""One shard's behaviour: registration handshake, initialization, push and pull.

This is the logic behind the RPCs, free of gRPC: the servicer parses messages and calls these
methods with plain values. It is asyncio-aware only where a caller must wait (a worker that
registers while another worker is still initializing the shard).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ranger_ps import __version__
from ranger_ps.frames import WireBlock
from ranger_ps.layout import Layout
from ranger_ps.placement import Placement
from ranger_ps.rules import RuleConfig
from ranger_ps.server.errors import NotReady, PreconditionFailed
from ranger_ps.server.membership import Membership, WorkerSnapshot
from ranger_ps.server.store import ShardStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    """The answer to a registration."""

    worker_id: int
    must_initialize: bool
    block_ids: tuple[int, ...]


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
    workers: tuple[WorkerSnapshot, ...]
    version: str


class Shard:
    """The state and behaviour of one parameter-server shard.

    Args:
        shard_id: this shard's index, ``0 <= shard_id < num_shards``.
        num_shards: how many shards the model is spread over.
        init_claim_seconds: how long the worker asked to initialize the shard has to do it
            before another worker may take over.
        register_wait_seconds: how long a registration waits for an initialization under way.
    """

    def __init__(
        self,
        shard_id: int,
        num_shards: int,
        *,
        init_claim_seconds: float = 30.0,
        register_wait_seconds: float = 60.0,
    ) -> None:
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard id {shard_id} is outside [0, {num_shards})")
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.init_claim_seconds = init_claim_seconds
        self.register_wait_seconds = register_wait_seconds
        self.store: ShardStore | None = None
        self.membership = Membership()
        self._claim: tuple[int, float] | None = None  # (worker id, deadline)
        self._initialized = asyncio.Event()
        self._started = time.monotonic()
        self.pushes_applied = 0
        self.pulls_served = 0
        self.bytes_received = 0
        self.bytes_sent = 0

    # -- registration and initialization ---------------------------------------------------

    async def register(
        self,
        worker_id: int,
        layout: Layout,
        rule: RuleConfig,
        expected_shard_id: int,
        expected_num_shards: int,
        *,
        observer: bool = False,
    ) -> Registration:
        """Handshake: adopt or check the layout and rule; maybe ask this worker to initialize."""
        if (expected_shard_id, expected_num_shards) != (self.shard_id, self.num_shards):
            raise PreconditionFailed(
                f"this server is shard {self.shard_id} of {self.num_shards}, but the worker lists it as "
                f"shard {expected_shard_id} of {expected_num_shards}: check the order and count of --servers"
            )
        deadline = time.monotonic() + self.register_wait_seconds
        while True:
            if self.store is None:
                placement = Placement.compute(layout, self.num_shards)
                self.store = ShardStore(layout, placement.blocks_by_shard[self.shard_id], rule)
                log.info(
                    "shard %d adopted layout %s (%d blocks here, rule %s)",
                    self.shard_id,
                    layout.fingerprint,
                    len(self.store.block_ids),
                    rule.name,
                )
                return self._grant_claim(worker_id, observer)
            self._check_match(layout, rule)
            if self.store.initialized:
                record = self.membership.register(worker_id, observer=observer)
                return Registration(record.worker_id, False, self.store.block_ids)
            now = time.monotonic()
            assert self._claim is not None
            holder, claim_deadline = self._claim
            if holder == worker_id or now >= claim_deadline:
                if holder != worker_id:
                    log.warning("worker %d did not initialize shard %d in time; handing over", holder, self.shard_id)
                return self._grant_claim(worker_id, observer)
            wait = min(claim_deadline, deadline) - now
            if wait <= 0:
                raise NotReady(f"shard {self.shard_id} is still waiting for worker {holder} to initialize it")
            try:
                await asyncio.wait_for(self._initialized.wait(), timeout=wait)
            except TimeoutError:
                pass

    def _grant_claim(self, worker_id: int, observer: bool) -> Registration:
        assert self.store is not None
        record = self.membership.register(worker_id, observer=observer)
        self._claim = (record.worker_id, time.monotonic() + self.init_claim_seconds)
        return Registration(record.worker_id, True, self.store.block_ids)

    def _check_match(self, layout: Layout, rule: RuleConfig) -> None:
        assert self.store is not None
        ours = self.store.layout
        if layout.fingerprint != ours.fingerprint:
            raise PreconditionFailed(
                f"layout mismatch: shard {self.shard_id} holds layout {ours.fingerprint} "
                f"({len(ours.params)} parameters, {ours.numel} elements, block size {ours.block_size}); "
                f"the worker sent {layout.fingerprint} ({len(layout.params)} parameters, {layout.numel} elements, "
                f"block size {layout.block_size})"
            )
        diffs = self.store.rule.differences(rule)
        if diffs:
            raise PreconditionFailed(
                f"update rule mismatch on shard {self.shard_id} (shard != worker): {'; '.join(diffs)}"
            )

    async def initialize(self, worker_id: int, blocks: Sequence[WireBlock]) -> int:
        """Install the initial block values sent by the worker holding the claim."""
        store = self._require_store()
        holder = self._claim[0] if self._claim else None
        if store.initialized:
            if worker_id == holder:
                return len(store.block_ids)  # a retried init whose reply was lost
            raise PreconditionFailed(f"shard {self.shard_id} is already initialized")
        if worker_id != holder:
            raise PreconditionFailed(f"worker {worker_id} was not asked to initialize shard {self.shard_id}")
        count = store.initialize(blocks)
        self._initialized.set()
        log.info("shard %d initialized by worker %d (%d blocks)", self.shard_id, worker_id, count)
        return count

    # -- training traffic --------------------------------------------------------------------

    async def push(self, worker_id: int, clock: int, blocks: Sequence[WireBlock]) -> tuple[int, int]:
        """Apply a worker's gradients; returns (blocks applied, sum of their versions)."""
        store = self._require_store()
        self._require_worker(worker_id)
        applied, version_sum = store.apply(blocks)
        self.pushes_applied += 1
        self.membership.seen(worker_id, clock)
        return applied, version_sum

    def pull(self, worker_id: int, known_versions: Sequence[int]) -> Iterator[WireBlock]:
        """Blocks newer than the worker's versions (see :meth:`ShardStore.newer_than`)."""
        store = self._require_store()
        self._require_worker(worker_id)
        self.membership.seen(worker_id)
        self.pulls_served += 1
        return store.newer_than(known_versions)

    def stats(self) -> ShardStats:
        store = self.store
        return ShardStats(
            shard_id=self.shard_id,
            num_shards=self.num_shards,
            initialized=bool(store and store.initialized),
            layout_fingerprint=store.layout.fingerprint if store else "",
            rule=store.rule.name if store else "",
            num_blocks=len(store.block_ids) if store else 0,
            num_elements=store.num_elements if store else 0,
            nbytes=store.nbytes if store else 0,
            version_sum=store.version_sum if store else 0,
            pushes_applied=self.pushes_applied,
            blocks_applied=store.blocks_applied if store else 0,
            pulls_served=self.pulls_served,
            bytes_received=self.bytes_received,
            bytes_sent=self.bytes_sent,
            uptime_seconds=time.monotonic() - self._started,
            workers=self.membership.snapshot(),
            version=__version__,
        )

    def _require_store(self) -> ShardStore:
        if self.store is None:
            raise NotReady(f"shard {self.shard_id} has no model yet: a worker must register first")
        return self.store

    def _require_worker(self, worker_id: int) -> None:
        if self.membership.get(worker_id) is None:
            raise PreconditionFailed(f"worker {worker_id} is not registered on shard {self.shard_id}")
