"""Which shard holds which block: deterministic from the layout and the shard count.

Blocks are dealt largest first to the shard holding the fewest bytes so far (ties go to the
lowest shard id, then the lowest block id), the classic longest-processing-time greedy rule:
every shard ends within one block's bytes of the mean. The result depends only on the blocks'
sizes and the shard count, so every process computes the same placement, and a checkpoint stored
per block can be placed again on any shard count.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import cached_property

from ranger_ps.algorithm.layout import Layout


@dataclass(frozen=True)
class Placement:
    """Block id -> shard id for one layout and shard count."""

    shard_of: tuple[int, ...]
    num_shards: int

    @classmethod
    def compute(cls, layout: Layout, num_shards: int) -> Placement:
        """Place ``layout``'s blocks on ``num_shards`` shards, balanced by bytes."""
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        order = sorted(layout.blocks, key=lambda b: (-b.nbytes, b.block_id))
        heap = [(0, shard) for shard in range(num_shards)]
        shard_of = [0] * layout.num_blocks
        for block in order:
            load, shard = heapq.heappop(heap)
            shard_of[block.block_id] = shard
            heapq.heappush(heap, (load + block.nbytes, shard))
        return cls(tuple(shard_of), num_shards)

    @cached_property
    def blocks_by_shard(self) -> tuple[tuple[int, ...], ...]:
        """For each shard, its block ids in ascending order."""
        out: list[list[int]] = [[] for _ in range(self.num_shards)]
        for block_id, shard in enumerate(self.shard_of):
            out[shard].append(block_id)
        return tuple(tuple(ids) for ids in out)

    def shard_bytes(self, layout: Layout) -> list[int]:
        """Bytes held by each shard."""
        totals = [0] * self.num_shards
        for block in layout.blocks:
            totals[self.shard_of[block.block_id]] += block.nbytes
        return totals
