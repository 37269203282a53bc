"""The JSON run report (``--report FILE``): its keys are an interface, only ever added to."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ranger_ps.files import write_text_atomically

REQUIRED_KEYS = (
    "test_accuracy",
    "test_loss",
    "steps",
    "wall_seconds",
    "bytes_pushed",
    "bytes_pushed_dense",
    "bytes_pulled",
    "workers",
    "shards",
    "config",
)


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write ``report`` as JSON atomically (a reader never sees a half-written file)."""
    missing = [k for k in REQUIRED_KEYS if k not in report]
    if missing:
        raise ValueError(f"report lacks keys {missing}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(report, indent=2, sort_keys=True) + "\n")


def read_report(path: Path) -> dict[str, Any]:
    """Read a report written by :func:`write_report`."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data
