"""What every benchmark shares: the machine it ran on, timing loops, rates and ratios, targets.

Throughput figures are decimal GB/s of parameter bytes (:data:`GB`); a ratio of two figures is
``None`` when either is missing (a baseline that could not run here).
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

GB = 1e9  # throughput figures are decimal GB/s of parameter bytes

Target = tuple[str, float, str]
"""A target of the performance issue, as a ratio measured in one run: (key, threshold, meaning).
A meaning with ``<=`` says lower is better."""


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def gbps(nbytes: int, seconds: float) -> float:
    """``nbytes`` in ``seconds`` as GB/s (infinite for no time at all)."""
    return nbytes / seconds / GB if seconds > 0 else math.inf


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either is missing or ``b`` is not positive."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


def check_targets(values: dict[str, float | None], targets: Sequence[Target]) -> dict[str, Any]:
    """Each target with its measured value and whether it was met (None: not measured)."""
    result = {}
    for key, threshold, meaning in targets:
        value = values.get(key)
        lower_is_better = "<=" in meaning
        met = None if value is None else (value <= threshold if lower_is_better else value >= threshold)
        result[key] = {"value": value, "target": threshold, "met": met, "meaning": meaning}
    return result


def free_port() -> int:
    """A loopback port free right now (for baselines that cannot announce the one they got)."""
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


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine skews every figure."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads, then restore the previous number."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def timed(fn: Callable[[], object], warmup: int, repeat: int) -> list[float]:
    """Seconds of each of ``repeat`` calls of ``fn``, after ``warmup`` calls that are not timed."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def synthetic_model(model_bytes: int, tensors: int, *, seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """``tensors`` float32 tensors of ``model_bytes`` in all (the last takes the remainder)."""
    numel = max(tensors, model_bytes // 4)
    each = numel // tensors
    sizes = [each] * (tensors - 1) + [numel - each * (tensors - 1)]
    generator = torch.Generator().manual_seed(seed)
    return [(f"t{i:03d}", torch.rand(n, generator=generator)) for i, n in enumerate(sizes)]


def quiet_grpc_fork() -> None:
    """Every child the benchmarks fork execs at once, so gRPC's fork handlers have nothing to do but
    log a line per fork while this process has gRPC threads: turn them off (before gRPC loads)."""
    if "grpc" not in sys.modules:
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
