"""Blocks in flat buffers: where each block of a set lives, and moving many blocks in a few torch calls.

A :class:`BlockSpace` lays a set of a layout's blocks end to end, in id order, in one flat buffer
per *segment* (the blocks of one dtype; a model usually has one). A block is a contiguous run of its
segment's buffer, and so is every parameter (a block never spans two parameters). Choosing,
gathering, scattering and updating blocks are then vectorized: the element index of ``k`` blocks is
built with a handful of torch calls (:meth:`BlockSpace.element_index`), whatever ``k`` is, and a set
that covers a whole segment in order skips the index altogether.

The shards keep their blocks, versions and rule state this way; a worker keeps its residual, its
gradients and the view the same way (its parameters are views into its buffers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ranger_ps.algorithm.dtypes import dtype_named
from ranger_ps.algorithm.layout import Layout


@dataclass(frozen=True)
class Segment:
    """The blocks of one dtype, end to end in one flat buffer.

    Attributes:
        dtype: the blocks' (and the buffer's) dtype.
        positions: positions (in the space's id order) of this segment's blocks, ascending.
        starts: where each of them starts in the buffer (int64).
        lengths: how many elements each has (int64).
        numel: the buffer's length.
    """

    dtype: torch.dtype
    positions: torch.Tensor
    starts: torch.Tensor
    lengths: torch.Tensor
    numel: int


class BlockSpace:
    """Where each block of a set lives in flat per-dtype buffers.

    Args:
        layout: the model's layout.
        block_ids: the blocks held (default: every block), in any order; they are laid out ascending.
    """

    def __init__(self, layout: Layout, block_ids: Sequence[int] | None = None) -> None:
        ids = sorted(range(layout.num_blocks) if block_ids is None else set(block_ids))
        self.layout = layout
        self.ids: tuple[int, ...] = tuple(ids)
        self.id_tensor = torch.tensor(ids, dtype=torch.int64)
        self.lengths = torch.tensor([layout.blocks[b].numel for b in ids], dtype=torch.int64)
        order: dict[torch.dtype, list[int]] = {}
        for position, block_id in enumerate(ids):
            order.setdefault(dtype_named(layout.blocks[block_id].dtype).torch_dtype, []).append(position)
        self.segment_of = [0] * len(ids)
        self.start_of = [0] * len(ids)
        self.segments: list[Segment] = []
        for index, (dtype, positions) in enumerate(order.items()):
            start = 0
            starts = []
            for position in positions:
                self.segment_of[position] = index
                self.start_of[position] = start
                starts.append(start)
                start += layout.blocks[ids[position]].numel
            self.segments.append(
                Segment(
                    dtype,
                    torch.tensor(positions, dtype=torch.int64),
                    torch.tensor(starts, dtype=torch.int64),
                    self.lengths[positions] if positions else torch.zeros(0, dtype=torch.int64),
                    start,
                )
            )
        self._local = torch.zeros(len(ids), dtype=torch.int64)  # position -> index within its segment
        for segment in self.segments:
            self._local[segment.positions] = torch.arange(len(segment.positions))
        self._segment_tensor = torch.tensor(self.segment_of, dtype=torch.int64)
        self._every = self.ids == tuple(range(len(ids)))  # positions are the ids themselves
        self._all_local = [torch.arange(len(s.positions)) for s in self.segments]  # a whole segment, in order

    def __len__(self) -> int:
        return len(self.ids)

    def buffers(self, dtype: torch.dtype | None = None, *, device: torch.device | str = "cpu") -> list[torch.Tensor]:
        """Zeroed flat buffers, one per segment, in the segments' dtypes or ``dtype``."""
        return [torch.zeros(s.numel, dtype=dtype or s.dtype, device=device) for s in self.segments]

    def positions(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Positions of the given block ids (int64), or ``ValueError`` naming one this space does not hold."""
        ids = block_ids.to(torch.int64)
        if self._every:
            if not ids.shape[0]:
                return ids
            low, high = torch.aminmax(ids)
            if int(low) >= 0 and int(high) < len(self.ids):
                return ids
        found = torch.searchsorted(self.id_tensor, ids)
        inside = found < len(self.ids)
        held = inside.clone()
        held[inside] = self.id_tensor[found[inside]] == ids[inside]
        if not bool(held.all()):
            missing = int(ids[~held][0])
            raise ValueError(f"block {missing} is not held here")
        return found

    def by_segment(self, positions: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
        """``positions`` split by segment: (segment, local indices in the order given), skipping empty ones."""
        if len(self.segments) == 1:
            if not positions.shape[0]:
                return []
            return [(0, positions if self._every else self._local[positions])]
        segments = self._segment_tensor[positions]
        out = []
        for index in range(len(self.segments)):
            mine = positions[segments == index]
            if len(mine):
                out.append((index, self._local[mine]))
        return out

    def element_index(
        self, segment: int, local: torch.Tensor, device: torch.device | str = "cpu"
    ) -> torch.Tensor | None:
        """The buffer elements of the blocks ``local`` (indices within ``segment``), in order, on ``device``.

        None when they are the whole segment in order: callers then use the buffer itself.
        """
        info = self.segments[segment]
        if local.shape[0] == info.positions.shape[0] and torch.equal(local, self._all_local[segment]):
            return None
        index = runs(info.starts[local], info.lengths[local])
        return index if str(device) == "cpu" else index.to(device)

    def block_of_elements(self, segment: int, local: torch.Tensor) -> torch.Tensor:
        """For the elements :meth:`element_index` lists, which of the ``local`` blocks each belongs to (0..k-1)."""
        lengths = self.segments[segment].lengths[local]
        return torch.repeat_interleave(torch.arange(len(local)), lengths, output_size=int(lengths.sum()))

    def block(self, buffers: Sequence[torch.Tensor], position: int) -> torch.Tensor:
        """One block of flat buffers as a view (for per-block work: checkpoints, rare paths)."""
        start = self.start_of[position]
        return buffers[self.segment_of[position]][start : start + int(self.lengths[position])]

    def param_span(self, param_index: int) -> tuple[int, int, int]:
        """(segment, start, end) of a parameter whose blocks are all held (a parameter is one run)."""
        first = next(b for b in self.layout.blocks if b.param_index == param_index)
        position = int(self.positions(torch.tensor([first.block_id]))[0])
        start = self.start_of[position]
        return self.segment_of[position], start, start + self.layout.params[param_index].numel


def runs(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The element indices of the runs ``[start, start + length)``, end to end (a few torch calls)."""
    ends = torch.cumsum(lengths, 0)
    total = int(ends[-1]) if len(ends) else 0
    # element j of the output belongs to run r: its index is starts[r] + (j - (ends[r] - lengths[r]))
    shift = torch.repeat_interleave(starts - (ends - lengths), lengths, output_size=total)
    return torch.arange(total, dtype=torch.int64) + shift


def gather(buffer: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """The elements ``index`` of a flat buffer, as a new contiguous tensor (the whole buffer when None)."""
    return buffer.clone() if index is None else buffer.index_select(0, index)


def scatter(buffer: torch.Tensor, index: torch.Tensor | None, values: torch.Tensor) -> None:
    """Write ``values`` at the elements ``index`` of a flat buffer (over the whole buffer when None)."""
    if index is None:
        buffer.copy_(values)
    else:
        buffer.index_copy_(0, index, values.to(buffer.dtype))
