"""The benchmarks' processes, started through the project's launcher (:mod:`ranger_ps.orchestration.launcher`).

Every benchmark that needs other processes runs them in a :func:`bench_cluster`: a
:class:`~ranger_ps.orchestration.launcher.Cluster` in a temporary directory that holds their logs,
stopped (SIGTERM, then SIGKILL) and removed when the benchmark is done. The children get the
environment of ``ranger-ps local``'s (one torch thread each) without any ``RANGER_PS_*`` setting (a
token, TLS) meant for real clusters: benchmark clusters are plain loopback.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ranger_ps.config.common import CommonSettings
from ranger_ps.config.server import ServerConfig
from ranger_ps.orchestration.launcher import Child, Cluster, child_environment
from ranger_ps.settings import to_argv

READY_SECONDS = 60.0
"""How long a server of a benchmark may take to announce its port."""


@contextlib.contextmanager
def bench_cluster() -> Iterator[Cluster]:
    """A cluster whose run directory is a temporary one; every child is stopped on the way out."""
    with (
        tempfile.TemporaryDirectory(prefix="ranger-ps-bench-") as tmp,
        Cluster(Path(tmp), env=child_environment(os.environ)) as cluster,
    ):
        yield cluster


def common_flags(use_uvloop: bool) -> list[str]:
    """The flags every ``ranger-ps`` child of a benchmark takes: warnings only, and the event loop asked for."""
    return to_argv(CommonSettings(log_level="WARNING", uvloop=use_uvloop))


def start_shards(cluster: Cluster, shards: int, *, use_uvloop: bool = True) -> tuple[list[Child], list[str]]:
    """Start ``shards`` shard servers on free loopback ports and wait until each serves.

    Returns the children and their addresses (``HOST:PORT``), in shard order.
    """
    children = []
    for shard in range(shards):
        ready = cluster.run_dir / f"shard-{shard}.ready.json"
        config = ServerConfig(shard_id=shard, num_shards=shards, port=0, ready_file=ready)
        children.append(cluster.spawn(f"shard-{shard}", ["server", *to_argv(config), *common_flags(use_uvloop)]))
    addresses = []
    for shard, child in enumerate(children):
        host, port = cluster.wait_ready(child, cluster.run_dir / f"shard-{shard}.ready.json", READY_SECONDS)
        addresses.append(f"{host}:{port}")
    return children, addresses


def log_line(child: Child, lines: int = 8) -> str:
    """The last lines of a child's log on one line (for an error in a JSON result)."""
    return " | ".join(line.strip() for line in child.log_tail(lines).splitlines())
