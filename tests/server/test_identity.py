"""Integration: worker identity, far-off clocks, non-finite updates and observers against one live shard.

A worker that registers with ``identity`` gets a secret; every later call of that registration must
carry it, and the live id cannot be taken by a caller that does not know it. Each refusal is checked
to leave the shard exactly as it was (weights, versions, counters, worker clocks).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ranger_ps.algorithm.rules import RuleConfig
from ranger_ps.server.membership import Membership
from ranger_ps.server.shard import MAX_CLOCK_AHEAD
from ranger_ps.wire._proto import ranger_ps_pb2 as pb
from ranger_ps.wire.pushes import SECRET_BYTES
from tests.conftest import ServerFactory, one_line_error, ranger_ps_cmd, stop_process
from tests.server.test_consistency_cluster import _log_tail, _poll, _spawn_worker, _stats, _wait_exit, _workers
from tests.server.test_security import (
    LAYOUT,
    RULE,
    RawShard,
    Target,
    exchange_frames,
    init_frames,
    push_frames,
    refusal,
    serve,
    wire,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

WORKER = 5


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """One shard, registered with identity and initialized by worker 5 over raw calls."""
    with serve(tmp_path_factory.mktemp("identity"), "--lease-seconds", "3600") as server:
        with RawShard(server.address) as raw:
            reply = raw.register(LAYOUT, RULE, WORKER, identity=True)
            assert reply.worker_id == WORKER and reply.must_initialize
            assert len(reply.secret) == SECRET_BYTES
            own = tuple(reply.block_ids)
            frames = init_frames(WORKER, own, reply.secret)
            assert pb.InitReply.FromString(raw.call("Init", frames)).blocks_initialized == len(own)
            yield Target(server, raw, WORKER, own, (), itertools.count(1), reply.secret)
    assert server.process.returncode == 0, server.log()[-3000:]


def _push(t: Target, secret: bytes | None = None, clock: int | None = None, fill: float = 1.0) -> pb.PushReply:
    blocks = [wire(b, fill) for b in t.own if LAYOUT.blocks[b].dtype == "float32"]
    frames = push_frames(
        t.worker_id, next(t.clocks) if clock is None else clock, blocks, secret=t.secret if secret is None else secret
    )
    return t.raw.push(frames)


def test_a_live_id_is_not_taken_by_a_caller_without_its_secret(shard: Target) -> None:
    before = shard.state()
    for secret in (b"", b"\x01" * SECRET_BYTES):
        error = refusal(lambda s=secret: shard.raw.register(LAYOUT, RULE, WORKER, identity=True, secret=s))  # type: ignore[misc]
        assert error.code() == grpc.StatusCode.ALREADY_EXISTS, error
        assert f"worker id {WORKER} is live on shard 0 under another registration" in (error.details() or "")
    assert shard.state() == before
    # the registration's own secret renews it (a retried Register of the same process)
    again = shard.raw.register(LAYOUT, RULE, WORKER, identity=True, secret=shard.secret)
    assert again.worker_id == WORKER and not again.must_initialize
    shard.secret = again.secret


def test_every_call_without_the_secret_is_refused_and_changes_nothing(shard: Target) -> None:
    assert _push(shard).blocks_applied > 0  # the control: with the secret, a push applies
    before = shard.state()
    wrong = b"\x02" * SECRET_BYTES
    calls = {
        "Push": lambda s: _push(shard, secret=s),
        "Exchange": lambda s: shard.raw.call(
            "Exchange", exchange_frames(WORKER, next(shard.clocks), [shard.own[0]], secret=s)
        ),
        "Pull": lambda s: shard.raw.weights(WORKER, s),
        "Heartbeat": lambda s: shard.raw.call(
            "Heartbeat", pb.HeartbeatRequest(worker_id=WORKER, secret=s).SerializeToString()
        ),
        "Leave": lambda s: shard.raw.call("Leave", pb.LeaveRequest(worker_id=WORKER, secret=s).SerializeToString()),
    }
    for method, call in calls.items():
        for secret in (b"", wrong):
            error = refusal(lambda c=call, s=secret: c(s))  # type: ignore[misc]
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED, (method, error)
            assert "does not carry its registration's secret" in (error.details() or ""), method
    assert shard.state() == before
    assert [w.live for w in shard.raw.stats().workers if w.worker_id == WORKER] == [True]  # a forged Leave did not
    assert _push(shard).blocks_applied > 0


def test_a_re_registration_tells_the_worker_the_clock_of_its_last_applied_push(shard: Target) -> None:
    _push(shard)
    (record,) = [w for w in shard.raw.stats().workers if w.worker_id == WORKER]
    again = shard.raw.register(LAYOUT, RULE, WORKER, identity=True, secret=shard.secret)
    assert again.pushed_clock == record.clock > 0
    shard.secret = again.secret


def test_a_clock_far_beyond_every_clock_seen_is_refused_before_anything_changes(shard: Target) -> None:
    before = shard.state()
    (record,) = [w for w in shard.raw.stats().workers if w.worker_id == WORKER]
    for clock in (record.clock + MAX_CLOCK_AHEAD + 1, 2**64 - 1):
        error = refusal(lambda c=clock: _push(shard, clock=c))  # type: ignore[misc]
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "is far beyond every clock shard 0 has seen" in (error.details() or "")
    assert shard.state() == before
    assert _push(shard).blocks_applied > 0  # the worker's own next push still applies


def test_an_update_that_would_make_a_weight_non_finite_is_refused_all_or_nothing(tmp_path: Path) -> None:
    rule = RuleConfig(lr=1.0, momentum=0.0, outer="rule")
    with serve(tmp_path, "--lease-seconds", "3600") as server, RawShard(server.address) as raw:
        reply = raw.register(LAYOUT, rule, identity=True)
        own = tuple(reply.block_ids)
        raw.call("Init", init_frames(reply.worker_id, own, reply.secret))
        target = Target(server, raw, reply.worker_id, own, (), itertools.count(1), reply.secret)
        f32 = target.f32
        good = target.f64
        # two finite gradients of -3e38: the first takes the weight near the float32 maximum, the
        # second would overflow it to +inf
        first = push_frames(target.worker_id, 1, [wire(f32, -3e38)], secret=target.secret)
        assert raw.push(first).blocks_applied == 1
        before = target.state()
        second = push_frames(target.worker_id, 2, [wire(good, 1.0), wire(f32, -3e38)], secret=target.secret)
        error = refusal(lambda: raw.push(second))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "non-finite" in (error.details() or "").lower() or "NaN or Inf" in (error.details() or "")
        weights, counters = target.state()
        assert (weights, counters[:3]) == (before[0], before[1][:3])  # neither block moved
        version, _, data = weights[f32]
        assert version == 2 and all(math.isfinite(x) for x in memoryview(data).cast("f"))


def test_an_observer_cannot_push(shard: Target) -> None:
    observer = shard.raw.register(LAYOUT, RULE, observer=True, identity=True)
    before = shard.state()
    blocks = [wire(shard.f32)]
    error = refusal(lambda: shard.raw.push(push_frames(observer.worker_id, 1, blocks, secret=observer.secret)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "registered as an observer: observers only pull" in (error.details() or "")
    assert shard.state()[0] == before[0]


def test_departed_workers_are_forgotten_after_a_while_and_beyond_a_cap() -> None:
    now = [0.0]
    members = Membership(lease_seconds=5.0, clock=lambda: now[0])
    for worker_id in range(10):
        members.register(worker_id)
        now[0] += 1.0
        if worker_id < 8:
            members.leave(worker_id)  # workers 0..7 left at times 0..7; 8 and 9 stay live
    now[0] = 10.0
    # kept: departed for at most 5 s (workers 5, 6, 7), and at most 2 of them (the newest: 6 and 7)
    assert members.forget_departed(after_seconds=5.0, keep=2) == 6
    assert sorted(w for w, _ in members.items()) == [6, 7, 8, 9]
    assert members.forget_departed(after_seconds=5.0, keep=2) == 0
    assert [r.live for _, r in sorted(members.items())] == [False, False, True, True]


@pytest.mark.timeout(180)
def test_a_second_process_with_a_live_worker_id_exits_2_and_the_first_trains_on(
    start_servers: ServerFactory, tmp_path: Path
) -> None:
    servers = start_servers(2, "--lease-seconds", "30")
    first, first_log, first_report = _spawn_worker(servers, 0, epochs=5, directory=tmp_path)
    try:
        _poll(
            lambda: all(0 in _workers(r) and _workers(r)[0].pushes > 0 for r in _stats(servers)),
            "worker 0 pushing to both shards",
            alive=[(first, first_log)],
        )
        first.send_signal(signal.SIGSTOP)  # paused, its lease (30 s) keeps it live: the id stays taken
        try:
            second = subprocess.run(
                ranger_ps_cmd(
                    "worker", "--servers", ",".join(servers), "--worker-id", "0", "--num-workers", "3",
                    "--epochs", "1", "--log-level", "WARNING",
                ),
                capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
            )  # fmt: skip
        finally:
            first.send_signal(signal.SIGCONT)
        line = one_line_error(second)
        assert "refused registration: worker id 0 is live on shard 0 under another registration" in line, line
        assert "choose another --worker-id" in line
        # the first process was not disturbed: it finishes with every push it saw acknowledged applied
        assert _wait_exit(first, first_log, timeout=150) == 0, _log_tail(first_log)
    finally:
        stop_process(first)
    report = json.loads(first_report.read_text())
    pushes = {w.worker_id: w.pushes for r in _stats(servers) for w in r.workers if w.worker_id == 0}
    assert report["steps"] > 0 and pushes == {0: report["steps"]}, (report["steps"], pushes)
