"""The worker's side of the wire: one client that talks to every shard concurrently.

All network I/O runs on an event loop in a background thread, so a training loop can start a
push and a pull and go on computing; ``push`` and ``pull`` return futures (handles), and waiting
is a separate step. Bytes are copied once on the way out (when frames are encoded, inside
``push``, so the caller may reuse its gradient buffers as soon as ``push`` returns) and not at all
on the way in (pulled blocks are tensors over the received messages).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import torch

from ranger_ps.algorithm.blocks import runs as runs_index
from ranger_ps.algorithm.layout import Layout
from ranger_ps.algorithm.placement import Placement
from ranger_ps.algorithm.rules import RuleConfig
from ranger_ps.client.backend import OutgoingBlock, PulledBlock, Run
from ranger_ps.client.retry import Attempts, transient
from ranger_ps.errors import (
    ClusterError,
    LayoutMismatchError,
    ServerUnavailableError,
    UserError,
    WireFormatError,
)
from ranger_ps.wire._proto import ranger_ps_pb2 as pb
from ranger_ps.wire.allocator import tune_allocator
from ranger_ps.wire.codec import bytes_to_tensor, codec_for_name, codec_for_torch, tensor_bytes
from ranger_ps.wire.frames import (
    DEFAULT_CHUNK_BYTES,
    WireBlock,
    chunk_frames,
    decode_frame,
    encode_frame,
    split_blocks,
)
from ranger_ps.wire.loop import LoopThread
from ranger_ps.wire.messages import layout_to_proto
from ranger_ps.wire.pushes import group_by_shard, push_header, push_wire_bytes
from ranger_ps.wire.rpc import CHANNEL_OPTIONS, ERROR_METADATA_KEY, describe_rpc_error, method_path
from ranger_ps.wire.runs import WireRun, decode_runs, encode_exchange, encode_shared, exchange_wire_bytes
from ranger_ps.wire.security import ClientSecurity
from ranger_ps.wire.shared import SharedSegment, create_or_none
from ranger_ps.wire.stats import ShardStats

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class PushResult:
    """What the shards acknowledged for one push."""

    blocks_applied: int
    bytes_sent: int


def _marker(exc: grpc.aio.AioRpcError) -> str | None:
    """The ``ranger-ps-error`` trailing metadata of a refusal, if any."""
    for key, value in exc.trailing_metadata() or ():
        if key == ERROR_METADATA_KEY:
            return str(value)
    return None


def _lost(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """A stream failure the retry policy treats as the status ``code`` would be."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


async def _ended(call: Any) -> grpc.aio.AioRpcError:
    """The status a finished stream call ended with, as the error its caller would have got."""
    code = await call.code()
    if code == grpc.StatusCode.OK:
        return _lost(grpc.StatusCode.UNAVAILABLE, "the shard ended the exchange stream without answering")
    return grpc.aio.AioRpcError(
        code, await call.initial_metadata(), await call.trailing_metadata(), details=await call.details()
    )


def is_local_address(address: str) -> bool:
    """Whether ``HOST:PORT`` names this host (loopback, or one of this host's own names and addresses)."""
    host = address.rsplit(":", 1)[0].strip("[]")
    if host in ("localhost", socket.gethostname()):
        return True
    try:
        if ipaddress.ip_address(host).is_loopback:
            return True
    except ValueError:
        pass
    try:
        own = set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        return False
    return host in own


def _wire_block(block: OutgoingBlock) -> WireBlock:
    return WireBlock(
        block.block_id, 0, codec_for_torch(block.payload.dtype).wire, tensor_bytes(block.payload), block.scale
    )


class _Shard:
    """One shard's channel and bookkeeping (used only on the I/O thread)."""

    def __init__(self, index: int, address: str, security: ClientSecurity) -> None:
        self.index = index
        self.address = address
        self.channel = security.channel(address, CHANNEL_OPTIONS)
        self.register = self.channel.unary_unary(method_path("Register"))
        self.init = self.channel.stream_unary(method_path("Init"))
        self.push = self.channel.stream_unary(method_path("Push"))
        self.pull = self.channel.unary_stream(method_path("Pull"))
        self.stats = self.channel.unary_unary(method_path("Stats"))
        self.heartbeat = self.channel.unary_unary(method_path("Heartbeat"))
        self.leave = self.channel.unary_unary(method_path("Leave"))
        self.exchange = self.channel.stream_stream(method_path("Exchange"))
        self.block_ids: tuple[int, ...] = ()
        self.secret = b""  # what every call of this registration carries
        self.clock = 0  # the clock of this worker's last push to this shard (its next push carries clock + 1)
        self.known: list[int] = []  # Push/Pull path: versions held, aligned with block_ids
        self.known_versions = torch.zeros(0, dtype=torch.int64)  # Exchange path: the same, as a tensor
        self.serves_exchange = False
        self.segment: SharedSegment | None = None  # same-host shared memory, when the shard took the offer
        self.stream: Any = None  # the open Exchange call

    def drop_stream(self) -> None:
        """Forget the open Exchange stream (cancelled: the shard sees the worker's next one)."""
        if self.stream is not None:
            self.stream.cancel()
            self.stream = None

    def drop_segment(self) -> None:
        if self.segment is not None:
            self.segment.close()
            self.segment = None


@dataclass
class _PushPart:
    """One shard's part of a v1 push: its blocks, its clock (0 once found applied) and its frames."""

    wire: list[WireBlock]
    clock: int
    frames: list[bytes] = field(default_factory=list)


@dataclass
class ExchangeRequest:
    """One shard's part of an exchange: its runs, and their encoding for the shard's shared memory as it
    was (frames, or one frame whose bytes are in ``segment``); encoded again if a re-registration
    changed the shared memory before a retry."""

    header: pb.ExchangeHeader
    pieces: list[tuple[WireRun, torch.Tensor]]
    chunk_bytes: int
    frames: list[bytes] = field(default_factory=list)
    shared_bytes: int = 0
    segment: SharedSegment | None = None

    def encode(self, segment: SharedSegment | None) -> None:
        """Encode for ``segment`` (None: bytes in the frames, as for a segment too small to hold them)."""
        wire = [r for r, _ in self.pieces]
        moved = sum(r.nbytes for r in wire)
        if segment is not None and moved <= segment.request_bytes:
            self.frames = [encode_shared(self.header, wire, segment.request)]
            self.shared_bytes = moved
        else:
            self.frames = encode_exchange(self.header, wire, [n for _, n in self.pieces], chunk_bytes=self.chunk_bytes)
            self.shared_bytes = 0
        self.segment = segment


@dataclass(frozen=True)
class ExchangeResult:
    """What an exchange brought back from every shard: blocks applied, and the blocks that changed.

    ``pulled`` values view the received messages or the shared regions: land them before the next
    exchange.
    """

    blocks_applied: int
    pulled: list[Run]


class ShardedClient:
    """Registers with every shard, pushes gradients of chosen blocks and pulls fresh blocks.

    Args:
        servers: ``HOST:PORT`` of each shard, in shard order.
        connect_timeout: how long registration keeps retrying unreachable servers (seconds).
        retry_timeout: how long a push or pull keeps retrying a shard that went away (seconds).
        call_timeout: deadline of each push, pull and stats call (seconds).
        chunk_bytes: payload size of streamed frames.
        use_uvloop: run the I/O loop on uvloop.
        security: token and TLS settings (default: plaintext, no token).
        use_exchange: push and pull in one round trip on a stream per shard where the shard serves it.
        shared_memory: offer same-host shards shared memory for the exchanges' bytes.
    """

    def __init__(
        self,
        servers: Sequence[str],
        *,
        connect_timeout: float = 30.0,
        retry_timeout: float = 60.0,
        call_timeout: float = 120.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        use_uvloop: bool = True,
        security: ClientSecurity | None = None,
        use_exchange: bool = True,
        shared_memory: bool = True,
    ) -> None:
        if not servers:
            raise UserError("at least one server address is needed")
        tune_allocator()  # frame buffers reuse memory instead of faulting fresh pages in
        self.servers = list(servers)
        self.connect_timeout = connect_timeout
        self.retry_timeout = retry_timeout
        self.call_timeout = call_timeout
        self.chunk_bytes = chunk_bytes
        self.security = security or ClientSecurity()
        self._md = self.security.metadata  # the token rides on every call
        self._io = LoopThread(use_uvloop=use_uvloop)
        self._shards: list[_Shard] = self._io.run(self._open())
        self.layout: Layout | None = None
        self.placement: Placement | None = None
        self.worker_id: int | None = None
        self.observer = False
        self.start_clock = 0
        self.lease_seconds = 0.0
        self.consistency = ""
        self.bytes_pushed = 0
        self.bytes_pulled = 0
        self._heartbeats: asyncio.Task[None] | None = None
        self._register_template: pb.RegisterRequest | None = None
        self._live_values: Sequence[torch.Tensor] = ()
        self.use_exchange = use_exchange
        self.use_shared_memory = shared_memory
        self.push_dtype: str | None = None
        self._shard_of = torch.zeros(0, dtype=torch.int64)
        self._position = torch.zeros(0, dtype=torch.int64)  # block id -> its position in its shard
        self._lengths = torch.zeros(0, dtype=torch.int64)  # block id -> elements
        self._wire_dtype = torch.zeros(0, dtype=torch.int64)  # block id -> its wire dtype

    async def _open(self) -> list[_Shard]:
        return [_Shard(i, address, self.security) for i, address in enumerate(self.servers)]

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        """Leave the cluster (a training worker stops counting for barriers at once), close the channels."""
        if self._io.loop.is_closed():
            return

        async def _close() -> None:
            if self._heartbeats is not None:
                self._heartbeats.cancel()
            if self.worker_id is not None and not self.observer:
                worker_id = self.worker_id
                results = await asyncio.gather(
                    *(
                        s.leave(
                            pb.LeaveRequest(worker_id=worker_id, secret=s.secret).SerializeToString(),
                            timeout=5,
                            metadata=self._md,
                        )
                        for s in self._shards
                    ),
                    return_exceptions=True,
                )
                for shard, result in zip(self._shards, results, strict=True):
                    if isinstance(result, Exception):
                        log.warning("leaving shard %d at %s failed: %s", shard.index, shard.address, result)
            for shard in self._shards:
                shard.drop_stream()
            await asyncio.gather(*(s.channel.close() for s in self._shards), return_exceptions=True)
            for shard in self._shards:
                shard.drop_segment()

        try:
            self._io.run(_close(), timeout=10)
        finally:
            self._io.close()

    def __enter__(self) -> ShardedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- registration -------------------------------------------------------------------------

    def register(
        self,
        layout: Layout,
        rule: RuleConfig,
        initial_values: Sequence[torch.Tensor],
        worker_id: int | None = None,
        *,
        observer: bool = False,
        consistency: str = "",
    ) -> int:
        """Register with every shard and initialize the shards that ask for it.

        Shard 0 assigns the worker id when ``worker_id`` is None; the other shards are then told
        that id. ``initial_values`` (one tensor per layout parameter) are sent only to shards that
        have not been initialized yet. An ``observer`` (an evaluator, a monitor) may pull but does
        not count as a training worker. ``consistency`` (e.g. ``"bsp"``) is checked against what
        the shards run; empty accepts theirs. Afterwards :attr:`start_clock` is the latest clock a shard
        gave this worker (each shard keeps its own: pushes without an explicit clock carry each
        shard's next), and a background task renews
        the worker's lease with heartbeats.

        Returns:
            The worker id.

        Raises:
            ServerUnavailableError: a server did not answer within ``connect_timeout``.
            LayoutMismatchError: a server holds another model or update rule.
        """
        flats = layout.flat_views([t.detach().to("cpu").contiguous() for t in initial_values])
        self._live_values = initial_values  # read again if a shard comes back empty and must be re-initialized
        self.layout = layout
        self.placement = Placement.compute(layout, len(self._shards))
        self.observer = observer
        self.push_dtype = rule.push_dtype
        self._shard_of = torch.tensor(self.placement.shard_of, dtype=torch.int64)
        self._lengths = torch.tensor([b.numel for b in layout.blocks], dtype=torch.int64)
        self._wire_dtype = torch.tensor([codec_for_name(b.dtype).wire for b in layout.blocks], dtype=torch.int64)
        self._position = torch.zeros(layout.num_blocks, dtype=torch.int64)
        for ids in self.placement.blocks_by_shard:
            self._position[list(ids)] = torch.arange(len(ids))
        self.worker_id = self._io.run(
            self._register_all(layout, rule, flats, -1 if worker_id is None else worker_id, observer, consistency)
        )
        log.info("worker %d registered; traffic per shard: %s", self.worker_id, ", ".join(self.transports))
        return self.worker_id

    async def _register_all(
        self,
        layout: Layout,
        rule: RuleConfig,
        flats: list[torch.Tensor],
        worker_id: int,
        observer: bool,
        consistency: str,
    ) -> int:
        request = pb.RegisterRequest(
            observer=observer,
            identity=True,
            consistency=consistency,
            layout=layout_to_proto(layout),
            rule=pb.RuleSpec(msgpack=rule.to_msgpack()),
            expected_num_shards=len(self._shards),
        )
        self._register_template = request
        deadline = time.monotonic() + self.connect_timeout
        first = await self._register_one(self._shards[0], request, worker_id, deadline)
        worker_id = first.worker_id
        rest = await asyncio.gather(*(self._register_one(s, request, worker_id, deadline) for s in self._shards[1:]))
        await asyncio.gather(
            *(
                self._initialize(shard, reply, flats)
                for shard, reply in zip(self._shards, [first, *rest], strict=True)
                if reply.must_initialize
            )
        )
        replies = [first, *rest]
        # Shards may disagree by a clock while pushes are in flight: start after the latest.
        self.start_clock = max(r.clock for r in replies)
        self.lease_seconds = min(r.lease_seconds for r in replies)
        self.consistency = first.consistency
        if self._heartbeats is None and self.lease_seconds > 0:
            self._heartbeats = asyncio.create_task(self._heartbeat_loop(worker_id, self.lease_seconds / 3))
        return worker_id

    async def _heartbeat_loop(self, worker_id: int, every: float) -> None:
        """Renew the lease while the caller computes (pushes and pulls renew it too)."""
        while True:
            await asyncio.sleep(every)
            for shard in self._shards:
                request = pb.HeartbeatRequest(worker_id=worker_id, secret=shard.secret).SerializeToString()
                try:
                    await shard.heartbeat(request, timeout=max(1.0, every), metadata=self._md)
                except grpc.aio.AioRpcError as exc:
                    log.warning(
                        "heartbeat to shard %d at %s failed: %s", shard.index, shard.address, describe_rpc_error(exc)
                    )

    async def _register_one(
        self, shard: _Shard, template: pb.RegisterRequest, worker_id: int, deadline: float
    ) -> pb.RegisterReply:
        request = pb.RegisterRequest()
        request.CopyFrom(template)
        request.worker_id = worker_id
        request.expected_shard_id = shard.index
        request.secret = shard.secret  # renews this process's own registration, if it is still live
        offer = self._offer(shard)
        if offer is not None:
            request.shared_memory.CopyFrom(
                pb.SharedMemoryOffer(
                    path=offer.path, nonce=offer.nonce, request_bytes=offer.request_bytes, reply_bytes=offer.reply_bytes
                )
            )
        payload = request.SerializeToString()
        attempts = Attempts(deadline - time.monotonic())
        while True:
            attempt = attempts.start()
            try:
                raw = await shard.register(payload, timeout=max(1.0, attempts.remaining) + 60.0, metadata=self._md)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.OK and offer is not None and not transient(exc):
                    offer.close()
                    offer.unlink()
                if exc.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    raise LayoutMismatchError(f"server {shard.address} refused registration: {exc.details()}") from None
                if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                    raise UserError(f"server {shard.address} refused registration: {exc.details()}") from None
                if not transient(exc):
                    raise UserError(f"server {shard.address} refused registration: {describe_rpc_error(exc)}") from None
                pause = attempts.next_pause()
                if pause is None:
                    raise ServerUnavailableError(
                        f"could not reach parameter server {shard.address} (shard {shard.index}) within "
                        f"{self.connect_timeout:g}s after {attempt} attempts: {exc.details()}"
                    ) from None
                log.warning(
                    "server %s (shard %d) not ready (attempt %d: %s); retrying in %.1fs",
                    shard.address, shard.index, attempt, exc.code().name, pause,
                )  # fmt: skip
                await attempts.pause()
        reply = pb.RegisterReply.FromString(raw)
        assert self.placement is not None
        expected = self.placement.blocks_by_shard[shard.index]
        if tuple(reply.block_ids) != expected:
            raise LayoutMismatchError(
                f"server {shard.address} holds blocks {list(reply.block_ids)[:5]}..., but this worker places "
                f"{list(expected)[:5]}... there: placement disagrees"
            )
        shard.block_ids = expected
        shard.secret = reply.secret
        shard.clock = reply.clock  # the shard's clock for this worker: pushes go on from there
        shard.known = [0] * len(expected)
        shard.known_versions = torch.zeros(len(expected), dtype=torch.int64)
        shard.serves_exchange = reply.exchange and self.use_exchange
        shard.drop_stream()  # a stream of the old registration would answer from an old cursor
        if offer is not None:
            offer.unlink()  # taken or not, the name goes: nothing is left behind, nobody else can open it
            if reply.shared_memory:
                shard.drop_segment()
                shard.segment = offer
            else:
                offer.close()
        return reply

    def _offer(self, shard: _Shard) -> SharedSegment | None:
        """A shared-memory segment to offer a shard on this host (None across hosts or when disabled)."""
        if not (self.use_shared_memory and self.use_exchange and is_local_address(shard.address)):
            return None
        assert self.layout is not None and self.placement is not None
        ids = list(self.placement.blocks_by_shard[shard.index])
        numel = int(self._lengths[ids].sum()) if ids else 0
        native = max((self.layout.blocks[b].itemsize for b in ids), default=1)
        pushed = codec_for_name(self.push_dtype).itemsize if self.push_dtype else native
        reply = sum(self.layout.blocks[b].nbytes for b in ids)
        return create_or_none(numel * max(native, pushed), reply)

    async def _initialize(self, shard: _Shard, reply: pb.RegisterReply, flats: list[torch.Tensor]) -> None:
        assert self.layout is not None
        blocks = self._wire_blocks(shard.block_ids, flats, version=0)
        frames = list(
            chunk_frames(
                blocks,
                chunk_bytes=self.chunk_bytes,
                first_header=pb.FrameHeader(init=pb.InitHeader(worker_id=reply.worker_id, secret=shard.secret)),
                always_one=True,
            )
        )
        try:
            await shard.init(iter(frames), timeout=self.call_timeout, metadata=self._md)
        except grpc.aio.AioRpcError as exc:
            raise ClusterError(
                f"initializing shard {shard.index} at {shard.address} failed: {describe_rpc_error(exc)}"
            ) from None
        log.info("initialized shard %d (%d blocks)", shard.index, len(shard.block_ids))

    def _wire_blocks(self, block_ids: Iterable[int], flats: Sequence[torch.Tensor], version: int) -> list[WireBlock]:
        assert self.layout is not None
        out = []
        for block_id in block_ids:
            block = self.layout.blocks[block_id]
            values = flats[block.param_index][block.offset : block.offset + block.numel]
            out.append(WireBlock(block_id, version, codec_for_name(block.dtype).wire, tensor_bytes(values)))
        return out

    # -- training traffic -----------------------------------------------------------------------

    def encode_push(
        self, grads: Sequence[torch.Tensor], block_ids: Iterable[int] | None, clock: int
    ) -> list[list[bytes]]:
        """The frames, per shard, of a push of the blocks ``block_ids`` (all when None) of per-parameter tensors."""
        return self.encode_blocks(self.outgoing(grads, block_ids), clock)

    def outgoing(self, tensors: Sequence[torch.Tensor], block_ids: Iterable[int] | None) -> list[OutgoingBlock]:
        """The blocks ``block_ids`` (all when None) of per-parameter tensors (their shape or flat), as pushed."""
        layout, _, _ = self._require_registered()
        flats = layout.flat_views(
            [t.detach().to("cpu", p.torch_dtype).contiguous() for t, p in zip(tensors, layout.params, strict=True)]
        )
        ids = range(layout.num_blocks) if block_ids is None else block_ids
        return [
            OutgoingBlock(b, flats[layout.blocks[b].param_index][layout.blocks[b].offset :][: layout.blocks[b].numel])
            for b in ids
        ]

    def encode_blocks(self, blocks: Sequence[OutgoingBlock], clock: int | None = None) -> list[list[bytes]]:
        """The frames, per shard, of a push of these blocks at ``clock`` (None: each shard's next clock).

        Every shard gets at least one frame (an empty push when none of its blocks was chosen), so
        each shard sees every clock tick of every worker.
        """
        return [part.frames for part in self._push_parts(blocks, clock)]

    def _push_parts(self, blocks: Sequence[OutgoingBlock], clock: int | None) -> list[_PushPart]:
        layout, placement, _ = self._require_registered()
        by_id = {b.block_id: b for b in blocks}
        if len(by_id) != len(blocks):
            raise ValueError("a push names a block twice")
        clock = self._step_clock(clock)
        parts = []
        for shard, ids in zip(self._shards, group_by_shard(layout, placement, sorted(by_id)), strict=True):
            wire = [
                WireBlock(
                    i, 0, codec_for_torch(by_id[i].payload.dtype).wire, tensor_bytes(by_id[i].payload), by_id[i].scale
                )
                for i in ids
            ]
            part = _PushPart(wire, self._next_clock(shard, clock))
            part.frames = self._push_frames(shard, part)
            parts.append(part)
        return parts

    def _push_frames(self, shard: _Shard, part: _PushPart) -> list[bytes]:
        assert self.worker_id is not None
        header = push_header(self.worker_id, part.clock, shard.secret)
        return list(chunk_frames(part.wire, chunk_bytes=self.chunk_bytes, first_header=header, always_one=True))

    def _step_clock(self, clock: int | None) -> int | None:
        """The clock a push goes with: as given, else (None) each shard's next; under the barrier modes
        (ssp and bsp) one clock on every shard, the next after the highest any shard gave this worker.

        Shards may admit a worker at different clocks: one that admitted it again at a later clock,
        or one where another worker had already rejoined at its old clock when this one joined (a
        joiner starts at the clock of the live workers a shard has, and another shard may have none
        yet). Left apart, two workers could wait for each other across shards; a shard it skips
        clocks on counts it as past them."""
        if clock is None and self.consistency.partition(":")[0] in ("ssp", "bsp") and self._shards:
            return max(shard.clock for shard in self._shards) + 1
        return clock

    @staticmethod
    def _next_clock(shard: _Shard, clock: int | None) -> int:
        """The clock of a push to ``shard``: the given one, or the one after the shard's last."""
        chosen = shard.clock + 1 if clock is None else clock
        shard.clock = max(shard.clock, chosen)
        return chosen

    @staticmethod
    def _readmitted(shard: _Shard, clock: int, reply: pb.RegisterReply) -> int:
        """After a shard admitted this worker again: 0 when the push of ``clock`` is already there (applied
        or queued), else the clock to send it again with (after the shard's clock for this worker)."""
        if clock <= reply.pushed_clock:
            return 0
        shard.clock += 1
        return shard.clock

    def push_wire_bytes(self, block_ids: Iterable[int] | None, clock: int) -> int:
        """Exactly what :meth:`push` would send for these blocks at this clock, headers included.

        Nothing is copied, so this is cheap enough to call every step (it gives the report's
        ``bytes_pushed_dense`` with ``block_ids=None``).
        """
        layout, placement, worker_id = self._require_registered()
        return push_wire_bytes(
            layout, placement, block_ids, worker_id=worker_id, clock=clock, chunk_bytes=self.chunk_bytes
        )

    def push(
        self, grads: Sequence[torch.Tensor], block_ids: Iterable[int] | None, clock: int | None = None
    ) -> Future[PushResult]:
        """Send the blocks ``block_ids`` (all when None) of per-parameter tensors (see :meth:`push_blocks`)."""
        return self.push_blocks(self.outgoing(grads, block_ids), clock)

    def push_blocks(self, blocks: Sequence[OutgoingBlock], clock: int | None = None) -> Future[PushResult]:
        """Send blocks to their shards as one push (``clock``: None gives each shard its next clock).

        The bytes are copied into frames before this returns, so the caller may reuse its buffers at
        once; the returned future resolves when every shard has applied its part. A shard that
        restarted or lost this worker's lease admits it again: the part it already holds is not sent
        again, the rest goes with a clock after the one the shard gave back.
        """
        parts = self._push_parts(blocks, clock)
        # Counted when handed to the wire (here, in the caller's thread), not when acknowledged, so
        # a caller reading it right after push() sees this push.
        self.bytes_pushed += sum(len(f) for part in parts for f in part.frames)
        future: Future[PushResult] = self._io.submit(self._push_all(parts))
        return future

    async def _push_all(self, parts: list[_PushPart]) -> PushResult:
        async def one(shard: _Shard, part: _PushPart) -> int:
            async def attempt() -> bytes:
                if not part.clock:  # found already applied after the shard admitted this worker again
                    return pb.PushReply().SerializeToString()
                raw: bytes = await shard.push(iter(part.frames), timeout=self.call_timeout, metadata=self._md)
                return raw

            def readmitted(reply: pb.RegisterReply) -> None:
                part.clock = self._readmitted(shard, part.clock, reply)
                if part.clock:
                    part.frames = self._push_frames(shard, part)

            raw = await self._retrying(shard, "push to", attempt, on_readmitted=readmitted)
            return pb.PushReply.FromString(raw).blocks_applied

        sent = sum(len(f) for part in parts for f in part.frames)
        applied = await asyncio.gather(*(one(s, p) for s, p in zip(self._shards, parts, strict=True)))
        return PushResult(sum(applied), sent)

    def pull(self, after: Future[Any] | None = None) -> Future[list[PulledBlock]]:
        """Fetch every block whose version moved since the last pull (all blocks the first time).

        With ``after`` (e.g. a push handle), the pull starts once that future is done, so it sees
        the push applied. The caller must apply the result (:meth:`apply_pulled`): the client
        records the new versions as held.
        """
        self._require_registered()
        future: Future[list[PulledBlock]] = self._io.submit(self._pull_all(after))
        return future

    async def _pull_all(self, after: Future[Any] | None) -> list[PulledBlock]:
        if after is not None:
            await asyncio.wait([asyncio.wrap_future(after)])
        parts = await asyncio.gather(*(self._pull_one(s) for s in self._shards))
        return [block for part in parts for block in part]

    async def _pull_one(self, shard: _Shard) -> list[PulledBlock]:
        return await self._retrying(shard, "pull from", lambda: self._pull_attempt(shard))

    async def _pull_attempt(self, shard: _Shard) -> list[PulledBlock]:
        assert self.layout is not None
        request = pb.PullRequest(
            worker_id=self.worker_id, known_versions=shard.known, secret=shard.secret
        ).SerializeToString()
        position = {block_id: i for i, block_id in enumerate(shard.block_ids)}
        out: list[PulledBlock] = []
        try:
            async for message in shard.pull(request, timeout=self.call_timeout, metadata=self._md):
                self.bytes_pulled += len(message)
                header, payload = decode_frame(message)
                for wire in split_blocks(header, payload):
                    if wire.block_id not in position:
                        raise WireFormatError(f"shard sent block {wire.block_id}, which it does not hold")
                    block = self.layout.blocks[wire.block_id]
                    codec = codec_for_name(block.dtype)
                    if wire.dtype != codec.wire or wire.data.nbytes != block.nbytes:
                        raise WireFormatError(f"shard sent block {wire.block_id} with the wrong dtype or size")
                    out.append(PulledBlock(wire.block_id, wire.version, bytes_to_tensor(wire.data, codec.torch_dtype)))
        except WireFormatError as exc:
            raise ClusterError(f"pull from shard {shard.index} at {shard.address}: {exc}") from None
        for pulled in out:
            i = position[pulled.block_id]
            shard.known[i] = max(shard.known[i], pulled.version)
        return out

    async def _retrying(
        self,
        shard: _Shard,
        what: str,
        call: Callable[[], Awaitable[T]],
        on_readmitted: Callable[[pb.RegisterReply], None] | None = None,
    ) -> T:
        """Run a call, riding through a shard that restarts or is briefly unreachable.

        Unreachable (UNAVAILABLE, DEADLINE_EXCEEDED): retry with capped exponential backoff and
        jitter until ``retry_timeout``. The shard no longer knows this worker (it restarted, or the
        lease lapsed): register again (initializing the shard from this worker's current weights
        if it came back empty), forget the versions held so the next pull fetches everything, and
        retry. A retried push is never applied twice: the shard recognises (worker id, clock).
        """
        attempts = Attempts(self.retry_timeout)
        while True:
            attempt = attempts.start()
            try:
                return await call()
            except grpc.aio.AioRpcError as exc:
                if _marker(exc) == "not-registered" and attempts.remaining > 0:
                    log.warning(
                        "shard %d at %s forgot worker %s; registering again", shard.index, shard.address, self.worker_id
                    )
                    reply = await self._reregister(shard, attempts.deadline)
                    if on_readmitted is not None:
                        on_readmitted(reply)
                    continue
                if not transient(exc):
                    raise ClusterError(
                        f"{what} shard {shard.index} at {shard.address} failed: {describe_rpc_error(exc)}"
                    ) from None
                pause = attempts.next_pause()
                if pause is None:
                    raise ClusterError(
                        f"{what} shard {shard.index} at {shard.address}: gave up after {self.retry_timeout:g}s "
                        f"and {attempt} attempts: {describe_rpc_error(exc)}"
                    ) from None
                log.warning(
                    "%s shard %d at %s failed (attempt %d: %s); retrying in %.1fs",
                    what, shard.index, shard.address, attempt, exc.code().name, pause,
                )  # fmt: skip
                await attempts.pause()

    async def _reregister(self, shard: _Shard, deadline: float) -> pb.RegisterReply:
        """Register with a shard again (it restarted, or this worker's lease lapsed); returns its answer."""
        assert self._register_template is not None and self.layout is not None and self.worker_id is not None
        reply = await self._register_one(shard, self._register_template, self.worker_id, deadline)
        if reply.must_initialize:
            flats = self.layout.flat_views([t.detach().to("cpu").contiguous() for t in self._live_values])
            await self._initialize(shard, reply, flats)
        return reply

    def apply_pulled(self, blocks: Iterable[PulledBlock], block_views: Sequence[torch.Tensor]) -> int:
        """Copy pulled blocks into ``block_views`` (from :meth:`Layout.block_views`); returns the count."""
        count = 0
        with torch.no_grad():
            for block in blocks:
                block_views[block.block_id].copy_(block.values)
                count += 1
        return count

    # -- the exchange path ---------------------------------------------------------------------------

    @property
    def serves_exchange(self) -> bool:
        """Whether every shard takes exchanges (else pushes and pulls go as Push and Pull calls)."""
        return bool(self._shards) and all(s.serves_exchange for s in self._shards)

    @property
    def transports(self) -> list[str]:
        """How each shard's traffic travels: ``shared-memory`` (exchanges, bytes in a shared region),
        ``exchange`` (exchanges, bytes in gRPC frames) or ``push-pull`` (v1 Push and Pull calls)."""
        if not self.serves_exchange:
            return ["push-pull"] * len(self._shards)
        return ["shared-memory" if s.segment is not None else "exchange" for s in self._shards]

    def shard_order(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Block ids sorted by shard, then id: a run in this order splits into one slice per shard."""
        if self.placement is None or len(block_ids) == 0 or self.placement.num_shards == 1:
            return block_ids
        key = self._shard_of[block_ids] * len(self._shard_of) + block_ids
        return block_ids[torch.argsort(key)]

    def exchange(self, runs: Sequence[Run], clock: int | None = None, *, pull: bool = True) -> Future[ExchangeResult]:
        """Push ``runs`` and pull what changed, one round trip per shard.

        ``clock``: None pushes with each shard's next clock for this worker, 0 only pulls, a number
        pushes with that clock on every shard. A shard that restarted or lost this worker's lease
        admits it again; a push it already holds is not sent again, one it does not goes with a clock
        after the one it gave back.

        The bytes are copied (into frames, or into the shared regions) before this returns; the runs'
        tensors must stay unchanged until the future resolves (a retry after a shard restarted may
        encode them again). The future resolves with what every shard answered. Every shard gets the
        clock, with or without blocks of its own. Runs in :meth:`shard_order` split without a copy.
        Without ``pull`` the answers carry only the acknowledgements.
        """
        _, _, worker_id = self._require_registered()
        clock = self._step_clock(clock)
        requests = []
        for shard, pieces in zip(self._shards, self._by_shard(runs), strict=True):
            shard_clock = 0 if clock == 0 else self._next_clock(shard, clock)
            header = pb.ExchangeHeader(worker_id=worker_id, clock=shard_clock, no_pull=not pull, secret=shard.secret)
            request = ExchangeRequest(header, pieces, self.chunk_bytes)
            request.encode(shard.segment)
            requests.append(request)
        if clock != 0:  # a pull on its own is not a push
            self.bytes_pushed += sum(r.shared_bytes + sum(len(f) for f in r.frames) for r in requests)
        future: Future[ExchangeResult] = self._io.submit(self._exchange_all(requests))
        return future

    def _by_shard(self, runs: Sequence[Run]) -> list[list[tuple[WireRun, torch.Tensor]]]:
        """Each shard's pieces of the runs, with each piece's elements per block."""
        out: list[list[tuple[WireRun, torch.Tensor]]] = [[] for _ in self._shards]
        for run in runs:
            ids = run.block_ids
            if not len(ids):
                continue
            values, scales = run.values, run.scales
            ordered = self.shard_order(ids)
            if not torch.equal(ordered, ids):  # not in shard order: one gather puts it there
                order = torch.argsort(self._shard_of[ids] * len(self._shard_of) + ids)
                starts = torch.cumsum(self._lengths[ids], 0) - self._lengths[ids]
                values = values[runs_index(starts[order], self._lengths[ids][order])]
                scales = scales[order] if scales is not None else None
                ids = ordered
            wire = codec_for_torch(values.dtype).wire
            counts = torch.bincount(self._shard_of[ids], minlength=len(self._shards)).tolist()
            lengths = self._lengths[ids]
            ends = torch.cumsum(lengths, 0)
            lo = 0
            for shard, count in enumerate(counts):
                if not count:
                    continue
                hi = lo + count
                start = int(ends[lo - 1]) if lo else 0
                piece = WireRun(
                    wire,
                    ids[lo:hi],
                    values[start : int(ends[hi - 1])],
                    None,
                    scales[lo:hi] if scales is not None else None,
                )
                out[shard].append((piece, lengths[lo:hi]))
                lo = hi
        return out

    async def _exchange_all(self, requests: list[ExchangeRequest]) -> ExchangeResult:
        results = await asyncio.gather(
            *(
                self._retrying(
                    shard,
                    "exchange with",
                    functools.partial(self._exchange_attempt, shard, request),
                    on_readmitted=functools.partial(self._readmit_exchange, shard, request),
                )
                for shard, request in zip(self._shards, requests, strict=True)
            )
        )
        return ExchangeResult(sum(a for a, _ in results), [run for _, pulled in results for run in pulled])

    def _readmit_exchange(self, shard: _Shard, request: ExchangeRequest, reply: pb.RegisterReply) -> None:
        """A shard admitted this worker again: adopt its clock and secret, encode the exchange again."""
        header = request.header
        if header.clock:
            header.clock = self._readmitted(shard, header.clock, reply)
        header.secret = shard.secret
        request.encode(shard.segment)

    async def _exchange_attempt(self, shard: _Shard, request: ExchangeRequest) -> tuple[int, list[Run]]:
        """One try at one shard's part: open the stream if needed, send, read the answer, check it."""
        assert self.worker_id is not None
        if request.segment is not shard.segment:  # the shared memory changed since it was encoded
            request.encode(shard.segment)
        try:
            if shard.stream is None:
                shard.stream = shard.exchange(metadata=self._md)
                known = shard.known_versions
                opening = pb.FrameHeader()
                opening.exchange.worker_id = self.worker_id
                opening.exchange.secret = shard.secret
                opening.exchange.more = True
                if bool(known.any()):
                    opening.exchange.known_versions = known.numpy().tobytes()
                await shard.stream.write(encode_frame(opening, []))
            for frame in request.frames:
                await shard.stream.write(frame)
            applied = 0
            pulled: list[WireRun] = []
            while True:
                message = await asyncio.wait_for(shard.stream.read(), self.call_timeout)
                if message is grpc.aio.EOF:
                    raise _lost(grpc.StatusCode.UNAVAILABLE, "the shard ended the exchange stream without answering")
                self.bytes_pulled += len(message)
                header, payload = decode_frame(message)
                region = shard.segment.reply if shard.segment is not None else None
                runs = decode_runs(header, payload, region)
                if header.exchange.shared:
                    self.bytes_pulled += sum(r.nbytes for r in runs)
                pulled.extend(runs)
                applied += header.exchange.blocks_applied
                if not header.exchange.more:
                    break
        except TimeoutError:
            shard.drop_stream()
            raise _lost(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {self.call_timeout:g}s") from None
        except WireFormatError as exc:
            shard.drop_stream()
            raise ClusterError(f"exchange with shard {shard.index} at {shard.address}: {exc}") from None
        except asyncio.InvalidStateError:  # the shard ended the stream while this side wrote: its status says why
            ended = shard.stream
            shard.drop_stream()
            raise await _ended(ended) from None
        except grpc.aio.AioRpcError as exc:
            shard.drop_stream()
            if exc.code() == grpc.StatusCode.CANCELLED:
                # not by this side (it drops a stream only between exchanges): a stopping shard cancels the
                # calls still open when its grace ends; the push is retried at the same clock (never applied twice)
                raise _lost(grpc.StatusCode.UNAVAILABLE, "the shard cancelled the exchange stream") from None
            if exc.code() == grpc.StatusCode.INTERNAL and exc.details() == "Internal error from Core":
                # gRPC core's own failure of this stream (seen after the process was paused): a new one helps
                raise _lost(grpc.StatusCode.UNAVAILABLE, "the exchange stream broke inside gRPC") from None
            raise
        except BaseException:
            shard.drop_stream()
            raise
        return applied, self._accept(shard, pulled)

    def _accept(self, shard: _Shard, pulled: Sequence[WireRun]) -> list[Run]:
        """Check what a shard sent (its own blocks, their types and sizes) and note the versions now held."""
        assert self.layout is not None
        out = []
        for run in pulled:
            ids = run.block_ids
            if not len(ids):
                continue
            if (
                int(ids.min()) < 0
                or int(ids.max()) >= self.layout.num_blocks
                or bool((self._shard_of[ids] != shard.index).any())
            ):
                raise ClusterError(f"shard {shard.index} at {shard.address} sent blocks it does not hold")
            if bool((self._wire_dtype[ids] != run.dtype).any()) or run.values.numel() != int(self._lengths[ids].sum()):
                raise ClusterError(f"shard {shard.index} at {shard.address} sent blocks with the wrong type or size")
            if run.versions is None:
                raise ClusterError(f"shard {shard.index} at {shard.address} sent blocks without versions")
            positions = self._position[ids]
            shard.known_versions[positions] = torch.maximum(shard.known_versions[positions], run.versions)
            out.append(Run(ids, run.values))
        return out

    def stats(self) -> list[ShardStats]:
        """Every shard's stats, in shard order."""
        return self._io.run(self._stats_all(), timeout=self.call_timeout + 5)

    async def _stats_all(self) -> list[ShardStats]:
        async def one(shard: _Shard) -> ShardStats:
            try:
                raw = await shard.stats(
                    pb.StatsRequest().SerializeToString(), timeout=self.call_timeout, metadata=self._md
                )
            except grpc.aio.AioRpcError as exc:
                raise ClusterError(
                    f"stats from shard {shard.index} at {shard.address} failed: {describe_rpc_error(exc)}"
                ) from None
            return ShardStats.from_proto(pb.StatsReply.FromString(raw))

        return list(await asyncio.gather(*(one(s) for s in self._shards)))

    @property
    def push_clocks(self) -> tuple[int, ...]:
        """Each shard's clock of this worker's last push to it (shards may have admitted it at different ones)."""
        return tuple(shard.clock for shard in self._shards)

    def exchange_wire_bytes(self, clock: int | None = None) -> int:
        """What an exchange pushing every block sends, headers included (counted, not encoded): at ``clock``
        on every shard, or (None) at each shard's clock of this worker's last push."""
        layout, placement, worker_id = self._require_registered()
        total = 0
        for shard in self._shards:
            ids = torch.tensor(placement.blocks_by_shard[shard.index], dtype=torch.int64)
            shard_clock = shard.clock if clock is None else clock
            header = pb.ExchangeHeader(worker_id=worker_id, clock=shard_clock, secret=shard.secret)
            by_dtype: dict[str, list[int]] = {}
            for block_id in ids.tolist():
                by_dtype.setdefault(self.push_dtype or layout.blocks[block_id].dtype, []).append(block_id)
            runs = []
            for name, members in by_dtype.items():
                codec = codec_for_name(name)
                block_ids = torch.tensor(members, dtype=torch.int64)
                count = int(self._lengths[block_ids].sum())
                values = torch.zeros(1, dtype=codec.torch_dtype).expand(count)
                scales = torch.ones(len(members)) if name == "int8" else None
                runs.append((WireRun(codec.wire, block_ids, values, None, scales), self._lengths[block_ids]))
            wire = [r for r, _ in runs]
            shared = shard.segment is not None and sum(r.nbytes for r in wire) <= shard.segment.request_bytes
            total += exchange_wire_bytes(header, wire, [n for _, n in runs], self.chunk_bytes, shared=shared)
        return total

    def _require_registered(self) -> tuple[Layout, Placement, int]:
        if self.layout is None or self.placement is None or self.worker_id is None:
            raise RuntimeError("register() first")
        return self.layout, self.placement, self.worker_id
