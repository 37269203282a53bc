"""How a worker talks to the shards: waiting for them, riding through restarts, overlapping pulls."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ranger_ps.settings import Settings, setting
from ranger_ps.wire.rpc import parse_servers


@dataclass(frozen=True)
class ConnectionSettings(Settings):
    """How a worker talks to the shards."""

    title: ClassVar[str] = "connection"

    overlap: bool = setting(False, "pull the next weights while the next step computes (one step of staleness)")
    connect_timeout: float = setting(30.0, "seconds to keep retrying servers that are not up yet")
    retry_timeout: float = setting(60.0, "seconds a push or pull keeps retrying a shard that went away (restart)")
    shared_memory: bool = setting(
        True,
        "on a shard's own host, move pushes and pulls through shared memory (a private /dev/shm file agreed at "
        "registration); off, or across hosts, they travel in the gRPC frames",
    )
    exchange: bool = setting(
        True,
        "one push-and-pull round trip per step on a persistent stream per shard (off: a Push then a Pull call, "
        "as v1 workers do; servers without Exchange get those anyway)",
    )

    def __post_init__(self) -> None:
        if not self.connect_timeout > 0:
            raise ValueError(f"connect_timeout must be > 0, got {self.connect_timeout}")
        if not self.retry_timeout > 0:
            raise ValueError(f"retry_timeout must be > 0, got {self.retry_timeout}")
        super().__post_init__()


@dataclass(frozen=True)
class ClusterSettings(Settings):
    """Which cluster to train on, and as whom."""

    title: ClassVar[str] = "cluster"

    servers: list[str] | None = setting(
        None,
        "HOST:PORT of every shard, in shard order (a list, or one comma-separated string)",
        parse=parse_servers,
        metavar="HOST:PORT,...",
    )
    worker_id: int | None = setting(None, "this worker's id", default_text="assigned by the servers")

    def __post_init__(self) -> None:
        if self.servers is not None:
            given: object = self.servers
            if not isinstance(given, str):
                if not isinstance(given, list | tuple) or not all(isinstance(s, str) for s in given):
                    raise ValueError(f"servers must be HOST:PORT strings, got {given!r}")
                given = ",".join(given)
            object.__setattr__(self, "servers", parse_servers(given))
        if self.worker_id is not None and (isinstance(self.worker_id, bool) or self.worker_id < 0):
            raise ValueError(f"worker_id must be an int >= 0, got {self.worker_id!r}")
        super().__post_init__()
