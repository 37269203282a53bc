"""The optimizer's backend on a cluster: push chosen blocks to the shards, pull what changed back.

One :class:`~ranger_ps.client.sharded.ShardedClient` does the I/O on its own thread. Each push is
followed by a pull of the blocks whose versions moved (this worker's own push included); with
``overlap`` that round trip runs while the next step computes, and :meth:`RemoteBackend.collect`
waits for it. A push that fails in the background is kept and raised at the next call, so a worker
never ends "successfully" with pushes the shards refused.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import torch

from ranger_ps.algorithm.layout import Layout
from ranger_ps.algorithm.rules import RuleConfig
from ranger_ps.client.backend import PulledBlock, Run, Traffic, blocks_of, runs_of
from ranger_ps.client.sharded import ExchangeResult, ShardedClient
from ranger_ps.config.client import ConnectionSettings
from ranger_ps.errors import ClusterError
from ranger_ps.wire.security import ClientSecurity
from ranger_ps.wire.stats import ShardStats


class RemoteBackend:
    """Registers a model's parameters with a cluster and trains them there.

    Args:
        servers: ``HOST:PORT`` of each shard, in shard order.
        layout: the parameters' layout (names, shapes, blocks).
        initial: the parameters' initial values, in layout order (sent to shards that are empty).
        rule: the update rule and outer rule the shards apply (checked against what they hold).
        connection: timeouts and overlap.
        worker_id: the id to register as (None: assigned by shard 0).
        observer: only pull; never count as a training worker.
        consistency: the consistency model expected ("" accepts the servers').
        use_uvloop: run the I/O loop on uvloop.
        security: token and TLS settings.
    """

    def __init__(
        self,
        servers: Sequence[str],
        layout: Layout,
        initial: Sequence[torch.Tensor],
        rule: RuleConfig,
        connection: ConnectionSettings,
        *,
        worker_id: int | None = None,
        observer: bool = False,
        consistency: str = "",
        use_uvloop: bool = True,
        security: ClientSecurity | None = None,
    ) -> None:
        self.layout = layout
        self.rule = rule
        self.overlap = connection.overlap
        self._pending: Future[list[PulledBlock]] | Future[ExchangeResult] | None = None
        self._failure: BaseException | None = None
        self._lock = threading.Lock()
        self._dense_bytes: dict[tuple[int, ...], int] = {}
        self._bytes_pushed_dense = 0
        self._bytes_flushed = 0
        self._pushes = 0
        self.client = ShardedClient(
            servers,
            connect_timeout=connection.connect_timeout,
            retry_timeout=connection.retry_timeout,
            use_uvloop=use_uvloop,
            security=security,
            use_exchange=connection.exchange,
            shared_memory=connection.shared_memory,
        )
        try:
            self._worker_id = self.client.register(
                layout, rule, initial, worker_id, observer=observer, consistency=consistency
            )
            self.first_pull = self._pull_now()
        except BaseException:
            self.client.close()
            raise

    @property
    def streaming(self) -> bool:
        """Whether pushes and pulls go as exchanges (every shard serves them and they are not disabled)."""
        return self.client.serves_exchange

    def _pull_now(self) -> list[Run]:
        if self.streaming:
            return self.client.exchange([], 0).result().pulled
        return runs_of(self.client.pull().result())

    @property
    def worker_id(self) -> int:
        return self._worker_id

    @property
    def consistency(self) -> str:
        """The consistency model the shards run."""
        return self.client.consistency

    @property
    def traffic(self) -> Traffic:
        client = self.client
        return Traffic(client.bytes_pushed, client.bytes_pulled, self._bytes_pushed_dense, self._bytes_flushed)

    def _remember_failure(self, future: Future[Any]) -> None:
        exc = future.exception()
        if exc is not None:
            with self._lock:
                if self._failure is None:
                    self._failure = exc

    def _raise_failure(self) -> None:
        with self._lock:
            failure, self._failure = self._failure, None
        if failure is not None:
            if isinstance(failure, ClusterError):
                raise failure
            raise ClusterError(f"an overlapped push failed: {failure}") from failure

    def collect(self) -> list[Run]:
        pending, self._pending = self._pending, None
        try:
            if pending is None:
                return []
            result = pending.result()
            return result.pulled if isinstance(result, ExchangeResult) else runs_of(result)
        finally:
            self._raise_failure()

    def order(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Block ids in the order a push lays them out (by shard: each shard's part is one slice)."""
        return self.client.shard_order(block_ids)

    def _dense_wire_bytes(self) -> int:
        """What a push of every block would have cost at the clocks of the push just made (computed once
        per combination of the clocks' varint lengths)."""
        clocks = self.client.push_clocks
        widths = tuple(max(1, (c.bit_length() + 6) // 7) for c in clocks)
        cached = self._dense_bytes.get(widths)
        if cached is None:
            if self.streaming:
                cached = self.client.exchange_wire_bytes()
            else:  # v1 pushes: one clock for the estimate (shards' clocks differ only after a re-admission)
                cached = self.client.push_wire_bytes(None, clock=max(clocks))
            self._dense_bytes[widths] = cached
        return cached

    def exchange(self, runs: Sequence[Run], steps: int) -> None:
        if self._pending is not None:
            raise RuntimeError("collect() the previous exchange before pushing again")
        self._raise_failure()
        self._pushes += 1
        before = self.client.bytes_pushed
        if self.streaming:  # each shard's next clock for this worker (a joining worker starts where it is)
            exchanged = self.client.exchange(runs)
            self._pending = exchanged
            handle: Future[Any] = exchanged
        else:
            blocks = [b for run in runs for b in blocks_of(run, self._lengths(run.block_ids))]
            handle = self.client.push_blocks(blocks)
            self._pending = self.client.pull(after=handle)
        self._bytes_pushed_dense += steps * self._dense_wire_bytes()
        if steps == 0:  # a flush
            self._bytes_flushed += self.client.bytes_pushed - before
        if self.overlap:
            handle.add_done_callback(self._remember_failure)
        else:
            handle.result()

    def _lengths(self, block_ids: torch.Tensor) -> list[int]:
        return [self.layout.blocks[b].numel for b in block_ids.tolist()]

    def pull_all(self) -> list[Run]:
        pending = self.collect()
        return [*pending, *self._pull_now()]

    def stats(self) -> list[ShardStats]:
        return self.client.stats()

    def close(self) -> None:
        try:
            self.collect()
        finally:
            self.client.close()
