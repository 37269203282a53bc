"""Tests for ranger_ps.algorithm.placement: deterministic byte-balanced block placement."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ranger_ps.algorithm.layout import Layout, ParamInfo
from ranger_ps.algorithm.placement import Placement


def _layout() -> Layout:
    return Layout(
        (
            ParamInfo("w1", (10, 10), "float32"),
            ParamInfo("b1", (10,), "float32"),
            ParamInfo("w2", (7, 9), "float64"),
            ParamInfo("b2", (3,), "float16"),
            ParamInfo("e", (0,), "float32"),
            ParamInfo("w3", (33,), "bfloat16"),
        ),
        block_size=16,
    )


def _check(layout: Layout, placement: Placement, num_shards: int) -> None:
    assert placement.num_shards == num_shards
    assert len(placement.shard_of) == layout.num_blocks
    assert all(0 <= s < num_shards for s in placement.shard_of)
    by_shard = placement.blocks_by_shard
    assert len(by_shard) == num_shards
    # Every block on exactly one shard.
    flat = [b for ids in by_shard for b in ids]
    assert sorted(flat) == list(range(layout.num_blocks))
    for shard, ids in enumerate(by_shard):
        assert list(ids) == sorted(ids)
        assert len(set(ids)) == len(ids)
        assert all(placement.shard_of[b] == shard for b in ids)
    totals = placement.shard_bytes(layout)
    assert len(totals) == num_shards
    assert sum(totals) == layout.nbytes
    for shard, ids in enumerate(by_shard):
        assert totals[shard] == sum(layout.blocks[b].nbytes for b in ids)
    largest = max((b.nbytes for b in layout.blocks), default=0)
    assert max(totals) - min(totals) <= largest


@pytest.mark.parametrize("num_shards", [1, 2, 3, 4, 7])
def test_placement_properties(num_shards: int) -> None:
    layout = _layout()
    _check(layout, Placement.compute(layout, num_shards), num_shards)


@pytest.mark.parametrize("num_shards", [1, 2, 3, 5])
def test_placement_is_deterministic(num_shards: int) -> None:
    first = Placement.compute(_layout(), num_shards)
    second = Placement.compute(_layout(), num_shards)
    assert first == second
    assert first.shard_of == second.shard_of
    assert first.blocks_by_shard == second.blocks_by_shard


def test_placement_depends_only_on_block_sizes() -> None:
    a = Layout((ParamInfo("x", (40,), "float32"), ParamInfo("y", (9,), "float64")), block_size=8)
    b = Layout((ParamInfo("p", (40,), "float32"), ParamInfo("q", (9,), "float64")), block_size=8)
    assert a.fingerprint != b.fingerprint
    assert Placement.compute(a, 3) == Placement.compute(b, 3)


def test_single_shard_holds_everything() -> None:
    layout = _layout()
    placement = Placement.compute(layout, 1)
    assert placement.shard_of == (0,) * layout.num_blocks
    assert placement.blocks_by_shard == (tuple(range(layout.num_blocks)),)
    assert placement.shard_bytes(layout) == [layout.nbytes]


def test_equal_blocks_are_dealt_round_robin() -> None:
    # Equal sizes: ties go to the lowest shard, then the lowest block id.
    layout = Layout((ParamInfo("w", (8 * 6,), "float32"),), block_size=8)
    placement = Placement.compute(layout, 3)
    assert placement.shard_of == (0, 1, 2, 0, 1, 2)
    assert placement.blocks_by_shard == ((0, 3), (1, 4), (2, 5))


def test_largest_blocks_first() -> None:
    # Sizes in bytes: 4, 40, 8 (float32 blocks of 1, 10 and 2 elements).
    layout = Layout(
        (ParamInfo("a", (1,), "float32"), ParamInfo("b", (10,), "float32"), ParamInfo("c", (2,), "float32")),
        block_size=16,
    )
    placement = Placement.compute(layout, 2)
    # b (40) -> shard 0; c (8) -> shard 1; a (4) -> shard 1.
    assert placement.shard_of == (1, 0, 1)
    assert placement.shard_bytes(layout) == [40, 12]


def test_more_shards_than_blocks() -> None:
    layout = Layout((ParamInfo("w", (5,), "float32"),), block_size=2)  # 3 blocks
    placement = Placement.compute(layout, 8)
    _check(layout, placement, 8)
    assert sum(1 for ids in placement.blocks_by_shard if ids) == 3
    assert sum(1 for ids in placement.blocks_by_shard if not ids) == 5
    assert placement.shard_bytes(layout).count(0) == 5


def test_empty_layout() -> None:
    layout = Layout((ParamInfo("e", (0,), "float32"),))
    placement = Placement.compute(layout, 3)
    assert placement.shard_of == ()
    assert placement.blocks_by_shard == ((), (), ())
    assert placement.shard_bytes(layout) == [0, 0, 0]


@pytest.mark.parametrize("num_shards", [0, -1])
def test_num_shards_below_one_raises(num_shards: int) -> None:
    with pytest.raises(ValueError, match="num_shards"):
        Placement.compute(_layout(), num_shards)


_DTYPES = st.sampled_from(["float32", "float16", "bfloat16", "float64"])
_PARAM = st.tuples(st.lists(st.integers(0, 12), min_size=0, max_size=3), _DTYPES)


@st.composite
def _layouts(draw: st.DrawFn) -> Layout:
    specs = draw(st.lists(_PARAM, min_size=0, max_size=8))
    block_size = draw(st.integers(1, 64))
    params = tuple(ParamInfo(f"p{i}", tuple(shape), dtype) for i, (shape, dtype) in enumerate(specs))
    return Layout(params, block_size)


@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(layout=_layouts(), num_shards=st.integers(1, 9))
def test_balance_property(layout: Layout, num_shards: int) -> None:
    placement = Placement.compute(layout, num_shards)
    _check(layout, placement, num_shards)
    assert Placement.compute(layout, num_shards) == placement
