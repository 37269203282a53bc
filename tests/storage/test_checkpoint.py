"""Checkpoint files: exact round trips, keep-K, every kind of damage detected, fallback, assembly, no pickle.

Fast unit tests: no processes, no network. The process-level proofs (SIGTERM, SIGKILL, resharding,
fallback on a real server) live in ``tests/server/test_durability.py``.
"""

from __future__ import annotations

import ast
import asyncio
import ctypes
import dataclasses
import errno
import logging
import os
import pickle
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
import torch

from ranger_ps.algorithm.layout import Layout
from ranger_ps.algorithm.placement import Placement
from ranger_ps.algorithm.rules import RuleConfig, new_block_state
from ranger_ps.config.server import CheckpointSettings
from ranger_ps.errors import ClusterError, UserError
from ranger_ps.server.checkpointer import Checkpointer, FinalCheckpointError, check_directory, restore
from ranger_ps.server.shard import Shard
from ranger_ps.server.store import ShardStore
from ranger_ps.storage import checkpoint
from ranger_ps.storage.checkpoint import BlockRecord, CheckpointError, ShardCheckpoint
from ranger_ps.wire.codec import codec_for_name, tensor_bytes
from ranger_ps.wire.frames import WireBlock
from tests.conftest import ROOT

ADAMW = RuleConfig(
    rule="adamw", lr=0.01, weight_decay=0.01, truncate_below=1e-3, truncation_residual=True, outer="rule"
)


def _params(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        ("w", torch.randn(3, 5, generator=g)),
        ("half", torch.randn(9, generator=g).to(torch.float16)),
        ("bf", torch.randn(7, generator=g).to(torch.bfloat16)),
        ("empty", torch.randn(0, generator=g)),
        ("double", torch.randn(2, 2, generator=g).to(torch.float64)),
    ]


def _layout(block_size: int = 4) -> Layout:
    return Layout.from_named_tensors(_params(), block_size)


def _tiny_params() -> list[tuple[str, torch.Tensor]]:
    return [("w", torch.arange(6, dtype=torch.float32)), ("h", torch.arange(3).to(torch.float16))]


def _records(
    layout: Layout,
    rule: RuleConfig,
    block_ids: list[int] | None = None,
    seed: int = 1,
    params: list[tuple[str, torch.Tensor]] | None = None,
) -> list[BlockRecord]:
    """Blocks with random values, random rule state (of the dtypes the server keeps) and residuals."""
    g = torch.Generator().manual_seed(seed)
    flats = [t.reshape(-1) for _, t in (params or _params())]
    out = []
    for block in layout.blocks:
        if block_ids is not None and block.block_id not in block_ids:
            continue
        dtype = codec_for_name(block.dtype).torch_dtype
        state = new_block_state(rule, block.numel, dtype)
        for tensor in (*state.tensors.values(), *([state.residual] if state.residual is not None else [])):
            tensor.copy_(torch.randn(block.numel, generator=g).to(tensor.dtype))
        value = flats[block.param_index][block.offset : block.offset + block.numel].clone()
        out.append(
            BlockRecord(
                block_id=block.block_id,
                version=3 + block.block_id,
                step=2 + block.block_id,
                value=value,
                state=dict(state.tensors),
                residual=state.residual,
            )
        )
    return out


def _checkpoint(
    rule: RuleConfig = ADAMW,
    *,
    layout: Layout | None = None,
    shard_id: int = 0,
    num_shards: int = 1,
    block_ids: list[int] | None = None,
    pushes: int = 7,
    params: list[tuple[str, torch.Tensor]] | None = None,
) -> ShardCheckpoint:
    layout = layout or (Layout.from_named_tensors(params, 3) if params else _layout())
    if block_ids is None and num_shards > 1:
        block_ids = list(Placement.compute(layout, num_shards).blocks_by_shard[shard_id])
    return ShardCheckpoint(
        shard_id=shard_id,
        num_shards=num_shards,
        layout=layout,
        rule=rule.to_dict(),
        consistency="ssp:2",
        applied_clock=11,
        clocks={0: 12, 3: 9},
        counters={"pushes_applied": pushes, "blocks_applied": 5 * pushes},
        created=1_700_000_000.25,
        blocks=_records(layout, rule, block_ids, params=params),
    )


def _assert_same(got: ShardCheckpoint, want: ShardCheckpoint) -> None:
    for name in ("shard_id", "num_shards", "rule", "consistency", "applied_clock", "clocks", "counters", "created"):
        assert getattr(got, name) == getattr(want, name), name
    assert got.layout == want.layout and got.layout.fingerprint == want.layout.fingerprint
    assert [b.block_id for b in got.blocks] == [b.block_id for b in want.blocks]
    for g, w in zip(got.blocks, want.blocks, strict=True):
        assert (g.version, g.step) == (w.version, w.step), g.block_id
        assert g.value.dtype == w.value.dtype and torch.equal(g.value, w.value), g.block_id
        assert sorted(g.state) == sorted(w.state), g.block_id
        for key in w.state:
            assert g.state[key].dtype == w.state[key].dtype, (g.block_id, key)
            assert torch.equal(g.state[key], w.state[key]), (g.block_id, key)
        if w.residual is None:
            assert g.residual is None
        else:
            assert g.residual is not None and g.residual.dtype == w.residual.dtype
            assert torch.equal(g.residual, w.residual), g.block_id


def _boundaries(data: bytes) -> list[int]:
    """Where each msgpack object of a checkpoint file ends (header, blocks..., footer)."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(data)
    ends = []
    for _ in unpacker:
        ends.append(unpacker.tell())
    return ends


def _value_offset(path: Path, index: int = 0) -> tuple[int, int]:
    """Where the value bytes of the ``index``-th block of a good file start, and how many there are."""
    data = path.read_bytes()
    raw = bytes(tensor_bytes(checkpoint.read(path).blocks[index].value))
    return data.index(raw, _boundaries(data)[0]), len(raw)


def _flip(path: Path, offset: int, mask: int = 0x01) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


# -- round trips ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rule",
    [
        ADAMW,
        RuleConfig(rule="ranger", lr=0.01, truncate_below=1e-2, truncation_residual=True, outer="rule"),
        RuleConfig(rule="sgd", lr=0.1, momentum=0.9, truncate_below=1e-2, truncation_residual=True, outer="rule"),
        RuleConfig(rule="sgd", lr=0.1, momentum=0.0, outer="rule"),  # no state at all
    ],
    ids=["adamw", "ranger", "sgd-momentum", "sgd-plain"],
)
def test_write_read_round_trip_is_exact(tmp_path: Path, rule: RuleConfig) -> None:
    saved = _checkpoint(rule)
    assert {b.value.dtype for b in saved.blocks} == {torch.float32, torch.float16, torch.bfloat16, torch.float64}
    path = checkpoint.write(saved, tmp_path)
    assert path == tmp_path / "shard-0-00000001.ckpt"
    assert not list(tmp_path.glob("*.tmp"))
    _assert_same(checkpoint.read(path), saved)


def test_round_trip_of_low_precision_blocks_with_a_residual_and_no_rule_state(tmp_path: Path) -> None:
    rule = RuleConfig(rule="sgd", lr=0.1, truncate_below=1e-2, truncation_residual=True, momentum=0.0, outer="rule")
    saved = _checkpoint(rule)
    assert any(b.residual is not None and b.residual.dtype != b.value.dtype for b in saved.blocks)
    _assert_same(checkpoint.read(checkpoint.write(saved, tmp_path)), saved)


def test_a_real_stores_snapshot_restores_onto_three_shards_exactly(tmp_path: Path) -> None:
    """ShardStore.snapshot -> write -> read -> Shard.restore on another shard count: every tensor equal."""
    layout = _layout()
    flats = [t.reshape(-1).contiguous() for _, t in _params()]
    g = torch.Generator().manual_seed(5)
    before = Placement.compute(layout, 2)
    for shard_id, ids in enumerate(before.blocks_by_shard):
        store = ShardStore(layout, ids, ADAMW)

        def wire(block_id: int, source: list[torch.Tensor]) -> WireBlock:
            block = layout.blocks[block_id]
            data = tensor_bytes(source[block.param_index][block.offset : block.offset + block.numel])
            return WireBlock(block_id, 0, codec_for_name(block.dtype).wire, data)

        store.initialize([wire(b, flats) for b in store.block_ids])
        for _ in range(3):
            grads = [torch.randn(t.shape, generator=g).to(t.dtype) for t in flats]
            store.apply(store.decode([wire(b, grads) for b in store.block_ids]))
        saved = ShardCheckpoint(shard_id, 2, layout, ADAMW.to_dict(), "async", 0, {}, {}, time.time(), store.snapshot())
        checkpoint.write(saved, tmp_path)
    old = {b.block_id: b for c in checkpoint.load_cluster(tmp_path) for b in c.blocks}
    assert sorted(old) == list(range(layout.num_blocks))
    assert all(b.step == 3 and b.version == 4 and b.residual is not None for b in old.values())
    restored: dict[int, BlockRecord] = {}
    for shard_id in range(3):
        shard = Shard(shard_id, 3)
        shard.restore(checkpoint.load_cluster(tmp_path))
        snapshot = shard.checkpoint()
        assert snapshot is not None and snapshot.num_shards == 3
        restored.update({b.block_id: b for b in snapshot.blocks})
    assert sorted(restored) == sorted(old)
    for block_id, want in old.items():
        got = restored[block_id]
        assert (got.version, got.step) == (want.version, want.step)
        assert torch.equal(got.value, want.value)
        assert got.state.keys() == want.state.keys()
        assert all(torch.equal(got.state[k], want.state[k]) for k in want.state)
        assert got.residual is not None and want.residual is not None and torch.equal(got.residual, want.residual)


# -- keep K -------------------------------------------------------------------------------------------------


def test_keep_leaves_the_newest_k_files_of_that_shard_only(tmp_path: Path) -> None:
    other = checkpoint.write(_checkpoint(shard_id=1, num_shards=2, pushes=100), tmp_path, keep=1)
    for pushes in range(1, 7):
        checkpoint.write(_checkpoint(shard_id=0, num_shards=2, pushes=pushes), tmp_path, keep=3)
    files = checkpoint.list_checkpoints(tmp_path)
    assert [p.name for p in files[0]] == [f"shard-0-{n:08d}.ckpt" for n in (4, 5, 6)]
    assert [checkpoint.read(p).counters["pushes_applied"] for p in files[0]] == [4, 5, 6]
    assert files[1] == [other]  # another shard's files are not touched
    assert not list(tmp_path.glob("*.tmp"))
    checkpoint.write(_checkpoint(shard_id=0, num_shards=2, pushes=7), tmp_path, keep=1)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)[0]] == ["shard-0-00000007.ckpt"]


# -- damage is detected ---------------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return checkpoint.write(_checkpoint(), tmp_path / "good")


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A small file (3 blocks, adamw state, residuals) for the tests that damage every byte."""
    return checkpoint.write(_checkpoint(params=_tiny_params()), tmp_path / "tiny")


def test_truncation_at_chosen_offsets_is_detected(good: Path, tmp_path: Path) -> None:
    data = good.read_bytes()
    ends = _boundaries(data)
    header_end, first_block_end, footer_start = ends[0], ends[1], ends[-2]
    value_at, value_size = _value_offset(good)
    cuts = {
        "empty": 0,
        "one byte": 1,
        "mid-header": header_end // 2,
        "header only": header_end,
        "mid-block value": value_at + value_size // 2,
        "after the first block": first_block_end,
        "just before the footer": footer_start,
        "one byte short": len(data) - 1,
    }
    for what, cut in cuts.items():
        bad = tmp_path / f"cut-{cut}.ckpt"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            checkpoint.read(bad)
        assert cut < len(data), what


def test_truncation_at_every_offset_is_detected(tiny: Path, tmp_path: Path) -> None:
    data = tiny.read_bytes()
    bad = tmp_path / "cut.ckpt"
    survived = []
    for cut in range(len(data)):
        bad.write_bytes(data[:cut])
        try:
            checkpoint.read(bad)
        except CheckpointError:
            continue
        survived.append(cut)
    assert survived == []


def test_a_flipped_byte_in_a_blocks_values_is_detected(good: Path) -> None:
    data = good.read_bytes()
    saved = checkpoint.read(good)
    for block in (saved.blocks[0], saved.blocks[-1]):
        for part in (block.value, *block.state.values()):
            raw = bytes(tensor_bytes(part))
            at = data.index(raw, _boundaries(data)[0])
            copy = good.with_name("flipped.ckpt")
            copy.write_bytes(data)
            _flip(copy, at + len(raw) // 2, 0x10)
            with pytest.raises(CheckpointError, match=f"block {block.block_id} checksum mismatch"):
                checkpoint.read(copy)


def test_a_flipped_bit_anywhere_in_the_header_is_detected(tiny: Path, tmp_path: Path) -> None:
    data = tiny.read_bytes()
    header_end = _boundaries(data)[0]
    bad = tmp_path / "flipped.ckpt"
    survived = []
    for offset in range(header_end):
        for mask in (0x01, 0x80):
            flipped = bytearray(data)
            flipped[offset] ^= mask
            bad.write_bytes(bytes(flipped))
            try:
                checkpoint.read(bad)
            except CheckpointError:
                continue
            survived.append((offset, mask))
    assert survived == []
    # e.g. a digit of the learning rate: the header checksum catches it
    at = data.index(b"lr")
    bad.write_bytes(data)
    _flip(bad, at + 4)
    with pytest.raises(CheckpointError, match="header checksum mismatch"):
        checkpoint.read(bad)


def test_a_flipped_bit_anywhere_in_the_file_is_detected(tiny: Path, tmp_path: Path) -> None:
    data = tiny.read_bytes()
    bad = tmp_path / "flipped.ckpt"
    survived: list[tuple[int, int, bytes]] = []
    for offset in range(len(data)):
        for mask in (0x01, 0x08):
            flipped = bytearray(data)
            flipped[offset] ^= mask
            bad.write_bytes(bytes(flipped))
            try:
                checkpoint.read(bad)
            except CheckpointError:
                continue
            survived.append((offset, mask, data[max(0, offset - 10) : offset + 2]))
    assert survived == [], f"{len(survived)} undetected flips, e.g. {survived[:6]}"


def test_garbage_empty_missing_and_foreign_files_raise_checkpoint_error(tmp_path: Path) -> None:
    cases: dict[str, bytes] = {"empty": b""}
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 100, 5000):
        cases[f"garbage-{n}"] = bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist())
    cases["msgpack list"] = msgpack.packb([1, 2, 3])
    cases["msgpack int"] = msgpack.packb(7)
    cases["another format"] = msgpack.packb({"format": "safetensors", "format_version": 1})
    cases["no format"] = msgpack.packb({"shard_id": 0})
    header = msgpack.Unpacker(raw=False, strict_map_key=False)
    saved = checkpoint.write(_checkpoint(), tmp_path / "src")
    header.feed(saved.read_bytes())
    real = next(header)
    future = {k: v for k, v in real.items() if k != "crc32"} | {"format_version": 99}
    future["crc32"] = checkpoint._header_crc(future)
    cases["a future format version"] = msgpack.packb(future, use_bin_type=True)
    cases["json"] = b'{"format": "ranger-ps-checkpoint"}'
    for what, data in cases.items():
        path = tmp_path / f"{what}.ckpt"
        path.write_bytes(data)
        with pytest.raises(CheckpointError) as info:
            checkpoint.read(path)
        assert str(path) in str(info.value), what
    with pytest.raises(CheckpointError, match="format version 99"):
        checkpoint.read(tmp_path / "a future format version.ckpt")
    with pytest.raises(CheckpointError, match="not a ranger-ps checkpoint"):
        checkpoint.read(tmp_path / "another format.ckpt")
    with pytest.raises(CheckpointError):
        checkpoint.read(tmp_path / "missing.ckpt")


class _Bomb:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_pickle_and_torch_save_files_are_refused_without_running_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "shard-0-00000001.ckpt").write_bytes(pickle.dumps(_Bomb(marker)))
    torch.save({"w": torch.ones(3)}, tmp_path / "shard-0-00000002.ckpt")
    for path in checkpoint.list_checkpoints(tmp_path)[0]:
        with pytest.raises(CheckpointError):
            checkpoint.read(path)
    assert checkpoint.load_newest(tmp_path, 0) is None
    assert not marker.exists()


# -- fallback ------------------------------------------------------------------------------------------------


def test_load_newest_falls_back_to_the_previous_good_file_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = [checkpoint.write(_checkpoint(pushes=n), tmp_path) for n in (1, 2, 3)]
    newest = checkpoint.load_newest(tmp_path, 0)
    assert newest is not None and newest.counters["pushes_applied"] == 3
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) // 2])  # torn
    with caplog.at_level(logging.WARNING, logger="ranger_ps.storage.checkpoint"):
        fallback = checkpoint.load_newest(tmp_path, 0)
    assert fallback is not None and fallback.counters["pushes_applied"] == 2
    _assert_same(fallback, checkpoint.read(paths[1]))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(paths[2]) in warnings[0].getMessage()
    caplog.clear()
    at, size = _value_offset(paths[1])
    _flip(paths[1], at + size // 2)  # inside the first block's values
    with caplog.at_level(logging.WARNING, logger="ranger_ps.storage.checkpoint"):
        oldest = checkpoint.load_newest(tmp_path, 0)
        clustered = checkpoint.load_cluster(tmp_path)
    assert oldest is not None and oldest.counters["pushes_applied"] == 1
    assert [c.counters["pushes_applied"] for c in clustered] == [1]
    messages = [r.getMessage() for r in caplog.records]
    assert any(str(paths[1]) in m for m in messages) and any(str(paths[2]) in m for m in messages)
    paths[0].write_bytes(b"")
    assert checkpoint.load_newest(tmp_path, 0) is None
    assert checkpoint.load_cluster(tmp_path) == []
    assert checkpoint.load_newest(tmp_path / "missing", 0) is None


# -- assembly ---------------------------------------------------------------------------------------------


def test_assemble_weights_rebuilds_whole_parameters_from_two_shards() -> None:
    layout = _layout()
    shards = [_checkpoint(shard_id=s, num_shards=2) for s in range(2)]
    assert all(shards[s].blocks for s in range(2))
    weights = checkpoint.assemble_weights(shards)
    assert list(weights) == [name for name, _ in _params()]
    for name, want in _params():
        assert weights[name].dtype == want.dtype and weights[name].shape == want.shape, name
        assert torch.equal(weights[name], want), name
    assert checkpoint.assemble_weights(list(reversed(shards))).keys() == weights.keys()
    summary = checkpoint.describe(shards, {0: [Path("shard-0-00000001.ckpt")]})
    assert summary["layout_fingerprint"] == layout.fingerprint
    assert [s["shard_id"] for s in summary["shards"]] == [0, 1]
    assert sum(s["blocks"] for s in summary["shards"]) == layout.num_blocks
    assert sum(s["elements"] for s in summary["shards"]) == layout.numel


def test_assemble_weights_errors_clearly_when_blocks_are_missing() -> None:
    shards = [_checkpoint(shard_id=s, num_shards=2) for s in range(2)]
    with pytest.raises(CheckpointError, match="blocks are in no checkpoint .*a shard's files are missing"):
        checkpoint.assemble_weights(shards[:1])
    with pytest.raises(CheckpointError, match="no checkpoints"):
        checkpoint.assemble_weights([])
    other = _checkpoint(layout=_layout(block_size=5), shard_id=1, num_shards=2)
    with pytest.raises(CheckpointError, match="different models"):
        checkpoint.assemble_weights([shards[0], other])


# -- restoring a folder on start ------------------------------------------------------------------------------


def _write_cluster(directory: Path, num_shards: int, pushes: int) -> None:
    for shard_id in range(num_shards):
        checkpoint.write(_checkpoint(shard_id=shard_id, num_shards=num_shards, pushes=pushes), directory)


def test_a_cluster_resharded_down_in_place_restarts_from_its_own_checkpoints(tmp_path: Path) -> None:
    _write_cluster(tmp_path, 3, pushes=5)
    for shard_id in range(2):  # the 2 new shards start on the folder and restore (resharding)...
        restore(Shard(shard_id, 2), tmp_path)
    _write_cluster(tmp_path, 2, pushes=9)  # ...train, and write their own checkpoints
    shard = Shard(0, 2)
    restore(shard, tmp_path)  # a plain restart of shard 0 of 2
    assert shard.pushes_applied == 9


def test_restore_on_start_takes_its_own_file_or_reshards_all_of_them(tmp_path: Path) -> None:
    _write_cluster(tmp_path, 2, pushes=4)
    same = Shard(1, 2)
    restore(same, tmp_path)
    assert same.pushes_applied == 4  # restored as itself: counters carry over
    assert same.store is not None and same.store.block_ids == Placement.compute(_layout(), 2).blocks_by_shard[1]
    grown = Shard(2, 3)
    restore(grown, tmp_path)
    assert grown.store is not None and grown.store.block_ids == Placement.compute(_layout(), 3).blocks_by_shard[2]
    empty = Shard(0, 1)
    restore(empty, tmp_path / "nothing-here")
    assert empty.store is None
    (tmp_path / "shard-1-00000001.ckpt").unlink()
    with pytest.raises(UserError, match=r"2-shard checkpoints of shards \[0\]"):
        restore(Shard(2, 3), tmp_path)


# -- generations: pruning, restore, export ------------------------------------------------------------------


def _written(
    directory: Path, shard_id: int, num_shards: int, created: float, *, keep: int = 3, pushes: int = 1
) -> Path:
    """Write one checkpoint of shard ``shard_id`` of ``num_shards`` created at ``created``."""
    saved = dataclasses.replace(_checkpoint(shard_id=shard_id, num_shards=num_shards, pushes=pushes), created=created)
    return checkpoint.write(saved, directory, keep=keep)


def _by_generation(directory: Path) -> dict[int, dict[int, list[str]]]:
    """num_shards -> shard id -> file names, read from the headers."""
    out: dict[int, dict[int, list[str]]] = {}
    for shard_id, paths in checkpoint.list_checkpoints(directory).items():
        for path in paths:
            out.setdefault(checkpoint.read_header(path).num_shards, {}).setdefault(shard_id, []).append(path.name)
    return out


def test_keep_counts_per_generation_and_an_older_generation_outlives_an_incomplete_newer_one(tmp_path: Path) -> None:
    """Issue 15, item 2: new shards 0 and 1 of 3 (keep 1) must not delete the 2-shard files shard 2 restores from."""
    for shard_id in range(2):
        _written(tmp_path, shard_id, 2, created=100.0, pushes=4)
    for n in range(5):  # shards 0 and 1 of 3 start first and checkpoint several times, keeping 1 file
        for shard_id in range(2):
            _written(tmp_path, shard_id, 3, created=200.0 + n, keep=1, pushes=10 + n)
    assert _by_generation(tmp_path) == {
        2: {0: ["shard-0-00000001.ckpt"], 1: ["shard-1-00000001.ckpt"]},
        3: {0: ["shard-0-00000006.ckpt"], 1: ["shard-1-00000006.ckpt"]},
    }
    generations = checkpoint.load_generations(tmp_path)
    assert [(g.num_shards, g.complete(), g.missing()) for g in generations] == [(3, False, [2]), (2, True, [])]
    chosen = checkpoint.newest_complete(generations)
    assert chosen is not None and chosen.num_shards == 2
    # Shard 2 starts late: it restores its blocks from the complete 2-shard generation.
    late = Shard(2, 3)
    restore(late, tmp_path)
    assert late.store is not None and late.store.block_ids == Placement.compute(_layout(), 3).blocks_by_shard[2]
    # Every block is found: the newest complete generation assembles the whole model.
    weights = checkpoint.assemble_weights(chosen.checkpoints())
    assert all(torch.equal(weights[name], want) for name, want in _params())
    # Shard 2's first checkpoint completes the 3-shard generation; each shard's next write removes
    # its own 2-shard files.
    _written(tmp_path, 2, 3, created=300.0, keep=1)
    assert sorted(_by_generation(tmp_path)) == [2, 3]  # shard 2 had no 2-shard file; 0 and 1 did not write since
    for shard_id in range(2):
        _written(tmp_path, shard_id, 3, created=301.0 + shard_id, keep=1)
    assert _by_generation(tmp_path) == {
        3: {0: ["shard-0-00000007.ckpt"], 1: ["shard-1-00000007.ckpt"], 2: ["shard-2-00000001.ckpt"]}
    }


def test_resharding_down_removes_the_older_generation_once_the_new_one_is_complete(tmp_path: Path) -> None:
    for shard_id in range(3):
        _written(tmp_path, shard_id, 3, created=100.0)
    _written(tmp_path, 0, 2, created=200.0, keep=2)
    assert sorted(_by_generation(tmp_path)) == [2, 3]  # 2-shard generation incomplete: nothing of 3 deleted
    _written(tmp_path, 1, 2, created=201.0, keep=2)  # complete now: shard 1 drops its own 3-shard file
    assert _by_generation(tmp_path) == {
        2: {0: ["shard-0-00000002.ckpt"], 1: ["shard-1-00000002.ckpt"]},
        3: {0: ["shard-0-00000001.ckpt"], 2: ["shard-2-00000001.ckpt"]},
    }
    _written(tmp_path, 0, 2, created=202.0, keep=2)  # shard 0 also drops the ids 2 shards no longer have
    assert _by_generation(tmp_path) == {
        2: {0: ["shard-0-00000002.ckpt", "shard-0-00000003.ckpt"], 1: ["shard-1-00000002.ckpt"]}
    }


def test_an_older_generation_is_kept_while_a_file_of_the_newer_one_is_damaged(tmp_path: Path) -> None:
    for shard_id in range(2):
        _written(tmp_path, shard_id, 2, created=100.0)
    damaged = _written(tmp_path, 1, 3, created=150.0)
    at, size = _value_offset(damaged)
    _flip(damaged, at + size // 2)  # shard 1 of 3 has a file, but not a good one
    for shard_id in (0, 2):
        _written(tmp_path, shard_id, 3, created=300.0 + shard_id)
    gens = checkpoint.load_generations(tmp_path)
    assert [(g.num_shards, g.missing()) for g in gens] == [(3, [1]), (2, [])]
    assert sorted(_by_generation(tmp_path)[2]) == [0, 1]  # the 2-shard files are all still there


def test_assemble_weights_refuses_to_mix_generations_or_repeat_a_shard() -> None:
    two = [_checkpoint(shard_id=s, num_shards=2) for s in range(2)]
    one = _checkpoint(shard_id=0, num_shards=1)
    with pytest.raises(CheckpointError, match=r"different generations \(shard counts \[1, 2\]\)"):
        checkpoint.assemble_weights([one, *two])
    with pytest.raises(CheckpointError, match="several checkpoints of one shard"):
        checkpoint.assemble_weights([two[0], two[0], two[1]])


def test_generations_warning_and_folder_summary(tmp_path: Path) -> None:
    only = tmp_path / "only"
    for shard_id in range(2):
        _written(only, shard_id, 2, created=100.0)
    generations = checkpoint.load_generations(only)
    assert checkpoint.generations_warning(generations) is None
    summary = checkpoint.describe_folder(generations)
    assert summary["generation"] == 2 and summary["complete"] and summary["warning"] is None
    assert [s["shard_id"] for s in summary["shards"]] == [0, 1]

    # Two complete generations side by side (a 1-shard file copied in): the newest one is used.
    shutil.copy(_written(tmp_path / "elsewhere", 0, 1, created=200.0), only / "shard-0-00000009.ckpt")
    generations = checkpoint.load_generations(only)
    assert [g.num_shards for g in generations] == [1, 2]
    warning = checkpoint.generations_warning(generations)
    assert warning == "2 generations (1 shard, complete; 2 shards, complete); the newest, 1-shard one is used"
    summary = checkpoint.describe_folder(generations)
    assert summary["generation"] == 1 and [s["num_shards"] for s in summary["shards"]] == [1]
    assert [(g["num_shards"], g["complete"]) for g in summary["generations"]] == [(1, True), (2, True)]

    partial = tmp_path / "partial"
    for shard_id in range(2):
        _written(partial, shard_id, 2, created=100.0)
    _written(partial, 0, 3, created=200.0)
    warning = checkpoint.generations_warning(checkpoint.load_generations(partial))
    assert warning is not None and warning.startswith("the newest generation is incomplete (3 shards, incomplete: ")
    assert "shards [1, 2] have no good file" in warning and "(2 shards) is used" in warning

    none = tmp_path / "none"
    _written(none, 1, 2, created=100.0)
    warning = checkpoint.generations_warning(checkpoint.load_generations(none))
    assert warning == "1 generation(s) and none complete (2 shards, incomplete: shard 0 has no good file)"


def test_read_header_reads_only_the_header_and_checks_the_name(tmp_path: Path) -> None:
    path = _written(tmp_path, 1, 2, created=123.5)
    info = checkpoint.read_header(path)
    assert (info.shard_id, info.sequence, info.num_shards, info.created) == (1, 1, 2, 123.5)
    data = path.read_bytes()
    torn = tmp_path / "shard-1-00000002.ckpt"
    torn.write_bytes(data[: _boundaries(data)[0]])  # the header alone: still a readable header
    assert checkpoint.read_header(torn).sequence == 2
    renamed = tmp_path / "shard-0-00000009.ckpt"
    renamed.write_bytes(data)
    with pytest.raises(CheckpointError, match="header says shard 1 of 2, which the name contradicts"):
        checkpoint.read_header(renamed)
    with pytest.raises(CheckpointError, match="not a checkpoint file name"):
        checkpoint.read_header(tmp_path / "model.pt")


# -- disk faults -----------------------------------------------------------------------------------------------

_MS_RDONLY = 1
_MNT_DETACH = 2


@contextmanager
def tmpfs(mountpoint: Path, size: str = "64k", *, read_only: bool = False) -> Iterator[Path]:
    """A tiny tmpfs mounted on ``mountpoint`` (a real file system that fills up), unmounted after.

    Skips the test when this process may not mount (not root, or no CAP_SYS_ADMIN).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    mountpoint.mkdir(parents=True, exist_ok=True)
    flags = _MS_RDONLY if read_only else 0
    if libc.mount(b"tmpfs", bytes(mountpoint), b"tmpfs", flags, f"size={size}".encode()) != 0:
        pytest.skip(f"cannot mount a tmpfs here ({os.strerror(ctypes.get_errno())}): the disk-fault test needs root")
    try:
        yield mountpoint
    finally:
        if libc.umount2(bytes(mountpoint), 0) != 0:
            libc.umount2(bytes(mountpoint), _MNT_DETACH)  # something still holds a file there


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte with one file; returns it (delete it to free the space)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as out:
        try:
            while True:
                out.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def test_a_write_on_a_full_disk_fails_without_a_partial_file_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk") as disk:
        folder = disk / "ckpt"
        folder.mkdir()
        good = checkpoint.write(_checkpoint(pushes=1), folder, keep=1, create=False)
        before = good.read_bytes()
        filler = fill(disk)
        with pytest.raises(OSError) as info:
            checkpoint.write(_checkpoint(pushes=2), folder, keep=1, create=False)
        assert info.value.errno == errno.ENOSPC
        assert sorted(p.name for p in folder.iterdir()) == [good.name]  # no .tmp left, the good one kept
        assert good.read_bytes() == before
        filler.unlink()
        newer = checkpoint.write(_checkpoint(pushes=3), folder, keep=1, create=False)
        assert sorted(p.name for p in folder.iterdir()) == [newer.name]
        assert checkpoint.read(newer).counters["pushes_applied"] == 3


def test_a_server_write_never_recreates_a_vanished_folder(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    with pytest.raises(OSError, match="the checkpoint folder is gone") as info:
        checkpoint.write(_checkpoint(), folder, create=False)
    assert info.value.errno == errno.ENOENT and not folder.exists()
    folder.write_bytes(b"")
    with pytest.raises(OSError, match="the checkpoint folder is no longer a folder") as info:
        checkpoint.write(_checkpoint(), folder, create=False)
    assert info.value.errno == errno.ENOTDIR
    assert checkpoint.write(_checkpoint(), tmp_path / "new") == tmp_path / "new" / "shard-0-00000001.ckpt"


def test_check_directory_creates_the_folder_and_refuses_unusable_paths(tmp_path: Path) -> None:
    created = tmp_path / "a" / "b"
    check_directory(created)
    assert created.is_dir() and list(created.iterdir()) == []  # the probe file is gone
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match=f"^--checkpoint-dir {a_file} is not a folder$"):
        check_directory(a_file)
    with pytest.raises(UserError, match=f"^--checkpoint-dir {a_file}/sub cannot be created: Not a directory"):
        check_directory(a_file / "sub")
    with tmpfs(tmp_path / "ro", read_only=True) as read_only:
        with pytest.raises(UserError, match=f"^--checkpoint-dir {read_only} is not writable: Read-only file system"):
            check_directory(read_only)
    with tmpfs(tmp_path / "full") as disk:
        fill(disk)
        with pytest.raises(UserError, match="is not writable: No space left on device"):
            check_directory(disk)
        assert [p.name for p in disk.iterdir()] == ["filler"]


def _restored_shard() -> Shard:
    shard = Shard(0, 1)
    shard.restore([_checkpoint(pushes=5)])
    return shard


def test_a_failing_checkpointer_counts_tells_once_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    saver = Checkpointer(_restored_shard(), folder, CheckpointSettings(checkpoint_every=0, keep=1))
    told: list[bool] = []

    async def listen(healthy: bool) -> None:
        told.append(healthy)

    saver.listeners.append(listen)

    async def scenario() -> None:
        assert await saver.attempt("periodic") and saver.failures == 0 and saver.failing is None
        folder.rename(tmp_path / "away")
        with caplog.at_level(logging.INFO, logger="ranger_ps.server.checkpointer"):
            assert not await saver.attempt("periodic")
            assert not await saver.attempt("periodic")
        (tmp_path / "away").rename(folder)
        assert await saver.attempt("periodic")

    asyncio.run(scenario())
    assert told == [False, True] and saver.failures == 2 and saver.failing is None
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and all(r.exc_info is None for r in errors)
    assert f"periodic checkpoint to {folder} failed: the checkpoint folder is gone ({folder})" in errors[0].getMessage()
    assert "2 failed so far" in errors[1].getMessage()
    age = saver.age()
    assert age is not None and 0 <= age < 60
    assert [p.name for p in folder.iterdir()] == ["shard-0-00000002.ckpt"]


def test_the_final_checkpoint_retries_until_the_deadline_then_fails_in_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    shard = _restored_shard()
    saver = Checkpointer(shard, folder, CheckpointSettings(checkpoint_every=0, keep=1))
    asyncio.run(saver.save("periodic"))
    good = folder / "shard-0-00000001.ckpt"
    folder.rename(tmp_path / "away")
    folder.write_bytes(b"")  # the folder became a file
    started = time.monotonic()
    with pytest.raises(FinalCheckpointError) as info:
        asyncio.run(saver.save_final(time.monotonic() + 1.2))
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert "\n" not in message and saver.failures >= 2
    assert message.startswith(f"shard 0: the final checkpoint to {folder} failed {saver.failures} time(s) in ")
    assert (
        f"the checkpoint folder is no longer a folder ({folder}); the last good one this process wrote is {good}"
        in (message)
    )
    assert message.endswith("and the 0 push(es) applied since it are not saved")
    assert isinstance(info.value, ClusterError)  # the command line: one line, exit 1
    # With the folder back, a single attempt is enough.
    folder.unlink()
    (tmp_path / "away").rename(folder)
    asyncio.run(saver.save_final(time.monotonic()))
    assert saver.failing is None and [p.name for p in folder.iterdir()] == ["shard-0-00000002.ckpt"]


# -- no pickle -------------------------------------------------------------------------------------------------

_FORBIDDEN_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib"}


def _source_files() -> Iterator[Path]:
    seen: set[Path] = set()
    for folder in ("ranger_ps", "server", "worker"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            real = path.resolve()
            if real not in seen:
                seen.add(real)
                yield path


def _unsafe_deserialization(source: str, filename: str) -> list[str]:
    """Imports or uses of pickle-like modules, and ``torch.load`` without ``weights_only=True``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in _FORBIDDEN_MODULES]
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.split(".")[0] in _FORBIDDEN_MODULES:
                found.append(f"{where}: from {node.module} import ...")
            if node.module == "torch" and any(a.name == "load" for a in node.names):
                found.append(f"{where}: from torch import load")
        elif isinstance(node, ast.Name) and node.id in _FORBIDDEN_MODULES:
            found.append(f"{where}: uses {node.id}")
        elif isinstance(node, ast.Constant) and node.value in _FORBIDDEN_MODULES:
            found.append(f"{where}: names module {node.value!r} (dynamic import?)")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id == "torch":
                safe = any(
                    k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                    for k in node.keywords
                )
                if not safe:
                    found.append(f"{where}: torch.load without weights_only=True")
    return found


def test_lint_rule_finds_what_it_is_meant_to_find() -> None:
    planted = (
        "import pickle\nimport marshal as m\nfrom shelve import open\nimport dill, cloudpickle\n"
        "torch.load(f)\ntorch.load(f, weights_only=False)\ntorch.load(f, weights_only=True)\n"
        "importlib.import_module('pickle')\nx = pickle.loads(b'')\n"
    )
    found = _unsafe_deserialization(planted, "planted.py")
    assert len(found) == 9, found
    assert not any("planted.py:7" in f for f in found)  # weights_only=True is fine


# The one module allowed to import pickle: it reads CIFAR-10's pickled batches with an unpickler whose
# find_class admits only numpy's array constructors (tests/workloads/test_data.py proves a malicious pickle is refused).
_RESTRICTED_UNPICKLER = "ranger_ps/workloads/file_formats.py"


def _pickle_uses_outside_a_restricted_unpickler(source: str) -> list[str]:
    """In the restricted-unpickler module: every ``pickle.X`` must be ``pickle.UnpicklingError`` or
    ``pickle.Unpickler`` as the base of a class that overrides ``find_class``."""
    tree = ast.parse(source)
    bases: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            overrides = any(isinstance(b, ast.FunctionDef) and b.name == "find_class" for b in node.body)
            for base in node.bases:
                if overrides and isinstance(base, ast.Attribute) and base.attr == "Unpickler":
                    bases.add(id(base))
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "pickle":
            if node.attr == "UnpicklingError" or id(node) in bases:
                continue
            bad.append(f"line {node.lineno}: pickle.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module == "pickle":
            bad.append(f"line {node.lineno}: from pickle import ...")
    return bad


def test_no_pickle_marshal_shelve_dill_or_unsafe_torch_load_in_library_code() -> None:
    files = list(_source_files())
    names = {p.relative_to(ROOT).as_posix() for p in files}
    assert {"ranger_ps/storage/checkpoint.py", "server/main.py", "worker/train.py", _RESTRICTED_UNPICKLER} <= names
    found = [
        f
        for path in files
        if path.relative_to(ROOT).as_posix() != _RESTRICTED_UNPICKLER
        for f in _unsafe_deserialization(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert found == [], "unsafe deserialization in library code:\n" + "\n".join(found)
    restricted = (ROOT / _RESTRICTED_UNPICKLER).read_text()
    assert _pickle_uses_outside_a_restricted_unpickler(restricted) == []
    unsafe = [f for f in _unsafe_deserialization(restricted, _RESTRICTED_UNPICKLER) if "pickle" not in f]
    assert unsafe == []  # no marshal, dill or torch.load there either


def test_restricted_unpickler_rule_finds_direct_pickle_use() -> None:
    planted = (
        "import pickle\nclass Safe(pickle.Unpickler):\n    def find_class(self, m, n): raise pickle.UnpicklingError\n"
        "class Open(pickle.Unpickler):\n    pass\nx = pickle.loads(b'')\nfrom pickle import load\n"
    )
    assert sorted(_pickle_uses_outside_a_restricted_unpickler(planted)) == [
        "line 4: pickle.Unpickler",
        "line 6: pickle.loads",
        "line 7: from pickle import ...",
    ]
