"""``bench wire``: full-model pull and dense push + apply through ranger-ps, beside the baselines.

ranger-ps's side runs :class:`ranger_ps.client.sharded.ShardedClient` against real shard
processes on loopback; the same bytes go over raw TCP sockets, bare ``grpc.aio`` streams and the
PyTorch tutorial's parameter server on ``torch.distributed.rpc`` (TensorPipe) in the same run
(:mod:`ranger_ps.bench.baselines`), with the CPU seconds each side spends per byte and per message
(the cost model's inputs, :mod:`ranger_ps.bench.cost_model`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ranger_ps.bench import common
from ranger_ps.bench.baselines import start_grpc_server, wire_grpc, wire_tcp, wire_torch_rpc
from ranger_ps.bench.processes import READY_SECONDS, bench_cluster, start_shards
from ranger_ps.bench.settings import WireSettings
from ranger_ps.errors import ClusterError

log = logging.getLogger(__name__)

WIRE_TARGETS: tuple[common.Target, ...] = (
    ("pull_vs_torch_rpc", 1.5, "full-model pull >= 1.5x torch.distributed.rpc"),
    ("push_vs_torch_rpc", 1.5, "dense push + apply >= 1.5x torch.distributed.rpc"),
    ("pull_vs_tcp", 0.5, "full-model pull >= 50% of raw TCP (its fastest repetition: the loopback limit)"),
    (
        "shm_pull_vs_torch_rpc_same_host",
        2.0,
        "same-host pull (shared memory) >= 2x torch.distributed.rpc with TensorPipe's default channels",
    ),
    (
        "shm_push_vs_torch_rpc_same_host",
        2.0,
        "same-host push + apply (shared memory) >= 2x torch.distributed.rpc with TensorPipe's default channels",
    ),
    ("exchange_pull_vs_torch_rpc", 1.0, "pull over gRPC (no shared memory) >= torch.distributed.rpc over TCP"),
    ("exchange_push_vs_torch_rpc", 1.0, "push + apply over gRPC (no shared memory) >= torch.distributed.rpc over TCP"),
)


def run_wire(settings: WireSettings) -> dict[str, Any]:
    """Measure the wire (ranger-ps, raw TCP, torch.distributed.rpc) in one run; returns one JSON-ready object."""
    named = common.synthetic_model(settings.model_bytes, settings.tensors)
    nbytes = sum(t.numel() * t.element_size() for _, t in named)
    out: dict[str, Any] = {
        "benchmark": "wire",
        "model_bytes": nbytes,
        "settings": {
            "model_mb": settings.model_mb,
            "tensors": settings.tensors,
            "shards": settings.shards,
            "repeat": settings.repeat,
            "block_size": settings.block_size,
            "torch_threads": settings.threads,
            "uvloop": settings.use_uvloop,
            "torch_rpc_transport": settings.torch_rpc_transport,
        },
        "machine": common.machine_info(),
        "load_average_before": common.load_average(),
    }
    common.quiet_grpc_fork()
    with common.torch_threads(settings.threads):
        # Baselines without gRPC first: nothing of theirs runs while gRPC threads do.
        if settings.tcp:
            log.info("wire: raw TCP")
            out |= wire_tcp(settings, nbytes)
        else:
            out |= {"tcp_gbps": None, "tcp_send_gbps": None, "tcp_error": "skipped (--no-tcp)"}
        if settings.torch_rpc:
            log.info("wire: torch.distributed.rpc (TensorPipe %s)", settings.torch_rpc_transport)
            out |= wire_torch_rpc(settings)
        else:
            out |= {"torch_rpc_pull_gbps": None, "torch_rpc_push_gbps": None, "torch_rpc_error": "skipped"}
        if settings.torch_rpc and settings.torch_rpc_same_host:
            log.info("wire: torch.distributed.rpc (TensorPipe's default, same-host channels)")
            out |= wire_torch_rpc(settings, "default", prefix="torch_rpc_same_host")
        else:
            out |= {"torch_rpc_same_host_pull_gbps": None, "torch_rpc_same_host_push_gbps": None}
        with bench_cluster() as cluster:
            grpc_server, ready = start_grpc_server(cluster, settings.use_uvloop)
            shards, addresses = start_shards(cluster, settings.shards, use_uvloop=settings.use_uvloop)
            _, port = cluster.wait_ready(grpc_server, ready, READY_SECONDS)
            log.info("wire: bare grpc.aio streams")
            out |= wire_grpc(settings, nbytes, f"127.0.0.1:{port}")
            cluster.stop(grpc_server)
            log.info("wire: ranger-ps, %d shards, %.1f MB", settings.shards, nbytes / 1e6)
            out |= _wire_ranger_ps(settings, named, addresses, [shard.process.pid for shard in shards])
            for shared, prefix in ((False, "exchange"), (True, "shm")):
                if settings.exchange:
                    log.info("wire: ranger-ps exchanges, %s", "shared memory" if shared else "gRPC frames")
                    out |= _wire_exchange(settings, named, addresses, shared=shared, prefix=prefix)
                else:
                    out |= {f"{prefix}_pull_gbps": None, f"{prefix}_push_gbps": None}
    out["load_average_after"] = common.load_average()
    out["ratios"] = {
        "pull_vs_torch_rpc": common.ratio(out["pull_gbps"], out["torch_rpc_pull_gbps"]),
        "push_vs_torch_rpc": common.ratio(out["push_gbps"], out["torch_rpc_push_gbps"]),
        "pull_vs_tcp": common.ratio(out["pull_gbps"], out.get("tcp_best_gbps")),
        "pull_vs_tcp_median": common.ratio(out["pull_gbps"], out["tcp_gbps"]),
        "push_vs_tcp": common.ratio(out["push_gbps"], out.get("tcp_send_best_gbps")),
        "pull_vs_grpc": common.ratio(out["pull_gbps"], out["grpc_pull_gbps"]),
        "push_vs_grpc": common.ratio(out["push_gbps"], out["grpc_push_gbps"]),
        "grpc_pull_vs_tcp": common.ratio(out["grpc_pull_gbps"], out.get("tcp_best_gbps")),
        "torch_rpc_pull_vs_tcp": common.ratio(out["torch_rpc_pull_gbps"], out.get("tcp_best_gbps")),
        "shm_pull_vs_torch_rpc_same_host": common.ratio(out["shm_pull_gbps"], out["torch_rpc_same_host_pull_gbps"]),
        "shm_push_vs_torch_rpc_same_host": common.ratio(out["shm_push_gbps"], out["torch_rpc_same_host_push_gbps"]),
        "exchange_pull_vs_torch_rpc": common.ratio(out["exchange_pull_gbps"], out["torch_rpc_pull_gbps"]),
        "exchange_push_vs_torch_rpc": common.ratio(out["exchange_push_gbps"], out["torch_rpc_push_gbps"]),
    }
    out["targets"] = common.check_targets(out["ratios"], WIRE_TARGETS)
    return out


def _wire_ranger_ps(
    settings: WireSettings, named: list[tuple[str, torch.Tensor]], addresses: list[str], shard_pids: list[int]
) -> dict[str, Any]:
    from ranger_ps.algorithm.layout import Layout
    from ranger_ps.algorithm.rules import RuleConfig
    from ranger_ps.client.sharded import ShardedClient

    values = [t for _, t in named]
    nbytes = sum(t.numel() * t.element_size() for t in values)
    layout = Layout.from_named_tensors(named, settings.block_size)
    grads = [torch.full_like(t, 1e-6) for t in values]
    client = ShardedClient(addresses, use_uvloop=settings.use_uvloop, call_timeout=settings.timeout)
    try:
        started = time.perf_counter()
        client.register(layout, RuleConfig(rule="sgd", lr=1e-3, momentum=0.0), values)
        register_seconds = time.perf_counter() - started
        views = layout.block_views(layout.flat_views(values))
        clock = client.start_clock

        def pull(apply: bool) -> tuple[float, int]:
            forget_versions(client)
            before = client.bytes_pulled
            start = time.perf_counter()
            blocks = client.pull().result(timeout=settings.timeout)
            if apply:
                client.apply_pulled(blocks, views)
            seconds = time.perf_counter() - start
            got = sum(b.values.numel() * b.values.element_size() for b in blocks)
            if got != nbytes:
                raise ClusterError(f"a full pull returned {got} bytes, expected {nbytes}")
            return seconds, client.bytes_pulled - before

        def push(block_ids: list[int] | None) -> tuple[float, int]:
            nonlocal clock
            clock += 1
            start = time.perf_counter()
            result = client.push(grads, block_ids, clock).result(timeout=settings.timeout)
            return time.perf_counter() - start, result.bytes_sent

        def empty_pull() -> float:
            start = time.perf_counter()
            client.pull().result(timeout=settings.timeout)
            return time.perf_counter() - start

        cold_pull = pull(False)  # warm-up: connections, HTTP/2 windows, fresh memory
        cold_push = push(None)
        cpu = _CpuMeter(shard_pids)
        pulls = [pull(False) for _ in range(settings.repeat)]
        cpu.mark("pull", settings.repeat * nbytes)
        pull_applies = [pull(True) for _ in range(settings.repeat)]
        cpu.mark("pull_apply", settings.repeat * nbytes)
        pushes = [push(None) for _ in range(settings.repeat)]
        cpu.mark("push", settings.repeat * nbytes)
        # The fixed cost of a step's messages: a push of no block (every shard still gets a
        # header-only frame, as it does every step) and a pull when nothing changed (ditto).
        small_pushes = [push([]) for _ in range(settings.small_repeat)]
        cpu.mark("empty_push", settings.small_repeat)
        client.pull().result(timeout=settings.timeout)
        cpu.mark("", 1)
        small_pulls = [empty_pull() for _ in range(settings.small_repeat)]
        cpu.mark("empty_pull", settings.small_repeat)
    finally:
        client.close()
    pull_seconds = [s for s, _ in pulls]
    push_seconds = [s for s, _ in pushes]
    return {
        "pull_gbps": common.gbps(nbytes, common.median(pull_seconds)),
        "pull_cold_gbps": common.gbps(nbytes, cold_pull[0]),
        "push_cold_gbps": common.gbps(nbytes, cold_push[0]),
        "pull_apply_gbps": common.gbps(nbytes, common.median([s for s, _ in pull_applies])),
        "push_gbps": common.gbps(nbytes, common.median(push_seconds)),
        "pull_seconds": pull_seconds,
        "push_seconds": push_seconds,
        "pull_wire_bytes": pulls[0][1],
        "push_wire_bytes": pushes[0][1],
        "num_blocks": layout.num_blocks,
        "register_seconds": register_seconds,
        "empty_push_ms": 1e3 * common.median([s for s, _ in small_pushes]),
        "empty_push_bytes": small_pushes[0][1],
        "empty_pull_ms": 1e3 * common.median(small_pulls),
        "cpu": cpu.report(),
    }


def _wire_exchange(
    settings: WireSettings,
    named: list[tuple[str, torch.Tensor]],
    addresses: list[str],
    *,
    shared: bool,
    prefix: str,
) -> dict[str, Any]:
    """Full pulls and dense pushes + apply as a worker makes them: exchanges on a stream per shard.

    The push is what the optimizer does: one gather of every block out of a flat buffer in shard
    order (:meth:`~ranger_ps.optim.flat.FlatState.take`), then the exchange (no answer blocks); the
    pull lands every block in the flat parameter buffer.
    """
    from ranger_ps.algorithm.layout import Layout
    from ranger_ps.algorithm.rules import RuleConfig
    from ranger_ps.client.sharded import ShardedClient
    from ranger_ps.optim.flat import FlatState

    params = [t.clone() for _, t in named]
    nbytes = sum(t.numel() * t.element_size() for t in params)
    layout = Layout.from_named_tensors(list(zip([n for n, _ in named], params, strict=True)), settings.block_size)
    flat = FlatState(layout, params, ["grad"])
    client = ShardedClient(
        addresses, use_uvloop=settings.use_uvloop, call_timeout=settings.timeout, shared_memory=shared
    )
    try:
        client.register(layout, RuleConfig(rule="sgd", lr=1e-3, momentum=0.0), params)  # as _wire_ranger_ps
        expected = "shared-memory" if shared else "exchange"
        if client.transports != [expected] * len(addresses):
            raise ClusterError(f"expected {expected} traffic, the shards agreed to {client.transports}")
        every = client.shard_order(torch.arange(layout.num_blocks))
        clock = client.start_clock

        def pull(apply: bool) -> float:
            for shard in client._shards:  # forget what is held: the next answer carries every block
                shard.known_versions.zero_()
                shard.drop_stream()
            start = time.perf_counter()
            result = client.exchange([], 0).result(timeout=settings.timeout)
            if apply:
                flat.land(result.pulled)
            seconds = time.perf_counter() - start
            got = sum(r.values.numel() * r.values.element_size() for r in result.pulled)
            if got != nbytes:
                raise ClusterError(f"a full pull returned {got} bytes, expected {nbytes}")
            return seconds

        def push() -> float:
            nonlocal clock
            clock += 1
            for buffer in flat.buffers["grad"]:
                buffer.fill_(1e-6)
            start = time.perf_counter()
            runs = flat.take(flat.buffers["grad"], every, None)
            result = client.exchange(runs, clock, pull=False).result(timeout=settings.timeout)
            seconds = time.perf_counter() - start
            if result.blocks_applied != layout.num_blocks:
                raise ClusterError(f"a dense push applied {result.blocks_applied} of {layout.num_blocks} blocks")
            return seconds

        pull(False), push()  # warm-up: streams, HTTP/2 windows, fresh memory
        pulls = [pull(False) for _ in range(settings.repeat)]
        pull_applies = [pull(True) for _ in range(settings.repeat)]
        pushes = [push() for _ in range(settings.repeat)]
    finally:
        client.close()
    return {
        f"{prefix}_pull_gbps": common.gbps(nbytes, common.median(pulls)),
        f"{prefix}_pull_apply_gbps": common.gbps(nbytes, common.median(pull_applies)),
        f"{prefix}_push_gbps": common.gbps(nbytes, common.median(pushes)),
        f"{prefix}_pull_seconds": pulls,
        f"{prefix}_push_seconds": pushes,
    }


class _CpuMeter:
    """CPU seconds spent by this process (all threads) and by the shard processes, phase by phase.

    Wall-clock rates on a machine whose cores every process shares say little about machines where
    each process has its own; CPU seconds per byte and per message do (the cost model's inputs).
    """

    def __init__(self, shard_pids: Sequence[int]) -> None:
        self.shard_pids = list(shard_pids)
        self.phases: dict[str, dict[str, float]] = {}
        self._last = self._now()

    def _now(self) -> tuple[float, float]:
        import resource  # Unix only, like the benchmarks' process handling

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime, sum(_process_cpu_seconds(pid) for pid in self.shard_pids)

    def mark(self, phase: str, units: float) -> None:
        """Close a phase that moved ``units`` (bytes or messages); an empty name discards it."""
        now = self._now()
        client, shards = now[0] - self._last[0], now[1] - self._last[1]
        self._last = now
        if phase:
            self.phases[phase] = {"client_seconds": client, "shard_seconds": shards, "units": units}

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"phases": self.phases}
        for name, p in self.phases.items():
            scale, unit = (1e9, "per_gb") if name in ("pull", "pull_apply", "push") else (1e3, "ms_per_message")
            out[f"{name}_client_{unit}"] = p["client_seconds"] / p["units"] * scale
            out[f"{name}_shards_{unit}"] = p["shard_seconds"] / p["units"] * scale
        return out


def _process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def forget_versions(client: Any) -> None:
    """Make the client's next pull fetch every block (it forgets the versions it holds)."""
    for shard in client._shards:
        shard.known = [0] * len(shard.known)
