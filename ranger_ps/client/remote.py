"""The optimizer's backend on a cluster: push chosen blocks to the shards, pull fresh ones back.

One :class:`~ranger_ps.client.sharded.ShardedClient` does the I/O on its own thread. With
``overlap`` the pull of step t runs while step t+1 computes and lands at the next
:meth:`RemoteBackend.synchronize` (``zero_grad`` or ``step``); a push that fails in the background
is kept and raised there, so a worker never ends "successfully" with pushes the shards refused.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import torch

from ranger_ps.algorithm.layout import Layout
from ranger_ps.algorithm.rules import RuleConfig
from ranger_ps.client.backend import Traffic
from ranger_ps.client.sharded import PulledBlock, ShardedClient
from ranger_ps.client.staging import PinnedStaging, needs_staging
from ranger_ps.config.client import ConnectionSettings
from ranger_ps.errors import ClusterError
from ranger_ps.wire.security import ClientSecurity
from ranger_ps.wire.stats import ShardStats


class RemoteBackend:
    """Registers a model's parameters with a cluster and trains them there.

    Args:
        servers: ``HOST:PORT`` of each shard, in shard order.
        layout: the parameters' layout (names, shapes, blocks).
        params: the parameters, in layout order; pulled weights are written into them.
        rule: the update rule the shards apply (checked against what they hold).
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
        params: Sequence[torch.Tensor],
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
        self._params = list(params)
        self._views = layout.block_views([p.data.view(-1) for p in self._params])
        self._staging = PinnedStaging(layout, [p.device for p in self._params]) if needs_staging(params) else None
        self._pending: Future[list[PulledBlock]] | None = None
        self._failure: BaseException | None = None
        self._lock = threading.Lock()
        self._dense_bytes: dict[int, int] = {}
        self._bytes_pushed_dense = 0
        self.client = ShardedClient(
            servers,
            connect_timeout=connection.connect_timeout,
            retry_timeout=connection.retry_timeout,
            use_uvloop=use_uvloop,
            security=security,
        )
        try:
            self._worker_id = self.client.register(
                layout, rule, self._params, worker_id, observer=observer, consistency=consistency
            )
            self._land(self.client.pull().result())
        except BaseException:
            self.client.close()
            raise

    @property
    def worker_id(self) -> int:
        return self._worker_id

    @property
    def consistency(self) -> str:
        """The consistency model the shards run."""
        return self.client.consistency

    @property
    def traffic(self) -> Traffic:
        return Traffic(self.client.bytes_pushed, self.client.bytes_pulled, self._bytes_pushed_dense)

    def _land(self, blocks: list[PulledBlock]) -> None:
        if self._staging is not None:
            self._staging.to_device(blocks, self._views)
        else:
            self.client.apply_pulled(blocks, self._views)

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

    def synchronize(self) -> None:
        pending, self._pending = self._pending, None
        try:
            if pending is not None:
                self._land(pending.result())
        finally:
            self._raise_failure()

    def _dense_wire_bytes(self, clock: int) -> int:
        """What a push of every block costs at this clock (cached per clock varint length)."""
        width = max(1, (clock.bit_length() + 6) // 7)
        cached = self._dense_bytes.get(width)
        if cached is None:
            cached = self._dense_bytes[width] = self.client.push_wire_bytes(None, clock=clock)
        return cached

    def exchange(self, pushed: Sequence[torch.Tensor], chosen: Sequence[int], step: int) -> None:
        self.synchronize()  # overlap: the previous step's pull lands (or fails) before this push
        if self._staging is not None:
            pushed = self._staging.to_host(pushed, chosen)
        clock = self.client.start_clock + step  # the cluster's clock: a joining worker starts where it is
        handle = self.client.push(pushed, chosen, clock=clock)
        self._bytes_pushed_dense += self._dense_wire_bytes(clock)
        pending = self.client.pull(after=handle)
        if self.overlap:
            handle.add_done_callback(self._remember_failure)
            self._pending = pending
        else:
            handle.result()
            self._land(pending.result())

    def refresh(self) -> None:
        self.synchronize()
        self._land(self.client.pull().result())

    def stats(self) -> list[ShardStats]:
        return self.client.stats()

    def close(self) -> None:
        try:
            self.synchronize()
        finally:
            self.client.close()
