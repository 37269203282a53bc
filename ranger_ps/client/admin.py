"""One-off calls to running shards: their stats and their standard gRPC health status.

For operators and orchestration (``status``, ``health``, ``local``'s progress): each call opens its
own channel, asks, and closes it; nothing registers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import grpc

from ranger_ps.wire._proto import ranger_ps_pb2 as pb
from ranger_ps.wire.loop import run_async
from ranger_ps.wire.rpc import CHANNEL_OPTIONS, describe_rpc_error, method_path
from ranger_ps.wire.security import ClientSecurity
from ranger_ps.wire.stats import ShardStats


def fetch_stats(
    servers: Sequence[str],
    *,
    timeout: float = 5.0,
    use_uvloop: bool = True,
    security: ClientSecurity | None = None,
) -> list[ShardStats | str]:
    """Each server's stats, or a one-line error for a server that did not answer."""
    security = security or ClientSecurity()

    async def gather() -> list[ShardStats | str]:
        async def one(address: str) -> ShardStats | str:
            async with security.channel(address, CHANNEL_OPTIONS) as channel:
                call = channel.unary_unary(method_path("Stats"))
                try:
                    raw = await call(pb.StatsRequest().SerializeToString(), timeout=timeout, metadata=security.metadata)
                except grpc.aio.AioRpcError as exc:
                    return describe_rpc_error(exc)
                return ShardStats.from_proto(pb.StatsReply.FromString(raw))

        return list(await asyncio.gather(*(one(a) for a in servers)))

    return run_async(gather(), use_uvloop=use_uvloop)


def check_health(
    address: str, *, timeout: float = 3.0, use_uvloop: bool = True, security: ClientSecurity | None = None
) -> str:
    """The standard gRPC health status of a server (``SERVING``, ``NOT_SERVING``...) or the error code."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel_security = security or ClientSecurity()

    async def check() -> str:
        async with channel_security.channel(address) as channel:
            try:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=timeout
                )
            except grpc.aio.AioRpcError as exc:
                return str(exc.code().name)
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))

    return run_async(check(), use_uvloop=use_uvloop)
