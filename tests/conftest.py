"""Shared fixtures: real parameter servers on loopback (in this process, or as processes), always cleaned up."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ranger_ps.cli import build_parser
from ranger_ps.cli.flags import settings_from_args
from ranger_ps.config.server import ServerConfig
from ranger_ps.server.app import BackgroundShards

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
def start_servers() -> Iterator[ServerFactory]:
    """Start ``n`` shard servers in this process on free loopback ports; returns their addresses in shard order.

    Extra arguments are ``ranger-ps server`` flags (``"--consistency", "bsp"``), parsed exactly as the
    command line parses them. The servers run on a background event loop and are stopped cleanly
    (final checkpoints written) after the test.
    """
    with BackgroundShards() as shards:

        def start(n: int, *extra: str) -> list[str]:
            args = build_parser().parse_args(["server", "--port", "0", *extra])
            base = settings_from_args(ServerConfig, args)
            return [shards.start(dataclasses.replace(base, shard_id=i, num_shards=n)).address for i in range(n)]

        yield start


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
