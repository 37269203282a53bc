"""What ranger-ps is measured beside: raw TCP, bare ``grpc.aio``, ``torch.distributed.rpc``, one-process
``torch.optim.SGD`` and torch DistributedDataParallel, each doing the same work as the ranger-ps run.

The peers of the baselines (the raw-TCP peer, the bare gRPC server, the torch.distributed.rpc
server and trainer, the DDP ranks) are helper processes: :func:`spawn_helper` starts this module's
:func:`helper_main` with a role through ``python -c``, so what torch.distributed.rpc pickles
(:func:`_rpc_get_params`, :func:`_rpc_push`) refers to ``ranger_ps.bench.baselines`` in both processes.
A baseline that cannot run here (no torch.distributed.rpc in this build) reports why instead of a figure.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ranger_ps.bench.common import free_port, gbps, median, synthetic_model, torch_threads
from ranger_ps.bench.processes import READY_SECONDS, bench_cluster, log_line
from ranger_ps.bench.settings import TrainSettings, WireSettings
from ranger_ps.errors import ClusterError
from ranger_ps.files import write_text_atomically
from ranger_ps.orchestration.launcher import Child, Cluster
from ranger_ps.wire.allocator import tune_allocator

log = logging.getLogger(__name__)

_HELPER = "import sys; from ranger_ps.bench.baselines import helper_main; sys.exit(helper_main(sys.argv[1:]))"


def spawn_helper(cluster: Cluster, name: str, role: str, *args: object, stdout_pipe: bool = False) -> Child:
    """Run :func:`helper_main` with ``role`` and ``args`` in a child interpreter of ``cluster``."""
    return cluster.spawn_command(name, [sys.executable, "-c", _HELPER, role, *map(str, args)], stdout_pipe=stdout_pipe)


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
        port, rank, world, dataset, epochs, batch_size, rule, seed, model, *options = rest
        return _ddp_rank(
            int(port), int(rank), int(world), dataset, int(epochs), int(batch_size), rule, int(seed), model,
            epoch_evaluations="epoch-evaluations" in options,
        )  # fmt: skip
    raise SystemExit(f"unknown helper role {role!r}")


# -- raw TCP --------------------------------------------------------------------------------------


def wire_tcp(settings: WireSettings, nbytes: int) -> dict[str, Any]:
    """The same bytes over one loopback TCP connection to a sink/source process (sendall / recv_into)."""
    with bench_cluster() as cluster:
        ready = cluster.run_dir / "tcp.ready.json"
        peer = spawn_helper(cluster, "tcp", "tcp-server", ready)
        try:
            _, port = cluster.wait_ready(peer, ready, READY_SECONDS)
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
        "tcp_gbps": gbps(nbytes, median(receives)),
        "tcp_send_gbps": gbps(nbytes, median(sends)),
        # Loopback TCP alternates between two speeds here (about 2x apart, by how the two processes
        # land on the cores): the fastest repetition is the machine's limit.
        "tcp_best_gbps": gbps(nbytes, min(receives)),
        "tcp_send_best_gbps": gbps(nbytes, min(sends)),
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


# -- bare grpc.aio ---------------------------------------------------------------------------------

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


def start_grpc_server(cluster: Cluster, use_uvloop: bool) -> tuple[Child, Path]:
    """Start the bare gRPC server in ``cluster``; returns it and the ready file it announces its port in."""
    ready = cluster.run_dir / "grpc.ready.json"
    return spawn_helper(cluster, "grpc", "grpc-server", ready, int(use_uvloop)), ready


def wire_grpc(settings: WireSettings, nbytes: int, address: str) -> dict[str, Any]:
    """The same bytes as raw gRPC messages to the bare gRPC server at ``address`` (streams both ways)."""
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
        "grpc_pull_cold_gbps": gbps(nbytes, cold[0]),
        "grpc_push_cold_gbps": gbps(nbytes, cold[1]),
        "grpc_pull_gbps": gbps(nbytes, median(pulls)),
        "grpc_push_gbps": gbps(nbytes, median(pushes)),
        "grpc_pull_seconds": pulls,
        "grpc_push_seconds": pushes,
    }


# -- torch.distributed.rpc -------------------------------------------------------------------------

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


def wire_torch_rpc(settings: WireSettings, transport: str | None = None, prefix: str = "torch_rpc") -> dict[str, Any]:
    """Full pull and dense push + SGD step through the torch.distributed.rpc parameter server (two helpers).

    ``transport`` (default: the settings') is TensorPipe's: ``uv`` (TCP), ``shm`` or ``default``; the
    report's keys start with ``prefix``.
    """
    transport = transport or settings.torch_rpc_transport

    def unavailable(reason: str) -> dict[str, Any]:
        log.warning("torch.distributed.rpc baseline (%s) unavailable: %s", transport, reason)
        return {f"{prefix}_pull_gbps": None, f"{prefix}_push_gbps": None, f"{prefix}_error": reason}

    try:
        from torch.distributed import rpc
    except ImportError as exc:
        return unavailable(f"torch.distributed.rpc does not import: {exc}")
    if not rpc.is_available():
        return unavailable("torch.distributed.rpc is not available in this torch build")
    args = (settings.model_bytes, settings.tensors, transport)
    with bench_cluster() as cluster:
        port = free_port()
        server = spawn_helper(cluster, "rpc-server", "rpc-server", port, *args)
        trainer = spawn_helper(cluster, "rpc-trainer", "rpc-trainer", port, *args, settings.repeat, stdout_pipe=True)
        deadline = time.monotonic() + settings.timeout
        while trainer.process.poll() is None:  # the trainer prints one line: the pipe never fills
            if server.process.poll() not in (None, 0):
                return unavailable(f"the server exited with {server.process.returncode}: {log_line(server)}")
            if time.monotonic() > deadline:
                return unavailable(f"the trainer did not finish within {settings.timeout:g}s: {log_line(trainer)}")
            time.sleep(0.1)
        assert trainer.process.stdout is not None
        stdout = trainer.process.stdout.read()
        if trainer.process.returncode != 0:
            return unavailable(
                f"the trainer exited with {trainer.process.returncode}: {log_line(trainer)} "
                f"(server: {log_line(server)})"
            )
        try:
            report = json.loads(stdout.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            return unavailable(f"the trainer printed no result: {stdout[-500:]!r}")
    nbytes = int(report["nbytes"])
    return {
        f"{prefix}_pull_gbps": gbps(nbytes, median(report["pull_seconds"])),
        f"{prefix}_push_gbps": gbps(nbytes, median(report["push_seconds"])),
        f"{prefix}_pull_cold_gbps": gbps(nbytes, report["cold_seconds"][0]),
        f"{prefix}_push_cold_gbps": gbps(nbytes, report["cold_seconds"][1]),
        f"{prefix}_pull_seconds": report["pull_seconds"],
        f"{prefix}_push_seconds": report["push_seconds"],
        f"{prefix}_error": None,
    }


# -- training without ranger-ps ----------------------------------------------------------------------


def train_single(settings: TrainSettings) -> dict[str, Any]:
    """The same model, data and rule in one process with ``torch.optim.SGD`` (no servers)."""

    from ranger_ps.workloads.evaluation import evaluate
    from ranger_ps.workloads.job import batch_loss, build

    config = settings.train_config(num_workers=1)
    with torch_threads(1):
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


def train_ddp(settings: TrainSettings, *, epoch_evaluations: bool = False) -> dict[str, Any]:
    """torch DistributedDataParallel over gloo, one process per worker, the same data split.

    With ``epoch_evaluations`` rank 0 also evaluates the model after every epoch (as a ranger-ps
    worker does) and the row gains ``timeline``: ``[seconds, test accuracy]`` per epoch, on the clock
    :func:`_ddp_rank` describes; ``train_seconds`` then includes those evaluations.
    """
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
        settings.model, *(["epoch-evaluations"] if epoch_evaluations else []),
    )  # fmt: skip
    with bench_cluster() as cluster:
        port = free_port()
        ranks = [
            spawn_helper(cluster, f"ddp-{rank}", "ddp", port, rank, *args, stdout_pipe=rank == 0)
            for rank in range(settings.workers)
        ]
        first = ranks[0].process
        try:
            stdout, _ = first.communicate(timeout=settings.timeout)
        except subprocess.TimeoutExpired:
            return base | {"error": f"DDP did not finish within {settings.timeout:g}s: {log_line(ranks[0])}"}
        if first.returncode != 0:
            return base | {"error": f"DDP rank 0 exited with {first.returncode}: {log_line(ranks[0])}"}
        for rank in ranks[1:]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                rank.process.wait(30)
        report = json.loads(stdout.decode().strip().splitlines()[-1])
    steps = int(report["steps"])
    # Ring all-reduce: each worker sends 2 (W-1)/W of the gradient bytes per step.
    per_step = 2 * (settings.workers - 1) / settings.workers * int(report["grad_bytes"])
    row = base | {
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
    if epoch_evaluations:
        row["timeline"] = report["timeline"]
    return row


def _ddp_rank(
    port: int,
    rank: int,
    world: int,
    dataset: str,
    epochs: int,
    batch_size: int,
    rule: str,
    seed: int,
    model_name: str,
    *,
    epoch_evaluations: bool = False,
) -> int:
    """One DDP rank; rank 0 prints the run's report as one JSON line.

    With ``epoch_evaluations`` rank 0 evaluates its model after every epoch on at most
    :data:`~ranger_ps.workloads.evaluation.EPOCH_EVAL_EXAMPLES` test examples (what a ranger-ps worker
    evaluates) and reports ``timeline``: per epoch, the seconds at the end of its last step (before its
    evaluation) and the accuracy. That clock starts once the process group is formed, so it counts
    building the job, DDP's first broadcast and the evaluations of the earlier epochs (the other ranks
    wait for rank 0 in the next all-reduce); the report's ``seconds`` stay barrier to barrier.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from ranger_ps.config.train import TrainConfig
    from ranger_ps.workloads.data import shard_indices
    from ranger_ps.workloads.evaluation import EPOCH_EVAL_EXAMPLES, evaluate
    from ranger_ps.workloads.job import batch_loss, build

    torch.set_num_threads(1)
    config = TrainConfig(rule=rule, dataset=dataset, model=model_name, epochs=epochs, batch_size=batch_size, seed=seed)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    clock = time.perf_counter()  # the timeline's clock: from the formed process group
    timeline: list[tuple[float, float]] = []
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
            if epoch_evaluations and rank == 0:
                seconds = time.perf_counter() - clock
                accuracy = evaluate(model, data, device, limit=EPOCH_EVAL_EXAMPLES).test_accuracy
                timeline.append((seconds, accuracy))
        dist.barrier()
        seconds = time.perf_counter() - start
        if rank == 0:
            grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            accuracy = evaluate(model, data, device).test_accuracy
            report: dict[str, Any] = {
                "steps": steps * world, "seconds": seconds, "test_accuracy": accuracy, "grad_bytes": grad_bytes,
            }  # fmt: skip
            if epoch_evaluations:
                report["timeline"] = timeline
            print(json.dumps(report), flush=True)
    finally:
        dist.destroy_process_group()
    return 0
