"""The parameter-server process: a gRPC server for one shard, health and reflection included."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from ranger_ps.consistency import parse_consistency
from ranger_ps.errors import UserError
from ranger_ps.rpc import CHANNEL_OPTIONS, SERVICE_NAME
from ranger_ps.runtime import run_async
from ranger_ps.server.servicer import ParameterServerServicer
from ranger_ps.server.shard import Shard

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

    def __post_init__(self) -> None:
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


def _write_ready_file(path: Path, host: str, port: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"host": host, "port": port, "pid": os.getpid()}))
    os.replace(tmp, path)


async def serve(options: ServerOptions, stop: asyncio.Event | None = None) -> None:
    """Serve one shard until ``stop`` is set or SIGTERM/SIGINT arrives, then shut down cleanly."""
    shard = Shard(
        options.shard_id,
        options.num_shards,
        consistency=options.consistency,
        lease_seconds=options.lease_seconds,
        wait_seconds=options.wait_seconds,
        init_claim_seconds=options.init_claim_seconds,
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((ParameterServerServicer(shard).generic_handler(),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{options.host}:{options.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise UserError(f"cannot listen on {address}: the port is in use or the address is not local ({exc})") from None
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if options.ready_file is not None:
        _write_ready_file(options.ready_file, options.host, port)
    log.info(
        "shard %d of %d serving on %s:%d (%s, lease %gs)",
        options.shard_id, options.num_shards, options.host, port, shard.mode, options.lease_seconds,
    )  # fmt: skip
    reaper = asyncio.create_task(_expire_leases(shard, options.lease_seconds / 4))

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        reaper.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("shard %d shutting down (grace %.1fs)", options.shard_id, options.grace_seconds)
        await health_servicer.enter_graceful_shutdown()
        await server.stop(options.grace_seconds)
        log.info("shard %d stopped: %d pushes applied", options.shard_id, shard.pushes_applied)


async def _expire_leases(shard: Shard, every: float) -> None:
    """Drop workers whose lease lapsed, so ssp/bsp barriers never wait for the dead."""
    while True:
        await asyncio.sleep(every)
        await shard.expire_leases()


def main(options: ServerOptions, *, use_uvloop: bool = True) -> int:
    """Run a shard's server in this process; returns the exit code."""
    run_async(serve(options), use_uvloop=use_uvloop)
    return 0
