"""Fixtures the server tests share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.test_durability import _Processes


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[_Processes]:
    """ranger-ps processes started by a test, each logging to a file under its folder; all stopped after it."""
    processes = _Processes(tmp_path)
    try:
        yield processes
    finally:
        processes.close()
