"""Exchange frames: runs of blocks whose ids, versions and scales travel as packed arrays.

An exchange (``ExchangeHeader`` in the contract) carries its blocks as :class:`WireRun` s, blocks of
one type back to back: the header holds one ``BlockRun`` per run with the block ids as one
little-endian array (not an entry per block), and the bytes lie in the frame's payload, or in a
shared-memory region when the worker and the shard share a host. Encoding copies the bytes once (or
not at all for shared memory); decoding never copies them: a run's values are a tensor over the
received message or the region.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ranger_ps.errors import WireFormatError
from ranger_ps.wire._proto import ranger_ps_pb2 as pb
from ranger_ps.wire.codec import bytes_to_tensor, codec_for_wire, tensor_bytes
from ranger_ps.wire.frames import DEFAULT_CHUNK_BYTES, encode_frame, frame_bytes

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("ranger-ps's wire arrays are little-endian; this host is not")


@dataclass(frozen=True)
class WireRun:
    """A run of blocks as an exchange carries it.

    Attributes:
        dtype: the wire type of the values.
        block_ids: the blocks, ascending (int64).
        values: the blocks' values back to back (flat, ``dtype``; a view of what was received).
        versions: each block's version (replies), int64.
        scales: each block's scale (int8 runs), float32.
    """

    dtype: int
    block_ids: torch.Tensor
    values: torch.Tensor
    versions: torch.Tensor | None = None
    scales: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()


def _array(data: bytes, dtype: torch.dtype, count: int | None, what: str) -> torch.Tensor:
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) % itemsize or (count is not None and len(data) != count * itemsize):
        expected = "a multiple of" if count is None else f"{count} x"
        raise WireFormatError(f"{what} has {len(data)} bytes, expected {expected} {itemsize}")
    return torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.zeros(0, dtype=dtype)


def run_header(run: WireRun) -> pb.BlockRun:
    """The ``BlockRun`` that describes a run (the values go to the payload or the region)."""
    return pb.BlockRun(
        dtype=run.dtype,  # type: ignore[arg-type]
        block_ids=run.block_ids.to(torch.int32).numpy().tobytes(),
        versions=run.versions.to(torch.int64).numpy().tobytes() if run.versions is not None else b"",
        scales=run.scales.to(torch.float32).numpy().tobytes() if run.scales is not None else b"",
        nbytes=run.nbytes,
    )


def _cut(run: WireRun, lengths: torch.Tensor, limit: int) -> list[WireRun]:
    """A run cut at block boundaries into pieces of about ``limit`` bytes (a block is never cut)."""
    if run.nbytes <= limit or len(run.block_ids) <= 1:
        return [run]
    itemsize = run.values.element_size()
    ends = torch.cumsum(lengths, 0)
    cuts = torch.unique(torch.searchsorted(ends * itemsize, torch.arange(limit, run.nbytes, limit), right=True))
    bounds = [0, *(int(c) for c in cuts if 0 < int(c) < len(lengths)), len(lengths)]
    out = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        start = int(ends[lo - 1]) if lo else 0
        end = int(ends[hi - 1])
        out.append(
            WireRun(
                run.dtype,
                run.block_ids[lo:hi],
                run.values[start:end],
                run.versions[lo:hi] if run.versions is not None else None,
                run.scales[lo:hi] if run.scales is not None else None,
            )
        )
    return out


def _plan(runs: Sequence[WireRun], lengths: Sequence[torch.Tensor], chunk_bytes: int) -> list[list[WireRun]]:
    """The runs cut at block boundaries and grouped into frames of about ``chunk_bytes`` (at least one)."""
    pieces = [piece for run, sizes in zip(runs, lengths, strict=True) for piece in _cut(run, sizes, chunk_bytes)]
    groups: list[list[WireRun]] = [[]]
    size = 0
    for piece in pieces:
        if groups[-1] and size + piece.nbytes > chunk_bytes:
            groups.append([])
            size = 0
        groups[-1].append(piece)
        size += piece.nbytes
    return groups


def _frame_header(header: pb.ExchangeHeader, group: Sequence[WireRun], more: bool) -> pb.FrameHeader:
    frame_header = pb.FrameHeader(runs=[run_header(r) for r in group])
    frame_header.exchange.CopyFrom(header)
    frame_header.exchange.more = more
    return frame_header


def encode_exchange(
    header: pb.ExchangeHeader,
    runs: Sequence[WireRun],
    lengths: Sequence[torch.Tensor],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> list[bytes]:
    """The frames of an exchange (or an answer) whose runs' bytes travel in the payloads.

    Runs are cut at block boundaries (``lengths``: each run's elements per block) so a frame
    carries about ``chunk_bytes``; every frame but the last says ``more``. At least one frame.
    """
    groups = _plan(runs, lengths, chunk_bytes)
    return [
        encode_frame(_frame_header(header, group, index < len(groups) - 1), [tensor_bytes(r.values) for r in group])
        for index, group in enumerate(groups)
    ]


def exchange_wire_bytes(
    header: pb.ExchangeHeader,
    runs: Sequence[WireRun],
    lengths: Sequence[torch.Tensor],
    chunk_bytes: int,
    *,
    shared: bool = False,
) -> int:
    """Exactly the bytes :func:`encode_exchange` (or, ``shared``, :func:`encode_shared` plus the bytes it
    writes to the region) would produce, without touching the values."""
    if shared:
        frame_header = _frame_header(header, runs, False)
        frame_header.exchange.shared = True
        return frame_bytes(frame_header.ByteSize(), 0) + sum(r.nbytes for r in runs)
    groups = _plan(runs, lengths, chunk_bytes)
    total = 0
    for index, group in enumerate(groups):
        head = _frame_header(header, group, index < len(groups) - 1).ByteSize()
        total += frame_bytes(head, sum(r.nbytes for r in group))
    return total


def encode_shared(header: pb.ExchangeHeader, runs: Sequence[WireRun], region: memoryview, offset: int = 0) -> bytes:
    """The one frame of an exchange whose runs' bytes are written into a shared region (from ``offset``).

    Raises:
        ValueError: the runs do not fit in the region.
    """
    total = sum(r.nbytes for r in runs)
    if offset + total > region.nbytes:
        raise ValueError(f"{total} bytes do not fit in a shared region of {region.nbytes - offset}")
    target = torch.frombuffer(region, dtype=torch.uint8, count=total, offset=offset) if total else None
    position = 0
    for run in runs:
        if run.nbytes:
            assert target is not None
            target[position : position + run.nbytes].copy_(run.values.reshape(-1).view(torch.uint8))
            position += run.nbytes
    frame_header = _frame_header(header, runs, False)
    frame_header.exchange.shared = True
    frame_header.exchange.shared_offset = offset
    return encode_frame(frame_header, [])


def decode_runs(header: pb.FrameHeader, payload: memoryview, region: memoryview | None = None) -> list[WireRun]:
    """A frame's runs, their values viewing the payload (or the shared region the header points into).

    Raises:
        WireFormatError: the arrays or sizes in the header do not match the bytes.
    """
    exchange = header.exchange
    if exchange.shared:
        if region is None:
            raise WireFormatError("the frame's bytes are in shared memory, but none was agreed at registration")
        if payload.nbytes:
            raise WireFormatError("a shared-memory frame carries a payload as well")
        source, position = region, exchange.shared_offset
    else:
        source, position = payload, 0
    out = []
    for entry in header.runs:
        codec = codec_for_wire(entry.dtype)
        ids = _array(entry.block_ids, torch.int32, None, "a run's block ids").to(torch.int64)
        count = len(ids)
        versions = _array(entry.versions, torch.int64, count, "a run's versions") if entry.versions else None
        scales = _array(entry.scales, torch.float32, count, "a run's scales") if entry.scales else None
        end = position + entry.nbytes
        if end > source.nbytes:
            raise WireFormatError(f"a run declares {entry.nbytes} bytes but only {source.nbytes - position} remain")
        if entry.nbytes % codec.itemsize:
            raise WireFormatError(f"a run of {codec.name} declares {entry.nbytes} bytes, not whole elements")
        values = bytes_to_tensor(source[position:end], codec.torch_dtype)
        out.append(WireRun(codec.wire, ids, values, versions, scales))
        position = end
    if not exchange.shared and position != payload.nbytes:
        raise WireFormatError(f"the frame carries {payload.nbytes - position} bytes beyond its declared runs")
    return out
