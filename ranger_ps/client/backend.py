"""The seam between :class:`ranger_ps.Ranger` and where its pushes are applied.

A backend takes each push (the chosen blocks, as the optimizer prepared them) and hands back the
blocks that changed, for the optimizer to land in its parameters: in this process
(:class:`ranger_ps.optim.local.LocalBackend`) or on a cluster of shards
(:class:`ranger_ps.client.remote.RemoteBackend`). A failure that happens in the background (an
overlapped push the shards refused) is kept and raised at the next call, never only logged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ranger_ps.wire.stats import ShardStats


@dataclass(frozen=True)
class OutgoingBlock:
    """One block as pushed: its values (flat, on the CPU), or their int8 quantization and its scale."""

    block_id: int
    payload: torch.Tensor
    scale: float = 0.0


@dataclass(frozen=True)
class PulledBlock:
    """A block that changed: ``values`` is flat (and may share memory with a received message)."""

    block_id: int
    version: int
    values: torch.Tensor


@dataclass(frozen=True)
class Run:
    """Blocks of one dtype end to end: ``block_ids`` (ascending, or in a backend's push order), their
    ``values`` in that order.

    A pushed run may be int8 with one ``scales`` entry per block (values = int8 x scale).
    """

    block_ids: torch.Tensor
    values: torch.Tensor
    scales: torch.Tensor | None = None

    def dequantized(self, dtype: torch.dtype, lengths: torch.Tensor) -> torch.Tensor:
        """The values this run stands for, in ``dtype`` (a new tensor)."""
        if self.scales is None:
            return self.values.to(dtype, copy=True)
        per_element = torch.repeat_interleave(self.scales, lengths, output_size=self.values.numel())
        return (self.values.to(torch.float32) * per_element).to(dtype)


@dataclass(frozen=True)
class Traffic:
    """Bytes a worker has moved so far (running totals).

    Attributes:
        bytes_pushed: what pushes put on the wire, frame headers included (0 in process).
        bytes_pulled: what pulls received.
        bytes_pushed_dense: what pushing every block at every step would have sent.
        bytes_flushed: of ``bytes_pushed``, what the final flushes of the residual sent.
    """

    bytes_pushed: int = 0
    bytes_pulled: int = 0
    bytes_pushed_dense: int = 0
    bytes_flushed: int = 0


class Backend(Protocol):
    """Where pushed blocks go and fresh blocks come from."""

    overlap: bool
    """Whether an exchange completes in the background (collected at the next step)."""

    @property
    def worker_id(self) -> int:
        """The id this worker pushes as (0 in process)."""
        ...

    def order(self, block_ids: torch.Tensor) -> torch.Tensor:
        """The chosen blocks in the order a push should lay them out (a cluster splits a run by shard)."""
        ...

    def exchange(self, runs: Sequence[Run], steps: int) -> None:
        """Push blocks (runs of them; a push that covers ``steps`` training steps, 0 for a flush).

        The caller may reuse the tensors when this returns. What changed is handed back by the next
        :meth:`collect`, which the caller makes before its next push.

        Raises:
            ClusterError: this push (without overlap) or an earlier overlapped one failed.
        """
        ...

    def collect(self) -> list[Run]:
        """Wait for what is in flight and return the blocks that changed since the last collect.

        Raises:
            ClusterError: a push or pull in flight failed.
        """
        ...

    def pull_all(self) -> list[Run]:
        """Every block that moved anywhere since this worker last saw it (a refresh)."""
        ...

    @property
    def traffic(self) -> Traffic:
        """Bytes moved so far."""
        ...

    def stats(self) -> list[ShardStats]:
        """What each shard reports (nothing in process)."""
        ...

    def close(self) -> None:
        """Finish what is in flight and let go of every resource; idempotent."""
        ...


def runs_of(blocks: Sequence[PulledBlock]) -> list[Run]:
    """Pulled blocks as runs: one per dtype, ascending block ids, values end to end."""
    by_dtype: dict[torch.dtype, list[PulledBlock]] = {}
    for block in sorted(blocks, key=lambda b: b.block_id):
        by_dtype.setdefault(block.values.dtype, []).append(block)
    return [
        Run(torch.tensor([b.block_id for b in group], dtype=torch.int64), torch.cat([b.values for b in group]))
        for group in by_dtype.values()
    ]


def blocks_of(run: Run, lengths: Sequence[int]) -> list[OutgoingBlock]:
    """A run as separate blocks (views), for a wire that lists blocks one by one."""
    out = []
    start = 0
    for index, (block_id, length) in enumerate(zip(run.block_ids.tolist(), lengths, strict=True)):
        scale = float(run.scales[index]) if run.scales is not None else 0.0
        out.append(OutgoingBlock(block_id, run.values[start : start + length], scale))
        start += length
    return out
