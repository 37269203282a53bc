"""Progress for long work: a bar on a terminal, periodic log lines otherwise."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger(__name__)


class Progress:
    """Shows ``done / total`` steps with a free-form postfix.

    Args:
        total: planned steps.
        description: label shown before the bar.
        enabled: False silences it entirely.
        log_every: seconds between log lines when stderr is not a terminal.
    """

    def __init__(self, total: int, description: str, *, enabled: bool = True, log_every: float = 5.0) -> None:
        self.total = max(1, total)
        self.description = description
        self.enabled = enabled
        self.log_every = log_every
        self._done = 0
        self._last_log = 0.0
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=description, unit="step", dynamic_ncols=True, leave=False)

    def update(self, done: int, **postfix: object) -> None:
        """Report that ``done`` steps are complete."""
        done = min(done, self.total)
        if not self.enabled or done < self._done:
            return
        if self._bar is not None:
            self._bar.update(done - self._done)
            if postfix:
                self._bar.set_postfix({k: v for k, v in postfix.items()}, refresh=False)
        else:
            now = time.monotonic()
            if now - self._last_log >= self.log_every or (done == self.total and self._done != done):
                self._last_log = now
                extra = " ".join(f"{k}={v}" for k, v in postfix.items())
                log.info(
                    "%s: %d/%d steps (%.0f%%) %s", self.description, done, self.total, 100 * done / self.total, extra
                )
        self._done = done

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
