"""A shard's durability: resuming from the newest good checkpoint, and writing new ones.

Checkpoints are written periodically, after every N applied pushes, and once on stop; the snapshot
is taken under the shard's apply lock (a consistent cut between pushes) and written in a thread, so
the event loop keeps serving while the bytes go to disk.

A checkpoint that fails (a full disk, a folder that vanished or turned read-only) is logged in one
line with its reason, counted (:attr:`Checkpointer.failures`), and reported to the listeners (the
server turns its health NOT_SERVING); it is retried every :data:`RETRY_SECONDS` at most (or every
``--checkpoint-every`` when shorter) until one succeeds, which reports healthy again. The final
checkpoint on stop is retried until a deadline (the grace period) and then fails with a
:class:`FinalCheckpointError`, which the command line turns into one line and exit code 1.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from ranger_ps.config.server import CheckpointSettings
from ranger_ps.errors import ClusterError, UserError
from ranger_ps.files import folder_problem
from ranger_ps.server.shard import Shard
from ranger_ps.storage import checkpoint

log = logging.getLogger(__name__)

#: Seconds between the background task's looks at whether a checkpoint is due.
TICK_SECONDS = 0.25
#: A failed periodic checkpoint is tried again after this long at most.
RETRY_SECONDS = 5.0
#: Pause between attempts of the final checkpoint.
FINAL_PAUSE_SECONDS = 0.5


class FinalCheckpointError(ClusterError):
    """The checkpoint on stop failed on every attempt within the grace period."""


def check_directory(directory: Path) -> None:
    """Require a checkpoint folder this process can write to, before anything is served.

    Creates the folder when it is missing, then creates, fsyncs and removes a probe file in it (a
    real write: permission bits say nothing to root, nor about a read-only or full file system).

    Raises:
        UserError: the path is not a folder, cannot be created, or does not take a new file.
    """
    problem = folder_problem(directory)
    if problem is not None:
        raise UserError(f"--checkpoint-dir {directory} {problem}")
    probe = directory / f".ranger-ps-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"ranger-ps")
            os.fsync(fd)
        finally:
            os.close(fd)
        probe.unlink()
    except OSError as exc:
        try:
            probe.unlink(missing_ok=True)
        except OSError:
            pass
        raise UserError(f"--checkpoint-dir {directory} is not writable: {exc.strerror or _reason(exc)}") from None


def _reason(exc: OSError) -> str:
    """An OSError in words, without the Python noise: ``No space left on device (/d/x.ckpt.tmp)``."""
    if exc.strerror:
        return f"{exc.strerror} ({exc.filename})" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


def _retrieve(future: asyncio.Future[Path]) -> None:
    if not future.cancelled():
        future.exception()


def restore(shard: Shard, directory: Path) -> None:
    """Resume from the newest good checkpoints in ``directory``, if any.

    Files of several cluster sizes (generations) may sit side by side after a reshard; the newest
    generation that can restore this shard wins: its own file when the shard count is unchanged,
    every shard's file of a complete generation when it changed. A newer generation that can do
    neither (incomplete, and without this shard's file) is skipped: its other shards started
    first, and this shard takes its blocks from the generation before.
    """
    generations = checkpoint.load_generations(directory)
    if not generations:
        log.info("no checkpoint in %s: starting empty", directory)
        return
    problems = []
    for generation in generations:
        count = generation.num_shards
        own = generation.checkpoint(shard.shard_id) if count == shard.num_shards else None
        if own is not None:
            chosen = [own]
        elif generation.complete():
            chosen = generation.checkpoints()  # resharding: every old shard's blocks are needed
        else:
            present = [c.shard_id for c in generation.checkpoints()]
            problems.append(f"{count}-shard checkpoints of shards {present}")
            continue
        try:
            shard.restore(chosen)
        except ValueError as exc:
            raise UserError(f"cannot restore from {directory}: {exc}") from None
        log.info("shard %d restored from the %d-shard generation in %s", shard.shard_id, count, directory)
        return
    raise UserError(
        f"{directory} holds {'; '.join(problems)}: restoring shard {shard.shard_id} of {shard.num_shards} needs its "
        "own file (same shard count) or every shard's file of one generation (resharding)"
    )


class Checkpointer:
    """Writes checkpoints: periodically, after every N pushes, and once on stop.

    Args:
        shard: the shard to save.
        directory: its checkpoint folder (checked by :func:`check_directory` at start).
        settings: how often, and how many files to keep.

    Attributes:
        failures: checkpoints that failed to write, since start.
        failing: the reason of the last failure while no checkpoint has succeeded since; else None.
        listeners: called with False when a checkpoint fails after a good one (or first), and with
            True when one succeeds after a failure (the server's health follows them).
    """

    def __init__(self, shard: Shard, directory: Path, settings: CheckpointSettings) -> None:
        self.shard = shard
        self.directory = directory
        self.every = settings.checkpoint_every
        self.every_pushes = settings.checkpoint_every_pushes
        self.keep = settings.keep
        self.failures = 0
        self.failing: str | None = None
        self.listeners: list[Callable[[bool], Awaitable[None]]] = []
        self._saved_at_pushes = shard.pushes_applied
        self._lock = asyncio.Lock()
        self._saved_at: float | None = None  # time.monotonic() of the last successful write
        self._last_path: Path | None = None
        self._writing: asyncio.Future[Path] | None = None

    def age(self) -> float | None:
        """Seconds since this process last wrote a good checkpoint; None while it has written none."""
        saved_at = self._saved_at
        return None if saved_at is None else time.monotonic() - saved_at

    @property
    def retry_every(self) -> float:
        """Seconds between attempts while checkpoints fail."""
        return min(self.every, RETRY_SECONDS) if self.every > 0 else RETRY_SECONDS

    async def run(self) -> None:
        """The background task: write a checkpoint whenever one is due (or retry a failed one)."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(TICK_SECONDS)
            since = time.monotonic() - last
            if self.failing is not None:
                due = since >= self.retry_every
            else:
                due = (self.every > 0 and since >= self.every) or (
                    self.every_pushes > 0 and self.shard.pushes_applied - self._saved_at_pushes >= self.every_pushes
                )
            if due:
                last = time.monotonic()
                await self.attempt("periodic")

    async def attempt(self, why: str) -> bool:
        """Write a checkpoint; on an OSError log one line, count it and tell the listeners. True when written."""
        try:
            await self.save(why)
        except OSError as exc:
            self.failures += 1
            first = self.failing is None
            self.failing = _reason(exc)
            log.error(
                "shard %d: %s checkpoint to %s failed: %s (%d failed so far; health NOT_SERVING until one succeeds)",
                self.shard.shard_id, why, self.directory, self.failing, self.failures,
            )  # fmt: skip
            if first:
                await self._tell(False)
            return False
        if self.failing is not None:
            log.warning(
                "shard %d: %s checkpoint succeeded again after %d failure(s); health SERVING",
                self.shard.shard_id, why, self.failures,
            )  # fmt: skip
            self.failing = None
            await self._tell(True)
        return True

    async def _tell(self, healthy: bool) -> None:
        for listener in self.listeners:
            await listener(healthy)

    async def save(self, why: str) -> None:
        """Snapshot on the event loop (a consistent cut), write in a thread (the loop keeps serving).

        Raises:
            OSError: the file could not be written (the temporary file is removed, older files kept).
        """
        async with self._lock:
            if self._writing is not None and not self._writing.done():
                # A periodic write cancelled by stop() goes on in its thread: let it end first, so two
                # writes never pick the same file name.
                await asyncio.wait({self._writing})
            async with self.shard.apply_lock:  # no update is half-applied in a thread meanwhile
                snapshot = self.shard.checkpoint()
                pushes = self.shard.pushes_applied
            if snapshot is None:
                return
            writing = asyncio.ensure_future(
                asyncio.to_thread(checkpoint.write, snapshot, self.directory, keep=self.keep, create=False)
            )
            writing.add_done_callback(_retrieve)  # a cancelled caller never leaves an unretrieved error
            self._writing = writing
            path = await asyncio.shield(writing)
            self._saved_at_pushes = pushes
            self._saved_at = time.monotonic()
            self._last_path = path
            log.info("shard %d wrote %s checkpoint %s", self.shard.shard_id, why, path)

    async def save_final(self, deadline: float) -> None:
        """The checkpoint on stop: tried at least once, retried after a short pause until ``deadline``.

        Args:
            deadline: ``time.monotonic()`` after which no new attempt starts.

        Raises:
            FinalCheckpointError: every attempt failed (one line: the reason, the attempts, what is lost).
        """
        attempts = 0
        started = time.monotonic()
        while True:
            attempts += 1
            if await self.attempt("final"):
                return
            pause = FINAL_PAUSE_SECONDS
            if time.monotonic() + pause >= deadline:
                break
            await asyncio.sleep(pause)
        lost = self.shard.pushes_applied - self._saved_at_pushes
        last = (
            f"the last good one this process wrote is {self._last_path}"
            if self._last_path is not None
            else "this process wrote no good one (older files in the folder are untouched)"
        )
        raise FinalCheckpointError(
            f"shard {self.shard.shard_id}: the final checkpoint to {self.directory} failed {attempts} time(s) in "
            f"{time.monotonic() - started:.1f}s: {self.failing}; {last}, and the {lost} push(es) applied since it "
            "are not saved"
        )
