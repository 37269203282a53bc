"""The gRPC face of a shard: parse bytes, call :class:`~ranger_ps.server.shard.Shard`, answer.

Only translation lives here. Methods receive raw bytes (identity serializers) and parse them
explicitly, so malformed input is answered with INVALID_ARGUMENT and a message instead of a
decode traceback; every refusal the shard raises maps to its own status code.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import torch
from google.protobuf.message import DecodeError, Message

from ranger_ps.algorithm.rules import RuleConfig
from ranger_ps.errors import WireFormatError
from ranger_ps.server.shard import Shard
from ranger_ps.server.store import PulledRun
from ranger_ps.wire._proto import ranger_ps_pb2 as pb
from ranger_ps.wire.codec import codec_for_torch
from ranger_ps.wire.frames import WireBlock, chunk_frames, decode_frame, split_blocks
from ranger_ps.wire.messages import layout_from_proto
from ranger_ps.wire.rpc import ERROR_METADATA_KEY, SERVICE_NAME
from ranger_ps.wire.runs import WireRun, decode_runs, encode_exchange, encode_shared
from ranger_ps.wire.shared import SharedSegment
from ranger_ps.wire.status import Exhausted, InvalidRequest, NotReady, NotRegistered, RequestError

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)


def _parse(message_type: type[M], data: bytes) -> M:
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        raise InvalidRequest(f"request does not parse as {message_type.DESCRIPTOR.full_name}: {exc}") from None


async def _abort(context: grpc.aio.ServicerContext, exc: RequestError | WireFormatError) -> None:
    """Answer a refusal with its own status (bytes that do not parse: INVALID_ARGUMENT).

    Nothing else is caught here: an unexpected exception is a bug, and gRPC answers it with UNKNOWN
    and logs its traceback instead of passing it off as the client's fault.
    """
    if isinstance(exc, NotRegistered):
        await context.abort(
            grpc.StatusCode[exc.status], str(exc), trailing_metadata=((ERROR_METADATA_KEY, NotRegistered.marker),)
        )
    if isinstance(exc, RequestError):
        await context.abort(grpc.StatusCode[exc.status], str(exc))
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


def _translating(
    handler: Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[bytes]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[bytes]]:
    """Turn the shard's refusals and wire errors into gRPC statuses for a unary-reply method."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> bytes:
        try:
            return await handler(self, request, context)
        except (RequestError, WireFormatError) as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable") from exc

    return wrapper


async def _read_frames(
    requests: AsyncIterator[bytes], shard: Shard, header_field: str
) -> tuple[Message, list[WireBlock]]:
    """Read a client stream of frames; the first must carry the ``header_field`` header.

    Checked frame by frame: a push's sender must be a live worker with its secret before anything
    more is read, and a stream may carry at most :meth:`Shard.stream_limit` bytes.
    """
    first: Message | None = None
    blocks: list[WireBlock] = []
    received = 0
    async for message in requests:
        shard.bytes_received += len(message)
        received += len(message)
        header, payload = decode_frame(message)
        if first is None:
            if not header.HasField(header_field):
                raise InvalidRequest(f"the first frame of the stream must carry a {header_field} header")
            first = getattr(header, header_field)
            if header_field == "push":
                shard.authenticate(header.push.worker_id, header.push.secret)
            limit = shard.stream_limit()
        if received > limit:
            raise Exhausted(f"a {header_field} stream may carry at most {limit} bytes on this shard")
        blocks.extend(split_blocks(header, payload))
    if first is None:
        raise InvalidRequest("empty stream: expected at least one frame")
    return first, blocks


def _check_layout_size(spec: pb.LayoutSpec, max_blocks: int) -> None:
    """Refuse a layout with more blocks than allowed before anything is built from it."""
    if spec.block_size <= 0:
        return  # layout_from_proto names the problem
    blocks = 0
    for param in spec.params:
        numel = math.prod(param.shape)
        blocks += max(1, -(-numel // spec.block_size))
        if blocks > max_blocks:
            raise InvalidRequest(
                f"bad layout: more than {max_blocks} blocks (the server's --max-blocks); use a larger block size"
            )


def _known_versions(data: bytes) -> torch.Tensor | None:
    """The versions a worker says it holds (little-endian uint64 each), or None when it holds none."""
    if not data:
        return None
    if len(data) % 8:
        raise InvalidRequest(f"known versions take 8 bytes each, got {len(data)} bytes")
    return torch.frombuffer(bytearray(data), dtype=torch.int64)


def _wire_run(run: PulledRun) -> WireRun:
    return WireRun(codec_for_torch(run.values.dtype).wire, run.block_ids, run.values, run.versions)


class ParameterServerServicer:
    """Routes the ``ranger_ps.v1.ParameterServer`` methods to a shard."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self._shared: dict[int, SharedSegment] = {}  # worker id -> the shared memory it offered
        self._streams: dict[int, object] = {}  # worker id -> its newest Exchange stream

    def close(self) -> None:
        """Let go of every worker's shared memory."""
        for segment in self._shared.values():
            segment.close()
        self._shared.clear()

    @_translating
    async def Register(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        req = _parse(pb.RegisterRequest, request)
        _check_layout_size(req.layout, self.shard.settings.max_blocks)
        try:
            layout = layout_from_proto(req.layout)
        except ValueError as exc:
            raise InvalidRequest(f"bad layout: {exc}") from None
        try:
            rule = RuleConfig.from_msgpack(req.rule.msgpack)
        except ValueError as exc:
            raise InvalidRequest(f"bad rule settings: {exc}") from None
        result = await self.shard.register(
            req.worker_id,
            layout,
            rule,
            req.expected_shard_id,
            req.expected_num_shards,
            observer=req.observer,
            consistency=req.consistency,
            identity=req.identity,
            secret=req.secret,
        )
        reply = pb.RegisterReply(
            worker_id=result.worker_id,
            shard_id=self.shard.shard_id,
            num_shards=self.shard.num_shards,
            must_initialize=result.must_initialize,
            block_ids=result.block_ids,
            clock=result.clock,
            lease_seconds=self.shard.membership.lease_seconds,
            consistency=str(self.shard.mode),
            exchange=True,
            shared_memory=req.HasField("shared_memory") and self._attach(result.worker_id, req.shared_memory),
            pushed_clock=result.pushed_clock,
            secret=result.secret,
        )
        return reply.SerializeToString()

    def _attach(self, worker_id: int, offer: pb.SharedMemoryOffer) -> bool:
        """Open a worker's shared-memory offer; False (and bytes travel in frames) where it cannot be had."""
        self._prune_shared()
        if not self.shard.settings.shared_memory:
            return False
        try:
            segment = SharedSegment.attach(offer.path, offer.nonce, offer.request_bytes, offer.reply_bytes)
        except (OSError, ValueError) as exc:
            log.info("worker %d's shared memory declined: %s", worker_id, exc)
            return False
        old = self._shared.pop(worker_id, None)
        if old is not None:
            old.close()
        self._shared[worker_id] = segment
        return True

    def _prune_shared(self) -> None:
        """Let go of the shared memory of workers the shard no longer knows (left, or lease expired)."""
        for worker_id in [w for w in self._shared if self.shard.membership.get(w) is None]:
            self._shared.pop(worker_id).close()

    @_translating
    async def Init(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        header, blocks = await _read_frames(requests, self.shard, "init")
        assert isinstance(header, pb.InitHeader)
        count = await self.shard.initialize(header.worker_id, blocks, header.secret)
        return pb.InitReply(blocks_initialized=count).SerializeToString()

    @_translating
    async def Push(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
        header, blocks = await _read_frames(requests, self.shard, "push")
        assert isinstance(header, pb.PushHeader)
        applied, version_sum = await self.shard.push(header.worker_id, header.clock, blocks, header.secret)
        return pb.PushReply(blocks_applied=applied, version_sum=version_sum).SerializeToString()

    async def Pull(self, request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            if len(request) > self.shard.pull_request_limit():
                raise InvalidRequest(
                    f"a pull request of {len(request)} bytes: more known versions than this shard has blocks"
                )
            req = _parse(pb.PullRequest, request)
            blocks = await self.shard.pull(req.worker_id, list(req.known_versions), req.secret)
            frames = chunk_frames(blocks, always_one=True)
            for frame in frames:
                self.shard.bytes_sent += len(frame)
                yield frame
        except (RequestError, WireFormatError) as exc:
            await _abort(context, exc)

    async def Exchange(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """Pushes and pulls on one stream: frames until ``more`` is false, then the answer (see the contract)."""
        stream = object()  # this stream's identity: only a worker's newest stream writes its shared memory
        worker_id: int | None = None
        sent: torch.Tensor | None = None
        runs: list[WireRun] = []
        received = 0  # bytes of the exchange being read
        try:
            async for message in requests:
                self.shard.bytes_received += len(message)
                header, payload = decode_frame(message)
                if not header.HasField("exchange"):
                    raise InvalidRequest("every Exchange frame must carry an exchange header")
                exchange = header.exchange
                if worker_id is None:
                    self.shard.authenticate(exchange.worker_id, exchange.secret)  # before it takes anything over
                    worker_id = exchange.worker_id
                    self._streams[worker_id] = stream
                elif exchange.worker_id != worker_id:
                    raise InvalidRequest(
                        f"a stream of worker {worker_id} carries a frame of worker {exchange.worker_id}"
                    )
                if exchange.known_versions or sent is None:
                    sent = self.shard.cursor(_known_versions(exchange.known_versions))
                received += len(message)
                if received > self.shard.stream_limit():
                    raise Exhausted(f"an exchange may carry at most {self.shard.stream_limit()} bytes on this shard")
                segment = self._shared.get(worker_id)
                if exchange.shared and segment is None:  # e.g. this server restarted: agree on it again
                    raise NotRegistered(
                        f"worker {worker_id} has no shared memory on shard {self.shard.shard_id}: register again"
                    )
                runs.extend(decode_runs(header, payload, segment.request if segment is not None else None))
                if exchange.more:
                    continue
                pushed = runs
                runs = []
                received = 0
                secret = exchange.secret
                applied, version_sum = (
                    await self.shard.push_runs(worker_id, exchange.clock, pushed, secret) if exchange.clock else (0, 0)
                )
                pulled = [] if exchange.no_pull else await self.shard.pull_changed(worker_id, sent, secret)
                answer = pb.ExchangeHeader(worker_id=worker_id, blocks_applied=applied, version_sum=version_sum)
                if exchange.shared:
                    if self._streams.get(worker_id) is not stream or segment is not self._shared.get(worker_id):
                        raise NotReady("a newer stream of this worker took over its shared memory")
                    assert segment is not None
                    frames = [encode_shared(answer, [_wire_run(r) for r in pulled], segment.reply)]
                else:
                    frames = encode_exchange(answer, [_wire_run(r) for r in pulled], [r.lengths for r in pulled])
                for frame in frames:
                    self.shard.bytes_sent += len(frame)
                    yield frame
        except (RequestError, WireFormatError) as exc:
            await _abort(context, exc)
        finally:
            if worker_id is not None and self._streams.get(worker_id) is stream:
                del self._streams[worker_id]

    @_translating
    async def Heartbeat(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        req = _parse(pb.HeartbeatRequest, request)
        lease = await self.shard.heartbeat(req.worker_id, req.secret)
        return pb.HeartbeatReply(lease_seconds=lease).SerializeToString()

    @_translating
    async def Leave(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        req = _parse(pb.LeaveRequest, request)
        await self.shard.leave(req.worker_id, req.secret)
        segment = self._shared.pop(req.worker_id, None)
        if segment is not None:
            segment.close()
        return pb.LeaveReply().SerializeToString()

    @_translating
    async def Stats(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        _parse(pb.StatsRequest, request)
        return self.shard.stats().to_proto().SerializeToString()

    def generic_handler(self) -> grpc.GenericRpcHandler:
        """The handler to add to a ``grpc.aio`` server (identity serializers throughout)."""
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                "Register": grpc.unary_unary_rpc_method_handler(self.Register),
                "Init": grpc.stream_unary_rpc_method_handler(self.Init),
                "Push": grpc.stream_unary_rpc_method_handler(self.Push),
                "Pull": grpc.unary_stream_rpc_method_handler(self.Pull),
                "Exchange": grpc.stream_stream_rpc_method_handler(self.Exchange),
                "Stats": grpc.unary_unary_rpc_method_handler(self.Stats),
                "Heartbeat": grpc.unary_unary_rpc_method_handler(self.Heartbeat),
                "Leave": grpc.unary_unary_rpc_method_handler(self.Leave),
            },
        )
