"""Integration: a shard's memory stays bounded under oversized requests (issue 15's amplification attacks).

One server process with a small model, registered and initialized by a worker with identity. Each
attack is sent over a raw channel and must be refused with a clear status; the server's peak
resident memory (``VmHWM`` in /proc) may grow by at most :data:`PEAK_GROWTH_LIMIT` over all of
them together - before these limits a 60 MB Pull raised it by 1.6 GB, a 276-byte Register by
1.5 GB, and a Push stream was buffered without limit.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from ranger_ps.wire._proto import ranger_ps_pb2 as pb
from ranger_ps.wire.frames import encode_frame
from tests.server.test_security import (
    LAYOUT,
    RULE,
    RawShard,
    Target,
    init_frames,
    push_frames,
    refusal,
    serve,
    wire,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

#: What all the attacks together may add to the server's peak resident memory. The largest message
#: the server reads is 64 MiB (--max-message-mb); gRPC holds it once and the servicer sees it as one
#: bytes object, so about two messages' worth is the floor; the rest is headroom for allocator noise.
PEAK_GROWTH_LIMIT = 256 << 20
FRAME = 2 << 20  # the size of each frame of the oversized streams


def _peak_rss(pid: int) -> int:
    """The process's peak resident set size in bytes (``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc")


@pytest.fixture
def shard(tmp_path: Path) -> Iterator[Target]:
    with serve(tmp_path, "--lease-seconds", "3600") as server, RawShard(server.address, timeout=60) as raw:
        reply = raw.register(LAYOUT, RULE, identity=True)
        own = tuple(reply.block_ids)
        assert pb.InitReply.FromString(raw.call("Init", init_frames(reply.worker_id, own, reply.secret)))
        yield Target(server, raw, reply.worker_id, own, (), itertools.count(1), reply.secret)


def _junk_frames(header: pb.FrameHeader, count: int) -> list[bytes]:
    """A first frame with ``header`` and ``count - 1`` more, each carrying :data:`FRAME` bytes of payload."""
    return [encode_frame(header if i == 0 else pb.FrameHeader(), [b"\x01" * FRAME]) for i in range(count)]


def test_oversized_requests_are_refused_and_the_shard_s_memory_stays_bounded(shard: Target) -> None:
    pid = shard.server.process.pid
    before = shard.state()
    assert shard.raw.stats()  # warm: every code path below is loaded before the baseline
    baseline = _peak_rss(pid)
    worker, secret = shard.worker_id, shard.secret
    attacks = {
        # a pull whose known versions claim 15 million blocks (47 MB) of a shard holding a handful: refused
        # by its length, before it is parsed
        "Pull of 47 MB": (
            "Pull",
            pb.PullRequest(worker_id=worker, secret=secret, known_versions=[1 << 20] * (15 << 20)).SerializeToString(),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        # the registered worker's push stream of 30 frames of 2 MiB: cut off at the shard's stream limit
        "Push stream of 60 MB": (
            "Push",
            _junk_frames(pb.FrameHeader(push=pb.PushHeader(worker_id=worker, clock=1, secret=secret)), 30),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        # the same from a caller without the secret: refused on its first frame
        "forged Push stream": (
            "Push",
            _junk_frames(pb.FrameHeader(push=pb.PushHeader(worker_id=worker, clock=1)), 30),
            grpc.StatusCode.PERMISSION_DENIED,
        ),
        "Exchange stream of 60 MB": (
            "Exchange",
            _junk_frames(
                pb.FrameHeader(exchange=pb.ExchangeHeader(worker_id=worker, clock=1, more=True, secret=secret)), 30
            ),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        # 276 bytes that describe 4 million blocks of one element
        "Register of 2^22 blocks": (
            "Register",
            pb.RegisterRequest(
                worker_id=-1,
                layout=pb.LayoutSpec(params=[pb.ParamSpec(name="x", shape=[1 << 22], dtype=pb.FLOAT32)], block_size=1),
                rule=pb.RuleSpec(msgpack=RULE.to_msgpack()),
                expected_shard_id=0,
                expected_num_shards=1,
            ).SerializeToString(),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    }
    for name, (method, request, status) in attacks.items():
        error = refusal(lambda m=method, r=request: shard.raw.call(m, r))  # type: ignore[misc]
        assert error.code() == status, (name, error.code(), error.details())
        assert error.details(), name
    growth = _peak_rss(pid) - baseline
    assert growth <= PEAK_GROWTH_LIMIT, f"peak memory grew by {growth >> 20} MiB under the attacks"
    assert shard.state() == before  # nothing changed
    # and the worker's own traffic goes on
    blocks = [wire(shard.f32)]
    assert shard.raw.push(push_frames(worker, next(shard.clocks), blocks, secret=secret)).blocks_applied == 1
