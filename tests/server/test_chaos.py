"""Chaos: seeded random faults on real processes during dense training, checked by an exact invariant.

Two shards (checkpointing to their folder) and two ``ranger-ps worker`` processes train digits with
dense pushes (every block, every step). While they train, a seeded sequence of faults hits them:

- ``term``: SIGTERM a shard (it applies what it acknowledged, writes its final checkpoint, exits 0)
  and start it again on the same port and folder;
- ``stop-shard``: SIGSTOP a shard past the workers' leases, then SIGCONT (their calls wait or time
  out and are retried; the shard, seeing it was the one paused, gives them new leases);
- ``stop-worker``: SIGSTOP a worker past its lease, then SIGCONT (it finds itself forgotten, registers
  again and adopts the shards' clocks; under bsp it keeps one clock on every shard).

Afterwards both workers must have exited 0, and on every shard:

- every push a worker saw acknowledged was applied exactly once: the shard's ``pushes_applied``
  equals the steps the workers report (one dense push per step);
- every block moved once per applied update: under async and ssp every block's version is
  ``1 + pushes_applied`` (the sum of versions is ``blocks * (1 + pushes_applied)``); under bsp a
  clock's pushes are combined into one update, so versions are ``1 + applied_clock``.

A SIGKILL of a shard is left out on purpose: it may lose what it applied after its last checkpoint
(documented in docs/durability.md and tested in test_durability.py), which an exact invariant
cannot allow. Every wait polls the processes or the shards against a deadline; the only fixed
waits are the faults' own lengths (a pause must outlast a lease).
"""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import pytest

from tests.server.test_durability import _poll, _Processes, _Server, _stats

pytestmark = [pytest.mark.e2e]

LEASE_SECONDS = 1.5
PAUSE_SECONDS = LEASE_SECONDS + 1.5  # a pause outlasts the lease: the other side forgets the paused one
EPOCHS = 40  # 2 workers x 23 steps x 40 epochs: 1,840 pushes per shard, long enough for every fault
FAULTS = 4
PUSHES_BETWEEN_FAULTS = 150


def _pushes(servers: list[_Server]) -> int:
    """The fewest pushes any live shard has applied (a paused or stopped shard does not answer: 0)."""
    try:
        return min(s.pushes_applied for s in _stats([s.address for s in servers]))
    except AssertionError:
        return 0


def _describe(servers: list[_Server]) -> str:
    """Each shard's applied clock and workers' clocks, for a failure message."""
    lines = []
    for server in servers:
        try:
            (stats,) = _stats([server.address])
        except AssertionError as exc:
            lines.append(f"shard {server.shard_id}: no stats ({exc})")
            continue
        workers = ", ".join(f"{w.worker_id}@{w.clock}{'' if w.live else ' (gone)'}" for w in stats.workers)
        lines.append(f"shard {stats.shard_id}: applied clock {stats.applied_clock}, workers {workers}")
    return "\n".join(lines)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("mode", "seed"), [("async", 1), ("ssp:2", 2), ("bsp", 3)])
def test_seeded_faults_lose_no_acknowledged_push_and_apply_each_exactly_once(
    mode: str, seed: int, procs: _Processes, tmp_path: Path
) -> None:
    folder = tmp_path / "ckpt"
    flags = (
        "--consistency", mode, "--lease-seconds", str(LEASE_SECONDS), "--checkpoint-dir", str(folder),
        "--checkpoint-every", "0",
    )  # fmt: skip
    servers = procs.servers(2, *flags)
    addresses = ",".join(s.address for s in servers)
    reports = [tmp_path / f"worker-{w}.json" for w in range(2)]
    workers = [
        procs.spawn(
            f"worker-{w}",
            "worker",
            "--servers",
            addresses,
            "--worker-id",
            str(w),
            "--num-workers",
            "2",
            "--epochs",
            str(EPOCHS),
            "--push-fraction",
            "1",
            "--no-overlap",
            "--retry-timeout",
            "60",
            "--report",
            str(reports[w]),
            "--log-level",
            "INFO",
        )  # fmt: skip
        for w in range(2)
    ]
    chosen = random.Random(seed)
    done: list[str] = []
    for n in range(FAULTS):
        goal = (n + 1) * PUSHES_BETWEEN_FAULTS

        def reached(goal: int = goal) -> bool | None:
            return True if _pushes(servers) >= goal else None

        try:
            _poll(reached, f"{goal} pushes on every shard", timeout=90)
        except AssertionError as exc:
            raise AssertionError(f"faults {done}: {exc}\n{_describe(servers)}") from None
        if any(p.poll() is not None for p, _ in workers):
            break  # the run ended before every fault: the invariant still has to hold
        kind, index = chosen.choice(["term", "stop-shard", "stop-worker"]), chosen.randrange(2)
        done.append(f"{kind} {index}")
        if kind == "term":
            server = servers[index]
            server.process.send_signal(signal.SIGTERM)
            assert server.process.wait(60) == 0, server.log_text()
            servers[index] = procs.server(index, 2, *flags, port=server.port)
        else:
            process = servers[index].process if kind == "stop-shard" else workers[index][0]
            process.send_signal(signal.SIGSTOP)
            time.sleep(PAUSE_SECONDS)  # the fault itself: a pause that outlasts the lease
            process.send_signal(signal.SIGCONT)
    for process, log in workers:
        code = process.wait(180)
        assert code == 0, f"faults {done}: worker exited {code}:\n{log.read_text(errors='replace')[-4000:]}"
    steps = sum(json.loads(r.read_text())["steps"] for r in reports)
    for stats in _stats([s.address for s in servers]):
        where = f"faults {done}, shard {stats.shard_id}"
        assert stats.pushes_applied == steps, f"{where}: {stats.pushes_applied} applied, {steps} acknowledged"
        updates = stats.applied_clock if mode == "bsp" else stats.pushes_applied
        assert stats.version_sum == stats.num_blocks * (1 + updates), (where, stats.version_sum, stats.num_blocks)
    assert done, "no fault was injected"
