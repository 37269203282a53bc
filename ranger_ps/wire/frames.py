"""Streamed messages: a protobuf header plus raw block bytes, without copying the bytes.

Every streamed message is an ``ranger_ps.v1.Frame`` (field 1: ``FrameHeader``; field 2: ``bytes
payload``), an ordinary protobuf message on the wire. Encoding writes the two field prefixes by
hand and joins them with the block bytes in one copy; decoding walks the top-level fields and
returns the payload as a ``memoryview`` slice of the received message, so tensor bytes are never
parsed or copied by protobuf. The header lists the blocks in payload order with their byte counts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from ranger_ps.errors import WireFormatError
from ranger_ps.wire._proto import ranger_ps_pb2 as pb

# Frames are cut at about this many payload bytes: large enough for full gRPC throughput, small
# enough to keep memory bounded and the event loop responsive (measured best at 1-4 MiB).
DEFAULT_CHUNK_BYTES = 2 << 20

_HEADER_TAG = 0x0A  # field 1, wire type 2 (length-delimited)
_PAYLOAD_TAG = 0x12  # field 2, wire type 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= len(data):
            raise WireFormatError("truncated varint in frame")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63 or result >> 64:
            raise WireFormatError("varint longer than 64 bits in frame")


def encode_frame(header: pb.FrameHeader, parts: Sequence[bytes | memoryview]) -> bytes:
    """Serialize a ``Frame`` whose payload is ``parts`` concatenated (one copy in all)."""
    head = header.SerializeToString()
    payload_len = sum(memoryview(p).nbytes for p in parts)
    prefix = b"".join((bytes((_HEADER_TAG,)), _varint(len(head)), head, bytes((_PAYLOAD_TAG,)), _varint(payload_len)))
    return b"".join((prefix, *parts))


def decode_frame(message: bytes | memoryview) -> tuple[pb.FrameHeader, memoryview]:
    """Parse a ``Frame``; the payload is a zero-copy slice of ``message``.

    Raises:
        WireFormatError: the bytes are not a well-formed ``Frame``.
    """
    data = memoryview(message)
    header = pb.FrameHeader()
    payload = memoryview(b"")
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        field, wire_type = key >> 3, key & 7
        if not 0 < field < 1 << 29:
            raise WireFormatError(f"frame field number {field} is out of range")
        if wire_type == 2:
            length, pos = _read_varint(data, pos)
            end = pos + length
            if end > len(data):
                raise WireFormatError("frame field runs past the end of the message")
            value = data[pos:end]
            pos = end
            if field == 1:
                try:
                    header.MergeFromString(bytes(value))  # headers are small
                except DecodeError as exc:
                    raise WireFormatError(f"frame header does not parse: {exc}") from None
            elif field == 2:
                payload = value
        elif wire_type == 0:
            _, pos = _read_varint(data, pos)
        elif wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            if pos > len(data):
                raise WireFormatError("truncated fixed-width field in frame")
        else:
            # Groups (wire types 3 and 4) are deprecated and never written for Frame; refusing them
            # is stricter than protobuf, which would skip them.
            raise WireFormatError(f"unsupported wire type {wire_type} in frame")
    return header, payload


@dataclass(frozen=True)
class WireBlock:
    """One block's bytes as carried in (or destined for) a frame (``scale``: int8 pushes only)."""

    block_id: int
    version: int
    dtype: pb.DType
    data: memoryview
    scale: float = 0.0


def split_blocks(header: pb.FrameHeader, payload: memoryview) -> list[WireBlock]:
    """Cut a frame's payload into its blocks, checking the declared sizes add up exactly.

    Raises:
        WireFormatError: the sizes in the header do not match the payload.
    """
    out = []
    pos = 0
    for entry in header.blocks:
        end = pos + entry.nbytes
        if end > payload.nbytes:
            raise WireFormatError(
                f"block {entry.block_id} declares {entry.nbytes} bytes but the frame ends after {payload.nbytes}"
            )
        out.append(WireBlock(entry.block_id, entry.version, entry.dtype, payload[pos:end], entry.scale))
        pos = end
    if pos != payload.nbytes:
        raise WireFormatError(f"frame carries {payload.nbytes - pos} bytes beyond its declared blocks")
    return out


def frame_size(header: pb.FrameHeader, parts: Sequence[bytes | memoryview]) -> int:
    """The exact length :func:`encode_frame` would produce, without copying any payload."""
    return frame_bytes(header.ByteSize(), sum(memoryview(p).nbytes for p in parts))


def frame_bytes(header_bytes: int, payload_bytes: int) -> int:
    """The length of a ``Frame`` with a header and a payload of these sizes."""
    return 1 + len(_varint(header_bytes)) + header_bytes + 1 + len(_varint(payload_bytes)) + payload_bytes


def _chunks(
    blocks: Iterable[WireBlock], chunk_bytes: int, first_header: pb.FrameHeader | None, always_one: bool
) -> Iterator[tuple[pb.FrameHeader, list[memoryview]]]:
    header = pb.FrameHeader()
    if first_header is not None:
        header.CopyFrom(first_header)
    parts: list[memoryview] = []
    size = 0
    emitted = False
    for block in blocks:
        if parts and size + block.data.nbytes > chunk_bytes:
            yield header, parts
            emitted = True
            header = pb.FrameHeader()
            parts = []
            size = 0
        header.blocks.add(
            block_id=block.block_id,
            version=block.version,
            dtype=block.dtype,
            nbytes=block.data.nbytes,
            scale=block.scale,
        )
        parts.append(block.data)
        size += block.data.nbytes
    if parts or (always_one and not emitted):
        yield header, parts


def chunk_frames(
    blocks: Iterable[WireBlock],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    first_header: pb.FrameHeader | None = None,
    always_one: bool = False,
) -> Iterator[bytes]:
    """Pack blocks into encoded frames of about ``chunk_bytes`` payload each.

    ``first_header`` (e.g. a push or init header) is merged into the first frame. With
    ``always_one`` a frame is produced even when there are no blocks, so the receiver still gets
    the first header. A frame exceeds ``chunk_bytes`` only when one block alone is larger.
    """
    for header, parts in _chunks(blocks, chunk_bytes, first_header, always_one):
        yield encode_frame(header, parts)


def chunked_size(
    blocks: Iterable[WireBlock],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    first_header: pb.FrameHeader | None = None,
    always_one: bool = False,
) -> int:
    """Total bytes :func:`chunk_frames` would produce for the same arguments, copying nothing."""
    return sum(frame_size(h, p) for h, p in _chunks(blocks, chunk_bytes, first_header, always_one))
