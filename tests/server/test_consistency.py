"""Consistency models and membership as pure logic: the Shard driven directly, no network."""

from __future__ import annotations

import asyncio

import pytest
import torch

from ranger_ps.algorithm.consistency import ConsistencyMode, Histogram, parse_consistency, staleness_summary
from ranger_ps.algorithm.layout import Layout
from ranger_ps.algorithm.rules import RuleConfig
from ranger_ps.config.server import ShardSettings
from ranger_ps.server.membership import Membership
from ranger_ps.server.shard import Shard
from ranger_ps.wire.codec import tensor_bytes
from ranger_ps.wire.frames import WireBlock
from ranger_ps.wire.status import InvalidRequest, NotReady, PreconditionFailed

FLOAT32 = 1  # the wire enum value


def test_parse_consistency() -> None:
    assert parse_consistency("async") == ConsistencyMode("async")
    assert parse_consistency(" BSP ") == ConsistencyMode("bsp")
    assert parse_consistency("ssp:3") == ConsistencyMode("ssp", 3)
    assert str(parse_consistency("ssp:0")) == "ssp:0"
    for bad in ("ssp", "ssp:-1", "ssp:x", "sync", ""):
        with pytest.raises(ValueError, match="async, ssp:K"):
            parse_consistency(bad)


def test_histogram_percentiles() -> None:
    h = Histogram()
    assert h.percentile(0.5) == 0 and h.maximum() == 0
    for value, count in ((0, 90), (1, 8), (5, 2)):
        h.add(value, count)
    assert (h.percentile(0.5), h.percentile(0.9), h.percentile(0.95), h.percentile(0.99)) == (0, 0, 1, 5)
    assert h.maximum() == 5 and h.total == 100
    summary = staleness_summary([{0: 3, 2: 1}, {0: 3, 2: 1}], [{0: 5}, {1: 5}])
    assert summary["staleness_max"] == 2 and summary["version_lag_p99"] == 1


def test_membership_leases_and_waiting_workers() -> None:
    now = [100.0]
    members = Membership(lease_seconds=2.0, clock=lambda: now[0])
    a = members.register(-1)
    b = members.register(-1)
    observer = members.register(-1, observer=True)
    assert (a.worker_id, b.worker_id, observer.worker_id) == (0, 1, -2)
    assert [r.worker_id for r in members.trainers()] == [0, 1]
    now[0] += 1.5
    members.seen(0)
    b.waiting = 1  # a pull of b waits at a barrier: b is alive
    now[0] += 1.0
    assert members.expire() == [-2]  # only the silent observer lapsed
    b.waiting = 0
    gone = []
    for _ in range(6):  # the reaper runs several times a lease
        now[0] += 0.5
        gone += members.expire()
    assert gone == [0, 1]
    assert members.trainers() == [] and members.slowest_clock() is None
    assert members.register(1).live  # a lapsed worker may come back
    # A reaper that did not run for more than a lease (the shard was paused) drops nobody: the
    # silence was its own, so every live worker gets a new lease.
    members.register(0)
    now[0] += 10.0
    assert members.expire() == []
    assert [r.worker_id for r in members.trainers()] == [0, 1]
    now[0] += 0.5
    assert members.expire() == []


def _layout() -> Layout:
    return Layout.from_named_tensors([("w", torch.zeros(6)), ("b", torch.zeros(2))], block_size=4)


def _blocks(values: dict[int, torch.Tensor]) -> list[WireBlock]:
    return [WireBlock(block_id, 0, FLOAT32, tensor_bytes(t)) for block_id, t in sorted(values.items())]  # type: ignore[arg-type]


async def _ready_shard(mode: str, workers: int) -> Shard:
    shard = Shard(0, 1, ShardSettings(consistency=mode, lease_seconds=60.0, wait_seconds=5.0))
    layout = _layout()
    for w in range(workers):
        registration = await shard.register(w, layout, RuleConfig(lr=1.0, momentum=0.0, outer="rule"), 0, 1)
        if registration.must_initialize:
            await shard.initialize(w, _blocks({0: torch.zeros(4), 1: torch.zeros(2), 2: torch.zeros(2)}))
    return shard


def _weights(shard: Shard) -> torch.Tensor:
    assert shard.store is not None
    return torch.cat([torch.frombuffer(bytearray(b.data), dtype=torch.float32) for b in shard.store.newer_than([])])


def test_bsp_applies_the_mean_once_per_clock_and_pulls_wait_for_it() -> None:
    async def scenario() -> None:
        shard = await _ready_shard("bsp", 3)
        await shard.push(0, 1, _blocks({0: torch.full((4,), 3.0), 2: torch.full((2,), 6.0)}))
        await shard.push(1, 1, _blocks({0: torch.full((4,), 6.0)}))
        pull = asyncio.create_task(shard.pull(0, []))
        await asyncio.sleep(0.05)
        assert not pull.done()  # worker 2 has not pushed clock 1
        assert torch.equal(_weights(shard), torch.zeros(8))
        await shard.push(2, 1, _blocks({1: torch.full((2,), 9.0)}))  # an empty-ish push still ticks the clock
        await asyncio.wait_for(pull, 1.0)
        # mean over the 3 pushes of clock 1; a worker that did not pick a block contributes zero
        expected = torch.tensor([-3.0] * 4 + [-3.0] * 2 + [-2.0] * 2)
        assert torch.equal(_weights(shard), expected)
        assert shard.applied_clock == 1
        # a retried push of clock 1 (its acknowledgement was lost) is acknowledged, not applied again
        assert await shard.push(0, 1, _blocks({0: torch.full((4,), 3.0)})) == (0, 0)
        assert torch.equal(_weights(shard), expected) and shard.duplicates == 1
        with pytest.raises(InvalidRequest, match="before its clock 1"):
            await shard.push(0, 0, [])

    asyncio.run(scenario())


def test_bsp_goes_on_without_a_worker_that_left_or_lapsed() -> None:
    async def scenario() -> None:
        shard = await _ready_shard("bsp", 3)
        await shard.push(0, 1, _blocks({0: torch.full((4,), 2.0)}))
        await shard.push(1, 1, [])
        await shard.leave(2)
        assert shard.applied_clock == 1
        assert torch.equal(_weights(shard)[:4], torch.full((4,), -1.0))  # mean over the 2 pushes
        await shard.push(0, 2, [])
        shard.membership.get(1).last_seen -= 120  # type: ignore[union-attr]
        assert await shard.expire_leases() == [1]
        assert shard.applied_clock == 2
        with pytest.raises(PreconditionFailed, match="lapsed"):
            await shard.push(1, 2, [])

    asyncio.run(scenario())


def test_a_joining_bsp_worker_takes_part_from_its_first_push() -> None:
    async def scenario() -> None:
        shard = await _ready_shard("bsp", 2)
        for clock in (1, 2):
            await shard.push(0, clock, [])
            await shard.push(1, clock, [])
        registration = await shard.register(5, _layout(), RuleConfig(lr=1.0, momentum=0.0, outer="rule"), 0, 1)
        assert registration.clock == 2 and not registration.must_initialize
        await shard.push(0, 3, [])
        await shard.push(1, 3, [])
        assert shard.applied_clock == 2  # waits for the new worker's clock 3
        await shard.push(5, 3, [])
        assert shard.applied_clock == 3

    asyncio.run(scenario())


def test_ssp_blocks_a_worker_more_than_k_clocks_ahead() -> None:
    async def scenario() -> None:
        shard = await _ready_shard("ssp:1", 2)
        await shard.push(0, 1, [])
        await asyncio.wait_for(shard.pull(0, []), 1.0)  # 1 ahead of worker 1: allowed
        await shard.push(0, 2, [])
        pull = asyncio.create_task(shard.pull(0, []))
        await asyncio.sleep(0.05)
        assert not pull.done()
        await shard.push(1, 1, [])
        await asyncio.wait_for(pull, 1.0)
        await shard.push(0, 3, [])  # its view was clock 1: staleness 3 - 1 - 1 = 1 <= K
        assert shard.staleness.maximum() <= 1

    asyncio.run(scenario())


def test_ssp_wait_has_a_deadline() -> None:
    async def scenario() -> None:
        shard = await _ready_shard("ssp:0", 2)
        shard.wait_seconds = 0.1
        await shard.push(0, 1, [])
        with pytest.raises(NotReady, match=r"waited 0.1s at the ssp:0 barrier"):
            await shard.pull(0, [])

    asyncio.run(scenario())


def test_consistency_mismatch_is_refused() -> None:
    async def scenario() -> None:
        shard = await _ready_shard("bsp", 1)
        with pytest.raises(PreconditionFailed, match="runs bsp, the worker expects ssp:2"):
            await shard.register(
                1, _layout(), RuleConfig(lr=1.0, momentum=0.0, outer="rule"), 0, 1, consistency="ssp:2"
            )

    asyncio.run(scenario())
