"""Shared fixtures: real parameter-server processes on loopback, always cleaned up."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

ServerFactory = Callable[..., list[str]]


def wait_for_file(path: Path, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Wait until ``path`` exists; fail fast if ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            out = process.stdout.read().decode(errors="replace") if process.stdout else ""
            raise AssertionError(f"process exited with {process.returncode} before {path} appeared:\n{out}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout}s")
        time.sleep(0.02)


def ranger_ps_cmd(*args: str) -> list[str]:
    """The command line of ``ranger-ps ARGS`` run by this interpreter."""
    return [sys.executable, "-m", "ranger_ps", *args]


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; never leaves the process running."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def start_servers(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start ``n`` shard processes on free loopback ports; returns their addresses in shard order."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(n: int, *extra: str) -> list[str]:
        addresses = []
        group = len(processes)
        for shard in range(n):
            ready = tmp_path / f"server-{group}-{shard}.json"
            process = subprocess.Popen(
                ranger_ps_cmd(
                    "server", "--port", "0", "--shard-id", str(shard), "--num-shards", str(n),
                    "--ready-file", str(ready), "--log-level", "WARNING", *extra,
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )  # fmt: skip
            processes.append(process)
            wait_for_file(ready, process)
            info = json.loads(ready.read_text())
            addresses.append(f"{info['host']}:{info['port']}")
        return addresses

    yield start
    for process in processes:
        stop_process(process)
        if process.stdout:
            process.stdout.close()


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (and is not a zombie)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return True
    return state != "Z"
