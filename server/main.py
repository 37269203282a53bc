"""The parameter-server process: a gRPC server for one shard, health and reflection included."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ranger_ps.algorithm.consistency import parse_consistency
from ranger_ps.errors import UserError
from ranger_ps.files import write_text_atomically
from ranger_ps.observability.metrics import MetricsEndpoint, ServerMetrics, start_metrics_server
from ranger_ps.server.servicer import ParameterServerServicer
from ranger_ps.server.shard import Shard
from ranger_ps.storage import checkpoint
from ranger_ps.wire.loop import run_async
from ranger_ps.wire.rpc import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES, SERVICE_NAME
from ranger_ps.wire.security import ServerSecurity

log = logging.getLogger(__name__)

# SO_REUSEPORT would let a second server bind a port that is already taken, silently.
SERVER_OPTIONS = (*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0))


@dataclass(frozen=True)
class ServerOptions:
    """Settings of one shard's server process.

    Attributes:
        shard_id: this shard's index.
        num_shards: how many shards the model is spread over.
        host: address to listen on (``0.0.0.0`` in containers).
        port: port to listen on; 0 picks a free one (see ``ready_file``).
        ready_file: where to write ``{"host", "port", "pid"}`` as JSON once serving.
        grace_seconds: how long in-flight calls may finish on shutdown.
        init_claim_seconds: how long the worker asked to initialize the shard has to do it.
        consistency: ``async``, ``ssp:K`` or ``bsp``.
        lease_seconds: a worker not heard from for this long leaves the ssp/bsp barriers.
        wait_seconds: the longest a pull waits at a barrier before failing with UNAVAILABLE.
        checkpoint_dir: where checkpoints go (and are resumed from at start); None disables them.
        checkpoint_every: seconds between periodic checkpoints (0: only the final one on stop).
        checkpoint_every_pushes: also checkpoint after this many applied pushes (0: off).
        keep: checkpoint files kept per shard.
        security: token and TLS settings (default: plaintext, no token).
        nan_policy: ``reject`` or ``skip`` pushes whose gradients hold NaN or Inf.
        max_workers: how many workers may be registered at once.
        max_streams: concurrent calls (HTTP/2 streams) per client connection.
        max_message_mb: the largest message accepted, in MiB.
        metrics_port: serve Prometheus metrics on ``http://metrics_host:metrics_port/metrics``; None
            (default) serves none, 0 picks a free port (written to the ready file as ``metrics_port``).
        metrics_host: address the metrics endpoint listens on.
    """

    shard_id: int = 0
    num_shards: int = 1
    host: str = "127.0.0.1"
    port: int = 50051
    ready_file: Path | None = None
    grace_seconds: float = 10.0
    init_claim_seconds: float = 30.0
    consistency: str = "async"
    lease_seconds: float = 5.0
    wait_seconds: float = 120.0
    checkpoint_dir: Path | None = None
    checkpoint_every: float = 60.0
    checkpoint_every_pushes: int = 0
    keep: int = 3
    security: ServerSecurity = field(default_factory=ServerSecurity)
    nan_policy: str = "reject"
    max_workers: int = 1024
    max_streams: int = 64
    max_message_mb: int = MAX_MESSAGE_BYTES >> 20
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if self.nan_policy not in ("reject", "skip"):
            raise UserError(f"--nan-policy must be reject or skip, got {self.nan_policy!r}")
        if self.max_workers < 1 or self.max_streams < 1:
            raise UserError("--max-workers and --max-streams must be >= 1")
        if not 1 <= self.max_message_mb <= 1024:
            raise UserError(f"--max-message-mb must be in [1, 1024], got {self.max_message_mb}")
        if self.checkpoint_every < 0 or self.checkpoint_every_pushes < 0:
            raise UserError("--checkpoint-every and --checkpoint-every-pushes must be >= 0")
        if self.keep < 1:
            raise UserError(f"--keep must be >= 1, got {self.keep}")
        try:
            parse_consistency(self.consistency)
        except ValueError as exc:
            raise UserError(f"--{exc}") from None
        if not self.lease_seconds > 0:
            raise UserError(f"--lease-seconds must be > 0, got {self.lease_seconds}")
        if not self.wait_seconds > 0:
            raise UserError(f"--wait-timeout must be > 0, got {self.wait_seconds}")
        if self.num_shards < 1:
            raise UserError(f"--num-shards must be >= 1, got {self.num_shards}")
        if not 0 <= self.shard_id < self.num_shards:
            raise UserError(f"--shard-id must be in [0, {self.num_shards - 1}], got {self.shard_id}")
        if not 0 <= self.port <= 65535:
            raise UserError(f"--port must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise UserError(f"--metrics-port must be in [0, 65535], got {self.metrics_port}")
        if not self.metrics_host:
            raise UserError("--metrics-host must not be empty")


def _write_ready_file(path: Path, host: str, port: int, metrics_port: int | None = None) -> None:
    info: dict[str, object] = {"host": host, "port": port, "pid": os.getpid()}
    if metrics_port is not None:
        info["metrics_port"] = metrics_port
    write_text_atomically(path, json.dumps(info))


async def serve(options: ServerOptions, stop: asyncio.Event | None = None) -> None:
    """Serve one shard until ``stop`` is set or SIGTERM/SIGINT arrives, then shut down cleanly."""
    shard = Shard(
        options.shard_id,
        options.num_shards,
        consistency=options.consistency,
        lease_seconds=options.lease_seconds,
        wait_seconds=options.wait_seconds,
        init_claim_seconds=options.init_claim_seconds,
        nan_policy=options.nan_policy,
        max_workers=options.max_workers,
    )
    if options.checkpoint_dir is not None:
        _restore(shard, options.checkpoint_dir)
    limit = options.max_message_mb << 20
    server = grpc.aio.server(
        options=(
            *((k, v) for k, v in SERVER_OPTIONS if k != "grpc.max_receive_message_length"),
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_concurrent_streams", options.max_streams),
        ),
        interceptors=options.security.interceptors(),
    )
    server.add_generic_rpc_handlers((ParameterServerServicer(shard).generic_handler(),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{options.host}:{options.port}"
    try:
        port = options.security.add_port(server, address)
    except RuntimeError as exc:
        raise UserError(f"cannot listen on {address}: the port is in use or the address is not local ({exc})") from None
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    saver = _Checkpointer(shard, options) if options.checkpoint_dir is not None else None
    try:
        metrics = _start_metrics(shard, options, saver)
    except OSError as exc:
        await server.stop(None)
        raise UserError(
            f"cannot serve metrics on {options.metrics_host}:{options.metrics_port}: the port is in use or the "
            f"address is not local ({exc})"
        ) from None
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)  # before announcing readiness: a stop always checkpoints
    if options.ready_file is not None:
        _write_ready_file(options.ready_file, options.host, port, metrics.port if metrics is not None else None)
    log.info(
        "shard %d of %d serving on %s:%d (%s, lease %gs, %s)",
        options.shard_id, options.num_shards, options.host, port, shard.mode, options.lease_seconds,
        options.security.describe(),
    )  # fmt: skip
    if metrics is not None:
        log.info("shard %d serves metrics on %s", options.shard_id, metrics.url)
    reaper = asyncio.create_task(_expire_leases(shard, options.lease_seconds / 4))
    periodic = asyncio.create_task(saver.run()) if saver is not None else None

    try:
        await stop.wait()
    finally:
        reaper.cancel()
        if periodic is not None:
            periodic.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("shard %d shutting down (grace %.1fs)", options.shard_id, options.grace_seconds)
        # Refuse new pushes, let the ones in flight finish, then save: nothing acknowledged is lost.
        shard.stopping = True
        await health_servicer.enter_graceful_shutdown()
        await server.stop(options.grace_seconds)
        flushed = await shard.flush_pending()
        if flushed:
            log.info("shard %d applied %d incomplete bsp clocks before stopping", options.shard_id, flushed)
        try:
            if saver is not None:
                await saver.save("final")
        finally:
            if metrics is not None:
                await asyncio.to_thread(metrics.close)  # last: a final scrape still sees the final state
        log.info("shard %d stopped: %d pushes applied", options.shard_id, shard.pushes_applied)


def _start_metrics(shard: Shard, options: ServerOptions, saver: _Checkpointer | None) -> MetricsEndpoint | None:
    """Serve the shard's Prometheus metrics when ``options.metrics_port`` is set (None otherwise)."""
    if options.metrics_port is None:
        return None
    metrics = ServerMetrics(
        shard.stats, shard_id=shard.shard_id, checkpoint_age=saver.age if saver is not None else None
    )
    endpoint, _ = start_metrics_server(metrics.registry, options.metrics_host, options.metrics_port)
    shard.apply_observers.append(metrics.observe_apply)
    return endpoint


def _restore(shard: Shard, directory: Path) -> None:
    """Resume from the newest good checkpoints in ``directory``, if any.

    Files of several cluster sizes may sit side by side (after a reshard); the newest generation
    (shard count) that can restore this shard wins: its own file when the count is unchanged, every
    old shard's file when it changed. Older generations are ignored.
    """
    saved = checkpoint.load_cluster_generations(directory)
    if not saved:
        log.info("no checkpoint in %s: starting empty", directory)
        return
    problems = []
    for count, generation in saved:
        present = sorted(c.shard_id for c in generation)
        if count == shard.num_shards and shard.shard_id in present:
            chosen = [c for c in generation if c.shard_id == shard.shard_id]
        elif present == list(range(count)):
            chosen = generation  # resharding: every old shard's blocks are needed
        else:
            problems.append(f"{count}-shard checkpoints of shards {present}")
            continue
        try:
            shard.restore(chosen)
        except ValueError as exc:
            raise UserError(f"cannot restore from {directory}: {exc}") from None
        return
    raise UserError(
        f"{directory} holds {'; '.join(problems)}: restoring shard {shard.shard_id} of {shard.num_shards} needs its "
        "own file (same shard count) or every shard's file of one generation (resharding)"
    )


class _Checkpointer:
    """Writes checkpoints: periodically, after every N pushes, and once on stop."""

    def __init__(self, shard: Shard, options: ServerOptions) -> None:
        assert options.checkpoint_dir is not None
        self.shard = shard
        self.directory = options.checkpoint_dir
        self.every = options.checkpoint_every
        self.every_pushes = options.checkpoint_every_pushes
        self.keep = options.keep
        self._saved_at_pushes = shard.pushes_applied
        self._lock = asyncio.Lock()
        self._saved_at: float | None = None  # time.monotonic() of the last successful write

    def age(self) -> float | None:
        """Seconds since this process last wrote a checkpoint; None while it has written none."""
        saved_at = self._saved_at
        return None if saved_at is None else time.monotonic() - saved_at

    async def run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            due_time = self.every > 0 and time.monotonic() - last >= self.every
            due_pushes = (
                self.every_pushes > 0 and self.shard.pushes_applied - self._saved_at_pushes >= self.every_pushes
            )
            if due_time or due_pushes:
                last = time.monotonic()
                try:
                    await self.save("periodic")
                except OSError as exc:
                    log.error("checkpoint of shard %d failed: %s", self.shard.shard_id, exc)

    async def save(self, why: str) -> None:
        """Snapshot on the event loop (a consistent cut), write in a thread (the loop keeps serving)."""
        async with self._lock:
            async with self.shard.apply_lock:  # no update is half-applied in a thread meanwhile
                snapshot = self.shard.checkpoint()
            if snapshot is None:
                return
            self._saved_at_pushes = self.shard.pushes_applied
            path = await asyncio.to_thread(checkpoint.write, snapshot, self.directory, keep=self.keep)
            self._saved_at = time.monotonic()
            log.info("shard %d wrote %s checkpoint %s", self.shard.shard_id, why, path)


async def _expire_leases(shard: Shard, every: float) -> None:
    """Drop workers whose lease lapsed, so ssp/bsp barriers never wait for the dead."""
    while True:
        await asyncio.sleep(every)
        await shard.expire_leases()


def main(options: ServerOptions, *, use_uvloop: bool = True) -> int:
    """Run a shard's server in this process; returns the exit code."""
    run_async(serve(options), use_uvloop=use_uvloop)
    return 0
