"""The seam between :class:`ranger_ps.Ranger` and where its updates are applied.

A backend takes each step's pushed values and makes fresh weights appear in the parameters: in
this process (:class:`ranger_ps.optim.local.LocalBackend`) or on a cluster of shards
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
class Traffic:
    """Bytes a worker has moved so far (running totals).

    Attributes:
        bytes_pushed: what pushes put on the wire, frame headers included (0 in process).
        bytes_pulled: what pulls received.
        bytes_pushed_dense: what pushing every block at every step would have sent.
    """

    bytes_pushed: int = 0
    bytes_pulled: int = 0
    bytes_pushed_dense: int = 0


class Backend(Protocol):
    """Where pushed blocks go and fresh weights come from."""

    @property
    def worker_id(self) -> int:
        """The id this worker pushes as (0 in process)."""
        ...

    def exchange(self, pushed: Sequence[torch.Tensor], chosen: Sequence[int], step: int) -> None:
        """Hand over one step's pushed values (one flat tensor per parameter, current at ``chosen``).

        When this returns, the caller may reuse the tensors. Fresh weights are in the parameters
        when it returns, or after the next :meth:`synchronize` when the backend overlaps.

        Raises:
            ClusterError: this step, or an earlier overlapped one, failed.
        """
        ...

    def synchronize(self) -> None:
        """Wait for what is in flight, land its weights in the parameters, raise its failure."""
        ...

    def refresh(self) -> None:
        """Bring every block that moved elsewhere into the parameters."""
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
