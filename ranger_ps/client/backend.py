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

    def exchange(self, blocks: Sequence[OutgoingBlock], steps: int) -> None:
        """Push blocks (a push that covers ``steps`` training steps; 0 for a flush).

        The caller may reuse the tensors when this returns. What changed is handed back by the next
        :meth:`collect`, which the caller makes before its next push.

        Raises:
            ClusterError: this push (without overlap) or an earlier overlapped one failed.
        """
        ...

    def collect(self) -> list[PulledBlock]:
        """Wait for what is in flight and return the blocks that changed since the last collect.

        Raises:
            ClusterError: a push or pull in flight failed.
        """
        ...

    def pull_all(self) -> list[PulledBlock]:
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
