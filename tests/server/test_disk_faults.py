"""A disk that fails under a real server process: startup refusals, loud periodic failures, the final checkpoint.

The faults are real: a tiny tmpfs that fills up, a folder that vanishes or turns into a file, a read-only
mount (root is not stopped by permission bits). Every server is a real ``ranger-ps server`` process
started by ``_Processes`` (see ``test_durability.py``), stopped at teardown; the tmpfs is unmounted after
the processes are gone. Waits poll health, metrics, files and logs against deadlines.
"""

from __future__ import annotations

import json
import re
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from ranger_ps.algorithm.rules import RuleConfig
from ranger_ps.client.sharded import ShardedClient
from ranger_ps.storage import checkpoint
from ranger_ps.wire.rpc import SERVICE_NAME
from tests.conftest import one_line_error
from tests.server.test_durability import _grads, _layout, _params, _poll, _Processes, _run, _Server
from tests.storage.test_checkpoint import fill, tmpfs

pytestmark = pytest.mark.e2e


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, unmounted after the test (after ``procs``, which must be requested after it)."""
    with tmpfs(tmp_path / "disk") as mounted:
        yield mounted


def _health(address: str, service: str) -> str:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _wait_health(address: str, want: str, timeout: float = 30.0) -> None:
    """Until the server's health is ``want`` for both the server ("") and the ranger-ps service name."""
    _poll(
        lambda: True if all(_health(address, s) == want for s in ("", SERVICE_NAME)) else None,
        f"health {want}",
        timeout,
    )


def _metrics_port(procs: _Processes, server: _Server) -> int:
    for ready in procs.folder.glob("ready-*.json"):
        info = json.loads(ready.read_text())
        if info["pid"] == server.process.pid:
            return int(info["metrics_port"])
    raise AssertionError("no ready file of this server")


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("shard") == "0":
                return float(sample.value)
    raise AssertionError(f"{name} not exported:\n{text}")


def _pushes_in_newest(folder: Path) -> int | None:
    newest = checkpoint.load_newest(folder, 0)
    return newest.counters["pushes_applied"] if newest is not None else None


def _register(address: str) -> ShardedClient:
    client = ShardedClient([address], retry_timeout=5.0)
    client.register(_layout(), RuleConfig(lr=0.05, momentum=0.9, outer="rule"), [t for _, t in _params()])
    return client


def _failure_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if re.search(r"checkpoint to \S+ failed: ", line)]


# -- startup ----------------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["a file", "under a file", "read-only", "full"])
def test_an_unusable_checkpoint_dir_is_a_startup_error(kind: str, tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    mount = tmpfs(tmp_path / "mnt", read_only=kind == "read-only")
    with mount as mounted:
        if kind == "full":
            fill(mounted)
        target, needle = {
            "a file": (a_file, "is not a folder"),
            "under a file": (a_file / "sub", "cannot be created: Not a directory"),
            "read-only": (mounted, "is not writable: Read-only file system"),
            "full": (mounted, "is not writable: No space left on device"),
        }[kind]
        ready = tmp_path / "ready.json"
        result = _run(
            "server", "--port", "0", "--checkpoint-dir", str(target), "--ready-file", str(ready), timeout=60
        )  # fmt: skip
        line = one_line_error(result)
        assert line == f"ranger-ps server: error: --checkpoint-dir {target} {needle}", line
        assert not ready.exists()  # refused before serving
        assert "serving on" not in result.stderr
        if kind == "full":
            assert [p.name for p in mounted.iterdir()] == ["filler"]  # the probe file was removed


# -- periodic checkpoints -----------------------------------------------------------------------------------------


@pytest.mark.timeout(180)
def test_a_failing_periodic_checkpoint_turns_health_not_serving_and_counts_until_one_succeeds(
    disk: Path, procs: _Processes
) -> None:
    folder = disk / "ckpt"
    server = procs.server(
        0, 1, "--checkpoint-dir", str(folder), "--checkpoint-every", "0.5", "--keep", "1", "--metrics-port", "0"
    )  # fmt: skip
    port = _metrics_port(procs, server)
    g = torch.Generator().manual_seed(1)
    with _register(server.address) as client:
        client.push(_grads(g), None, 1).result(timeout=30)
        _poll(lambda: True if _pushes_in_newest(folder) == 1 else None, "a checkpoint with push 1")
        _wait_health(server.address, "SERVING")
        assert _metric(port, "ranger_ps_checkpoint_failures_total") == 0

        # 1. The disk fills up: NOT_SERVING, failures counted, the age grows; pushes are still taken.
        (good,) = checkpoint.list_checkpoints(folder)[0]
        before = good.read_bytes()
        filler = fill(disk)
        _wait_health(server.address, "NOT_SERVING")
        client.push(_grads(g), None, 2).result(timeout=30)
        _poll(lambda: True if _metric(port, "ranger_ps_checkpoint_failures_total") >= 3 else None, "3 failures")
        age = _metric(port, "ranger_ps_checkpoint_age_seconds")
        _poll(lambda: True if _metric(port, "ranger_ps_checkpoint_age_seconds") > age + 0.5 else None, "age to grow")
        assert _health(server.address, "") == "NOT_SERVING"
        assert sorted(p.name for p in folder.iterdir()) == [good.name] and good.read_bytes() == before
        # Space again: the next checkpoint succeeds and health is SERVING again.
        filler.unlink()
        _wait_health(server.address, "SERVING")
        assert _pushes_in_newest(folder) == 2
        assert _metric(port, "ranger_ps_checkpoint_age_seconds") < 5
        after_full = _metric(port, "ranger_ps_checkpoint_failures_total")

        # 2. The folder vanishes (an unmounted volume): the same, and it is not silently recreated.
        folder.rename(disk / "away")
        _wait_health(server.address, "NOT_SERVING")
        _poll(lambda: True if _metric(port, "ranger_ps_checkpoint_failures_total") > after_full else None, "a failure")
        assert not folder.exists()
        (disk / "away").rename(folder)
        _wait_health(server.address, "SERVING")
        failures = _metric(port, "ranger_ps_checkpoint_failures_total")
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 0, server.log_text()
    log = server.log_text()
    assert "Traceback" not in log, log
    lines = _failure_lines(log)
    assert len(lines) == failures, lines  # each failure logged once, in one line
    assert all(" ERROR " in line for line in lines), lines
    assert f"periodic checkpoint to {folder} failed: No space left on device" in lines[0], lines[0]
    assert f"failed: the checkpoint folder is gone ({folder})" in lines[-1], lines[-1]
    assert log.count("succeeded again") == 2, log
    assert _pushes_in_newest(folder) == 2


# -- the final checkpoint -------------------------------------------------------------------------------------------


def _trained_server(procs: _Processes, folder: Path, *extra: str) -> _Server:
    """A shard with a good checkpoint after push 3, and pushes 4 and 5 applied since (in no checkpoint yet)."""
    server = procs.server(
        0, 1, "--checkpoint-dir", str(folder), "--checkpoint-every", "0", "--checkpoint-every-pushes", "3",
        "--keep", "1", *extra,
    )  # fmt: skip
    g = torch.Generator().manual_seed(2)
    with _register(server.address) as client:
        for clock in range(1, 4):
            client.push(_grads(g), None, clock).result(timeout=30)
        _poll(lambda: True if _pushes_in_newest(folder) == 3 else None, "the checkpoint after push 3")
        for clock in range(4, 6):
            client.push(_grads(g), None, clock).result(timeout=30)
    return server


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["full", "gone"])
def test_a_final_checkpoint_that_cannot_be_written_ends_in_one_line_and_exit_1_keeping_the_last_good_one(
    fault: str, disk: Path, procs: _Processes
) -> None:
    folder = disk / "ckpt"
    server = _trained_server(procs, folder, "--grace", "2")
    (good,) = checkpoint.list_checkpoints(folder)[0]
    before = good.read_bytes()
    kept = folder
    if fault == "full":
        fill(disk)
        reason = "No space left on device"
    else:
        kept = disk / "away"
        folder.rename(kept)
        reason = f"the checkpoint folder is gone ({folder})"
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(30) == 1, server.log_text()
    log = server.log_text()
    assert "Traceback" not in log, log
    (line,) = [line for line in log.splitlines() if line.startswith("ranger-ps")]
    attempts = len(_failure_lines(log))
    assert attempts >= 2, log  # retried within the grace period
    said = re.sub(r"(No space left on device) \(\S+\)", r"\1", line)  # the file named, if the OS says which
    assert (
        said
        == (
            f"ranger-ps server: failed: shard 0: the final checkpoint to {folder} failed {attempts} time(s) in "
            + re.search(r" in (\d+\.\d)s: ", line).group(1)  # type: ignore[union-attr]
            + f"s: {reason}; the last good one this process wrote is {folder / good.name}, and the 2 push(es) "
            "applied since it are not saved"
        )
    ), line
    assert log.splitlines()[-1] == line  # the last thing the server said
    # The last good checkpoint is intact and nothing partial is left beside it.
    assert sorted(p.name for p in kept.iterdir()) == [good.name]
    assert (kept / good.name).read_bytes() == before
    assert checkpoint.read(kept / good.name).counters["pushes_applied"] == 3


@pytest.mark.timeout(120)
def test_the_final_checkpoint_retries_and_succeeds_when_space_comes_back_within_the_grace_period(
    disk: Path, procs: _Processes
) -> None:
    folder = disk / "ckpt"
    server = _trained_server(procs, folder, "--grace", "30")
    filler = fill(disk)
    server.process.send_signal(signal.SIGTERM)
    _poll(lambda: True if _failure_lines(server.log_text()) else None, "a failed final attempt")
    assert server.process.poll() is None  # still retrying
    filler.unlink()
    assert server.process.wait(30) == 0, server.log_text()
    log = server.log_text()
    assert "Traceback" not in log and "final checkpoint succeeded again" in log, log
    assert all("final checkpoint" in line for line in _failure_lines(log))
    assert [p.name for p in folder.iterdir()] == ["shard-0-00000002.ckpt"]  # keep 1: the good one replaced
    assert _pushes_in_newest(folder) == 5  # nothing acknowledged was lost
