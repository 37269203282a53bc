"""Files a process writes: a folder made ready before any work, a file a reader never sees half of."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it and an atomic rename.

    A reader (a parent polling for a ready file, a tool reading a report) sees either the old file
    or the whole new one.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def folder_problem(path: Path) -> str | None:
    """Create the folder ``path`` when it is missing; what keeps it from being a folder, or None.

    The problem reads after the path: ``is not a folder``, ``cannot be created: Permission denied``.
    """
    if path.exists() and not path.is_dir():
        return "is not a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot be created: {exc.strerror or str(exc) or type(exc).__name__}"
    return None
