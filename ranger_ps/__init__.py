"""ranger-ps: a sharded parameter server for PyTorch.

Workers push randomly chosen parameter blocks over gRPC; sharded servers apply truncation and
the update rule; pulls run in the background while the next step computes.

``from ranger_ps import Ranger`` gives the optimizer. Importing the package itself loads nothing
heavy (no torch, no gRPC), so ``ranger-ps --version`` and ``ranger-ps health`` start fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ranger_ps.version import __version__

if TYPE_CHECKING:
    from ranger_ps.optim import Ranger

__all__ = ["Ranger", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "Ranger":
        from ranger_ps.optim import Ranger

        return Ranger
    raise AttributeError(f"module 'ranger_ps' has no attribute {name!r}")
