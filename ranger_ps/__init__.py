"""ranger-ps: a sharded parameter server for PyTorch.

Workers push randomly chosen parameter blocks over gRPC; sharded servers apply truncation and
the update rule; pulls run in the background while the next step computes.

``from ranger_ps import Ranger`` gives the optimizer. A script started by ``ranger-ps launch``
creates it with ``servers="env"`` and takes its part of the data by :func:`rank` and
:func:`world_size` (:func:`init` returns all of its place at once). Importing the package itself
loads nothing heavy (no torch, no gRPC), so ``ranger-ps --version`` and ``ranger-ps health`` start
fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ranger_ps.version import __version__

if TYPE_CHECKING:
    from ranger_ps.config.launch import LaunchedProcess
    from ranger_ps.optim import Ranger, running_statistics

__all__ = ["Ranger", "__version__", "init", "local_rank", "rank", "running_statistics", "world_size"]


def init() -> LaunchedProcess:
    """This process's place in a run started by ``ranger-ps launch``: rank, world size, local rank
    and the shards' addresses (``servers`` None when it was not launched: a run of one, in process).

    Raises:
        ValueError: the launcher's variables are malformed (the message names the variable).
    """
    from ranger_ps.config.launch import LaunchedProcess

    return LaunchedProcess.from_environ()


def rank() -> int:
    """This copy's index among the launched workers (0 when not launched)."""
    return init().rank


def world_size() -> int:
    """How many copies ``ranger-ps launch`` started (1 when not launched)."""
    return init().world_size


def local_rank() -> int:
    """This copy's index on its machine (for ``cuda:LOCAL_RANK``; 0 when not launched)."""
    return init().local_rank


def __getattr__(name: str) -> Any:
    if name == "Ranger":
        from ranger_ps.optim import Ranger

        return Ranger
    if name == "running_statistics":
        from ranger_ps.optim import running_statistics

        return running_statistics
    raise AttributeError(f"module 'ranger_ps' has no attribute {name!r}")
