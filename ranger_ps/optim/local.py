"""The optimizer's backend in this process: what one shard holding every block would do.

Pushes are applied to :class:`~ranger_ps.algorithm.table.BlockTable` s, the very tables a shard
keeps (truncation, then the outer rule or the rule), so a one-worker cluster and the in-process
optimizer compute the same thing. There is one table per param group (groups may differ in their
settings; a group's blocks are consecutive ids). Under the classic rule mode a table's values are
the optimizer's parameter buffers themselves; otherwise they are the server copy, and the blocks a
push changed are handed back for the optimizer to land in its view.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ranger_ps.algorithm.rules import RuleConfig
from ranger_ps.algorithm.table import BlockTable, Part
from ranger_ps.client.backend import Run, Traffic
from ranger_ps.wire.stats import ShardStats


class LocalBackend:
    """Applies pushes in place, as a one-shard cluster would (at once: never overlapped).

    Args:
        tables: one table per param group, in block id order; together they hold every block.
        lengths: every block's element count, by block id.
        hands_back: whether the tables' values are a server copy the optimizer lands (otherwise they
            are the parameters themselves and nothing is handed back).
    """

    def __init__(self, tables: Sequence[BlockTable], lengths: torch.Tensor, *, hands_back: bool) -> None:
        self.tables = list(tables)
        self._first = torch.tensor([t.space.ids[0] if t.space.ids else 0 for t in self.tables], dtype=torch.int64)
        self._lengths = lengths
        self._hands_back = hands_back
        self._changed: list[list[torch.Tensor]] = [[] for _ in self.tables]
        self.overlap = False

    @property
    def worker_id(self) -> int:
        return 0

    @property
    def traffic(self) -> Traffic:
        return Traffic()

    def order(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Pushes keep block id order here."""
        return block_ids

    def configure(self, configs: Sequence[RuleConfig]) -> None:
        """Each table's settings now (an lr schedule changes them between steps)."""
        for table, config in zip(self.tables, configs, strict=True):
            table.reconfigure(config)

    def exchange(self, runs: Sequence[Run], steps: int) -> None:
        parts: list[list[Part]] = [[] for _ in self.tables]
        for run in runs:
            for index, ids, values, scales in self._split(run):
                table = self.tables[index]
                space = table.space
                positions = space.positions(ids)
                ((segment, local),) = space.by_segment(positions)
                dtype = torch.float32 if scales is not None else table.values[segment].dtype
                if scales is None and values.dtype == dtype:
                    pushed = values  # the table never writes into what it applies
                else:
                    pushed = Run(ids, values, scales).dequantized(dtype, space.lengths[positions])
                parts[index].append(Part(segment, local, pushed.to(table.values[segment].device)))
                if self._hands_back:
                    self._changed[index].append(positions)
        for table, table_parts in zip(self.tables, parts, strict=True):
            if table_parts:
                table.apply(table_parts)

    def _split(self, run: Run) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """A run cut at the tables' boundaries: (table, block ids, values, scales) for each piece."""
        if len(self.tables) == 1:
            return [(0, run.block_ids, run.values, run.scales)]
        owner = torch.searchsorted(self._first, run.block_ids, right=True) - 1
        pieces = []
        for index in torch.unique(owner).tolist():
            mine = (owner == index).nonzero().flatten()
            lo, hi = int(mine[0]), int(mine[-1]) + 1  # ids are ascending: each table's piece is one slice
            start = self._element_offset(run.block_ids, lo)
            end = self._element_offset(run.block_ids, hi)
            scales = run.scales[lo:hi] if run.scales is not None else None
            pieces.append((index, run.block_ids[lo:hi], run.values[start:end], scales))
        return pieces

    def _element_offset(self, block_ids: torch.Tensor, count: int) -> int:
        """Elements of a run's first ``count`` blocks."""
        return int(self._lengths[block_ids[:count]].sum())

    def collect(self) -> list[Run]:
        out = []
        for index, changed in enumerate(self._changed):
            if not changed:
                continue
            self._changed[index] = []
            table = self.tables[index]
            positions = torch.unique(torch.cat(changed))
            for part in table.read(positions, copy=False):  # landed before the table changes again
                ids = table.space.id_tensor[table.space.segments[part.segment].positions[part.local]]
                out.append(Run(ids, part.values))
        return out

    def pull_all(self) -> list[Run]:
        return self.collect()

    def stats(self) -> list[ShardStats]:
        return []

    def close(self) -> None:
        """Nothing to let go of."""
