"""Integration: hostile bytes and messages against one live shard never crash it or move its weights.

One server process, registered and initialized once over raw calls, its weights recorded by a real client.
A property-based test (hypothesis, derandomized) then sends random bytes, well-formed messages with
random field values, and mutations of a valid push or exchange (truncated, bytes flipped, inserted, deleted,
frames dropped or repeated) to every RPC over a raw channel. A valid push from the registered worker
is never sent (a check written from the wire contract filters them out), so afterwards the weights
must be exactly the recorded ones, and the server must still answer health checks.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import msgpack
import pytest
import torch
from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st

from ranger_ps.algorithm.placement import Placement
from ranger_ps.client.sharded import ShardedClient
from ranger_ps.errors import WireFormatError
from ranger_ps.server.store import ShardStore
from ranger_ps.wire._proto import ranger_ps_pb2 as pb
from ranger_ps.wire.codec import codec_for_name
from ranger_ps.wire.frames import decode_frame, split_blocks
from ranger_ps.wire.messages import layout_to_proto
from ranger_ps.wire.rpc import METHODS, SERVICE_NAME
from ranger_ps.wire.status import RequestError
from tests.server.test_security import (
    CLIENT_STREAMING,
    INITIAL,
    LAYOUT,
    RULE,
    RawShard,
    Server,
    exchange_frames,
    pull_into,
    push_frames,
    serve,
    wire,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

# The registered worker's id: far from the ids random data tends to produce (0, 1, -1, small).
WORKER = 123_456_789
# Explicit refusals a hostile message may get; UNKNOWN, INTERNAL, DEADLINE_EXCEEDED... mean a crash or a hang.
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
}
CALL_TIMEOUT = 5.0

_SERVICE = pb.DESCRIPTOR.services_by_name["ParameterServer"]


@dataclass
class Live:
    """The shard under attack, the client that set it up, and what it held before."""

    server: Server
    raw: RawShard
    client: ShardedClient
    weights: list[torch.Tensor]
    raw_weights: dict[int, tuple[int, int, bytes]]
    stats: pb.StatsReply


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    directory: Path = tmp_path_factory.mktemp("fuzz")
    with serve(directory, "--lease-seconds", "3600", log_level="WARNING") as server, RawShard(server.address) as raw:
        # a registration without identity (as a v1 client makes): its calls carry no secret, so the
        # valid pushes below are the registered worker's without knowing one
        reply = raw.register(LAYOUT, RULE, worker_id=WORKER)
        assert reply.worker_id == WORKER and reply.must_initialize and not reply.secret
        assert raw.initialize(WORKER, range(LAYOUT.num_blocks)) == LAYOUT.num_blocks
        with ShardedClient([server.address], connect_timeout=30) as client:
            client.register(LAYOUT, RULE, [torch.zeros_like(t) for t in INITIAL], observer=True)
            weights = pull_into(client)
            for got, want in zip(weights, INITIAL, strict=True):
                assert torch.equal(got, want)
            yield Live(server, raw, client, weights, raw.weights(WORKER), raw.stats())
    assert server.process.returncode == 0, server.log()[-3000:]


# -- never send a push the shard should apply ----------------------------------------------------------

_OWN = {b.block_id: b for b in LAYOUT.blocks}  # one shard: it holds every block
_REPLICA = ShardStore(LAYOUT, Placement.compute(LAYOUT, 1).blocks_by_shard[0], RULE)


def valid_push(method: str, messages: Sequence[bytes]) -> bool:
    """Whether a correct shard must apply this as a push of the registered worker (which never pushed).

    Written from the wire contract, independently of ranger_ps.wire.frames and the shard's checks: the
    frames parse, the first carries a push header of the registered worker, each header's block
    sizes add up to its payload, and every block is a block of the shard, once, with its dtype and
    length, and finite.
    """
    if method != "Push" or not messages:
        return False
    try:
        stream = [pb.Frame.FromString(m) for m in messages]
    except DecodeError:
        return False
    if not stream[0].header.HasField("push") or stream[0].header.push.worker_id != WORKER:
        return False
    seen: set[int] = set()
    for frame in stream:
        pos = 0
        for entry in frame.header.blocks:
            block = _OWN.get(entry.block_id)
            data = frame.payload[pos : pos + entry.nbytes]
            pos += entry.nbytes
            if block is None or entry.block_id in seen or len(data) != entry.nbytes:
                return False
            codec = codec_for_name(block.dtype)
            if entry.dtype != codec.wire or entry.nbytes != block.nbytes:
                return False
            seen.add(entry.block_id)
            if not bool(torch.isfinite(torch.frombuffer(bytearray(data), dtype=codec.torch_dtype)).all()):
                return False
        if pos != len(frame.payload):
            return False
    return True


def valid_exchange(method: str, messages: Sequence[bytes]) -> bool:
    """Whether a correct shard must apply a push of the registered worker from this Exchange stream.

    Written from the wire contract, independently of ranger_ps.wire.runs and the shard's checks: an
    exchange is the frames up to one with ``more`` false; it pushes when its clock is not 0. Conservative:
    any such exchange in the stream whose frames all belong to the registered worker and whose runs
    are well-formed (ids ascending, owned, once each, the blocks' own types, sizes adding up, finite)
    counts, even one a failed earlier exchange would keep the shard from reading.
    """
    if method != "Exchange":
        return False
    try:
        stream = [pb.Frame.FromString(m) for m in messages]
    except DecodeError:
        return False
    exchange: list[pb.Frame] = []
    for frame in stream:
        exchange.append(frame)
        if frame.header.exchange.more:
            continue
        if _pushes(exchange):
            return True
        exchange = []
    return False


def _pushes(frames: Sequence[pb.Frame]) -> bool:
    if not frames[-1].header.exchange.clock:
        return False
    seen: set[int] = set()
    for frame in frames:
        header = frame.header
        if not header.HasField("exchange") or header.exchange.worker_id != WORKER or header.exchange.shared:
            return False
        pos = 0
        for run in header.runs:
            if len(run.block_ids) % 4 or run.scales or run.versions:
                return False
            ids = [int.from_bytes(run.block_ids[i : i + 4], "little") for i in range(0, len(run.block_ids), 4)]
            if not ids or ids != sorted(set(ids)) or seen & set(ids) or any(b not in _OWN for b in ids):
                return False
            seen |= set(ids)
            codecs = {codec_for_name(_OWN[b].dtype) for b in ids}
            if len(codecs) != 1 or run.dtype != next(iter(codecs)).wire:
                return False
            codec = next(iter(codecs))
            if run.nbytes != sum(_OWN[b].numel for b in ids) * codec.itemsize:
                return False
            data = frame.payload[pos : pos + run.nbytes]
            pos += run.nbytes
            if len(data) != run.nbytes:
                return False
            if not bool(torch.isfinite(torch.frombuffer(bytearray(data), dtype=codec.torch_dtype)).all()):
                return False
        if pos != len(frame.payload):
            return False
    return True


def replica_accepts(messages: Sequence[bytes]) -> bool:
    """What the library's own checks (frame decoding, ShardStore.decode) say about the same push."""
    first: pb.PushHeader | None = None
    blocks = []
    try:
        for message in messages:
            header, payload = decode_frame(message)
            if first is None:
                if not header.HasField("push"):
                    return False
                first = header.push
            blocks.extend(split_blocks(header, payload))
        if first is None or first.worker_id != WORKER:
            return False
        _REPLICA.decode(blocks)
    except (WireFormatError, RequestError, ValueError):
        return False
    return True


# -- strategies --------------------------------------------------------------------------------------

int64 = st.integers(-(2**63), 2**63 - 1)
uint64 = st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1))
uint32 = st.one_of(st.integers(0, 16), st.integers(0, 2**32 - 1))
worker_ids = st.one_of(st.sampled_from([-2, -1, 0, 1, 2]), int64).filter(lambda w: w != WORKER)
wire_dtypes = st.one_of(st.sampled_from(sorted(pb.DType.values())), st.integers(-(2**31), 2**31 - 1))
block_ids = st.one_of(st.sampled_from(range(LAYOUT.num_blocks + 1)), uint32)
nbytes = st.one_of(st.sampled_from(sorted({b.nbytes for b in LAYOUT.blocks})), uint64)


@st.composite
def unknown_fields(draw: st.DrawFn) -> bytes:
    """Well-formed protobuf fields with random numbers and wire types (unknown to most messages)."""
    out = bytearray()
    for _ in range(draw(st.integers(0, 3))):
        number = draw(st.one_of(st.integers(1, 40), st.integers(1, 2**29 - 1)))
        kind = draw(st.sampled_from([0, 1, 2, 5]))
        out += _varint(number << 3 | kind)
        if kind == 0:
            out += _varint(draw(st.integers(0, 2**64 - 1)))
        elif kind == 1:
            out += draw(st.binary(min_size=8, max_size=8))
        elif kind == 5:
            out += draw(st.binary(min_size=4, max_size=4))
        else:
            value = draw(st.binary(max_size=24))
            out += _varint(len(value)) + value
    return bytes(out)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


msgpack_ints = st.integers(-(2**63), 2**64 - 1)  # what msgpack can encode
rule_blobs = st.one_of(
    st.just(RULE.to_msgpack()),
    st.binary(max_size=40),
    st.dictionaries(
        st.sampled_from(["name", "lr", "momentum", "betas", "k", "eps", "clip_norm", "nesterov", "bogus"]),
        st.one_of(st.none(), st.booleans(), msgpack_ints, st.floats(), st.text(max_size=6), st.lists(st.floats())),
        max_size=4,
    ).map(lambda d: msgpack.packb(d, use_bin_type=True)),
    st.lists(msgpack_ints, max_size=3).map(msgpack.packb),
)

layouts = st.builds(
    pb.LayoutSpec,
    params=st.lists(
        st.builds(
            pb.ParamSpec,
            name=st.sampled_from([p.name for p in LAYOUT.params]) | st.text(max_size=6),
            shape=st.lists(st.one_of(st.integers(0, 50), uint64), max_size=3),
            dtype=wire_dtypes,
        ),
        max_size=3,
    ),
    block_size=st.one_of(st.just(LAYOUT.block_size), uint64),
    fingerprint=st.one_of(st.just(""), st.just(LAYOUT.fingerprint), st.text(max_size=20)),
)
# the real layout with one thing changed: each draw differs from it somewhere, so it never matches
near_layouts = st.builds(
    lambda spec, size: pb.LayoutSpec(params=spec.params, block_size=size, fingerprint=""),
    st.just(layout_to_proto(LAYOUT)),
    st.integers(1, 2**22).filter(lambda n: n != LAYOUT.block_size),
)

register_requests = st.builds(
    pb.RegisterRequest,
    worker_id=worker_ids,
    layout=layouts | near_layouts,
    rule=st.builds(pb.RuleSpec, msgpack=rule_blobs),
    expected_shard_id=st.one_of(st.just(0), uint32),
    expected_num_shards=st.one_of(st.just(1), uint32),
    observer=st.booleans(),
    consistency=st.one_of(st.sampled_from(["", "async", "bsp", "ssp:2", "ssp:-1", "ssp:x", "nope"]), st.text()),
)

frame_headers = st.builds(
    pb.FrameHeader,
    blocks=st.lists(
        st.builds(pb.BlockEntry, block_id=block_ids, version=uint64, dtype=wire_dtypes, nbytes=nbytes), max_size=4
    ),
    push=st.one_of(st.none(), st.builds(pb.PushHeader, worker_id=worker_ids, clock=uint64)),
    init=st.one_of(st.none(), st.builds(pb.InitHeader, worker_id=worker_ids)),
)
frames = st.builds(
    lambda header, payload: pb.Frame(header=header, payload=payload).SerializeToString(),
    frame_headers,
    st.one_of(st.binary(max_size=96), st.sampled_from([bytes(wire(b).data) for b in range(LAYOUT.num_blocks)])),
)

Action = tuple[str, list[bytes]]


def _one(method: str, message: object) -> Action:
    assert hasattr(message, "SerializeToString")
    return method, [message.SerializeToString()]


def _with_unknown(action: Action, extra: bytes) -> Action:
    method, messages = action
    return (method, [messages[0] + extra, *messages[1:]]) if messages else (method, [extra])


well_formed: st.SearchStrategy[Action] = st.one_of(
    register_requests.map(lambda m: _one("Register", m)),
    st.builds(pb.PullRequest, worker_id=worker_ids, known_versions=st.lists(uint64, max_size=12)).map(
        lambda m: _one("Pull", m)
    ),
    st.builds(pb.HeartbeatRequest, worker_id=worker_ids).map(lambda m: _one("Heartbeat", m)),
    st.builds(pb.LeaveRequest, worker_id=worker_ids).map(lambda m: _one("Leave", m)),
    st.just(("Stats", [pb.StatsRequest().SerializeToString()])),
    st.tuples(st.sampled_from(["Push", "Init"]), st.lists(frames, max_size=3)).map(lambda a: (a[0], list(a[1]))),
)
well_formed_with_unknown_fields = st.builds(_with_unknown, well_formed, unknown_fields())

random_bytes: st.SearchStrategy[Action] = st.tuples(
    st.sampled_from(METHODS), st.lists(st.binary(max_size=256), min_size=1, max_size=3)
).map(lambda a: (a[0], list(a[1])))


def _base_pushes() -> list[list[bytes]]:
    """Valid pushes to mutate: the registered worker's (filtered if still valid), a stranger's, a NaN one."""
    blocks = [wire(b, 0.25) for b in range(LAYOUT.num_blocks)]
    nan = wire(1, [float("nan")] + [0.0] * (LAYOUT.blocks[1].numel - 1))
    return [
        push_frames(WORKER, 1, blocks),
        push_frames(WORKER, 7, blocks, chunk_bytes=64),  # several frames
        push_frames(987_654_321, 1, blocks),
        push_frames(WORKER, 1, [blocks[0], nan, blocks[5]]),
    ]


BASES = _base_pushes()


def _base_exchanges() -> list[list[bytes]]:
    """Valid exchanges to mutate, as :func:`_base_pushes`, and a pull of the registered worker."""
    ids = list(range(LAYOUT.num_blocks))
    nan = [float("nan")] + [0.0] * (LAYOUT.blocks[1].numel - 1)
    return [
        exchange_frames(WORKER, 1, ids, [0.25] * len(ids)),
        exchange_frames(WORKER, 7, ids, [0.25] * len(ids), chunk_bytes=64),  # several frames
        exchange_frames(987_654_321, 1, ids),
        exchange_frames(WORKER, 1, [0, 1, 5], [0.25, nan, 0.25]),
        exchange_frames(WORKER, 0, []),
    ]


EXCHANGES = _base_exchanges()


@st.composite
def mutated_pushes(draw: st.DrawFn, exchanges: bool = False) -> Action:
    """A valid Push stream (or Exchange stream) mutated, sent mostly to its own method."""
    bases = EXCHANGES if exchanges else BASES
    stream = [bytearray(f) for f in draw(st.sampled_from(bases))]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["truncate", "flip", "insert", "delete", "drop", "repeat", "swap", "splice"]))
        i = draw(st.integers(0, len(stream) - 1)) if stream else 0
        at = draw(st.integers(0, 10**6))
        if not stream:
            break
        frame = stream[i]
        pos = at % (len(frame) + 1)
        if op == "truncate":
            del frame[pos:]
        elif op == "flip" and frame:
            frame[pos % len(frame)] ^= draw(st.integers(1, 255))
        elif op == "insert":
            frame[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del frame[pos : pos + draw(st.integers(1, 8))]
        elif op == "drop" and len(stream) > 1:
            del stream[i]
        elif op == "repeat":
            stream.insert(i, bytearray(frame))
        elif op == "swap" and len(stream) > 1:
            stream[0], stream[i] = stream[i], stream[0]
        elif op == "splice":
            other = draw(st.sampled_from(bases))[0]
            frame[pos:] = other[at % (len(other) + 1) :]
    main = "Exchange" if exchanges else "Push"
    method = draw(st.sampled_from([main] * 6 + ["Init", "Pull", "Register", "Stats", "Push", "Exchange"]))
    return method, [bytes(f) for f in stream]


actions: st.SearchStrategy[Action] = st.one_of(
    random_bytes, well_formed, well_formed_with_unknown_fields, mutated_pushes(), mutated_pushes(exchanges=True)
)


def send(raw: RawShard, method: str, messages: Sequence[bytes]) -> grpc.StatusCode:
    """Send one call (a stream method gets every message; a unary one the first, or empty bytes)."""
    request: bytes | list[bytes] = list(messages) if method in CLIENT_STREAMING else (messages[0] if messages else b"")
    try:
        raw.call(method, request, timeout=CALL_TIMEOUT)
    except grpc.RpcError as exc:
        code = exc.code()
        assert code in REFUSALS, f"{method}: {code} {exc.details()!r}"
        assert exc.details(), f"{method}: {code} without a message"
        return code
    return grpc.StatusCode.OK


def test_random_and_mutated_messages_never_crash_the_server_or_move_the_weights(live: Live) -> None:
    @settings(
        max_examples=250,
        derandomize=True,
        database=None,
        deadline=None,
        # the server's state persists between examples: after a failure, shrinking would only replay it
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(actions)
    def attack(action: Action) -> None:
        method, messages = action
        valid = valid_push(method, messages) or valid_exchange(method, messages)
        # the library's own checks never accept what the contract forbids (they may be stricter: groups)
        assert valid or method != "Push" or not replica_accepts(messages), "ShardStore.decode accepts a bad push"
        if valid:
            event("skipped: a valid push of the registered worker")
            return
        note(f"{method} {[m[:64] for m in messages]!r}")
        code = send(live.raw, method, messages)
        event(f"{method}: {code.name}")
        assert not (method == "Push" and code == grpc.StatusCode.OK), "the shard accepted a push"
        assert live.raw.stats().pushes_applied == 0, "the shard accepted a push"
        assert live.raw.weights(WORKER) == live.raw_weights, "the weights moved"

    attack()
    # after every example: serving, alive, and exactly the recorded weights for a fresh client
    assert live.raw.health() == health_pb2.HealthCheckResponse.SERVING
    assert live.server.alive()
    stats = live.raw.stats()
    assert (
        (stats.pushes_applied, stats.blocks_applied, stats.version_sum)
        == (
            live.stats.pushes_applied,
            live.stats.blocks_applied,
            live.stats.version_sum,
        )
        == (0, 0, LAYOUT.num_blocks)
    )
    with ShardedClient([live.server.address], connect_timeout=10) as fresh:
        fresh.register(LAYOUT, RULE, [torch.zeros_like(t) for t in INITIAL], observer=True)
        for got, want in zip(pull_into(fresh), live.weights, strict=True):
            assert torch.equal(got, want)


def _reflected_methods(raw: RawShard) -> set[str]:
    """The ParameterServer's methods as the server's own reflection service describes them."""
    stub = reflection_pb2_grpc.ServerReflectionStub(raw.channel)
    request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME)
    (reply,) = stub.ServerReflectionInfo(iter([request]), timeout=10)
    names = set()
    for blob in reply.file_descriptor_response.file_descriptor_proto:
        file = descriptor_pb2.FileDescriptorProto.FromString(blob)
        for service in file.service:
            if f"{file.package}.{service.name}" == SERVICE_NAME:
                names |= {m.name for m in service.method}
    return names


GARBAGE: list[bytes] = [
    b"\xff\xff\xff\xff\x0f garbage",
    b"\x00",
    b"\x80",  # a truncated varint
    b"\x07",  # wire type 7 does not exist
    b"\x0b\x0b\x0b",  # groups that never end
    b"\x0a\xff\xff\xff\xff\x0f",  # a length past the end
    b"\x0a" * 4096,
    b"\x00" + random.Random(0).randbytes(4096),
    b"\x0f" + random.Random(1).randbytes(64 << 10),
]


def test_garbage_bytes_to_every_method_get_invalid_argument(live: Live) -> None:
    methods = list(_SERVICE.methods)
    assert {m.name for m in methods} == _reflected_methods(live.raw) == set(METHODS)
    for method in methods:
        path = f"/{_SERVICE.full_name}/{method.name}"
        for garbage in GARBAGE:
            streams = [[garbage], [garbage, garbage]] if method.client_streaming else [[garbage]]
            for messages in streams:
                with pytest.raises(grpc.RpcError) as info:
                    if method.client_streaming:
                        live.raw.channel.stream_unary(path)(iter(messages), timeout=CALL_TIMEOUT)
                    elif method.server_streaming:
                        list(live.raw.channel.unary_stream(path)(garbage, timeout=CALL_TIMEOUT))
                    else:
                        live.raw.channel.unary_unary(path)(garbage, timeout=CALL_TIMEOUT)
                error = info.value
                assert error.code() not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (method.name, error)
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method.name, garbage[:16], error)
                assert error.details(), method.name
    assert live.raw.health() == health_pb2.HealthCheckResponse.SERVING
    assert live.server.alive()
    assert live.raw.weights(WORKER) == live.raw_weights
