"""The parameter-server process: one :class:`~ranger_ps.server.app.ShardServer` until SIGTERM/SIGINT.

Only the process installs signal handlers and announces readiness (``--ready-file``): the server
object itself is free of both, so it also runs in-process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path

from ranger_ps.config.server import ServerConfig
from ranger_ps.files import write_text_atomically
from ranger_ps.server.app import ShardServer
from ranger_ps.wire.loop import run_async
from ranger_ps.wire.security import ServerSecurity

log = logging.getLogger(__name__)


def write_ready_file(path: Path, host: str, port: int, metrics_port: int | None = None) -> None:
    """Announce ``{host, port, pid[, metrics_port]}`` atomically (a reader never sees half of it)."""
    info: dict[str, object] = {"host": host, "port": port, "pid": os.getpid()}
    if metrics_port is not None:
        info["metrics_port"] = metrics_port
    write_text_atomically(path, json.dumps(info))


async def serve_until_signalled(config: ServerConfig, security: ServerSecurity) -> None:
    """Serve until SIGTERM or SIGINT, then stop cleanly (the final checkpoint included)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)  # before announcing readiness: a stop always checkpoints
    server = ShardServer(config, security)
    try:
        port = await server.start()
        if config.ready_file is not None:
            metrics_port = server.metrics.port if server.metrics is not None else None
            write_ready_file(config.ready_file, config.host, port, metrics_port)
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await server.stop()


def main(config: ServerConfig, security: ServerSecurity, *, use_uvloop: bool = True) -> int:
    """Run a shard's server in this process; returns the exit code."""
    run_async(serve_until_signalled(config, security), use_uvloop=use_uvloop)
    return 0
