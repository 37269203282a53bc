"""A shard served over gRPC in this process: :class:`ShardServer`.

The server holds one :class:`~ranger_ps.server.shard.Shard` behind the gRPC servicer, the standard
health service and reflection, and runs its background duties (lease reaping, periodic
checkpoints, the optional Prometheus endpoint). It installs no signal handlers and writes no ready
file: those belong to the process (:mod:`ranger_ps.server.main`), so tests and benchmarks can run
any number of servers on one event loop (:class:`BackgroundShards`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ranger_ps.config.server import ServerConfig
from ranger_ps.errors import UserError
from ranger_ps.observability.metrics import MetricsEndpoint, ServerMetrics, start_metrics_server
from ranger_ps.server.checkpointer import Checkpointer, check_directory, restore
from ranger_ps.server.servicer import ParameterServerServicer
from ranger_ps.server.shard import Shard
from ranger_ps.wire.loop import LoopThread
from ranger_ps.wire.rpc import CHANNEL_OPTIONS, SERVICE_NAME
from ranger_ps.wire.security import ServerSecurity

log = logging.getLogger(__name__)

# SO_REUSEPORT would let a second server bind a port that is already taken, silently.
SERVER_OPTIONS = (*CHANNEL_OPTIONS, ("grpc.so_reuseport", 0))


class ShardServer:
    """One shard, served: ``port = await server.start()``, later ``await server.stop()``.

    Args:
        config: the shard's settings (place in the cluster, consistency, limits, checkpoints, metrics).
        security: the token and TLS the server demands (default: plaintext, no token).
    """

    def __init__(self, config: ServerConfig, security: ServerSecurity | None = None) -> None:
        self.config = config
        self.security = security or ServerSecurity()
        self.shard = Shard(config.shard_id, config.num_shards, config.shard_settings())
        self.port = 0
        self.metrics: MetricsEndpoint | None = None
        self._server: grpc.aio.Server | None = None
        self._servicer: ParameterServerServicer | None = None
        self._health: health.aio.HealthServicer | None = None
        self._saver: Checkpointer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    @property
    def address(self) -> str:
        """``HOST:PORT`` clients connect to (after :meth:`start`)."""
        return f"{self.config.host}:{self.port}"

    async def start(self) -> int:
        """Resume from checkpoints (when configured), listen, and start the background duties.

        Returns:
            The port the server listens on.

        Raises:
            UserError: the port or the metrics port is taken, the checkpoint folder is not a writable
                folder, or a checkpoint cannot be restored.
        """
        config = self.config
        if config.checkpoint_dir is not None:
            check_directory(config.checkpoint_dir)  # before anything is served: a real write, then removed
            restore(self.shard, config.checkpoint_dir)
        server = grpc.aio.server(
            options=(
                *((k, v) for k, v in SERVER_OPTIONS if k != "grpc.max_receive_message_length"),
                ("grpc.max_receive_message_length", config.max_message_mb << 20),
                ("grpc.max_concurrent_streams", config.max_streams),
            ),
            interceptors=self.security.interceptors(),
        )
        self._servicer = ParameterServerServicer(self.shard)
        server.add_generic_rpc_handlers((self._servicer.generic_handler(),))
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        address = f"{config.host}:{config.port}"
        try:
            with _core_log_kept_back(address):
                self.port = self.security.add_port(server, address)
        except RuntimeError as exc:
            raise UserError(f"cannot listen on {address}: {_bind_problem(config.host, config.port, exc)}") from None
        await server.start()
        self._server = server
        for name in ("", SERVICE_NAME):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if config.checkpoint_dir is not None:
            self._saver = Checkpointer(self.shard, config.checkpoint_dir, config)
            self._saver.listeners.append(self._checkpoint_health)
        try:
            self.metrics = self._start_metrics()
        except OSError as exc:
            await server.stop(None)
            raise UserError(
                f"cannot serve metrics on {config.metrics_host}:{config.metrics_port}: the port is in use or the "
                f"address is not local ({exc})"
            ) from None
        self._tasks.append(asyncio.create_task(_expire_leases(self.shard, config.lease_seconds / 4)))
        if self._saver is not None:
            self._tasks.append(asyncio.create_task(self._saver.run()))
        log.info(
            "shard %d of %d serving on %s (%s, lease %gs, %s)",
            config.shard_id, config.num_shards, self.address, self.shard.mode, config.lease_seconds,
            self.security.describe(),
        )  # fmt: skip
        if self.metrics is not None:
            log.info("shard %d serves metrics on %s", config.shard_id, self.metrics.url)
        return self.port

    def _start_metrics(self) -> MetricsEndpoint | None:
        if self.config.metrics_port is None:
            return None
        saver = self._saver
        metrics = ServerMetrics(
            self.shard.stats,
            shard_id=self.shard.shard_id,
            checkpoint_age=saver.age if saver is not None else None,
            checkpoint_failures=(lambda: saver.failures) if saver is not None else None,
        )
        endpoint, _ = start_metrics_server(metrics.registry, self.config.metrics_host, self.config.metrics_port)
        self.shard.apply_observers.append(metrics.observe_apply)
        return endpoint

    async def _checkpoint_health(self, healthy: bool) -> None:
        """A checkpoint failed (NOT_SERVING) or succeeded again (SERVING): both health service names follow."""
        if self._health is None or self._stopped:
            return
        status = health_pb2.HealthCheckResponse.SERVING if healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self._health.set(name, status)

    async def stop(self, grace: float | None = None) -> None:
        """Stop cleanly: refuse new pushes, let those in flight finish, apply incomplete bsp clocks,
        write the final checkpoint; nothing acknowledged is lost. Idempotent.

        The final checkpoint is retried (with a short pause) until the grace period, counted from
        this call, is over; at least one attempt is made.

        Args:
            grace: seconds in-flight calls get, and the final checkpoint's retries end by (default:
                the configured ``--grace``).

        Raises:
            FinalCheckpointError: the final checkpoint failed on every attempt (the server is stopped).
        """
        if self._stopped or self._server is None:
            return
        self._stopped = True
        grace = self.config.grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        for task in self._tasks:
            task.cancel()
        log.info("shard %d shutting down (grace %.1fs)", self.config.shard_id, grace)
        self.shard.stopping = True
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
        if self._servicer is not None:
            self._servicer.close()
        flushed = await self.shard.flush_pending()
        if flushed:
            log.info("shard %d applied %d incomplete bsp clocks before stopping", self.config.shard_id, flushed)
        try:
            if self._saver is not None:
                await self._saver.save_final(deadline)
        finally:
            if self.metrics is not None:
                await asyncio.to_thread(self.metrics.close)  # last: a final scrape still sees the final state
        log.info("shard %d stopped: %d pushes applied", self.config.shard_id, self.shard.pushes_applied)


@contextmanager
def _core_log_kept_back(address: str) -> Iterator[None]:
    """Keep gRPC core's log line about a failed bind of ``address`` off stderr; pass on anything else.

    gRPC core logs a failed bind itself (``add_port.cc ... Failed to add port``) to file descriptor 2
    before Python sees the error, which then becomes a one-line usage error: the core's line would
    only repeat it. The descriptor is redirected to a temporary file for the synchronous bind, and
    whatever was written meanwhile that is not about ``address`` is written to stderr afterwards.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as held:
            os.dup2(held.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                held.seek(0)
                lines = held.read().decode(errors="replace").splitlines(keepends=True)
                kept = "".join(line for line in lines if f"'{address}'" not in line and "add_port" not in line)
                if kept:
                    sys.stderr.write(kept)
    finally:
        os.close(saved)


def _bind_problem(host: str, port: int, error: RuntimeError) -> str:
    """Why gRPC could not listen on ``host:port``, in words (gRPC's own error only says it failed).

    Binding a plain socket the same way gives the operating system's reason. This runs after gRPC's
    bind failed and decides nothing but the message.
    """
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        return f"the host cannot be resolved ({exc.strerror or exc})"
    for family, kind, proto, _, where in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
            try:
                probe.bind(where)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return "the port is in use"
                if exc.errno == errno.EADDRNOTAVAIL:
                    return "the address is not one of this machine's"
                return exc.strerror or str(exc)
    return f"gRPC refused it ({error})"


async def _expire_leases(shard: Shard, every: float) -> None:
    """Drop workers whose lease lapsed, so ssp/bsp barriers never wait for the dead."""
    while True:
        await asyncio.sleep(every)
        await shard.expire_leases()


class BackgroundShards:
    """Shard servers on an event loop in a background thread, for synchronous callers in one process.

    Use as a context manager; every server started is stopped (final checkpoints written) on exit.

    Args:
        use_uvloop: run the servers' loop on uvloop.
    """

    def __init__(self, *, use_uvloop: bool = True) -> None:
        self._loop = LoopThread(use_uvloop=use_uvloop, name="ranger-ps-shards")
        self.servers: list[ShardServer] = []

    def start(self, config: ServerConfig, security: ServerSecurity | None = None) -> ShardServer:
        """Start one shard server; returns it (its :attr:`~ShardServer.address` is set)."""
        server = ShardServer(config, security)
        self._loop.run(server.start(), timeout=60)
        self.servers.append(server)
        return server

    def start_cluster(self, num_shards: int, config: ServerConfig | None = None) -> list[str]:
        """Start ``num_shards`` shards on free ports with ``config``'s other settings; their addresses."""
        import dataclasses

        base = config or ServerConfig()
        return [
            self.start(dataclasses.replace(base, shard_id=i, num_shards=num_shards, port=0)).address
            for i in range(num_shards)
        ]

    def stop(self, server: ShardServer, grace: float | None = None) -> None:
        """Stop one server cleanly (see :meth:`ShardServer.stop`)."""
        self._loop.run(server.stop(grace), timeout=120)

    def call(self, coroutine: object) -> object:
        """Run a coroutine on the servers' loop (to reach into a shard between steps) and return its result."""
        return self._loop.run(coroutine, timeout=60)  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop every server (newest first) and the loop."""
        try:
            for server in reversed(self.servers):
                self.stop(server, grace=0)
        finally:
            self._loop.close()

    def __enter__(self) -> BackgroundShards:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def background_cluster(num_shards: int, config: ServerConfig | None = None) -> Iterator[list[str]]:
    """``num_shards`` shards in this process for the duration of a ``with`` block; yields their addresses."""
    with BackgroundShards() as shards:
        yield shards.start_cluster(num_shards, config)
