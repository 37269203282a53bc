"""A shard's durability: resuming from the newest good checkpoint, and writing new ones.

Checkpoints are written periodically, after every N applied pushes, and once on stop; the snapshot
is taken under the shard's apply lock (a consistent cut between pushes) and written in a thread, so
the event loop keeps serving while the bytes go to disk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from ranger_ps.config.server import CheckpointSettings
from ranger_ps.errors import UserError
from ranger_ps.server.shard import Shard
from ranger_ps.storage import checkpoint

log = logging.getLogger(__name__)


def restore(shard: Shard, directory: Path) -> None:
    """Resume from the newest good checkpoints in ``directory``, if any.

    Files of several cluster sizes may sit side by side (after a reshard); the newest generation
    (shard count) that can restore this shard wins: its own file when the count is unchanged, every
    old shard's file when it changed. Older generations are ignored.
    """
    saved = checkpoint.load_cluster_generations(directory)
    if not saved:
        log.info("no checkpoint in %s: starting empty", directory)
        return
    problems = []
    for count, generation in saved:
        present = sorted(c.shard_id for c in generation)
        if count == shard.num_shards and shard.shard_id in present:
            chosen = [c for c in generation if c.shard_id == shard.shard_id]
        elif present == list(range(count)):
            chosen = generation  # resharding: every old shard's blocks are needed
        else:
            problems.append(f"{count}-shard checkpoints of shards {present}")
            continue
        try:
            shard.restore(chosen)
        except ValueError as exc:
            raise UserError(f"cannot restore from {directory}: {exc}") from None
        return
    raise UserError(
        f"{directory} holds {'; '.join(problems)}: restoring shard {shard.shard_id} of {shard.num_shards} needs its "
        "own file (same shard count) or every shard's file of one generation (resharding)"
    )


class Checkpointer:
    """Writes checkpoints: periodically, after every N pushes, and once on stop."""

    def __init__(self, shard: Shard, directory: Path, settings: CheckpointSettings) -> None:
        self.shard = shard
        self.directory = directory
        self.every = settings.checkpoint_every
        self.every_pushes = settings.checkpoint_every_pushes
        self.keep = settings.keep
        self._saved_at_pushes = shard.pushes_applied
        self._lock = asyncio.Lock()
        self._saved_at: float | None = None  # time.monotonic() of the last successful write

    def age(self) -> float | None:
        """Seconds since this process last wrote a checkpoint; None while it has written none."""
        saved_at = self._saved_at
        return None if saved_at is None else time.monotonic() - saved_at

    async def run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            due_time = self.every > 0 and time.monotonic() - last >= self.every
            due_pushes = (
                self.every_pushes > 0 and self.shard.pushes_applied - self._saved_at_pushes >= self.every_pushes
            )
            if due_time or due_pushes:
                last = time.monotonic()
                try:
                    await self.save("periodic")
                except OSError as exc:
                    log.error("checkpoint of shard %d failed: %s", self.shard.shard_id, exc)

    async def save(self, why: str) -> None:
        """Snapshot on the event loop (a consistent cut), write in a thread (the loop keeps serving)."""
        async with self._lock:
            async with self.shard.apply_lock:  # no update is half-applied in a thread meanwhile
                snapshot = self.shard.checkpoint()
            if snapshot is None:
                return
            self._saved_at_pushes = self.shard.pushes_applied
            path = await asyncio.to_thread(checkpoint.write, snapshot, self.directory, keep=self.keep)
            self._saved_at = time.monotonic()
            log.info("shard %d wrote %s checkpoint %s", self.shard.shard_id, why, path)
