"""Where a shard applies updates: big async pushes in a worker thread, one update at a time, and a
checkpoint taken under the shard's lock is a consistent cut between pushes. The Shard is driven
directly (pure logic and asyncio, no network)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from ranger_ps.algorithm.layout import Layout
from ranger_ps.algorithm.rules import RuleConfig
from ranger_ps.config.server import ShardSettings
from ranger_ps.server.shard import OFF_LOOP_APPLY_BYTES, Shard
from ranger_ps.storage.checkpoint import ShardCheckpoint
from ranger_ps.wire.codec import tensor_bytes
from ranger_ps.wire.frames import WireBlock

FLOAT32 = 1  # the wire enum value


def _blocks(values: dict[int, torch.Tensor]) -> list[WireBlock]:
    return [WireBlock(b, 0, FLOAT32, tensor_bytes(t)) for b, t in sorted(values.items())]  # type: ignore[arg-type]


async def _shard_with(layout: Layout, workers: int) -> Shard:
    shard = Shard(0, 1, ShardSettings(lease_seconds=60.0))
    for worker in range(workers):
        registration = await shard.register(worker, layout, RuleConfig(lr=1.0, momentum=0.0, outer="rule"), 0, 1)
        if registration.must_initialize:
            zeros = {b.block_id: torch.zeros(b.numel) for b in layout.blocks}
            await shard.initialize(worker, _blocks(zeros))
    return shard


@pytest.mark.timeout(30)
def test_big_pushes_apply_in_a_thread_one_at_a_time_and_checkpoints_fall_between_them() -> None:
    numel = OFF_LOOP_APPLY_BYTES // 4  # one block alone reaches the threshold
    layout = Layout.from_named_tensors([("w", torch.zeros(2 * numel))], block_size=numel)

    async def scenario() -> tuple[list[str], ShardCheckpoint | None, Shard]:
        shard = await _shard_with(layout, 2)
        threads: list[str] = []
        shard.apply_observers.append(lambda seconds, blocks: threads.append(threading.current_thread().name))

        async def checkpoint() -> ShardCheckpoint | None:
            async with shard.apply_lock:  # as the server's checkpointer takes it
                return shard.checkpoint()

        ones, twos = torch.full((numel,), 1.0), torch.full((numel,), 2.0)
        first = asyncio.ensure_future(shard.push(0, 1, _blocks({0: ones, 1: ones})))
        await asyncio.sleep(0)  # the first push holds the lock and runs in a thread
        cut = asyncio.ensure_future(checkpoint())
        second = asyncio.ensure_future(shard.push(1, 1, _blocks({0: twos, 1: twos})))
        await asyncio.gather(first, second)
        return threads, await cut, shard

    threads, cut, shard = asyncio.run(scenario())
    assert len(threads) == 2 and threading.main_thread().name not in threads  # both off the loop
    assert shard.store is not None
    final = shard.store.snapshot()
    assert all(torch.equal(r.value, torch.full((numel,), -3.0)) for r in final)  # lr 1: -(1 + 2)
    assert [r.version for r in final] == [3, 3]  # initialized (1) and two updates
    assert cut is not None
    # The checkpoint waited for the first push and ran before the second: both blocks after exactly
    # one update, never a block half-updated or one block ahead of the other.
    assert [(r.version, bool((r.value == -1.0).all())) for r in cut.blocks] == [(2, True), (2, True)]


@pytest.mark.timeout(30)
def test_small_pushes_apply_on_the_event_loop() -> None:
    layout = Layout.from_named_tensors([("w", torch.zeros(64))], block_size=16)

    async def scenario() -> list[str]:
        shard = await _shard_with(layout, 1)
        threads: list[str] = []
        shard.apply_observers.append(lambda seconds, blocks: threads.append(threading.current_thread().name))
        await shard.push(0, 1, _blocks({0: torch.ones(16), 3: torch.ones(16)}))
        return threads

    assert asyncio.run(scenario()) == [threading.main_thread().name]
