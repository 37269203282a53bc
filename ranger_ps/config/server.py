"""A shard's settings: its place in the cluster, membership and consistency, limits, durability."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ranger_ps.algorithm.consistency import parse_consistency
from ranger_ps.config.common import MetricsSettings, check_port
from ranger_ps.errors import UserError
from ranger_ps.settings import Settings, message_with_flag, setting

NAN_POLICIES = ("reject", "skip")
MAX_MESSAGE_MB = 64
"""The default largest message, in MiB (one block may be up to 2**22 float64 elements: 32 MiB)."""


@dataclass(frozen=True)
class MembershipSettings(Settings):
    """How the shards pace workers and notice that they are gone."""

    title: ClassVar[str] = "consistency and membership"

    consistency: str = setting(
        "async",
        "async (apply every push at once), ssp:K (a worker waits while more than K clocks ahead of the slowest "
        "live worker) or bsp (one combined update per clock)",
    )
    lease_seconds: float = setting(5.0, "a worker not heard from for this long leaves the ssp/bsp barriers")
    wait_seconds: float = setting(
        120.0, "the longest a pull waits at an ssp/bsp barrier before failing", flag="wait-timeout"
    )

    def __post_init__(self) -> None:
        parse_consistency(self.consistency)
        if not self.lease_seconds > 0:
            raise ValueError(f"lease_seconds must be > 0, got {self.lease_seconds}")
        if not self.wait_seconds > 0:
            raise ValueError(f"wait_timeout must be > 0, got {self.wait_seconds}")
        super().__post_init__()


@dataclass(frozen=True)
class ShardSettings(MembershipSettings):
    """How one shard treats its workers and their requests."""

    title: ClassVar[str] = "security and limits"

    nan_policy: str = setting(
        "reject",
        "a push with NaN or Inf: reject it (INVALID_ARGUMENT) or skip it; never partly applied",
        choices=NAN_POLICIES,
    )
    max_workers: int = setting(1024, "registered workers allowed")
    shared_memory: bool = setting(
        True, "accept a same-host worker's offer to exchange bytes through shared memory (a private /dev/shm file)"
    )
    max_blocks: int = setting(
        1_000_000, "blocks a model may have (a registration with more is refused before anything is built)"
    )
    init_claim_seconds: float = setting(
        30.0, "how long the worker asked to initialize the shard has to do it", cli=False
    )
    register_wait_seconds: float = setting(
        60.0, "how long a registration waits for an initialization under way", cli=False
    )

    def __post_init__(self) -> None:
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be reject or skip, got {self.nan_policy!r}")
        if self.max_workers < 1:
            raise ValueError(f"max_workers must be >= 1, got {self.max_workers}")
        if self.max_blocks < 1:
            raise ValueError(f"max_blocks must be >= 1, got {self.max_blocks}")
        super().__post_init__()


@dataclass(frozen=True)
class ListenSettings(Settings):
    """Where and how a shard serves."""

    title: ClassVar[str] = "serving"

    shard_id: int = setting(0, "this shard's index")
    num_shards: int = setting(1, "number of shards")
    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 in containers)")
    port: int = setting(50051, "port to listen on; 0 picks a free one")
    ready_file: Path | None = setting(None, "write {host, port, pid} as JSON here once serving", metavar="FILE")
    grace_seconds: float = setting(10.0, "seconds in-flight calls get on shutdown", flag="grace")
    max_streams: int = setting(64, "concurrent calls per connection")
    max_message_mb: int = setting(MAX_MESSAGE_MB, "largest message accepted, MiB")

    def __post_init__(self) -> None:
        if self.num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {self.num_shards}")
        if not 0 <= self.shard_id < self.num_shards:
            raise ValueError(f"shard_id must be in [0, {self.num_shards - 1}], got {self.shard_id}")
        check_port("port", self.port)
        if self.max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {self.max_streams}")
        if not 1 <= self.max_message_mb <= 1024:
            raise ValueError(f"max_message_mb must be in [1, 1024], got {self.max_message_mb}")
        if self.grace_seconds < 0:
            raise ValueError(f"grace must be >= 0, got {self.grace_seconds}")
        super().__post_init__()


@dataclass(frozen=True)
class CheckpointSettings(Settings):
    """Where a shard saves itself and how often."""

    title: ClassVar[str] = "durability"

    checkpoint_dir: Path | None = setting(
        None, "save checkpoints here and resume from the newest good one at start", metavar="DIR"
    )
    checkpoint_every: float = setting(60.0, "seconds between checkpoints; 0: only on stop")
    checkpoint_every_pushes: int = setting(0, "also checkpoint every N applied pushes (0: off)")
    keep: int = setting(3, "checkpoint files kept per shard")

    def __post_init__(self) -> None:
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.checkpoint_every_pushes < 0:
            raise ValueError(f"checkpoint_every_pushes must be >= 0, got {self.checkpoint_every_pushes}")
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")
        super().__post_init__()


@dataclass(frozen=True)
class ServerSecuritySettings(Settings):
    """What a shard demands of its callers."""

    title: ClassVar[str] = "security and limits"

    token_file: Path | None = setting(
        None,
        "require 'authorization: Bearer <token>' on every call but the health check (or set RANGER_PS_TOKEN)",
        metavar="FILE",
    )
    tls_cert: Path | None = setting(None, "serve TLS with this certificate chain (PEM)", metavar="FILE")
    tls_key: Path | None = setting(None, "the TLS private key (PEM)", metavar="FILE")
    tls_client_ca: Path | None = setting(
        None, "mutual TLS: require client certificates signed by this CA", metavar="FILE"
    )


@dataclass(frozen=True)
class ServerConfig(MetricsSettings, ServerSecuritySettings, CheckpointSettings, ShardSettings, ListenSettings):
    """Everything ``ranger-ps server`` takes. A bad value is a :class:`~ranger_ps.errors.UserError`
    naming the flag."""

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as exc:
            raise UserError(message_with_flag(ServerConfig, str(exc))) from None

    def shard_settings(self) -> ShardSettings:
        """What the shard logic itself takes."""
        return ShardSettings.from_settings(self)
