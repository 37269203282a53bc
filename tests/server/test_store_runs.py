"""A shard's store on the exchange path: pushes as runs are checked before any of them is used, and an
exchange stream's cursor hands back each changed block once, with its version."""

from __future__ import annotations

import pytest
import torch

from ranger_ps.algorithm.layout import Layout
from ranger_ps.algorithm.rules import RuleConfig
from ranger_ps.server.store import ShardStore
from ranger_ps.wire._proto import ranger_ps_pb2 as pb
from ranger_ps.wire.codec import tensor_bytes
from ranger_ps.wire.frames import WireBlock
from ranger_ps.wire.runs import WireRun
from ranger_ps.wire.status import InvalidRequest, NonFinite

BLOCK = 4


def _store(*, push_dtype: str | None = None) -> ShardStore:
    layout = Layout.from_named_tensors(
        [("w", torch.zeros(3 * BLOCK)), ("h", torch.zeros(2 * BLOCK, dtype=torch.bfloat16))], BLOCK
    )
    store = ShardStore(layout, [0, 1, 2, 3, 4], RuleConfig(lr=1.0, outer="sum", push_dtype=push_dtype))
    zeros = [
        WireBlock(
            b.block_id,
            0,
            pb.FLOAT32 if b.dtype == "float32" else pb.BFLOAT16,
            tensor_bytes(torch.zeros(BLOCK, dtype=layout.params[b.param_index].torch_dtype)),
        )
        for b in layout.blocks
    ]
    store.initialize(zeros)
    return store


def _run(ids: list[int], values: torch.Tensor, scales: torch.Tensor | None = None) -> WireRun:
    wire = {torch.float32: pb.FLOAT32, torch.bfloat16: pb.BFLOAT16, torch.int8: pb.INT8}[values.dtype]
    return WireRun(wire, torch.tensor(ids), values, None, scales)


def test_a_push_of_runs_is_applied_and_the_cursor_returns_what_changed_once() -> None:
    store = _store()
    sent = torch.ones(5, dtype=torch.int64)  # the worker holds the initial versions
    decoded = store.decode_runs([_run([0, 2], torch.ones(2 * BLOCK)), _run([3], torch.full((BLOCK,), 2.0).bfloat16())])
    store.apply(decoded)
    pulled = store.changed_runs(sent)
    assert sorted(torch.cat([r.block_ids for r in pulled]).tolist()) == [0, 2, 3]
    by_dtype = {r.values.dtype: r for r in pulled}
    assert torch.equal(by_dtype[torch.float32].values, torch.ones(2 * BLOCK))
    assert by_dtype[torch.float32].versions.tolist() == [2, 2]
    assert torch.equal(by_dtype[torch.bfloat16].values, torch.full((BLOCK,), 2.0).bfloat16())
    assert store.changed_runs(sent) == []  # nothing new since


def test_int8_runs_are_scaled_per_block() -> None:
    store = _store(push_dtype="int8")
    levels = torch.tensor([1, 2, 3, 4, -1, -2, -3, -4], dtype=torch.int8)
    store.apply(store.decode_runs([_run([0, 1], levels, torch.tensor([0.5, 2.0]))]))
    (run,) = [r for r in store.changed_runs(torch.ones(5, dtype=torch.int64)) if len(r.block_ids)]
    assert run.values.tolist() == [0.5, 1.0, 1.5, 2.0, -2.0, -4.0, -6.0, -8.0]


@pytest.mark.parametrize(
    ("runs", "error", "message"),
    [
        (lambda: [_run([2, 0], torch.zeros(2 * BLOCK))], InvalidRequest, "strictly ascending"),
        (lambda: [_run([0, 7], torch.zeros(2 * BLOCK))], InvalidRequest, "block 7 is not held"),
        (lambda: [_run([2, 3], torch.zeros(2 * BLOCK))], InvalidRequest, "mixes blocks of different types"),
        (lambda: [_run([0], torch.zeros(BLOCK + 1))], InvalidRequest, "expected 4"),
        (lambda: [_run([3], torch.zeros(BLOCK))], InvalidRequest, "wire dtype float32, expected bfloat16"),
        (lambda: [_run([0], torch.zeros(BLOCK, dtype=torch.int8), torch.ones(1))], InvalidRequest, "int8"),
        (lambda: [_run([0], torch.zeros(BLOCK)), _run([0], torch.zeros(BLOCK))], InvalidRequest, "appears twice"),
        (lambda: [_run([1], torch.tensor([0.0, float("nan"), 0.0, 0.0]))], NonFinite, "NaN or Inf"),
    ],
)
def test_bad_runs_are_refused_before_anything_is_applied(runs: object, error: type[Exception], message: str) -> None:
    store = _store()
    before = store.version_sum
    with pytest.raises(error, match=message):
        store.decode_runs(runs())  # type: ignore[operator]
    assert store.version_sum == before


def test_int8_runs_need_a_positive_scale_per_block() -> None:
    store = _store(push_dtype="int8")
    with pytest.raises(InvalidRequest, match="one scale per block"):
        store.decode_runs([_run([0, 1], torch.zeros(2 * BLOCK, dtype=torch.int8), torch.ones(1))])
    with pytest.raises(InvalidRequest, match="finite scales > 0"):
        store.decode_runs([_run([0], torch.zeros(BLOCK, dtype=torch.int8), torch.zeros(1))])
