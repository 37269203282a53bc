"""Exchange frames: runs of blocks with packed ids, versions and scales, chunked at block boundaries."""

from __future__ import annotations

import pytest
import torch

from ranger_ps.errors import WireFormatError
from ranger_ps.wire._proto import ranger_ps_pb2 as pb
from ranger_ps.wire.frames import decode_frame, encode_frame
from ranger_ps.wire.runs import (
    WireRun,
    decode_runs,
    encode_exchange,
    encode_shared,
    exchange_wire_bytes,
    run_header,
)


def _run(ids: list[int], lengths: list[int], *, versions: bool = False, dtype: torch.dtype = torch.float32) -> WireRun:
    values = torch.arange(sum(lengths), dtype=torch.float32).to(dtype)
    wire = {torch.float32: pb.FLOAT32, torch.bfloat16: pb.BFLOAT16, torch.int8: pb.INT8}[dtype]
    return WireRun(
        wire,
        torch.tensor(ids, dtype=torch.int64),
        values,
        torch.tensor([i * 10 for i in ids], dtype=torch.int64) if versions else None,
        torch.full((len(ids),), 0.5) if dtype == torch.int8 else None,
    )


def _decode_all(frames: list[bytes]) -> tuple[list[pb.ExchangeHeader], list[WireRun]]:
    headers, runs = [], []
    for frame in frames:
        header, payload = decode_frame(frame)
        headers.append(header.exchange)
        runs.extend(decode_runs(header, payload))
    return headers, runs


def test_runs_round_trip_with_ids_versions_and_scales_as_packed_arrays() -> None:
    runs = [_run([1, 4, 9], [3, 3, 2], versions=True), _run([2, 5], [4, 4], dtype=torch.int8)]
    frames = encode_exchange(
        pb.ExchangeHeader(worker_id=3, clock=7),
        runs,
        [torch.tensor([3, 3, 2]), torch.tensor([4, 4])],
    )
    assert len(frames) == 1
    headers, decoded = _decode_all(frames)
    assert headers[0].worker_id == 3 and headers[0].clock == 7 and not headers[0].more
    for sent, got in zip(runs, decoded, strict=True):
        assert got.dtype == sent.dtype
        assert torch.equal(got.block_ids, sent.block_ids)
        assert torch.equal(got.values, sent.values)
        assert (got.versions is None) == (sent.versions is None)
        if sent.versions is not None:
            assert got.versions is not None and torch.equal(got.versions, sent.versions)
        if sent.scales is not None:
            assert got.scales is not None and torch.equal(got.scales, sent.scales)
    # one array per run, not an entry per block
    assert len(run_header(runs[0]).block_ids) == 3 * 4


def test_big_runs_are_cut_at_block_boundaries_into_frames_that_say_more() -> None:
    lengths = [100] * 10  # 400 bytes a block
    run = _run(list(range(0, 20, 2)), lengths)
    frames = encode_exchange(pb.ExchangeHeader(clock=1), [run], [torch.tensor(lengths)], chunk_bytes=1000)
    assert len(frames) > 1
    headers, decoded = _decode_all(frames)
    assert [h.more for h in headers] == [True] * (len(frames) - 1) + [False]
    assert all(h.clock == 1 for h in headers)
    assert torch.equal(torch.cat([r.block_ids for r in decoded]), run.block_ids)
    assert torch.equal(torch.cat([r.values for r in decoded]), run.values)
    for piece in decoded:  # whole blocks only
        assert piece.values.numel() == 100 * len(piece.block_ids)
    assert exchange_wire_bytes(pb.ExchangeHeader(clock=1), [run], [torch.tensor(lengths)], 1000) == sum(
        len(f) for f in frames
    )


def test_an_exchange_without_blocks_is_one_frame() -> None:
    frames = encode_exchange(pb.ExchangeHeader(worker_id=1, clock=5), [], [])
    headers, runs = _decode_all(frames)
    assert len(frames) == 1 and runs == [] and headers[0].clock == 5


def test_shared_runs_carry_only_headers_and_read_from_the_region() -> None:
    region = memoryview(bytearray(4096))
    runs = [_run([0, 3], [4, 4]), _run([7], [2], dtype=torch.bfloat16)]
    frame = encode_shared(pb.ExchangeHeader(clock=2), runs, region, offset=64)
    header, payload = decode_frame(frame)
    assert payload.nbytes == 0 and header.exchange.shared and header.exchange.shared_offset == 64
    decoded = decode_runs(header, payload, region)
    assert torch.equal(decoded[0].values, runs[0].values)
    assert torch.equal(decoded[1].values, runs[1].values)
    with pytest.raises(WireFormatError, match="none was agreed"):
        decode_runs(header, payload, None)
    with pytest.raises(ValueError, match="do not fit"):
        encode_shared(pb.ExchangeHeader(), [_run([0], [2000])], region)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda h: setattr(h.runs[0], "nbytes", 4000), "declares 4000 bytes"),
        (lambda h: setattr(h.runs[0], "block_ids", b"\x01\x00\x00"), "block ids has 3 bytes"),
        (lambda h: setattr(h.runs[0], "versions", b"\x00" * 8), "versions has 8 bytes, expected 2 x 8"),
        (lambda h: setattr(h.runs[0], "dtype", 42), "unknown wire dtype 42"),
        (lambda h: setattr(h.runs[0], "nbytes", 30), "not whole elements"),
    ],
)
def test_malformed_run_headers_are_wire_errors(mutate: object, message: str) -> None:
    run = _run([1, 2], [4, 4])
    header = pb.FrameHeader(runs=[run_header(run)])
    header.exchange.clock = 1
    mutate(header)  # type: ignore[operator]
    frame = encode_frame(header, [run.values.numpy().tobytes()])
    decoded_header, payload = decode_frame(frame)
    with pytest.raises(WireFormatError, match=message):
        decode_runs(decoded_header, payload)


def test_bytes_beyond_the_declared_runs_are_refused() -> None:
    run = _run([1], [4])
    header = pb.FrameHeader(runs=[run_header(run)])
    frame = encode_frame(header, [run.values.numpy().tobytes(), b"\x00" * 4])
    decoded_header, payload = decode_frame(frame)
    with pytest.raises(WireFormatError, match="4 bytes beyond"):
        decode_runs(decoded_header, payload)
