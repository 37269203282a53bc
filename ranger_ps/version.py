"""The ranger-ps version (one place; the package, the CLI and the shards report it)."""

from __future__ import annotations

__version__ = "0.1.0"
