"""Event-loop plumbing: uvloop when available and wanted, plain asyncio otherwise."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def new_event_loop(use_uvloop: bool = True) -> asyncio.AbstractEventLoop:
    """A fresh event loop, uvloop's when ``use_uvloop`` and it is installed."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
            pass
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run_async(coro: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    """Run a coroutine to completion on a new loop (``uvloop.run`` when wanted)."""
    with asyncio.Runner(loop_factory=lambda: new_event_loop(use_uvloop)) as runner:
        return runner.run(coro)


class LoopThread:
    """An event loop running in a daemon thread, for sync callers that want async I/O behind them."""

    def __init__(self, *, use_uvloop: bool = True, name: str = "ranger-ps-io") -> None:
        self.loop = new_event_loop(use_uvloop)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Any:
        """Schedule ``coro`` on the loop; returns a ``concurrent.futures.Future``."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for its result."""
        result: T = self.submit(coro).result(timeout)
        return result

    def close(self) -> None:
        """Stop the loop and join the thread."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()
