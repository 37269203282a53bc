"""The one retry policy of the client: which failures are transient, and how long to wait.

A shard that is starting, restarting or briefly unreachable answers ``UNAVAILABLE`` or
``DEADLINE_EXCEEDED``; those are retried with capped exponential backoff and jitter until the
caller's deadline. Registration (waiting for servers to come up) and training traffic (riding
through a restart) follow the same policy with their own deadlines.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import grpc

TRANSIENT = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
"""Status codes a retry may cure."""

FIRST_PAUSE = 0.1
"""Seconds before the second attempt."""

LONGEST_PAUSE = 2.0
"""Pauses double up to this (before jitter of +-20%)."""


def transient(exc: grpc.aio.AioRpcError) -> bool:
    """Whether a failed call may succeed if tried again."""
    return exc.code() in TRANSIENT


@dataclass
class Attempts:
    """Attempts at one call until a deadline: count them, and pause between them.

    Args:
        timeout: seconds from now until giving up.
    """

    timeout: float
    deadline: float = field(init=False)
    count: int = field(default=0, init=False)
    _pause: float = field(default=FIRST_PAUSE, init=False)

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.timeout

    def start(self) -> int:
        """Count an attempt; returns its number (from 1)."""
        self.count += 1
        return self.count

    @property
    def remaining(self) -> float:
        """Seconds left before the deadline (<= 0 when it passed)."""
        return self.deadline - time.monotonic()

    def next_pause(self) -> float | None:
        """The pause before the next attempt, or None when the deadline has passed."""
        remaining = self.remaining
        if remaining <= 0:
            return None
        return min(self._pause, remaining)

    async def pause(self) -> None:
        """Sleep the next pause (see :meth:`next_pause`) and lengthen the one after."""
        pause = self.next_pause()
        if pause is not None:
            await asyncio.sleep(pause)
        self._pause = min(self._pause * 2, LONGEST_PAUSE) * (0.8 + 0.4 * random.random())
