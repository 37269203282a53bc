"""Tests for ranger_ps.wire.frames: protobuf Frames with zero-copy payloads."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.protobuf.internal.encoder import _VarintBytes  # type: ignore[attr-defined]
from hypothesis import given, settings
from hypothesis import strategies as st

from ranger_ps.errors import WireFormatError
from ranger_ps.wire._proto import ranger_ps_pb2 as pb
from ranger_ps.wire.frames import (
    DEFAULT_CHUNK_BYTES,
    WireBlock,
    chunk_frames,
    decode_frame,
    encode_frame,
    split_blocks,
)

_HYPOTHESIS = settings(max_examples=100, deadline=None, derandomize=True, database=None)


def _varint(value: int) -> bytes:
    """protobuf's own varint encoder: an oracle independent of the code under test."""
    return bytes(_VarintBytes(value))


def _field(number: int, wire_type: int, body: bytes) -> bytes:
    """One raw protobuf field: key varint, then the body (length-prefixed for wire type 2)."""
    key = _varint(number << 3 | wire_type)
    if wire_type == 2:
        return key + _varint(len(body)) + body
    return key + body


def _payload_bytes(sizes: list[int]) -> list[bytes]:
    return [bytes((i * 31 + j) % 256 for j in range(n)) for i, n in enumerate(sizes)]


def _header(sizes: list[int], *, push: bool = False) -> pb.FrameHeader:
    header = pb.FrameHeader()
    for i, n in enumerate(sizes):
        header.blocks.add(block_id=10 + i, version=100 + i, dtype=pb.FLOAT32, nbytes=n)
    if push:
        header.push.worker_id = 7
        header.push.clock = 12345
    return header


def _decode_and_split(message: bytes | memoryview) -> list[WireBlock]:
    header, payload = decode_frame(message)
    return split_blocks(header, payload)


# --- round trip and interop ----------------------------------------------------------------


@pytest.mark.parametrize("sizes", [[], [0], [4], [4, 8, 0, 12], [1, 2, 3], [300], [70_000, 5]])
def test_encode_decode_round_trip(sizes: list[int]) -> None:
    parts = _payload_bytes(sizes)
    header = _header(sizes, push=True)
    message = encode_frame(header, parts)
    assert isinstance(message, bytes)
    decoded, payload = decode_frame(message)
    assert decoded == header
    assert bytes(payload) == b"".join(parts)
    blocks = split_blocks(decoded, payload)
    assert [b.block_id for b in blocks] == [10 + i for i in range(len(sizes))]
    assert [b.version for b in blocks] == [100 + i for i in range(len(sizes))]
    assert all(b.dtype == pb.FLOAT32 for b in blocks)
    assert [bytes(b.data) for b in blocks] == parts


def test_encode_accepts_memoryview_parts() -> None:
    raw = bytearray(range(16))
    parts: list[bytes | memoryview] = [memoryview(raw)[:4], memoryview(raw)[4:16], b"xyz"]
    message = encode_frame(_header([4, 12, 3]), parts)
    _, payload = decode_frame(message)
    assert bytes(payload) == bytes(raw) + b"xyz"


@pytest.mark.parametrize("sizes", [[], [5], [3, 0, 200]])
def test_encoded_frame_parses_with_protobuf(sizes: list[int]) -> None:
    parts = _payload_bytes(sizes)
    header = _header(sizes, push=True)
    frame = pb.Frame.FromString(encode_frame(header, parts))
    assert frame.header == header
    assert frame.payload == b"".join(parts)


@pytest.mark.parametrize("sizes", [[5], [3, 0, 200], [130]])
def test_protobuf_serialized_frame_decodes(sizes: list[int]) -> None:
    parts = _payload_bytes(sizes)
    header = _header(sizes, push=True)
    message = pb.Frame(header=header, payload=b"".join(parts)).SerializeToString()
    decoded, payload = decode_frame(message)
    assert decoded == header
    assert [bytes(b.data) for b in split_blocks(decoded, payload)] == parts


def test_protobuf_serialized_frame_matches_encode_frame() -> None:
    sizes = [3, 9]
    parts = _payload_bytes(sizes)
    header = _header(sizes)
    ours = encode_frame(header, parts)
    theirs = pb.Frame(header=header, payload=b"".join(parts)).SerializeToString()
    assert ours == theirs


def test_empty_and_default_frames() -> None:
    header, payload = decode_frame(b"")
    assert header == pb.FrameHeader()
    assert payload.nbytes == 0
    assert split_blocks(header, payload) == []
    # A protobuf Frame with nothing set serializes to zero bytes.
    assert pb.Frame().SerializeToString() == b""
    header, payload = decode_frame(encode_frame(pb.FrameHeader(), []))
    assert header == pb.FrameHeader()
    assert payload.nbytes == 0


def test_frame_without_header_field() -> None:
    message = pb.Frame(payload=b"abc").SerializeToString()
    header, payload = decode_frame(message)
    assert header == pb.FrameHeader()
    assert bytes(payload) == b"abc"
    with pytest.raises(WireFormatError):
        split_blocks(header, payload)


def test_repeated_header_fields_merge_and_last_payload_wins() -> None:
    # Protobuf semantics: a repeated embedded message merges; a repeated bytes field keeps the last.
    first = _header([2])
    second = pb.FrameHeader()
    second.blocks.add(block_id=99, nbytes=3)
    message = (
        _field(1, 2, first.SerializeToString())
        + _field(2, 2, b"zz")
        + _field(1, 2, second.SerializeToString())
        + _field(2, 2, b"abcde")
    )
    expected = pb.Frame.FromString(message)
    header, payload = decode_frame(message)
    assert header == expected.header
    assert bytes(payload) == expected.payload == b"abcde"
    assert [b.block_id for b in split_blocks(header, payload)] == [10, 99]


# --- zero copy -----------------------------------------------------------------------------


def test_payload_is_a_zero_copy_slice_of_bytes() -> None:
    message = encode_frame(_header([8]), [b"ABCDEFGH"])
    _, payload = decode_frame(message)
    assert isinstance(payload, memoryview)
    assert payload.obj is message
    assert bytes(payload) == b"ABCDEFGH"
    blocks = split_blocks(*decode_frame(message))
    assert blocks[0].data.obj is message


def test_payload_shares_memory_with_a_bytearray_message() -> None:
    buffer = bytearray(encode_frame(_header([4, 4]), [b"aaaa", b"bbbb"]))
    header, payload = decode_frame(memoryview(buffer))
    blocks = split_blocks(header, payload)
    # Changing the received buffer shows through the payload and the block slices.
    buffer[-1] = ord("Z")
    assert bytes(payload) == b"aaaabbbZ"
    assert bytes(blocks[1].data) == b"bbbZ"
    assert bytes(blocks[0].data) == b"aaaa"


# --- unknown fields ------------------------------------------------------------------------


def test_unknown_fields_are_skipped() -> None:
    header = _header([3, 2])
    message = b"".join(
        (
            _field(3, 0, _varint(300)),  # varint
            _field(4, 1, b"\x01" * 8),  # fixed64
            _field(1, 2, header.SerializeToString()),
            _field(5, 5, b"\x02" * 4),  # fixed32
            _field(6, 2, b"unknown bytes"),  # length-delimited
            _field(2, 2, b"abcde"),
            _field(1000, 0, _varint(2**63)),  # large field number, large value
            _field(7, 2, b""),
        )
    )
    decoded, payload = decode_frame(message)
    assert decoded == header
    assert bytes(payload) == b"abcde"
    assert [bytes(b.data) for b in split_blocks(decoded, payload)] == [b"abc", b"de"]
    # Protobuf agrees on what the known fields hold.
    frame = pb.Frame.FromString(message)
    assert frame.header == decoded
    assert frame.payload == bytes(payload)


def test_unknown_fields_inside_the_header_are_skipped() -> None:
    head = _header([2]).SerializeToString() + _field(50, 2, b"future") + _field(51, 0, b"\x05")
    message = _field(1, 2, head) + _field(2, 2, b"hi")
    header, payload = decode_frame(message)
    assert [(e.block_id, e.nbytes) for e in header.blocks] == [(10, 2)]
    assert bytes(split_blocks(header, payload)[0].data) == b"hi"


# --- malformed input -----------------------------------------------------------------------


def test_every_truncation_raises() -> None:
    message = encode_frame(_header([5, 7], push=True), [b"12345", b"abcdefg"])
    for cut in range(1, len(message)):
        with pytest.raises(WireFormatError):
            _decode_and_split(message[:cut])


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(b"\xff" * 11, id="overlong-varint"),
        pytest.param(b"\x80", id="truncated-key"),
        pytest.param(b"\x0a", id="missing-length"),
        pytest.param(b"\x0a\x80", id="truncated-length"),
        pytest.param(b"\x0a\x05ab", id="header-runs-past-end"),
        pytest.param(b"\x12\xff\xff\xff\xff\x0f", id="payload-runs-past-end"),
        pytest.param(b"\x00", id="field-zero"),
        pytest.param(b"\x02\x00", id="field-zero-length-delimited"),
        pytest.param(b"\x0b", id="start-group"),
        pytest.param(b"\x0c", id="end-group"),
        pytest.param(b"\x0e", id="wire-type-6"),
        pytest.param(b"\x0f", id="wire-type-7"),
        pytest.param(b"\x19\x00\x00", id="truncated-fixed64"),
        pytest.param(b"\x1d\x00", id="truncated-fixed32"),
        pytest.param(b"\x18", id="truncated-varint-value"),
        pytest.param(b"\x0a\x03\xff\xff\xff", id="garbage-header"),
        pytest.param(b"\x0a\x02\x0a\x05", id="header-entry-runs-past-end"),
        pytest.param(b"\x0a\x01\x0b", id="header-with-unterminated-group"),
        pytest.param(b"not a protobuf frame at all", id="ascii"),
    ],
)
def test_garbage_raises_wire_format_error(message: bytes) -> None:
    with pytest.raises(WireFormatError):
        _decode_and_split(message)


def test_block_larger_than_payload_raises() -> None:
    header = _header([4, 9])
    message = encode_frame(header, [b"abcd", b"12345678"])  # second block is one byte short
    decoded, payload = decode_frame(message)
    with pytest.raises(WireFormatError, match="declares"):
        split_blocks(decoded, payload)


def test_huge_declared_block_size_raises() -> None:
    header = pb.FrameHeader()
    header.blocks.add(block_id=0, nbytes=2**64 - 1)
    with pytest.raises(WireFormatError):
        _decode_and_split(encode_frame(header, [b"abc"]))


def test_trailing_undeclared_payload_raises() -> None:
    message = encode_frame(_header([4]), [b"abcd", b"!"])
    decoded, payload = decode_frame(message)
    with pytest.raises(WireFormatError, match="beyond"):
        split_blocks(decoded, payload)
    with pytest.raises(WireFormatError):
        _decode_and_split(encode_frame(pb.FrameHeader(), [b"x"]))


def test_wire_format_error_is_a_value_error() -> None:
    assert issubclass(WireFormatError, ValueError)


@settings(_HYPOTHESIS, max_examples=300)
@given(data=st.binary(max_size=200))
def test_random_bytes_only_raise_wire_format_error(data: bytes) -> None:
    try:
        blocks = _decode_and_split(data)
    except WireFormatError:
        return
    assert all(isinstance(b.data, memoryview) for b in blocks)


@st.composite
def _corrupted_frames(draw: st.DrawFn) -> bytes:
    sizes = draw(st.lists(st.integers(0, 20), max_size=5))
    message = bytearray(encode_frame(_header(sizes, push=draw(st.booleans())), _payload_bytes(sizes)))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "delete"]))
        position = draw(st.integers(0, len(message)))
        if action == "flip" and position < len(message):
            message[position] = draw(st.integers(0, 255))
        elif action == "cut":
            del message[position:]
        elif action == "insert":
            message[position:position] = draw(st.binary(min_size=1, max_size=4))
        elif action == "delete" and position < len(message):
            del message[position]
    return bytes(message)


@_HYPOTHESIS
@given(data=_corrupted_frames())
def test_corrupted_frames_only_raise_wire_format_error(data: bytes) -> None:
    try:
        _decode_and_split(data)
    except WireFormatError:
        pass


@_HYPOTHESIS
@given(sizes=st.lists(st.integers(0, 64), max_size=6), push=st.booleans())
def test_round_trip_property(sizes: list[int], push: bool) -> None:
    parts = _payload_bytes(sizes)
    header = _header(sizes, push=push)
    message = encode_frame(header, parts)
    assert pb.Frame.FromString(message) == pb.Frame(header=header, payload=b"".join(parts))
    decoded, payload = decode_frame(message)
    assert decoded == header
    assert [bytes(b.data) for b in split_blocks(decoded, payload)] == parts


# --- chunk_frames --------------------------------------------------------------------------


def _wire_blocks(sizes: list[int]) -> list[WireBlock]:
    return [
        WireBlock(block_id=i, version=i + 1, dtype=pb.FLOAT16, data=memoryview(part))
        for i, part in enumerate(_payload_bytes(sizes))
    ]


def _check_chunks(frames: list[bytes], blocks: list[WireBlock], chunk_bytes: int) -> list[pb.FrameHeader]:
    headers = []
    received: list[WireBlock] = []
    for index, message in enumerate(frames):
        header, payload = decode_frame(message)
        headers.append(header)
        mine = split_blocks(header, payload)
        assert mine, "no empty frames when there are blocks"
        if payload.nbytes > chunk_bytes:
            # Only a single block larger than the chunk may exceed it.
            assert len(mine) == 1
            assert mine[0].data.nbytes > chunk_bytes
        if index + 1 < len(frames):
            # Greedy packing: the next block would not have fitted.
            next_size = split_blocks(*decode_frame(frames[index + 1]))[0].data.nbytes
            assert payload.nbytes + next_size > chunk_bytes
        received.extend(mine)
    assert [(b.block_id, b.version, b.dtype, bytes(b.data)) for b in received] == [
        (b.block_id, b.version, b.dtype, bytes(b.data)) for b in blocks
    ]
    return headers


@pytest.mark.parametrize(
    ("sizes", "chunk_bytes"),
    [
        ([10, 10, 10, 10], 20),
        ([10, 10, 10, 10], 25),
        ([10, 10, 10, 10], 1000),
        ([5, 50, 5, 5, 60, 1], 20),
        ([0, 0, 3, 0], 2),
        ([21], 20),
        ([1, 2, 3, 4, 5, 6, 7, 8, 9], 9),
    ],
)
def test_chunk_frames_respects_chunk_bytes(sizes: list[int], chunk_bytes: int) -> None:
    blocks = _wire_blocks(sizes)
    frames = list(chunk_frames(blocks, chunk_bytes=chunk_bytes))
    _check_chunks(frames, blocks, chunk_bytes)


def test_chunk_frames_counts() -> None:
    assert len(list(chunk_frames(_wire_blocks([10] * 4), chunk_bytes=20))) == 2
    assert len(list(chunk_frames(_wire_blocks([10] * 4), chunk_bytes=19))) == 4
    assert len(list(chunk_frames(_wire_blocks([10] * 4), chunk_bytes=40))) == 1
    assert len(list(chunk_frames(_wire_blocks([100, 1, 100]), chunk_bytes=10))) == 3


def test_chunk_frames_default_chunk() -> None:
    blocks = _wire_blocks([1000] * 3)
    frames = list(chunk_frames(blocks))
    assert len(frames) == 1
    assert DEFAULT_CHUNK_BYTES >= 1 << 20


def test_chunk_frames_accepts_a_generator() -> None:
    blocks = _wire_blocks([4, 4, 4])

    def gen() -> Iterator[WireBlock]:
        yield from blocks

    _check_chunks(list(chunk_frames(gen(), chunk_bytes=8)), blocks, 8)


def test_first_header_only_in_first_frame() -> None:
    first = pb.FrameHeader()
    first.push.worker_id = 3
    first.push.clock = 99
    blocks = _wire_blocks([8, 8, 8, 8])
    frames = list(chunk_frames(blocks, chunk_bytes=8, first_header=first))
    headers = _check_chunks(frames, blocks, 8)
    assert len(headers) == 4
    assert headers[0].HasField("push")
    assert headers[0].push == first.push
    assert not headers[0].HasField("init")
    for header in headers[1:]:
        assert not header.HasField("push")
        assert not header.HasField("init")
    # The caller's header is not modified.
    assert len(first.blocks) == 0


def test_init_first_header() -> None:
    first = pb.FrameHeader(init=pb.InitHeader(worker_id=5))
    frames = list(chunk_frames(_wire_blocks([3, 3]), chunk_bytes=3, first_header=first))
    headers = [decode_frame(f)[0] for f in frames]
    assert headers[0].init.worker_id == 5
    assert not headers[1].HasField("init")


def test_always_one_with_no_blocks() -> None:
    first = pb.FrameHeader(push=pb.PushHeader(worker_id=1, clock=2))
    frames = list(chunk_frames([], first_header=first, always_one=True))
    assert len(frames) == 1
    header, payload = decode_frame(frames[0])
    assert header == first
    assert payload.nbytes == 0
    assert split_blocks(header, payload) == []
    assert len(list(chunk_frames([], always_one=True))) == 1


def test_no_blocks_without_always_one_gives_no_frames() -> None:
    first = pb.FrameHeader(push=pb.PushHeader(worker_id=1, clock=2))
    assert list(chunk_frames([], first_header=first)) == []
    assert list(chunk_frames([])) == []


def test_always_one_does_not_add_frames_when_there_are_blocks() -> None:
    blocks = _wire_blocks([4, 4, 4])
    with_flag = list(chunk_frames(blocks, chunk_bytes=4, always_one=True))
    without = list(chunk_frames(blocks, chunk_bytes=4))
    assert with_flag == without
    assert len(with_flag) == 3


@_HYPOTHESIS
@given(sizes=st.lists(st.integers(0, 50), max_size=12), chunk_bytes=st.integers(1, 80), push=st.booleans())
def test_chunk_frames_property(sizes: list[int], chunk_bytes: int, push: bool) -> None:
    blocks = _wire_blocks(sizes)
    first = pb.FrameHeader(push=pb.PushHeader(worker_id=4, clock=8)) if push else None
    frames = list(chunk_frames(blocks, chunk_bytes=chunk_bytes, first_header=first, always_one=True))
    assert frames
    if not blocks:
        assert len(frames) == 1
        return
    headers = _check_chunks(frames, blocks, chunk_bytes)
    assert headers[0].HasField("push") == push
    assert not any(h.HasField("push") for h in headers[1:])
