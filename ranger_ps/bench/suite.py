"""``ranger-ps bench wire | apply | train``: how close the wire, the update and training come to the machine.

Part of the command-line edge: it starts shard servers and baseline processes on loopback, and
imports the server and worker packages lazily. Every benchmark prints one JSON object with
``--json`` (a Markdown table otherwise) and can draw a PNG bar chart with ``--plot`` (matplotlib,
imported only then). Results, commands and the cost model built on them: ``docs/benchmarks.md``.

- ``wire``: full-model pull and dense push + apply through :class:`ranger_ps.client.sharded.ShardedClient`
  against real shard processes, beside the same bytes over raw TCP sockets, bare ``grpc.aio``
  streams and the PyTorch tutorial's parameter server on ``torch.distributed.rpc`` (TensorPipe),
  in one run; with the CPU seconds each side spends per byte and per message.
- ``apply``: the server-side update (:func:`ranger_ps.algorithm.rules.apply_update`) per rule in GB/s of
  parameters, beside a plain ``torch`` copy of the same bytes (the memory-bandwidth limit).
- ``train``: the default job (digits MLP, 2 shards, 2 workers) at several push fractions, beside
  one process with ``torch.optim.SGD`` and torch DistributedDataParallel (gloo).

Helper processes (the raw-TCP peer, the bare gRPC server, the torch.distributed.rpc server and
trainer, DDP ranks) run this module's functions through ``python -c``, so what they pickle refers to
``ranger_ps.bench.suite`` in both processes. ``python -m ranger_ps.bench.suite cost-model`` turns a
``wire`` and a ``train`` result into the cost model's tables (:func:`cost_model`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from ranger_ps.errors import ClusterError, UserError
from ranger_ps.files import write_text_atomically
from ranger_ps.orchestration.launcher import child_environment, die_with_parent, stop_process
from ranger_ps.wire.allocator import tune_allocator

log = logging.getLogger(__name__)

GB = 1e9  # throughput figures are decimal GB/s of parameter bytes
DEFAULT_FRACTIONS = (1.0, 0.25, 0.05, 0.01)
TRAIN_BLOCK_SIZE = 256  # 39 blocks for the digits MLP: small enough that push fractions mean something

# Targets of the performance issue, as ratios measured in one run: (key, threshold, meaning).
WIRE_TARGETS = (
    ("pull_vs_torch_rpc", 1.5, "full-model pull >= 1.5x torch.distributed.rpc"),
    ("push_vs_torch_rpc", 1.5, "dense push + apply >= 1.5x torch.distributed.rpc"),
    ("pull_vs_tcp", 0.5, "full-model pull >= 50% of raw TCP (its fastest repetition: the loopback limit)"),
)
APPLY_TARGET = ("sgd_vs_memcpy", 0.3, "server apply (sgd) >= 30% of memcpy bandwidth")
TRAIN_TARGET = ("push_bytes_ratio_at_0.05", 0.06, "bytes pushed per step at push fraction 0.05 <= 6% of dense")

_HELPER = "import sys; from ranger_ps.bench.suite import helper_main; sys.exit(helper_main(sys.argv[1:]))"


# -- small utilities ----------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / GB if seconds > 0 else math.inf


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = round(int(line.split()[1]) / 2**20, 1)
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": memory,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine skews every figure."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _child_env() -> dict[str, str]:
    """The children's environment: one torch thread each (as ``ranger-ps local``), and none of the
    ``RANGER_PS_*`` settings (a token, TLS) meant for real clusters: benchmark clusters are plain loopback."""
    return child_environment(os.environ)


@dataclass
class _Children:
    """Child processes of one benchmark: started in their own sessions, always stopped (SIGTERM, then SIGKILL)."""

    run_dir: Path
    env: dict[str, str] = field(default_factory=_child_env)
    processes: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = field(default_factory=list)

    def spawn(self, name: str, argv: Sequence[str], *, stdout_pipe: bool = False) -> subprocess.Popen[bytes]:
        log_file = open(self.run_dir / f"{name}.log", "wb")  # closed in stop_all
        process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else log_file,
            stderr=log_file,
            env=self.env,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        self.processes.append((name, process, log_file))
        return process

    def helper(self, name: str, role: str, *args: object, stdout_pipe: bool = False) -> subprocess.Popen[bytes]:
        """Run :func:`helper_main` with ``role`` in a child interpreter."""
        return self.spawn(name, [sys.executable, "-c", _HELPER, role, *map(str, args)], stdout_pipe=stdout_pipe)

    def log_tail(self, name: str, lines: int = 8) -> str:
        try:
            text = (self.run_dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])

    def stop(self, process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        stop_process(process, timeout)

    def stop_all(self) -> None:
        for _name, process, log_file in reversed(self.processes):
            self.stop(process)
            if process.stdout is not None:
                process.stdout.close()
            log_file.close()
        self.processes.clear()

    def __enter__(self) -> _Children:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _wait_ready_file(children: _Children, name: str, process: subprocess.Popen[bytes], path: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while not path.exists():
        if process.poll() is not None:
            raise ClusterError(
                f"{name} exited with {process.returncode} before it was ready: {children.log_tail(name)}"
            )
        if time.monotonic() > deadline:
            raise ClusterError(f"{name} was not ready within 60s: {children.log_tail(name)}")
        time.sleep(0.02)
    info: dict[str, Any] = json.loads(path.read_text())
    return info


def start_shards(children: _Children, shards: int, *, use_uvloop: bool = True) -> list[str]:
    """Start ``shards`` shard servers on free loopback ports; returns their addresses in shard order."""
    processes = []
    for shard in range(shards):
        ready = children.run_dir / f"shard-{shard}.ready.json"
        argv = [
            sys.executable, "-m", "ranger_ps", "server", "--port", "0", "--ready-file", str(ready),
            "--num-shards", str(shards), "--shard-id", str(shard), "--log-level", "WARNING",
            "--uvloop" if use_uvloop else "--no-uvloop",
        ]  # fmt: skip
        processes.append((f"shard-{shard}", children.spawn(f"shard-{shard}", argv), ready))
    addresses = []
    for name, process, ready in processes:
        info = _wait_ready_file(children, name, process, ready)
        addresses.append(f"{info['host']}:{info['port']}")
    return addresses


def synthetic_model(model_bytes: int, tensors: int, *, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """``tensors`` float32 tensors of ``model_bytes`` in all (the last takes the remainder)."""
    numel = max(tensors, model_bytes // 4)
    each = numel // tensors
    sizes = [each] * (tensors - 1) + [numel - each * (tensors - 1)]
    generator = torch.Generator().manual_seed(seed)
    return [(f"t{i:03d}", torch.rand(n, generator=generator)) for i, n in enumerate(sizes)]


# -- wire -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WireSettings:
    """``bench wire`` settings (the flags of the same names); ``small_repeat``: empty pushes and pulls timed."""

    model_mb: float = 100.0
    shards: int = 2
    repeat: int = 5
    tensors: int = 25
    block_size: int = 65_536
    small_repeat: int = 200
    torch_rpc: bool = True
    torch_rpc_transport: str = "uv"
    tcp: bool = True
    use_uvloop: bool = True
    threads: int = 1
    timeout: float = 300.0

    @property
    def model_bytes(self) -> int:
        return int(self.model_mb * 1e6) // 4 * 4


def run_wire(settings: WireSettings) -> dict[str, Any]:
    """Measure the wire (ranger-ps, raw TCP, torch.distributed.rpc) in one run; returns one JSON-ready object."""
    if settings.shards < 1 or settings.repeat < 1 or settings.tensors < 1 or settings.model_mb <= 0:
        raise UserError("--shards, --repeat and --tensors must be >= 1 and --model-mb > 0")
    named = synthetic_model(settings.model_bytes, settings.tensors)
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
        "machine": machine_info(),
        "load_average_before": _load_average(),
    }
    _quiet_grpc_fork()
    with _torch_threads(settings.threads):
        # Baselines without gRPC first: nothing of theirs runs while gRPC threads do.
        if settings.tcp:
            log.info("wire: raw TCP")
            out |= _wire_tcp(settings, nbytes)
        else:
            out |= {"tcp_gbps": None, "tcp_send_gbps": None, "tcp_error": "skipped (--no-tcp)"}
        if settings.torch_rpc:
            log.info("wire: torch.distributed.rpc (TensorPipe %s)", settings.torch_rpc_transport)
            out |= _wire_torch_rpc(settings)
        else:
            out |= {"torch_rpc_pull_gbps": None, "torch_rpc_push_gbps": None, "torch_rpc_error": "skipped"}
        with tempfile.TemporaryDirectory(prefix="ranger-ps-bench-") as tmp, _Children(Path(tmp)) as children:
            ready = Path(tmp) / "grpc.ready.json"
            grpc_server = children.helper("grpc", "grpc-server", ready, int(settings.use_uvloop))
            addresses = start_shards(children, settings.shards, use_uvloop=settings.use_uvloop)
            port = int(_wait_ready_file(children, "grpc", grpc_server, ready)["port"])
            log.info("wire: bare grpc.aio streams")
            out |= _wire_grpc(settings, nbytes, f"127.0.0.1:{port}")
            children.stop(grpc_server)
            log.info("wire: ranger-ps, %d shards, %.1f MB", settings.shards, nbytes / 1e6)
            shard_pids = [proc.pid for name, proc, _ in children.processes if name.startswith("shard-")]
            out |= _wire_ranger_ps(settings, named, addresses, shard_pids)
    out["load_average_after"] = _load_average()
    out["ratios"] = {
        "pull_vs_torch_rpc": _ratio(out["pull_gbps"], out["torch_rpc_pull_gbps"]),
        "push_vs_torch_rpc": _ratio(out["push_gbps"], out["torch_rpc_push_gbps"]),
        "pull_vs_tcp": _ratio(out["pull_gbps"], out.get("tcp_best_gbps")),
        "pull_vs_tcp_median": _ratio(out["pull_gbps"], out["tcp_gbps"]),
        "push_vs_tcp": _ratio(out["push_gbps"], out.get("tcp_send_best_gbps")),
        "pull_vs_grpc": _ratio(out["pull_gbps"], out["grpc_pull_gbps"]),
        "push_vs_grpc": _ratio(out["push_gbps"], out["grpc_push_gbps"]),
        "grpc_pull_vs_tcp": _ratio(out["grpc_pull_gbps"], out.get("tcp_best_gbps")),
        "torch_rpc_pull_vs_tcp": _ratio(out["torch_rpc_pull_gbps"], out.get("tcp_best_gbps")),
    }
    out["targets"] = _targets(out["ratios"], WIRE_TARGETS)
    return out


def _targets(values: dict[str, float | None], targets: Sequence[tuple[str, float, str]]) -> dict[str, Any]:
    result = {}
    for key, threshold, meaning in targets:
        value = values.get(key)
        lower_is_better = "<=" in meaning
        met = None if value is None else (value <= threshold if lower_is_better else value >= threshold)
        result[key] = {"value": value, "target": threshold, "met": met, "meaning": meaning}
    return result


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
        "pull_gbps": _gbps(nbytes, _median(pull_seconds)),
        "pull_cold_gbps": _gbps(nbytes, cold_pull[0]),
        "push_cold_gbps": _gbps(nbytes, cold_push[0]),
        "pull_apply_gbps": _gbps(nbytes, _median([s for s, _ in pull_applies])),
        "push_gbps": _gbps(nbytes, _median(push_seconds)),
        "pull_seconds": pull_seconds,
        "push_seconds": push_seconds,
        "pull_wire_bytes": pulls[0][1],
        "push_wire_bytes": pushes[0][1],
        "num_blocks": layout.num_blocks,
        "register_seconds": register_seconds,
        "empty_push_ms": 1e3 * _median([s for s, _ in small_pushes]),
        "empty_push_bytes": small_pushes[0][1],
        "empty_pull_ms": 1e3 * _median(small_pulls),
        "cpu": cpu.report(),
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


def _wire_tcp(settings: WireSettings, nbytes: int) -> dict[str, Any]:
    """The same bytes over one loopback TCP connection to a sink/source process (sendall / recv_into)."""
    with tempfile.TemporaryDirectory(prefix="ranger-ps-bench-") as tmp, _Children(Path(tmp)) as children:
        ready = Path(tmp) / "tcp.ready.json"
        process = children.helper("tcp", "tcp-server", ready)
        try:
            port = int(_wait_ready_file(children, "tcp", process, ready)["port"])
            buffer = bytearray(nbytes)
            view = memoryview(buffer)
            with socket.create_connection(("127.0.0.1", port), timeout=settings.timeout) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

                def receive() -> float:  # server -> client: the direction of a pull
                    start = time.perf_counter()
                    sock.sendall(struct.pack("!cQ", b"R", nbytes))
                    _recv_exactly(sock, view)
                    return time.perf_counter() - start

                def send() -> float:  # client -> server: the direction of a push
                    start = time.perf_counter()
                    sock.sendall(struct.pack("!cQ", b"S", nbytes))
                    sock.sendall(view)
                    _recv_exactly(sock, memoryview(bytearray(1)))
                    return time.perf_counter() - start

                for _ in range(3):  # the first transfers run at half speed while the connection settles
                    receive()
                    send()
                receives = [receive() for _ in range(settings.repeat)]
                sends = [send() for _ in range(settings.repeat)]
                sock.sendall(struct.pack("!cQ", b"Q", 0))
        except (OSError, ClusterError) as exc:
            return {"tcp_gbps": None, "tcp_send_gbps": None, "tcp_error": str(exc)}
    return {
        "tcp_gbps": _gbps(nbytes, _median(receives)),
        "tcp_send_gbps": _gbps(nbytes, _median(sends)),
        # Loopback TCP alternates between two speeds here (about 2x apart, by how the two processes
        # land on the cores): the fastest repetition is the machine's limit.
        "tcp_best_gbps": _gbps(nbytes, min(receives)),
        "tcp_send_best_gbps": _gbps(nbytes, min(sends)),
        "tcp_seconds": receives,
        "tcp_send_seconds": sends,
    }


def _recv_exactly(sock: socket.socket, view: memoryview) -> None:
    pos = 0
    while pos < len(view):
        n = sock.recv_into(view[pos:])
        if n == 0:
            raise ConnectionError("the peer closed the connection early")
        pos += n


def _tcp_server(ready: Path) -> int:
    """The raw-TCP peer: answers ``R n`` with n bytes, ``S n`` by receiving n bytes and acknowledging."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        write_text_atomically(ready, json.dumps({"host": "127.0.0.1", "port": listener.getsockname()[1]}))
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            buffer = bytearray()
            head = memoryview(bytearray(9))
            while True:
                _recv_exactly(conn, head)
                op, n = struct.unpack("!cQ", head)
                if op == b"Q":
                    return 0
                if len(buffer) < n:
                    buffer = bytearray(n)
                view = memoryview(buffer)[:n]
                if op == b"R":
                    conn.sendall(view)
                elif op == b"S":
                    _recv_exactly(conn, view)
                    conn.sendall(b"k")
                else:
                    return 2


# Bare grpc.aio: the same channel options and frame size as ranger-ps, raw bytes both ways, no
# frames, no tensors, messages prepared in advance: the ceiling of the transport ranger-ps is built on.
_GRPC_SERVICE = "ranger_ps.bench.Raw"


def _grpc_server(ready: Path, use_uvloop: bool) -> int:
    import asyncio

    import grpc

    from ranger_ps.wire.frames import DEFAULT_CHUNK_BYTES
    from ranger_ps.wire.loop import run_async
    from ranger_ps.wire.rpc import CHANNEL_OPTIONS

    chunk = bytes(DEFAULT_CHUNK_BYTES)

    async def pull(request: bytes, context: Any) -> Any:
        (remaining,) = struct.unpack("!Q", request)
        while remaining > 0:
            n = min(remaining, len(chunk))
            yield chunk if n == len(chunk) else chunk[:n]
            remaining -= n

    async def push(requests: Any, context: Any) -> bytes:
        total = 0
        async for message in requests:
            total += len(message)
        return struct.pack("!Q", total)

    async def serve() -> None:
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        handler = grpc.method_handlers_generic_handler(
            _GRPC_SERVICE,
            {
                "Pull": grpc.unary_stream_rpc_method_handler(pull),
                "Push": grpc.stream_unary_rpc_method_handler(push),
            },
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        write_text_atomically(ready, json.dumps({"host": "127.0.0.1", "port": port}))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await server.stop(1)

    run_async(serve(), use_uvloop=use_uvloop)
    return 0


def _wire_grpc(settings: WireSettings, nbytes: int, address: str) -> dict[str, Any]:
    import grpc

    from ranger_ps.wire.frames import DEFAULT_CHUNK_BYTES
    from ranger_ps.wire.loop import run_async
    from ranger_ps.wire.rpc import CHANNEL_OPTIONS

    frames = [bytes(min(DEFAULT_CHUNK_BYTES, nbytes - o)) for o in range(0, nbytes, DEFAULT_CHUNK_BYTES)]

    async def measure() -> tuple[list[float], list[float], list[float]]:
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            pull = channel.unary_stream(f"/{_GRPC_SERVICE}/Pull")
            push = channel.stream_unary(f"/{_GRPC_SERVICE}/Push")

            async def pull_once() -> float:
                start = time.perf_counter()
                got = 0
                async for message in pull(struct.pack("!Q", nbytes), timeout=settings.timeout):
                    got += len(message)
                if got != nbytes:
                    raise ClusterError(f"bare gRPC pull returned {got} bytes, expected {nbytes}")
                return time.perf_counter() - start

            async def push_once() -> float:
                start = time.perf_counter()
                await push(iter(frames), timeout=settings.timeout)
                return time.perf_counter() - start

            cold = [await pull_once(), await push_once()]
            pulls = [await pull_once() for _ in range(settings.repeat)]
            pushes = [await push_once() for _ in range(settings.repeat)]
            return pulls, pushes, cold

    pulls, pushes, cold = run_async(measure(), use_uvloop=settings.use_uvloop)
    return {
        "grpc_pull_cold_gbps": _gbps(nbytes, cold[0]),
        "grpc_push_cold_gbps": _gbps(nbytes, cold[1]),
        "grpc_pull_gbps": _gbps(nbytes, _median(pulls)),
        "grpc_push_gbps": _gbps(nbytes, _median(pushes)),
        "grpc_pull_seconds": pulls,
        "grpc_push_seconds": pushes,
    }


# torch.distributed.rpc: the PyTorch tutorial's parameter server (a server process holds the
# parameters; trainers fetch them and send gradients with rpc_sync; the server steps torch.optim.SGD).
_RPC_STATE: dict[str, Any] = {}


def _rpc_get_params() -> list[torch.Tensor]:
    params: list[torch.Tensor] = _RPC_STATE["params"]
    return params


def _rpc_push(grads: list[torch.Tensor]) -> bool:
    params: list[torch.Tensor] = _RPC_STATE["params"]
    optimizer: torch.optim.Optimizer = _RPC_STATE["optimizer"]
    for param, grad in zip(params, grads, strict=True):
        param.grad = grad
    optimizer.step()
    return True


def _rpc_options(port: int, transport: str) -> Any:
    from torch.distributed import rpc

    kwargs: dict[str, Any] = {"init_method": f"tcp://127.0.0.1:{port}", "rpc_timeout": 600}
    if transport != "default":
        # Tensors over the same transport as everything else (no same-host shortcut such as CMA).
        kwargs["_transports"] = [transport]
        kwargs["_channels"] = ["basic"]
    return rpc.TensorPipeRpcBackendOptions(**kwargs)


def _rpc_server(port: int, model_bytes: int, tensors: int, transport: str) -> int:
    from torch.distributed import rpc

    torch.set_num_threads(1)
    params = [t.requires_grad_(False) for _, t in synthetic_model(model_bytes, tensors)]
    _RPC_STATE["params"] = params
    _RPC_STATE["optimizer"] = torch.optim.SGD(params, lr=1e-3)
    rpc.init_rpc("ps", rank=1, world_size=2, rpc_backend_options=_rpc_options(port, transport))  # type: ignore[no-untyped-call]
    rpc.shutdown()  # waits until the trainer is done
    return 0


def _rpc_trainer(port: int, model_bytes: int, tensors: int, transport: str, repeat: int) -> int:
    from torch.distributed import rpc

    torch.set_num_threads(1)
    rpc.init_rpc(  # type: ignore[no-untyped-call]
        "trainer", rank=0, world_size=2, rpc_backend_options=_rpc_options(port, transport)
    )
    try:
        grads = [torch.full_like(t, 1e-6) for _, t in synthetic_model(model_bytes, tensors)]
        nbytes = sum(g.numel() * g.element_size() for g in grads)

        def pull() -> float:
            start = time.perf_counter()
            params = rpc.rpc_sync("ps", _rpc_get_params)
            seconds = time.perf_counter() - start
            got = sum(p.numel() * p.element_size() for p in params)
            if got != nbytes:
                raise RuntimeError(f"torch rpc pull returned {got} bytes, expected {nbytes}")
            return seconds

        def push() -> float:
            start = time.perf_counter()
            rpc.rpc_sync("ps", _rpc_push, args=(grads,))
            return time.perf_counter() - start

        cold = (pull(), push())
        pulls = [pull() for _ in range(repeat)]
        pushes = [push() for _ in range(repeat)]
    finally:
        rpc.shutdown()
    report = {"pull_seconds": pulls, "push_seconds": pushes, "cold_seconds": cold, "nbytes": nbytes}
    print(json.dumps(report), flush=True)
    return 0


def _wire_torch_rpc(settings: WireSettings) -> dict[str, Any]:
    def unavailable(reason: str) -> dict[str, Any]:
        log.warning("torch.distributed.rpc baseline unavailable: %s", reason)
        return {"torch_rpc_pull_gbps": None, "torch_rpc_push_gbps": None, "torch_rpc_error": reason}

    try:
        from torch.distributed import rpc
    except ImportError as exc:
        return unavailable(f"torch.distributed.rpc does not import: {exc}")
    if not rpc.is_available():
        return unavailable("torch.distributed.rpc is not available in this torch build")
    args = (settings.model_bytes, settings.tensors, settings.torch_rpc_transport)
    with tempfile.TemporaryDirectory(prefix="ranger-ps-bench-") as tmp, _Children(Path(tmp)) as children:
        port = _free_port()
        server = children.helper("rpc-server", "rpc-server", port, *args)
        trainer = children.helper("rpc-trainer", "rpc-trainer", port, *args, settings.repeat, stdout_pipe=True)
        deadline = time.monotonic() + settings.timeout
        while trainer.poll() is None:  # the trainer prints one line: the pipe never fills
            if server.poll() not in (None, 0):
                return unavailable(f"the server exited with {server.returncode}: {children.log_tail('rpc-server')}")
            if time.monotonic() > deadline:
                return unavailable(
                    f"the trainer did not finish within {settings.timeout:g}s: {children.log_tail('rpc-trainer')}"
                )
            time.sleep(0.1)
        assert trainer.stdout is not None
        stdout = trainer.stdout.read()
        if trainer.returncode != 0:
            return unavailable(
                f"the trainer exited with {trainer.returncode}: {children.log_tail('rpc-trainer')} "
                f"(server: {children.log_tail('rpc-server')})"
            )
        try:
            report = json.loads(stdout.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            return unavailable(f"the trainer printed no result: {stdout[-500:]!r}")
    nbytes = int(report["nbytes"])
    return {
        "torch_rpc_pull_gbps": _gbps(nbytes, _median(report["pull_seconds"])),
        "torch_rpc_push_gbps": _gbps(nbytes, _median(report["push_seconds"])),
        "torch_rpc_pull_cold_gbps": _gbps(nbytes, report["cold_seconds"][0]),
        "torch_rpc_push_cold_gbps": _gbps(nbytes, report["cold_seconds"][1]),
        "torch_rpc_pull_seconds": report["pull_seconds"],
        "torch_rpc_push_seconds": report["push_seconds"],
        "torch_rpc_error": None,
    }


# -- apply ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApplySettings:
    """``bench apply`` settings (the flags of the same names)."""

    model_mb: float = 100.0
    block_size: int = 65_536
    rules: tuple[str, ...] = ("sgd", "adamw", "ranger")
    repeat: int = 5
    warmup: int = 6
    threads: int = 1
    server_path: bool = True

    @property
    def model_bytes(self) -> int:
        return int(self.model_mb * 1e6) // 4 * 4


def _rule_config(name: str) -> Any:
    """The rule as the default job runs it (the CLI's per-rule learning rate and momentum)."""
    from ranger_ps.config.train import TrainConfig

    return TrainConfig(rule=name).rule_config()


def _blocks_of(flat: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    out = []
    offset = 0
    for n in sizes:
        out.append(flat[offset : offset + n])
        offset += n
    return out


def _timed(fn: Callable[[], object], warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def run_apply(settings: ApplySettings) -> dict[str, Any]:
    """Server-side update throughput per rule beside a plain copy of the same bytes."""
    from ranger_ps.algorithm.rules import RuleConfig, apply_update, new_block_state

    if settings.repeat < 1 or settings.model_mb <= 0 or settings.block_size < 1:
        raise UserError("--repeat and --block-size must be >= 1 and --model-mb > 0")
    numel = settings.model_bytes // 4
    nbytes = numel * 4
    sizes = [min(settings.block_size, numel - o) for o in range(0, numel, settings.block_size)]
    generator = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {
        "benchmark": "apply",
        "model_bytes": nbytes,
        "settings": {
            "model_mb": settings.model_mb,
            "block_size": settings.block_size,
            "num_blocks": len(sizes),
            "repeat": settings.repeat,
            "warmup": settings.warmup,
            "torch_threads": settings.threads,
        },
        "machine": machine_info(),
        "load_average_before": _load_average(),
    }
    rules: dict[str, Any] = {}
    with _torch_threads(settings.threads):
        out |= _memcpy(numel, sizes, settings.repeat, generator)
        grads = [torch.rand(n, generator=generator).sub_(0.5).mul_(1e-3) for n in sizes]
        configs: list[tuple[str, RuleConfig]] = [(name, _rule_config(name)) for name in settings.rules]
        if "sgd" in settings.rules:
            configs.append(("sgd_no_momentum", RuleConfig(rule="sgd", lr=0.05, momentum=0.0)))
        for label, config in configs:
            params = [torch.rand(n, generator=generator) for n in sizes]
            states = [new_block_state(config, n, torch.float32) for n in sizes]

            def update(config: RuleConfig = config, params: list[torch.Tensor] = params, states: Any = states) -> None:
                apply_update(config, params, grads, states)

            times = _timed(update, settings.warmup, settings.repeat)
            rules[label] = {
                "gbps": _gbps(nbytes, _median(times)),
                "seconds": times,
                "rule": config.to_dict(),
                "state_tensors": len(config.state_names()),
            }
            log.info("apply: %s %.2f GB/s", label, rules[label]["gbps"])
        out["rules"] = rules
        if settings.server_path and "sgd" in settings.rules:
            out["server_push_path"] = _apply_server_path(settings, sizes, grads)
    out["ratios"] = {f"{name}_vs_memcpy": _ratio(row["gbps"], out["memcpy_gbps"]) for name, row in rules.items()}
    out["targets"] = _targets(out["ratios"], (APPLY_TARGET,))
    out["load_average_after"] = _load_average()
    return out


def _memcpy(numel: int, sizes: Sequence[int], repeat: int, generator: torch.Generator) -> dict[str, Any]:
    """``dst.copy_(src)`` of the whole model, and block by block (the rules' per-call overhead)."""
    src = torch.rand(numel, generator=generator)
    dst = torch.empty_like(src)
    whole = _timed(lambda: dst.copy_(src), 1, repeat)
    src_blocks = _blocks_of(src, sizes)
    dst_blocks = _blocks_of(dst, sizes)

    def copy_blocks() -> None:
        for d, s in zip(dst_blocks, src_blocks, strict=True):
            d.copy_(s)

    per_block = _timed(copy_blocks, 1, repeat)
    return {
        "memcpy_gbps": _gbps(numel * 4, _median(whole)),
        "memcpy_blocks_gbps": _gbps(numel * 4, _median(per_block)),
    }


def _apply_server_path(settings: ApplySettings, sizes: Sequence[int], grads: Sequence[torch.Tensor]) -> dict[str, Any]:
    """What a shard does with a dense push besides the rule: decode and check every block, then apply."""
    try:
        from ranger_ps.algorithm.layout import Layout, ParamInfo
        from ranger_ps.server.store import ShardStore
        from ranger_ps.wire.codec import codec_for_name, tensor_bytes
        from ranger_ps.wire.frames import WireBlock

        wire = codec_for_name("float32").wire
        layout = Layout((ParamInfo("flat", (sum(sizes),), "float32"),), settings.block_size)
        store = ShardStore(layout, range(layout.num_blocks), _rule_config("sgd"))
        initial = torch.rand(sum(sizes))
        blocks = _blocks_of(initial, sizes)
        store.initialize(
            [WireBlock(b.block_id, 0, wire, tensor_bytes(v)) for b, v in zip(layout.blocks, blocks, strict=True)]
        )
        # Received messages are immutable bytes; the shard reads gradients straight out of them.
        wires = [WireBlock(i, 0, wire, memoryview(bytes(tensor_bytes(g)))) for i, g in enumerate(grads)]
        times = _timed(lambda: store.apply(store.decode(wires)), settings.warmup, settings.repeat)
        decode_times = _timed(lambda: store.decode(wires), 1, settings.repeat)
    except (ImportError, TypeError, AttributeError, ValueError) as exc:  # server internals move: say why
        return {"gbps": None, "error": f"{type(exc).__name__}: {exc}"}
    nbytes = sum(sizes) * 4
    return {"gbps": _gbps(nbytes, _median(times)), "decode_gbps": _gbps(nbytes, _median(decode_times)), "rule": "sgd"}


# -- train ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    """``bench train`` settings (the flags of the same names); ``in_process``: also time Ranger without servers."""

    fractions: tuple[float, ...] = DEFAULT_FRACTIONS
    epochs: int = 10
    block_size: int = TRAIN_BLOCK_SIZE
    workers: int = 2
    shards: int = 2
    rule: str = "sgd"
    dataset: str = "digits"
    batch_size: int = 32
    seed: int = 0
    ddp: bool = True
    single: bool = True
    in_process: bool = True
    use_uvloop: bool = True
    timeout: float = 600.0


def _train_config(settings: TrainSettings, **overrides: Any) -> Any:
    from ranger_ps.config.train import TrainConfig

    values: dict[str, Any] = {
        "rule": settings.rule,
        "dataset": settings.dataset,
        "epochs": settings.epochs,
        "batch_size": settings.batch_size,
        "block_size": settings.block_size,
        "seed": settings.seed,
        "num_workers": settings.workers,
    }
    return TrainConfig(**(values | overrides))


def run_train(settings: TrainSettings) -> dict[str, Any]:
    """The default job at several push fractions beside single-process SGD and DDP."""
    if not settings.fractions or not all(0 < f <= 1 for f in settings.fractions):
        raise UserError("--fractions must be in (0, 1]")
    _quiet_grpc_fork()
    load_before = _load_average()
    rows: list[dict[str, Any]] = []
    for fraction in settings.fractions:
        log.info("train: ranger-ps push fraction %g", fraction)
        rows.append(_train_cluster(settings, fraction))
    if settings.single:
        log.info("train: one process, torch.optim.SGD")
        rows.append(_train_single(settings))
    if settings.in_process:
        log.info("train: one process, ranger_ps.Ranger in-process")
        rows.append(_train_in_process(settings))
    if settings.ddp:
        log.info("train: torch DistributedDataParallel (gloo), %d processes", settings.workers)
        rows.append(_train_ddp(settings))
    by_fraction = {r["push_fraction"]: r for r in rows if r["kind"] == "ranger-ps"}
    ratios: dict[str, float | None] = {
        f"push_bytes_ratio_at_{f:g}": by_fraction[f]["push_ratio"] if f in by_fraction else None
        for f in settings.fractions
    }
    ratios.setdefault("push_bytes_ratio_at_0.05", None)
    single = next((r for r in rows if r["kind"] == "torch-sgd"), None)
    dense = by_fraction.get(1.0)
    ratios["dense_steps_vs_single_sgd"] = (
        _ratio(dense["steps_per_second"], single["steps_per_second"]) if dense and single else None
    )
    return {
        "benchmark": "train",
        "settings": {
            "fractions": list(settings.fractions),
            "epochs": settings.epochs,
            "block_size": settings.block_size,
            "workers": settings.workers,
            "shards": settings.shards,
            "rule": settings.rule,
            "dataset": settings.dataset,
            "batch_size": settings.batch_size,
            "seed": settings.seed,
            "num_blocks": _num_blocks(settings),
        },
        "machine": machine_info(),
        "load_average_before": load_before,
        "load_average_after": _load_average(),
        "rows": rows,
        "ratios": ratios,
        "targets": _targets(ratios, (TRAIN_TARGET,)),
    }


def _train_cluster(settings: TrainSettings, fraction: float) -> dict[str, Any]:
    """One local cluster (shard and worker processes, as ``ranger-ps local`` starts them), timed from outside.

    A worker's own ``wall_seconds`` includes its start-up (registration, the first optimizer's
    one-time imports): here shard 0's stats are polled, and the steady rate is the steps between
    10% and 90% of the run over the time they took.
    """
    from ranger_ps.client.sharded import ShardedClient
    from ranger_ps.settings import to_argv
    from ranger_ps.workloads.data import load_dataset
    from ranger_ps.workloads.evaluation import evaluate_cluster
    from ranger_ps.workloads.job import planned_steps

    config = _train_config(settings, push_fraction=fraction)
    n = len(load_dataset(config.dataset).y_train)
    planned = sum(planned_steps(config, n, w) for w in range(settings.workers))
    loop = "--uvloop" if settings.use_uvloop else "--no-uvloop"
    with tempfile.TemporaryDirectory(prefix="ranger-ps-bench-") as tmp, _Children(Path(tmp)) as children:
        addresses = start_shards(children, settings.shards, use_uvloop=settings.use_uvloop)
        argv = to_argv(config, skip=("num_workers",))
        reports = [Path(tmp) / f"worker-{w}.json" for w in range(settings.workers)]
        started = time.monotonic()
        workers = [
            children.spawn(
                f"worker-{w}",
                [
                    sys.executable,
                    "-m",
                    "ranger_ps",
                    "worker",
                    "--servers",
                    ",".join(addresses),
                    "--worker-id",
                    str(w),
                    "--num-workers",
                    str(settings.workers),
                    "--report",
                    str(reports[w]),
                    *argv,
                    "--log-level",
                    "WARNING",
                    loop,
                ],
            )  # fmt: skip
            for w in range(settings.workers)
        ]
        samples: list[tuple[float, int]] = []
        monitor = ShardedClient(addresses[:1], use_uvloop=settings.use_uvloop, call_timeout=5)
        try:
            while any(w.poll() is None for w in workers):
                for w, process in enumerate(workers):
                    if process.poll() not in (None, 0):
                        raise ClusterError(
                            f"worker {w} exited with {process.returncode}: {children.log_tail(f'worker-{w}')}"
                        )
                if time.monotonic() - started > settings.timeout:
                    raise ClusterError(f"the cluster did not finish within {settings.timeout:g}s")
                with contextlib.suppress(ClusterError):
                    reply = monitor.stats()[0]
                    samples.append((time.monotonic(), sum(r.pushes for r in reply.workers if not r.observer)))
                time.sleep(0.02)
        finally:
            monitor.close()
        ended = time.monotonic()
        for w, process in enumerate(workers):
            if process.returncode != 0:
                raise ClusterError(f"worker {w} exited with {process.returncode}: {children.log_tail(f'worker-{w}')}")
        evaluation, _ = evaluate_cluster(config, addresses, use_uvloop=settings.use_uvloop)
        per_worker = [json.loads(r.read_text()) for r in reports]
    steps = sum(int(r["steps"]) for r in per_worker)
    pushed = sum(int(r["bytes_pushed"]) for r in per_worker)
    dense = sum(int(r["bytes_pushed_dense"]) for r in per_worker)
    pulled = sum(int(r["bytes_pulled"]) for r in per_worker)
    steady = steady_rate(samples, planned)
    return {
        "name": f"ranger-ps push fraction {fraction:g}",
        "kind": "ranger-ps",
        "push_fraction": fraction,
        "processes": settings.workers + settings.shards,
        "steps": steps,
        "train_seconds": steps / steady if steady else ended - started,
        "wall_seconds": ended - started,
        "steps_per_second": steady or steps / (ended - started),
        "end_to_end_steps_per_second": steps / (ended - started),
        "bytes_pushed_per_step": pushed / steps,
        "bytes_dense_per_step": dense / steps,
        "push_ratio": pushed / dense,
        "bytes_pulled_per_step": pulled / steps,
        "test_accuracy": evaluation.test_accuracy,
    }


def steady_rate(
    samples: Sequence[tuple[float, int]], planned: int, low: float = 0.1, high: float = 0.9
) -> float | None:
    """Steps per second between ``low`` and ``high`` of ``planned`` steps, from (time, steps so far) samples.

    None when the samples do not span that window with any time between (a run too short to time).
    """
    first = next(((t, c) for t, c in samples if c >= low * planned), None)
    last = next(((t, c) for t, c in samples if c >= high * planned), None)
    if first is None or last is None or last[0] <= first[0] or last[1] <= first[1]:
        return None
    return (last[1] - first[1]) / (last[0] - first[0])


def _quiet_grpc_fork() -> None:
    """Every child the benchmarks fork execs at once, so gRPC's fork handlers have nothing to do but
    log a line per fork while this process has gRPC threads: turn them off (before gRPC loads)."""
    if "grpc" not in sys.modules:
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")


def _num_blocks(settings: TrainSettings) -> int:
    from ranger_ps.algorithm.layout import Layout
    from ranger_ps.workloads.job import build

    _, model, _ = build(_train_config(settings))
    return Layout.from_named_tensors(model.named_parameters(), settings.block_size).num_blocks


def _train_single(settings: TrainSettings) -> dict[str, Any]:
    """The same model, data and rule in one process with ``torch.optim.SGD`` (no servers)."""

    from ranger_ps.workloads.evaluation import evaluate
    from ranger_ps.workloads.job import batch_loss, build

    config = _train_config(settings, num_workers=1)
    with _torch_threads(1):
        data, model, device = build(config)
        assert config.lr is not None and config.momentum is not None  # resolved by TrainConfig
        optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003)
        steps = 0
        start = time.perf_counter()
        for _epoch in range(config.epochs):
            order = torch.randperm(len(data.y_train), generator=generator)
            for first in range(0, len(order), config.batch_size):
                batch = order[first : first + config.batch_size]
                optimizer.zero_grad()
                loss = batch_loss(model(data.prepare(data.x_train[batch])), data.y_train[batch])
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                steps += 1
        seconds = time.perf_counter() - start
        accuracy = evaluate(model, data, device).test_accuracy
    return {
        "name": "torch.optim.SGD, one process",
        "kind": "torch-sgd",
        "push_fraction": None,
        "processes": 1,
        "steps": steps,
        "train_seconds": seconds,
        "wall_seconds": seconds,
        "steps_per_second": steps / seconds,
        "bytes_pushed_per_step": 0.0,
        "bytes_dense_per_step": 0.0,
        "push_ratio": None,
        "bytes_pulled_per_step": 0.0,
        "test_accuracy": accuracy,
    }


def _train_in_process(settings: TrainSettings) -> dict[str, Any]:
    """``ranger_ps.Ranger`` without servers (dense): the optimizer's own overhead, no wire."""
    from ranger_ps.bench.convergence import run_case

    with _torch_threads(1):
        result = run_case(_train_config(settings, num_workers=1, push_fraction=1.0), shards=settings.shards)
    return {
        "name": "ranger_ps.Ranger in-process, one process",
        "kind": "ranger-in-process",
        "push_fraction": 1.0,
        "processes": 1,
        "steps": result.steps,
        "train_seconds": result.seconds,
        "wall_seconds": result.seconds,
        "steps_per_second": result.steps / result.seconds,
        "bytes_pushed_per_step": 0.0,
        "bytes_dense_per_step": result.bytes_pushed_dense / result.steps,
        "push_ratio": None,
        "bytes_pulled_per_step": 0.0,
        "test_accuracy": result.test_accuracy,
    }


def _train_ddp(settings: TrainSettings) -> dict[str, Any]:
    """torch DistributedDataParallel over gloo, one process per worker, the same data split."""
    name = f"torch DDP (gloo), {settings.workers} processes"
    base = {"name": name, "kind": "ddp", "push_fraction": None, "processes": settings.workers}
    try:
        import torch.distributed as dist
    except ImportError as exc:
        return base | {"error": f"torch.distributed does not import: {exc}"}
    if not dist.is_available() or not dist.is_gloo_available():
        return base | {"error": "torch.distributed with gloo is not available in this torch build"}
    args = (
        settings.workers, settings.dataset, settings.epochs, settings.batch_size, settings.rule, settings.seed,
    )  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="ranger-ps-bench-") as tmp, _Children(Path(tmp)) as children:
        port = _free_port()
        ranks = [
            children.helper(f"ddp-{rank}", "ddp", port, rank, *args, stdout_pipe=rank == 0)
            for rank in range(settings.workers)
        ]
        try:
            stdout, _ = ranks[0].communicate(timeout=settings.timeout)
        except subprocess.TimeoutExpired:
            return base | {"error": f"DDP did not finish within {settings.timeout:g}s: {children.log_tail('ddp-0')}"}
        if ranks[0].returncode != 0:
            return base | {"error": f"DDP rank 0 exited with {ranks[0].returncode}: {children.log_tail('ddp-0')}"}
        for process in ranks[1:]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(30)
        report = json.loads(stdout.decode().strip().splitlines()[-1])
    steps = int(report["steps"])
    # Ring all-reduce: each worker sends 2 (W-1)/W of the gradient bytes per step.
    per_step = 2 * (settings.workers - 1) / settings.workers * int(report["grad_bytes"])
    return base | {
        "steps": steps,
        "train_seconds": report["seconds"],
        "wall_seconds": report["seconds"],
        "steps_per_second": steps / report["seconds"],
        "bytes_pushed_per_step": per_step,
        "bytes_dense_per_step": per_step,
        "push_ratio": None,
        "bytes_pulled_per_step": 0.0,
        "test_accuracy": report["test_accuracy"],
    }


def _ddp_rank(
    port: int, rank: int, world: int, dataset: str, epochs: int, batch_size: int, rule: str, seed: int
) -> int:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ranger_ps.config.train import TrainConfig
    from ranger_ps.workloads.data import shard_indices
    from ranger_ps.workloads.evaluation import evaluate
    from ranger_ps.workloads.job import batch_loss, build

    torch.set_num_threads(1)
    config = TrainConfig(rule=rule, dataset=dataset, epochs=epochs, batch_size=batch_size, seed=seed)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        data, model, device = build(config)
        ddp = DistributedDataParallel(model)
        assert config.lr is not None and config.momentum is not None  # resolved by TrainConfig
        optimizer = torch.optim.SGD(ddp.parameters(), lr=config.lr, momentum=config.momentum)
        mine = shard_indices(len(data.y_train), rank, world)
        # Every rank takes the same number of steps (DDP's collectives need it): the smallest share's.
        steps_per_epoch = math.ceil((len(data.y_train) // world) / batch_size)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + rank)
        steps = 0
        dist.barrier()
        start = time.perf_counter()
        for _epoch in range(epochs):
            order = mine[torch.randperm(len(mine), generator=generator)]
            for i in range(steps_per_epoch):
                batch = order[i * batch_size : (i + 1) * batch_size]
                optimizer.zero_grad()
                loss = batch_loss(ddp(data.prepare(data.x_train[batch])), data.y_train[batch])
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                steps += 1
        dist.barrier()
        seconds = time.perf_counter() - start
        if rank == 0:
            grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            accuracy = evaluate(model, data, device).test_accuracy
            print(
                json.dumps(
                    {"steps": steps * world, "seconds": seconds, "test_accuracy": accuracy, "grad_bytes": grad_bytes}
                ),
                flush=True,
            )
    finally:
        dist.destroy_process_group()
    return 0


# -- cost model -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Costs:
    """Measured costs the cost model runs on (CPU seconds unless said otherwise).

    Attributes:
        worker_push: a worker's CPU per byte pushed (encode, gRPC send).
        worker_pull: a worker's CPU per byte pulled (gRPC receive, decode).
        worker_message: a worker's CPU per shard per step for the message pair (empty push + pull).
        shard_push: a shard's CPU per byte pushed to it (receive, check, apply).
        shard_pull: a shard's CPU per byte pulled from it (encode, gRPC send).
        shard_message: a shard's CPU per worker step for the message pair.
        latency: wall seconds of an empty push followed by an empty pull (the round trips).
        nic_gbps: network bandwidth per machine and direction, GB/s.
    """

    worker_push: float
    worker_pull: float
    worker_message: float
    shard_push: float
    shard_pull: float
    shard_message: float
    latency: float
    nic_gbps: float = 1.25


def cost_model(
    costs: Costs,
    *,
    model_bytes: float,
    compute_seconds: float,
    push_fraction: float,
    workers: Sequence[int],
    shards: Sequence[int],
    overlap: bool = True,
    header_bytes: int = 64,
) -> list[dict[str, Any]]:
    """Steps per second of W workers and S shards, each process on its own machine: a bottleneck model.

    Per worker step a worker pushes ``P = f M`` bytes and (async, every worker pushing random
    blocks) pulls what anyone changed since its last pull, ``Q = (1 - (1 - f)^W) M``; every shard
    gets a message pair from every worker step, whatever it holds. Per worker step:

    - worker CPU ``S c_wm + P c_wp + Q c_wq``; its wire path ``latency + (P + Q) / N``; its compute
      ``t_c``. With overlap the step lasts the largest of the three, without it ``t_c`` plus the
      larger of the other two;
    - each shard, per step of every worker (one event loop: one core), CPU ``W (c_sm + (P c_sp + Q c_sq) / S)``
      and NIC ``W max(P, Q) / S / N``.

    The slowest resource sets the pace: steps/s of all workers together ``= W / max(...)``, and
    that resource is the bottleneck.
    """
    rows = []
    for w in workers:
        for s in shards:
            pushed = push_fraction * model_bytes + header_bytes * s
            pulled = (1 - (1 - push_fraction) ** w) * model_bytes + header_bytes * s
            worker_cpu = s * costs.worker_message + pushed * costs.worker_push + pulled * costs.worker_pull
            worker_wire = costs.latency + (pushed + pulled) / (costs.nic_gbps * GB)
            shard_cpu = w * (costs.shard_message + (pushed * costs.shard_push + pulled * costs.shard_pull) / s)
            shard_nic = w * max(pushed, pulled) / s / (costs.nic_gbps * GB)
            if overlap:
                worker_step = max(compute_seconds, worker_cpu, worker_wire)
            else:
                worker_step = compute_seconds + max(worker_cpu, worker_wire)
            terms = {
                "worker compute": compute_seconds if overlap else worker_step,
                "worker CPU (wire)": worker_cpu,
                "worker round trips + NIC": worker_wire,
                "shard CPU": shard_cpu,
                "shard NIC": shard_nic,
            }
            period = max(worker_step, shard_cpu, shard_nic)
            rows.append(
                {
                    "workers": w,
                    "shards": s,
                    "push_fraction": push_fraction,
                    "steps_per_second": w / period,
                    "bottleneck": max(terms, key=lambda k: terms[k]),
                    "seconds": terms,
                }
            )
    return rows


def measured_costs(wire: dict[str, Any], nic_gbps: float = 1.25) -> Costs:
    """The cost model's inputs from a ``bench wire`` result (its CPU accounting)."""
    cpu = wire["cpu"]
    shards = wire["settings"]["shards"]
    return Costs(
        worker_push=cpu["push_client_per_gb"] / GB,
        worker_pull=cpu["pull_client_per_gb"] / GB,
        worker_message=(cpu["empty_push_client_ms_per_message"] + cpu["empty_pull_client_ms_per_message"])
        / 1e3
        / shards,
        shard_push=cpu["push_shards_per_gb"] / GB,
        shard_pull=cpu["pull_shards_per_gb"] / GB,
        shard_message=(cpu["empty_push_shards_ms_per_message"] + cpu["empty_pull_shards_ms_per_message"])
        / 1e3
        / shards,
        latency=(wire["empty_push_ms"] + wire["empty_pull_ms"]) / 1e3,
        nic_gbps=nic_gbps,
    )


def one_machine_check(costs: Costs, train: dict[str, Any]) -> dict[str, Any]:
    """Predict the measured dense ``train`` run, where every process shares this machine's cores.

    The CPU of one worker step (its compute, taken as the in-process Ranger step, plus the wire
    work of the worker and of every shard), spread over the cores; never faster than one worker's
    own step allows.
    """
    s = train["settings"]
    workers, shards, cores = s["workers"], s["shards"], train["machine"]["cpus"] or 1
    dense = next(r for r in train["rows"] if r["kind"] == "ranger-ps" and r["push_fraction"] == 1.0)
    compute = next((1 / r["steps_per_second"] for r in train["rows"] if r["kind"] == "ranger-in-process"), 0.0)
    pushed, pulled = dense["bytes_pushed_per_step"], dense["bytes_pulled_per_step"]
    worker = shards * costs.worker_message + pushed * costs.worker_push + pulled * costs.worker_pull
    shard = shards * costs.shard_message + pushed * costs.shard_push + pulled * costs.shard_pull
    cpu_per_step = compute + worker + shard
    own_step = max(compute + worker, costs.latency)
    predicted = min(cores / cpu_per_step, workers / own_step)
    return {
        "predicted_steps_per_second": predicted,
        "measured_steps_per_second": dense["steps_per_second"],
        "cpu_seconds_per_step": {"compute": compute, "worker_wire": worker, "shards": shard},
    }


def cost_model_main(argv: Sequence[str]) -> int:
    """``python -m ranger_ps.bench.suite cost-model --wire W.json --train T.json [--plot P] [--out J]``."""
    parser = argparse.ArgumentParser(prog="python -m ranger_ps.bench.suite cost-model")
    parser.add_argument("command", choices=["cost-model"])
    parser.add_argument("--wire", type=Path, required=True, help="JSON written by bench wire --out")
    parser.add_argument("--train", type=Path, required=True, help="JSON written by bench train --out")
    parser.add_argument("--nic-gbps", type=float, default=1.25, help="network GB/s per machine (default: 10 GbE)")
    parser.add_argument("--compute-ms", type=float, default=100.0, help="compute per step of the large model")
    parser.add_argument("--plot", type=Path, help="draw the scaling curves here (PNG)")
    parser.add_argument("--out", type=Path, help="write the tables as JSON here")
    args = parser.parse_args(argv)
    wire, train = (json.loads(p.read_text()) for p in (args.wire, args.train))
    costs = measured_costs(wire, args.nic_gbps)
    workers, shards = (1, 2, 4, 8, 16, 32, 64), (1, 2, 4, 8, 16)
    digits_bytes = train["rows"][0]["bytes_dense_per_step"]
    digits_compute = next(1 / r["steps_per_second"] for r in train["rows"] if r["kind"] == "ranger-in-process")
    big = f"{wire['model_bytes'] / 1e6:.0f} MB model, {args.compute_ms:g} ms compute"
    scenarios = {
        f"{big}, dense": cost_model(
            costs, model_bytes=wire["model_bytes"], compute_seconds=args.compute_ms / 1e3, push_fraction=1.0,
            workers=workers, shards=shards,
        ),
        f"{big}, push fraction 0.05": cost_model(
            costs, model_bytes=wire["model_bytes"], compute_seconds=args.compute_ms / 1e3, push_fraction=0.05,
            workers=workers, shards=shards,
        ),
        "digits MLP (the default job), dense": cost_model(
            costs, model_bytes=digits_bytes, compute_seconds=digits_compute, push_fraction=1.0,
            workers=workers, shards=shards,
        ),
    }  # fmt: skip
    check = one_machine_check(costs, train)
    lines = [
        "costs: " + json.dumps(dataclasses.asdict(costs)),
        f"one-machine check (dense train run): {json.dumps(check)}",
        "",
    ]
    for title, rows in scenarios.items():
        lines += [f"### {title}", "", "| workers | " + " | ".join(f"S={s}" for s in shards) + " |"]
        lines.append("| ---: | " + " | ".join("---" for _ in shards) + " |")
        for w in workers:
            cells = [r for r in rows if r["workers"] == w]
            lines.append(
                f"| {w} | " + " | ".join(f"{r['steps_per_second']:.3g} ({r['bottleneck']})" for r in cells) + " |"
            )
        lines.append("")
    print("\n".join(lines))
    if args.out:
        report = {"costs": dataclasses.asdict(costs), "one_machine_check": check, "scenarios": scenarios}
        args.out.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot_cost_model(scenarios, args.plot)
    return 0


def plot_cost_model(scenarios: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Steps/s against workers, one line per shard count, one panel per scenario (log-log)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5 * len(scenarios), 4), squeeze=False)
    for ax, (title, rows) in zip(axes[0], scenarios.items(), strict=True):
        for s in sorted({r["shards"] for r in rows}):
            line = [r for r in rows if r["shards"] == s]
            ax.plot(
                [r["workers"] for r in line], [r["steps_per_second"] for r in line], marker="o", label=f"{s} shards"
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("workers")
        ax.set_ylabel("steps per second (all workers)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


# -- helper processes -------------------------------------------------------------------------------


def helper_main(argv: Sequence[str]) -> int:
    """Entry of the benchmark's helper processes (``python -c``): ``ROLE ARGS...``."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    tune_allocator()  # every process of a benchmark runs with the allocator ranger-ps's own processes use
    role, *rest = argv
    if role == "tcp-server":
        return _tcp_server(Path(rest[0]))
    if role == "grpc-server":
        return _grpc_server(Path(rest[0]), rest[1] == "1")
    if role == "rpc-server":
        return _rpc_server(int(rest[0]), int(rest[1]), int(rest[2]), rest[3])
    if role == "rpc-trainer":
        return _rpc_trainer(int(rest[0]), int(rest[1]), int(rest[2]), rest[3], int(rest[4]))
    if role == "ddp":
        port, rank, world, dataset, epochs, batch_size, rule, seed = rest
        return _ddp_rank(int(port), int(rank), int(world), dataset, int(epochs), int(batch_size), rule, int(seed))
    raise SystemExit(f"unknown helper role {role!r}")


# -- output: tables and plots ----------------------------------------------------------------------


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _target_lines(targets: dict[str, Any]) -> list[str]:
    lines = []
    for key, t in targets.items():
        verdict = "n/a" if t["met"] is None else "met" if t["met"] else "MISSED"
        lines.append(f"- {t['meaning']}: {_fmt(t['value'])} (target {t['target']:g}) {verdict}  [{key}]")
    return lines


def wire_table(result: dict[str, Any]) -> str:
    """The wire result as Markdown."""
    r = result
    rows = [
        (f"ranger-ps (gRPC, {r['settings']['shards']} shards)", r["pull_gbps"], r["push_gbps"]),
        (f"torch.distributed.rpc (TensorPipe {r['settings']['torch_rpc_transport']})",
         r["torch_rpc_pull_gbps"], r["torch_rpc_push_gbps"]),
        ("bare grpc.aio streams (no frames, no tensors)", r["grpc_pull_gbps"], r["grpc_push_gbps"]),
        ("raw TCP (sendall / recv_into), median", r["tcp_gbps"], r["tcp_send_gbps"]),
        ("raw TCP, fastest repetition (the limit)", r.get("tcp_best_gbps"), r.get("tcp_send_best_gbps")),
    ]  # fmt: skip
    lines = [
        f"wire: {r['model_bytes'] / 1e6:.0f} MB model ({r['settings']['tensors']} tensors, "
        f"{r.get('num_blocks')} blocks)",
        "",
        "| stack | full pull GB/s | dense push + apply GB/s |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {_fmt(pull)} | {_fmt(push)} |" for name, pull, push in rows),
        "",
        f"ranger-ps pull + copy into the model: {_fmt(r['pull_apply_gbps'])} GB/s; empty push (headers only) "
        f"{_fmt(r['empty_push_ms'])} ms, empty pull {_fmt(r['empty_pull_ms'])} ms",
    ]
    lines.append(
        f"first (cold) pull, into freshly allocated memory: ranger-ps {_fmt(r.get('pull_cold_gbps'))}, "
        f"torch.distributed.rpc {_fmt(r.get('torch_rpc_pull_cold_gbps'))}, "
        f"bare grpc.aio {_fmt(r.get('grpc_pull_cold_gbps'))} GB/s"
    )
    if r.get("torch_rpc_error"):
        lines.append(f"torch.distributed.rpc: {r['torch_rpc_error']}")
    return "\n".join([*lines, "", *_target_lines(r["targets"])])


def apply_table(result: dict[str, Any]) -> str:
    """The apply result as Markdown."""
    r = result
    lines = [
        f"apply: {r['model_bytes'] / 1e6:.0f} MB of float32 in {r['settings']['num_blocks']} blocks of "
        f"{r['settings']['block_size']}, {r['settings']['torch_threads']} torch thread(s)",
        "",
        "| update | GB/s of parameters | of memcpy |",
        "| --- | ---: | ---: |",
        f"| memcpy (dst.copy_(src), one tensor) | {_fmt(r['memcpy_gbps'])} | 100% |",
        f"| memcpy per block | {_fmt(r['memcpy_blocks_gbps'])} | "
        f"{100 * r['memcpy_blocks_gbps'] / r['memcpy_gbps']:.0f}% |",
    ]
    for name, row in r["rules"].items():
        lines.append(f"| {name} | {_fmt(row['gbps'])} | {100 * row['gbps'] / r['memcpy_gbps']:.0f}% |")
    path = r.get("server_push_path")
    if path and path.get("gbps") is not None:
        lines.append(
            f"| shard push path (decode + finiteness check + sgd) | {_fmt(path['gbps'])} | "
            f"{100 * path['gbps'] / r['memcpy_gbps']:.0f}% |"
        )
    return "\n".join([*lines, "", *_target_lines(r["targets"])])


def train_table(result: dict[str, Any]) -> str:
    """The train result as Markdown."""
    s = result["settings"]
    lines = [
        f"train: {s['dataset']} MLP, {s['epochs']} epochs, batch {s['batch_size']}, rule {s['rule']}, "
        f"{s['workers']} workers, {s['shards']} shards, block size {s['block_size']} ({s['num_blocks']} blocks)",
        "",
        "| run | steps | steps/s | steps/s with start-up | bytes pushed / step | of dense | bytes pulled / step "
        "| test accuracy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['name']} | n/a: {row['error']} | | | | | | |")
            continue
        ratio = "" if row["push_ratio"] is None else f"{100 * row['push_ratio']:.1f}%"
        end_to_end = row.get("end_to_end_steps_per_second")
        lines.append(
            f"| {row['name']} | {row['steps']} | {row['steps_per_second']:.0f} | "
            f"{'' if end_to_end is None else f'{end_to_end:.0f}'} | "
            f"{row['bytes_pushed_per_step']:,.0f} | {ratio} | {row['bytes_pulled_per_step']:,.0f} | "
            f"{row['test_accuracy']:.4f} |"
        )
    return "\n".join([*lines, "", *_target_lines(result["targets"])])


def plot_wire(result: dict[str, Any], path: Path) -> None:
    """Grouped bars: pull and push + apply GB/s per stack."""
    plt = _pyplot()
    stacks = ["ranger-ps", "torch rpc\n(TensorPipe)", "bare grpc.aio\n(no frames)", "raw TCP\n(fastest)"]
    pulls = [result["pull_gbps"], result["torch_rpc_pull_gbps"], result["grpc_pull_gbps"], result.get("tcp_best_gbps")]
    pushes = [
        result["push_gbps"],
        result["torch_rpc_push_gbps"],
        result["grpc_push_gbps"],
        result.get("tcp_send_best_gbps"),
    ]
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(stacks))
    for offset, values, label in ((-0.2, pulls, "full pull"), (0.2, pushes, "dense push (+ apply)")):
        heights = [v or 0.0 for v in values]
        bars = ax.bar([x + offset for x in xs], heights, width=0.4, label=label)
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=8)
    ax.set_xticks(list(xs), stacks)
    ax.set_ylabel("GB/s of parameters")
    ax.set_title(
        f"wire: {result['model_bytes'] / 1e6:.0f} MB model, {result['settings']['shards']} shards, loopback "
        f"({result['machine']['cpus']} cores)"
    )
    ax.legend()
    _save(fig, path)


def plot_apply(result: dict[str, Any], path: Path) -> None:
    """Bars: GB/s per update rule beside memcpy."""
    plt = _pyplot()
    names = ["memcpy", "memcpy per block", *result["rules"]]
    values = [result["memcpy_gbps"], result["memcpy_blocks_gbps"], *(r["gbps"] for r in result["rules"].values())]
    path_result = result.get("server_push_path") or {}
    if path_result.get("gbps") is not None:
        names.append("shard push path (sgd)")
        values.append(path_result["gbps"])
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(names, values, color=["grey", "grey"] + ["C0"] * (len(names) - 2))
    ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=8)
    ax.set_ylabel("GB/s of parameters")
    ax.set_title(
        f"server-side update: {result['model_bytes'] / 1e6:.0f} MB in blocks of {result['settings']['block_size']}, "
        f"{result['settings']['torch_threads']} thread(s)"
    )
    ax.tick_params(axis="x", labelrotation=20)
    _save(fig, path)


def plot_train(result: dict[str, Any], path: Path) -> None:
    """Two panels: steps per second and bytes pushed per step (log), accuracy on the bars."""
    plt = _pyplot()
    rows = [r for r in result["rows"] if "error" not in r]
    names = [
        f"f={r['push_fraction']:g}" if r["kind"] == "ranger-ps" else {"torch-sgd": "SGD 1 proc",
        "ranger-in-process": "Ranger 1 proc", "ddp": "DDP gloo"}.get(r["kind"], r["kind"])
        for r in rows
    ]  # fmt: skip
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bars = left.bar(names, [r["steps_per_second"] for r in rows])
    left.bar_label(bars, labels=[f"acc {r['test_accuracy']:.3f}" for r in rows], fontsize=7)
    left.set_ylabel("steps per second (all workers)")
    left.set_title("throughput and final test accuracy")
    pushed = [max(r["bytes_pushed_per_step"], 1.0) for r in rows]
    bars = right.bar(names, pushed, color="C1")
    right.bar_label(bars, labels=[f"{r['bytes_pushed_per_step']:,.0f}" for r in rows], fontsize=7)
    right.set_yscale("log")
    right.set_ylabel("bytes sent per worker step (log)")
    right.set_title("bytes per step (ranger-ps: pushes; DDP: all-reduce)")
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=30)
    s = result["settings"]
    fig.suptitle(
        f"train: {s['dataset']} MLP, {s['workers']} workers, {s['shards']} shards, block size {s['block_size']}"
    )
    _save(fig, path)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install matplotlib, or the dev extras)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)


# -- command line -----------------------------------------------------------------------------------


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"push fractions must be in (0, 1], got {text!r}")
    return values


def _rule_names(text: str) -> tuple[str, ...]:
    from ranger_ps.algorithm.rules import RULE_NAMES

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in RULE_NAMES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"expected rules from {', '.join(RULE_NAMES)}, got {text!r}")
    return names


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _add_output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a Markdown table")
    parser.add_argument("--out", type=Path, help="also write the JSON object to this file")
    parser.add_argument("--plot", type=Path, help="draw a PNG bar chart here (needs matplotlib)")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging verbosity"
    )
    parser.add_argument(
        "--uvloop", action=argparse.BooleanOptionalAction, default=True, help="run event loops on uvloop (default: on)"
    )


def add_bench_parsers(bench: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``wire``, ``apply`` and ``train`` subparsers to ``ranger-ps bench``.

    Each sets ``run`` (a callable taking the parsed arguments and returning the exit code), so the
    command line dispatches with ``args.run(args)``.
    """
    w = bench.add_parser(
        "wire",
        help="full-model pull and dense push + apply beside raw TCP and torch.distributed.rpc",
        description="Measure full-model pull and dense push + apply over real shard processes on loopback, "
        "beside the same bytes over raw TCP sockets and the torch.distributed.rpc parameter server, in one run.",
    )
    w.add_argument("--model-mb", type=_positive_float, default=100.0, help="model size in MB of float32 (default: 100)")
    w.add_argument("--shards", type=_positive_int, default=2, help="shard server processes (default: 2)")
    w.add_argument("--repeat", type=_positive_int, default=5, help="measured repetitions; the median is reported")
    w.add_argument("--tensors", type=_positive_int, default=25, help="parameter tensors the model is cut into")
    w.add_argument("--block-size", type=_positive_int, default=65_536, help="elements per block (default: 65536)")
    w.add_argument(
        "--torch-rpc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the torch.distributed.rpc baseline",
    )
    w.add_argument(
        "--torch-rpc-transport",
        default="uv",
        help="TensorPipe transport: uv (TCP with the basic channel, as across machines; default), shm, or default "
        "(TensorPipe's own choice of transports and channels)",
    )
    w.add_argument("--tcp", action=argparse.BooleanOptionalAction, default=True, help="run the raw TCP baseline")
    w.add_argument("--threads", type=_positive_int, default=1, help="torch threads in this process (default: 1)")
    w.add_argument("--timeout", type=_positive_float, default=300.0, help="seconds any one stage may take")
    _add_output(w)
    w.set_defaults(run=_run_wire)

    a = bench.add_parser(
        "apply",
        help="server-side update throughput per rule beside memcpy",
        description="Apply each update rule (ranger_ps.algorithm.rules) to a model's blocks and compare the "
        "throughput with a plain torch copy of the same bytes (the memory-bandwidth limit).",
    )
    a.add_argument("--model-mb", type=_positive_float, default=100.0, help="model size in MB of float32 (default: 100)")
    a.add_argument("--block-size", type=_positive_int, default=65_536, help="elements per block (default: 65536)")
    a.add_argument("--rules", type=_rule_names, default=("sgd", "adamw", "ranger"), help="comma-separated rules")
    a.add_argument("--repeat", type=_positive_int, default=5, help="measured repetitions; the median is reported")
    a.add_argument("--warmup", type=int, default=6, help="updates before measuring (ranger rectifies after ~6)")
    a.add_argument("--threads", type=_positive_int, default=1, help="torch threads, as a shard runs (default: 1)")
    _add_output(a)
    a.set_defaults(run=_run_apply)

    t = bench.add_parser(
        "train",
        help="steps/s and bytes per step of the default job per push fraction, beside torch SGD and DDP",
        description="Train the default job (a local cluster) at each push fraction, then the same model in one "
        "process with torch.optim.SGD and with torch DistributedDataParallel (gloo).",
    )
    t.add_argument("--fractions", type=_floats, default=DEFAULT_FRACTIONS, help="comma-separated push fractions")
    t.add_argument("--epochs", type=_positive_int, default=10, help="passes over the training set (default: 10)")
    t.add_argument(
        "--block-size",
        type=_positive_int,
        default=TRAIN_BLOCK_SIZE,
        help=f"elements per block (default: {TRAIN_BLOCK_SIZE}, so that small fractions choose whole blocks)",
    )
    t.add_argument("--workers", type=_positive_int, default=2, help="worker processes (default: 2)")
    t.add_argument("--shards", type=_positive_int, default=2, help="shard processes (default: 2)")
    t.add_argument("--rule", default="sgd", help="update rule (default: sgd)")
    t.add_argument("--dataset", default="digits", help="dataset (default: digits)")
    t.add_argument("--batch-size", type=_positive_int, default=32, help="examples per step and worker (default: 32)")
    t.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    t.add_argument("--ddp", action=argparse.BooleanOptionalAction, default=True, help="run the DDP baseline")
    t.add_argument("--single", action=argparse.BooleanOptionalAction, default=True, help="run one-process baselines")
    t.add_argument(
        "--timeout", type=_positive_float, default=600.0, help="seconds one cluster or the DDP baseline may take"
    )
    _add_output(t)
    t.set_defaults(run=_run_train)


def _emit(args: argparse.Namespace, result: dict[str, Any], table: Callable[[dict[str, Any]], str],
          plot: Callable[[dict[str, Any], Path], None]) -> int:  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot(result, args.plot)
    print(json.dumps(result) if args.json else table(result), flush=True)
    return 0


def _run_wire(args: argparse.Namespace) -> int:
    settings = WireSettings(
        model_mb=args.model_mb,
        shards=args.shards,
        repeat=args.repeat,
        tensors=args.tensors,
        block_size=args.block_size,
        torch_rpc=args.torch_rpc,
        torch_rpc_transport=args.torch_rpc_transport,
        tcp=args.tcp,
        use_uvloop=args.uvloop,
        threads=args.threads,
        timeout=args.timeout,
    )
    return _emit(args, run_wire(settings), wire_table, plot_wire)


def _run_apply(args: argparse.Namespace) -> int:
    settings = ApplySettings(
        model_mb=args.model_mb,
        block_size=args.block_size,
        rules=args.rules,
        repeat=args.repeat,
        warmup=max(0, args.warmup),
        threads=args.threads,
    )
    return _emit(args, run_apply(settings), apply_table, plot_apply)


def _run_train(args: argparse.Namespace) -> int:
    settings = TrainSettings(
        fractions=args.fractions,
        epochs=args.epochs,
        block_size=args.block_size,
        workers=args.workers,
        shards=args.shards,
        rule=args.rule,
        dataset=args.dataset,
        batch_size=args.batch_size,
        seed=args.seed,
        ddp=args.ddp,
        single=args.single,
        in_process=args.single,
        use_uvloop=args.uvloop,
        timeout=args.timeout,
    )
    return _emit(args, run_train(settings), train_table, plot_train)


if __name__ == "__main__":
    sys.exit(cost_model_main(sys.argv[1:]))
