"""Shared fixtures, and the three tiers of tests.

Every test is exactly one of:

- ``unit``: pure functions and objects in this process; no sockets, no gRPC, no processes (the
  default when a test names no tier);
- ``integration``: real servers in this process (``start_servers``), real gRPC on loopback, no
  processes;
- ``e2e``: real processes (the command line, kills, packaging, deploy).

The tier is the marker closest to the test (a test's own, else its module's ``pytestmark``); an
autouse guard makes a unit test that opens a network socket or starts gRPC, or an integration test
that starts a process, fail with a message saying so. ``pytest -m unit`` runs the fast tier alone.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from ranger_ps.cli import build_parser
from ranger_ps.cli.flags import settings_from_args
from ranger_ps.config.server import ServerConfig
from ranger_ps.orchestration import launcher
from ranger_ps.server.app import BackgroundShards

ROOT = Path(__file__).resolve().parent.parent

TIERS = ("unit", "integration", "e2e")


def tier_of(item: pytest.Item) -> str:
    """The tier a test runs in: its closest tier marker, ``unit`` when it has none."""
    return next((m.name for m in item.iter_markers() if m.name in TIERS), "unit")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if not any(m.name in TIERS for m in item.iter_markers()):
            item.add_marker(pytest.mark.unit)


def _refuse(what: str, tier: str, instead: str) -> Callable[..., object]:
    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError(f"a {tier} test may not {what}: mark it {instead}")

    return refuse


@pytest.fixture(autouse=True)
def _tier_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hold each test to its tier (see the module docstring)."""
    tier = tier_of(request.node)
    if tier == "e2e":
        return
    monkeypatch.setattr(subprocess.Popen, "__init__", _refuse("start a process", tier, "e2e"))
    if tier == "unit":
        original_bind, original_connect = socket.socket.bind, socket.socket.connect

        def bind(sock: socket.socket, address: Any) -> None:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                raise AssertionError("a unit test may not open a network socket: mark it integration")
            original_bind(sock, address)

        def connect(sock: socket.socket, address: Any) -> None:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                raise AssertionError("a unit test may not open a network socket: mark it integration")
            original_connect(sock, address)

        monkeypatch.setattr(socket.socket, "bind", bind)
        monkeypatch.setattr(socket.socket, "connect", connect)
        for name in ("server", "insecure_channel", "secure_channel"):
            monkeypatch.setattr(grpc.aio, name, _refuse("start gRPC", tier, "integration"))


ServerFactory = Callable[..., list[str]]


def wait_for_file(path: Path, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Wait until ``path`` exists; fail the test (with the process's output) if ``process`` exits first."""
    try:
        launcher.wait_for_file(path, process, timeout)
    except launcher.NotReady as exc:
        out = process.stdout.read().decode(errors="replace") if process.stdout and process.poll() is not None else ""
        raise AssertionError(f"process {exc} ({path}):\n{out}") from None


def ranger_ps_cmd(*args: str) -> list[str]:
    """The command line of ``ranger-ps ARGS`` run by this interpreter."""
    return [sys.executable, "-m", "ranger_ps", *args]


def one_line_error(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The one ``ranger-ps ...: error: ...`` line a failed command printed (no traceback), checking its exit code."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("ranger-ps")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; never leaves the process running."""
    launcher.stop_process(process, timeout)


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
