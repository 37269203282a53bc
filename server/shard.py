"""One shard's behaviour: registration handshake, initialization, push, pull and the barriers.

This is the logic behind the RPCs, free of gRPC: the servicer parses messages and calls these
methods with plain values. It is asyncio-aware where a caller must wait: a worker that registers
while another is initializing the shard, a pull that waits for the slowest worker (ssp) or for a
clock's combined update (bsp). Everything else runs without yielding, so a push is applied all at
once and a block is never seen half-updated.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from ranger_ps.algorithm.consistency import ConsistencyMode, Histogram, parse_consistency
from ranger_ps.algorithm.layout import Layout
from ranger_ps.algorithm.placement import Placement
from ranger_ps.algorithm.rules import RuleConfig
from ranger_ps.config.server import ShardSettings
from ranger_ps.server.membership import Membership, WorkerRecord
from ranger_ps.server.store import EMPTY, Decoded, PulledRun, ShardStore
from ranger_ps.storage.checkpoint import ShardCheckpoint
from ranger_ps.version import __version__
from ranger_ps.wire.frames import WireBlock
from ranger_ps.wire.pushes import SECRET_BYTES
from ranger_ps.wire.runs import WireRun
from ranger_ps.wire.stats import ShardStats
from ranger_ps.wire.status import (
    Exhausted,
    IdInUse,
    InvalidRequest,
    NonFinite,
    NotReady,
    NotRegistered,
    PreconditionFailed,
    WrongSecret,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")

DEPARTED_SECONDS = 600.0
#: How long a restored shard keeps the places of the workers in its checkpoint for them to come back.
RESTORED_HOLD_SECONDS = 15.0
"""How long a shard remembers a worker that left or lost its lease (its clock, for a late retry)."""

MAX_CLOCK_AHEAD = 1 << 20
"""A push clock this far beyond every clock the shard has seen is refused (a real worker moves by one)."""

OFF_LOOP_APPLY_BYTES = 1 << 20
"""An async push carrying at least this many gradient bytes is applied in a worker thread."""


@dataclass(frozen=True)
class Registration:
    """The answer to a registration."""

    worker_id: int
    must_initialize: bool
    block_ids: tuple[int, ...]
    clock: int
    pushed_clock: int = 0  # the clock of the worker's last push this shard holds (0: none)
    secret: bytes = b""  # what the worker's later calls carry (empty: a v1 worker, not checked)


class Shard:
    """The state and behaviour of one parameter-server shard.

    Args:
        shard_id: this shard's index, ``0 <= shard_id < num_shards``.
        num_shards: how many shards the model is spread over.
        settings: consistency, leases, limits (:class:`~ranger_ps.config.server.ShardSettings`).
    """

    def __init__(self, shard_id: int, num_shards: int, settings: ShardSettings | None = None) -> None:
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard id {shard_id} is outside [0, {num_shards})")
        settings = settings or ShardSettings()
        self.settings = settings
        self.shard_id = shard_id
        self.num_shards = num_shards
        self.nan_policy = settings.nan_policy
        self.max_workers = settings.max_workers
        self.pushes_skipped = 0
        self.mode: ConsistencyMode = parse_consistency(settings.consistency)
        self.wait_seconds = settings.wait_seconds
        self.init_claim_seconds = settings.init_claim_seconds
        self.register_wait_seconds = settings.register_wait_seconds
        self.store: ShardStore | None = None
        self.membership = Membership(settings.lease_seconds)
        self._claim: tuple[int, float] | None = None  # (worker id, deadline)
        self._initialized = asyncio.Event()
        self._changed = asyncio.Condition()
        self._started = time.monotonic()
        # bsp: the last clock whose combined update is applied, and the pushes waiting per clock.
        self.applied_clock = 0
        self._pending: dict[int, dict[int, Decoded]] = {}
        self.staleness = Histogram()
        self.version_lag = Histogram()
        self.pushes_applied = 0
        self.duplicates = 0
        self.stopping = False
        self.pulls_served = 0
        self.bytes_received = 0
        self.bytes_sent = 0
        # Called with (seconds, blocks) after every update applied to the store (metrics hook).
        self.apply_observers: list[Callable[[float, int], None]] = []
        # Held while an update is applied (possibly in a thread): updates never overlap, and a
        # checkpoint taken under it is a consistent cut.
        self.apply_lock = asyncio.Lock()

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
        consistency: str = "",
        identity: bool = False,
        secret: bytes = b"",
    ) -> Registration:
        """Handshake: adopt or check the layout and rule; maybe ask this worker to initialize.

        With ``identity`` the registration gets a fresh secret its later calls must carry; a worker id
        that is live under another registration's secret is refused (``secret`` renews one's own).
        """
        self._check_identity(worker_id, secret)
        if (expected_shard_id, expected_num_shards) != (self.shard_id, self.num_shards):
            raise PreconditionFailed(
                f"this server is shard {self.shard_id} of {self.num_shards}, but the worker lists it as "
                f"shard {expected_shard_id} of {expected_num_shards}: check the order and count of --servers"
            )
        if consistency:
            try:
                wanted = parse_consistency(consistency)
            except ValueError as exc:
                raise InvalidRequest(str(exc)) from None
            if wanted != self.mode:
                raise PreconditionFailed(
                    f"consistency mismatch: shard {self.shard_id} runs {self.mode}, the worker expects {wanted}"
                )
        deadline = time.monotonic() + self.register_wait_seconds
        while True:
            claim = self._claim
            if self.store is not None and not self.store.initialized and claim and time.monotonic() >= claim[1]:
                # The worker that brought the layout never initialized it: forget both, so the next
                # worker's layout (right or wrong) is not judged against an abandoned one.
                log.warning(
                    "worker %d did not initialize shard %d in time; its layout is forgotten", claim[0], self.shard_id
                )
                self.store, self._claim = None, None
            if self.store is None:
                placement = Placement.compute(layout, self.num_shards)
                self.store = ShardStore(layout, placement.blocks_by_shard[self.shard_id], rule)
                log.info(
                    "shard %d adopted layout %s (%d blocks here, rule %s, %s)",
                    self.shard_id, layout.fingerprint, len(self.store.block_ids), rule.rule, self.mode,
                )  # fmt: skip
                return await self._grant_claim(worker_id, observer, identity)
            self._check_match(layout, None if observer else rule)
            if self.store.initialized:
                return await self._admit(worker_id, observer, must_initialize=False, identity=identity)
            now = time.monotonic()
            assert self._claim is not None
            holder, claim_deadline = self._claim
            if holder == worker_id or now >= claim_deadline:
                if holder != worker_id:
                    log.warning("worker %d did not initialize shard %d in time; handing over", holder, self.shard_id)
                return await self._grant_claim(worker_id, observer, identity)
            wait = min(claim_deadline, deadline) - now
            if wait <= 0:
                raise NotReady(f"shard {self.shard_id} is still waiting for worker {holder} to initialize it")
            try:
                await asyncio.wait_for(self._initialized.wait(), timeout=wait)
            except TimeoutError:
                pass

    def _check_identity(self, worker_id: int, secret: bytes) -> None:
        """Refuse to hand a live worker id that carries a secret to a caller that does not know it."""
        record = self.membership.get(worker_id) if worker_id >= 0 else None
        if record is None or not record.live or record.secret is None:
            return
        if not hmac.compare_digest(secret, record.secret):
            raise IdInUse(
                f"worker id {worker_id} is live on shard {self.shard_id} under another registration (another "
                f"process uses it): choose another --worker-id, or wait {self.membership.lease_seconds:g}s for "
                "its lease to lapse"
            )

    async def _grant_claim(self, worker_id: int, observer: bool, identity: bool) -> Registration:
        registration = await self._admit(worker_id, observer, must_initialize=True, identity=identity)
        self._claim = (registration.worker_id, time.monotonic() + self.init_claim_seconds)
        return registration

    async def _admit(
        self, worker_id: int, observer: bool, *, must_initialize: bool, identity: bool = False
    ) -> Registration:
        """(Re)admit a worker and set its clock so it neither holds the others back nor runs ahead."""
        assert self.store is not None
        others = [r.clock for r in self.membership.trainers() if r.worker_id != worker_id]
        before = self.membership.get(worker_id)
        known = before is not None
        pushed_clock = before.clock if before is not None and before.pushes > 0 else 0
        if not known and sum(1 for _, r in self.membership.items() if r.live) >= self.max_workers:
            raise Exhausted(f"shard {self.shard_id} has {self.max_workers} registered workers, its limit")
        record = self.membership.register(worker_id, observer=observer)
        if self.mode.kind == "bsp":
            start = self.applied_clock
        else:
            start = min(others) if others else record.clock  # at the slowest: holds nobody back
        # A returning worker keeps a later clock it had: its pushes up to it were applied (or are
        # pending), and a retried push of that clock must be recognised as a duplicate.
        record.clock = max(record.clock, start) if known else start
        record.join_clock = record.clock
        record.pushed_since_join = False
        record.secret = secrets.token_bytes(SECRET_BYTES) if identity else None
        await self._barrier_changed()
        log.info("worker %d joined shard %d at clock %d", record.worker_id, self.shard_id, record.clock)
        return Registration(
            record.worker_id, must_initialize, self.store.block_ids, record.clock, pushed_clock, record.secret or b""
        )

    def _check_match(self, layout: Layout, rule: RuleConfig | None) -> None:
        """Refuse a worker whose model or rule differs from the shard's (an observer only pulls: no rule)."""
        assert self.store is not None
        ours = self.store.layout
        if layout.fingerprint != ours.fingerprint:
            difference = ours.difference(layout, mine="the shard holds", theirs="this worker has")
            raise PreconditionFailed(
                f"layout mismatch on shard {self.shard_id}: {difference} (layout {ours.fingerprint} != "
                f"{layout.fingerprint})"
            )
        diffs = self.store.rule.differences(rule) if rule is not None else []
        if diffs:
            raise PreconditionFailed(
                f"update rule mismatch on shard {self.shard_id} (shard != worker): {'; '.join(diffs)}"
            )

    async def initialize(self, worker_id: int, blocks: Sequence[WireBlock], secret: bytes = b"") -> int:
        """Install the initial block values sent by the worker holding the claim."""
        store = self._require_store()
        record = self.membership.get(worker_id)
        if record is not None:
            self._check_secret(record, secret)
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

    # -- membership ----------------------------------------------------------------------------

    async def heartbeat(self, worker_id: int, secret: bytes = b"") -> float:
        """Renew a worker's lease; returns the lease length."""
        self._require_live(worker_id, secret)
        self.membership.seen(worker_id)
        return self.membership.lease_seconds

    async def leave(self, worker_id: int, secret: bytes = b"") -> None:
        """A worker is done: drop it from the barriers now."""
        record = self.membership.get(worker_id)
        if record is not None and record.live:
            self._check_secret(record, secret)
        if self.membership.leave(worker_id):
            log.info("worker %d left shard %d", worker_id, self.shard_id)
            await self._barrier_changed()

    async def expire_leases(self) -> list[int]:
        """Drop workers whose lease lapsed (called periodically); returns their ids. Records of workers
        gone long ago are forgotten (at most ``max_workers`` of them are kept)."""
        self.membership.forget_departed(max(DEPARTED_SECONDS, 20 * self.membership.lease_seconds), self.max_workers)
        gone = self.membership.expire()
        if gone:
            log.warning("shard %d: lease lapsed for workers %s; the others go on without them", self.shard_id, gone)
            await self._barrier_changed()
        return gone

    # -- training traffic --------------------------------------------------------------------

    async def push(
        self, worker_id: int, clock: int, blocks: Sequence[WireBlock], secret: bytes = b""
    ) -> tuple[int, int]:
        """Take a worker's push for ``clock``; returns (blocks applied or queued, version sum)."""
        return await self.push_checked(worker_id, clock, lambda store: store.decode(blocks), secret)

    async def push_runs(
        self, worker_id: int, clock: int, runs: Sequence[WireRun], secret: bytes = b""
    ) -> tuple[int, int]:
        """:meth:`push` of an exchange, its blocks as runs."""
        return await self.push_checked(worker_id, clock, lambda store: store.decode_runs(runs), secret)

    async def push_checked(
        self, worker_id: int, clock: int, decode: Callable[[ShardStore], Decoded], secret: bytes = b""
    ) -> tuple[int, int]:
        """Take a push whose blocks ``decode`` checks and converts (nothing is used before it is checked)."""
        if self.stopping:
            raise NotReady(f"shard {self.shard_id} is shutting down; retry against its replacement")
        store = self._require_store()
        record = self._require_live(worker_id, secret)
        if record.observer:
            raise PreconditionFailed(f"worker {worker_id} registered as an observer: observers only pull")
        highest = max([self.applied_clock, *(r.clock for _, r in self.membership.items())])
        if clock > highest + MAX_CLOCK_AHEAD:
            raise InvalidRequest(
                f"push clock {clock} of worker {worker_id} is far beyond every clock shard {self.shard_id} has "
                f"seen ({highest})"
            )
        if clock == record.clock and record.pushes > 0:
            # A retry of a push whose acknowledgement was lost: (worker id, clock) identifies a
            # push, so it is acknowledged again and never applied twice.
            self.duplicates += 1
            self.membership.seen(worker_id)
            if record.applying is not None:  # the original is still being applied: acknowledge once it is
                await record.applying.wait()
                if record.clock != clock:  # the original was refused after all: this is a push of its own
                    return await self.push_checked(worker_id, clock, decode, secret)
            return 0, 0
        if clock < record.clock:
            raise InvalidRequest(f"push clock {clock} of worker {worker_id} is before its clock {record.clock}")
        if self.mode.kind == "bsp" and clock <= self.applied_clock:
            raise PreconditionFailed(
                f"bsp: worker {worker_id} pushed clock {clock}, which shard {self.shard_id} already applied"
            )
        try:
            decoded = decode(store)
        except NonFinite:
            if self.nan_policy == "reject":
                raise
            self.pushes_skipped += 1
            log.warning("shard %d skipped a push of worker %d holding NaN or Inf", self.shard_id, worker_id)
            decoded = EMPTY
        if record.pushed_since_join:
            self._record_staleness(record, clock, decoded)
        else:
            # A worker's first push after joining may skip clocks (another shard told it a later
            # start): it takes part in the barriers from this clock on. Its staleness is not
            # counted: its view predates the join.
            record.pushed_since_join = True
            record.join_clock = max(record.join_clock, clock - 1)
        before = (record.clock, record.pushes)
        record.clock = clock
        record.pushes += 1
        self.membership.seen(worker_id)
        self.pushes_applied += 1
        if self.mode.kind == "bsp":
            # Held until every worker's push of this clock is in: owned copies, not views of frames
            # or of a shared region the worker will write again.
            self._pending.setdefault(clock, {})[worker_id] = decoded.owned()
            await self._barrier_changed()
            return len(decoded), 0
        record.applying = applying = asyncio.Event()
        try:
            async with self.apply_lock:
                if decoded.nbytes >= OFF_LOOP_APPLY_BYTES:
                    # Big updates run in a thread (torch releases the GIL), so the loop keeps serving.
                    applied, version_sum = await asyncio.to_thread(self._timed_apply, store.apply, decoded)
                else:
                    applied, version_sum = self._timed_apply(store.apply, decoded)
        except NonFinite:  # the update would make weights non-finite: nothing of it was applied
            if self.nan_policy == "reject":
                record.clock, record.pushes = before
                self.pushes_applied -= 1
                raise
            self.pushes_skipped += 1
            log.warning(
                "shard %d skipped a push of worker %d that would make weights non-finite", self.shard_id, worker_id
            )
            applied, version_sum = 0, 0
        finally:
            applying.set()
            if record.applying is applying:
                record.applying = None
        await self._notify()
        return applied, version_sum

    def _timed_apply(self, apply: Callable[[_T], tuple[int, int]], argument: _T) -> tuple[int, int]:
        """Run one store update and tell :attr:`apply_observers` how long it took."""
        started = time.perf_counter()
        applied, version_sum = apply(argument)
        elapsed = time.perf_counter() - started
        for observer in self.apply_observers:
            observer(elapsed, applied)
        return applied, version_sum

    def _record_staleness(self, record: WorkerRecord, clock: int, decoded: Decoded) -> None:
        """How far behind its own clock the worker's view was, in clocks and (per block) in versions."""
        self.staleness.add(clock - 1 - record.view_clock)
        if record.view_versions is not None and len(decoded):
            assert self.store is not None
            versions = self.store.version_tensor()
            self.version_lag.add_all(versions[decoded.positions] - record.view_versions[decoded.positions])

    async def pull(self, worker_id: int, known_versions: Sequence[int], secret: bytes = b"") -> Iterator[WireBlock]:
        """Wait at the barrier the consistency model sets, then the blocks newer than the worker's."""
        store = self._require_store()
        record = await self._pulling(worker_id, secret)
        record.view_versions = store.version_tensor().clone()
        return store.newer_than(known_versions)

    def cursor(self, known: torch.Tensor | None) -> torch.Tensor:
        """An exchange stream's record of the versions it answered with: what the worker says it holds
        (aligned with this shard's block ids), or zeros (the first answer carries every block)."""
        store = self._require_store()
        if known is None:
            return torch.zeros(len(store.block_ids), dtype=torch.int64)
        if len(known) != len(store.block_ids):
            raise InvalidRequest(f"{len(known)} known versions for a shard of {len(store.block_ids)} blocks")
        _check_known(known, store.version_tensor())
        return known.clone()

    async def pull_changed(self, worker_id: int, sent: torch.Tensor, secret: bytes = b"") -> list[PulledRun]:
        """:meth:`pull` for an exchange stream: the blocks whose version is above ``sent`` (the versions
        this stream last answered with, which advance), as runs with their versions.

        A whole segment's values are the live buffer: encode them before awaiting anything.
        """
        store = self._require_store()
        record = await self._pulling(worker_id, secret)
        record.view_versions = store.version_tensor().clone()
        return store.changed_runs(sent, copy=False)

    async def _pulling(self, worker_id: int, secret: bytes) -> WorkerRecord:
        """A pull's bookkeeping: wait at the consistency barrier, then note the view the worker gets."""
        record = self.membership.get(worker_id)
        if record is None:
            raise NotRegistered(f"worker {worker_id} is not registered on shard {self.shard_id}: register again")
        self._check_secret(record, secret)
        if record.live and not record.observer and self.mode.waits:
            await self._wait_for_view(record)
        self.membership.seen(worker_id)
        self.pulls_served += 1
        record.view_clock = self.applied_clock if self.mode.kind == "bsp" else self._slowest_or(record.clock)
        return record

    async def _wait_for_view(self, record: WorkerRecord) -> None:
        def ready() -> bool:
            self.membership.seen(record.worker_id)  # a worker waiting here is alive
            if not record.live:
                return True
            if self.mode.kind == "bsp":
                return self.applied_clock >= record.clock
            return record.clock - self._slowest_or(record.clock) <= self.mode.bound

        record.waiting += 1
        try:
            async with self._changed:
                await asyncio.wait_for(self._changed.wait_for(ready), timeout=self.wait_seconds)
        except TimeoutError:
            slowest = [(r.worker_id, r.clock) for r in self.membership.trainers()]
            raise NotReady(
                f"worker {record.worker_id} at clock {record.clock} waited {self.wait_seconds:g}s at the "
                f"{self.mode} barrier of shard {self.shard_id} (workers and clocks: {slowest})"
            ) from None
        finally:
            record.waiting -= 1

    def _slowest_or(self, default: int) -> int:
        slowest = self.membership.slowest_clock()
        return default if slowest is None else slowest

    async def _barrier_changed(self) -> None:
        """Apply every bsp clock whose pushes are all in, then wake waiting pulls."""
        if self.mode.kind == "bsp" and self.store is not None and self.store.initialized:
            while True:
                clock = self.applied_clock + 1
                pushes = self._pending.get(clock, {})
                # A live worker is done with this clock once it pushed it, or a later one: a worker
                # keeps one clock on every shard, so after another shard admitted it at a later clock
                # it skips the clocks in between here (it has nothing for them).
                waiting_for = [
                    r.worker_id
                    for r in self.membership.trainers()
                    if r.join_clock < clock and r.clock < clock and r.worker_id not in pushes
                ]
                if waiting_for:
                    break
                if pushes:
                    # Every live worker pushed this clock or skipped it; a push acknowledged before its
                    # worker was dropped still counts (nothing acknowledged is lost).
                    try:
                        self._timed_apply(self.store.apply_mean, list(pushes.values()))
                    except NonFinite as exc:  # acknowledged already: skipped, said loudly, counted
                        self.pushes_skipped += len(pushes)
                        log.error("shard %d skipped the combined update of clock %d: %s", self.shard_id, clock, exc)
                    del self._pending[clock]
                elif not any(pending > clock for pending in self._pending):
                    break  # nobody reached this clock yet
                self.applied_clock = clock  # (with no push: every live worker skipped it, nothing to combine)
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- durability ------------------------------------------------------------------------------

    def checkpoint(self) -> ShardCheckpoint | None:
        """A consistent copy of everything this shard holds (None before initialization)."""
        if self.store is None or not self.store.initialized:
            return None
        return ShardCheckpoint(
            shard_id=self.shard_id,
            num_shards=self.num_shards,
            layout=self.store.layout,
            rule=self.store.rule.to_dict(),
            consistency=str(self.mode),
            applied_clock=self.applied_clock,
            clocks={r.worker_id: r.clock for _, r in sorted(self.membership.items()) if not r.observer},
            counters={"pushes_applied": self.pushes_applied, "blocks_applied": self.store.blocks_applied},
            created=time.time(),
            blocks=self.store.snapshot(),
        )

    def restore(self, checkpoints: Sequence[ShardCheckpoint]) -> None:
        """Resume from saved shards (any count): take the blocks this shard's placement gives it.

        Raises:
            ValueError: the checkpoints disagree with each other or lack some of this shard's blocks.
        """
        if not checkpoints:
            raise ValueError("no checkpoints to restore from")
        first = checkpoints[0]
        for other in checkpoints[1:]:
            if other.layout.fingerprint != first.layout.fingerprint or other.rule != first.rule:
                what = first.layout.difference(
                    other.layout, mine=f"shard {first.shard_id}'s file has", theirs=f"shard {other.shard_id}'s has"
                ) or "; ".join(RuleConfig.from_dict(first.rule).differences(RuleConfig.from_dict(other.rule)))
                raise ValueError(
                    f"checkpoints of shards {first.shard_id} and {other.shard_id} hold different models or rules: "
                    + what
                )
        layout = first.layout
        rule = RuleConfig.from_dict(first.rule)
        placement = Placement.compute(layout, self.num_shards)
        records = {b.block_id: b for c in checkpoints for b in c.blocks}
        store = ShardStore(layout, placement.blocks_by_shard[self.shard_id], rule)
        store.restore(records)
        self.store = store
        self._initialized.set()
        same = len(checkpoints) == 1 and first.shard_id == self.shard_id and first.num_shards == self.num_shards
        # Counters carry over when the shard is restored as itself; after resharding they restart.
        if same:
            self.pushes_applied = first.counters.get("pushes_applied", 0)
            store.blocks_applied = first.counters.get("blocks_applied", 0)
        self.applied_clock = min(c.applied_clock for c in checkpoints)
        for worker_id, clock in first.clocks.items():
            record = self.membership.register(worker_id)
            record.clock = min(c.clocks.get(worker_id, clock) for c in checkpoints)
            record.pushes = 1  # so a retried push of exactly this clock is recognised as a duplicate
            # A restart does not change who trains: the barriers wait for a restored worker to come
            # back (at its own clock) rather than run ahead without it (under bsp that would put the
            # worker at different clocks on different shards, and two workers could then wait for
            # each other across shards). Its place is held for RESTORED_HOLD_SECONDS (a client retries
            # a restarting shard with a backoff of up to 5 s) or a lease, whichever is longer; a worker
            # that does not come back by then is dropped as usual.
            self.membership.hold(worker_id, max(RESTORED_HOLD_SECONDS, self.membership.lease_seconds))
        log.info(
            "shard %d restored %d blocks from %d checkpoint(s) (layout %s, applied clock %d)",
            self.shard_id, len(store.block_ids), len(checkpoints), layout.fingerprint, self.applied_clock,
        )  # fmt: skip

    async def flush_pending(self) -> int:
        """bsp, on a planned stop: apply the clocks still waiting, with the pushes they have.

        Those pushes were acknowledged, and nothing acknowledged is dropped. Returns the clocks applied.
        """
        applied = 0
        while self.store is not None and self._pending:
            clock = min(self._pending)
            self._timed_apply(self.store.apply_mean, list(self._pending.pop(clock).values()))
            self.applied_clock = max(self.applied_clock, clock)
            applied += 1
        return applied

    def stats(self) -> ShardStats:
        store = self.store
        return ShardStats(
            shard_id=self.shard_id,
            num_shards=self.num_shards,
            initialized=bool(store and store.initialized),
            layout_fingerprint=store.layout.fingerprint if store else "",
            rule=store.rule.rule if store else "",
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
            consistency=str(self.mode),
            applied_clock=self.applied_clock if self.mode.kind == "bsp" else self._slowest_or(0),
            staleness_counts=dict(self.staleness.counts),
            version_lag_counts=dict(self.version_lag.counts),
        )

    def _require_store(self) -> ShardStore:
        if self.store is None:
            raise NotReady(f"shard {self.shard_id} has no model yet: a worker must register first")
        return self.store

    def _require_live(self, worker_id: int, secret: bytes = b"") -> WorkerRecord:
        record = self.membership.get(worker_id)
        if record is None:
            raise NotRegistered(f"worker {worker_id} is not registered on shard {self.shard_id}: register again")
        if not record.live:
            raise NotRegistered(
                f"worker {worker_id}'s lease on shard {self.shard_id} lapsed (or it left): register again"
            )
        self._check_secret(record, secret)
        return record

    def stream_limit(self) -> int:
        """Bytes one push, init or exchange may carry here: every block twice over (a push may be in a wider
        type than the blocks), plus headers."""
        store = self._require_store()
        return 2 * store.nbytes + 64 * len(store.block_ids) + (1 << 20)

    def pull_request_limit(self) -> int:
        """Bytes a v1 pull request may have: a version per block, plus the rest of the message."""
        return 10 * (len(self.store.block_ids) if self.store is not None else 0) + 256

    def authenticate(self, worker_id: int, secret: bytes) -> None:
        """Refuse a caller that is not a live registered worker carrying its registration's secret."""
        self._require_live(worker_id, secret)

    def _check_secret(self, record: WorkerRecord, secret: bytes) -> None:
        """A call of a worker registered with identity must carry that registration's secret."""
        if record.secret is not None and not hmac.compare_digest(secret, record.secret):
            raise WrongSecret(
                f"this call of worker {record.worker_id} does not carry its registration's secret on shard "
                f"{self.shard_id} (another process registered as this worker, or the call is forged)"
            )


def _check_known(known: torch.Tensor, versions: torch.Tensor) -> None:
    """Refuse versions a worker cannot have been given (beyond what the shard holds, or negative)."""
    if bool((known > versions).any()) or bool((known < 0).any()):
        # e.g. the shard restarted from an older checkpoint: the worker must start its view afresh
        raise NotRegistered("known versions outside what this shard holds: register again to start afresh")
