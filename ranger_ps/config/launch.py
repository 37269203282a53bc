"""``ranger-ps launch``: the user's own script on a cluster, and the environment it is started in.

The launcher (:mod:`ranger_ps.orchestration.launch`) starts shards (or uses running ones) and
``--workers`` copies of a script or module, each with the variables torchrun's users know
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``) and ``RANGER_PS_SERVERS``, the
shards' addresses. :class:`LaunchedProcess` reads them back in the script:
``Ranger(model.parameters(), servers="env")`` and ``ranger_ps.init()`` / ``rank()`` /
``world_size()`` are built on it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from ranger_ps.config.common import check_port
from ranger_ps.config.server import MembershipSettings
from ranger_ps.errors import UserError
from ranger_ps.settings import TOKEN_VARIABLE, message_with_flag, setting
from ranger_ps.wire.rpc import parse_servers

SERVERS_VARIABLE = "RANGER_PS_SERVERS"
"""The shards' addresses, ``HOST:PORT,...`` in shard order (also ``ranger-ps worker``'s ``--servers``)."""

RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
"""What the launcher tells each copy of the script about its place, named as torchrun names them."""


@dataclass(frozen=True)
class ProcessSettings(MembershipSettings):
    """A cluster of processes on this machine: how many, where their logs go, how they start."""

    title: ClassVar[str] = "the processes"

    workers: int = setting(2, "worker processes")
    shards: int = setting(2, "server shards")
    run_dir: Path | None = setting(
        None, "keep the processes' logs here", metavar="DIR", default_text="a temporary folder"
    )
    startup_timeout: float = setting(60.0, "seconds for the servers to come up")
    token_file: Path | None = setting(
        None, "run the cluster with this token (servers require it, workers send it)", metavar="FILE"
    )
    host: str = setting("127.0.0.1", "loopback address the servers listen on", cli=False)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.shards < 1:
            raise ValueError(f"shards must be >= 1, got {self.shards}")
        if not self.startup_timeout > 0:
            raise ValueError(f"startup_timeout must be > 0, got {self.startup_timeout}")
        super().__post_init__()


@dataclass(frozen=True)
class LaunchSettings(ProcessSettings):
    """Everything ``ranger-ps launch`` takes besides the script and its arguments."""

    title: ClassVar[str] = "the launch"

    servers: list[str] | None = setting(
        None,
        "train on these running shards (HOST:PORT,... in shard order) instead of starting --shards of them",
        parse=parse_servers,
        metavar="HOST:PORT,...",
    )
    checkpoint_dir: Path | None = setting(
        None,
        "the started shards checkpoint here; a folder that already holds checkpoints needs --resume",
        metavar="DIR",
    )
    resume: bool = setting(
        False,
        "continue from the checkpoints in --checkpoint-dir, or from the weights the --servers hold (without it a "
        "run starts from fresh weights, and shards that hold weights are refused)",
    )
    max_restarts: int = setting(
        0, "start a failed worker again up to this many times (same rank; not after exit code 2, a usage error)"
    )
    fail_fast: bool = setting(
        False, "end the whole run when a worker fails for good (off: the others train on, and the exit code is 1)"
    )
    tee: bool = setting(
        True, "copy each worker's output here, each line prefixed with its rank (off: only in its log in --run-dir)"
    )
    metrics_port: int | None = setting(
        None,
        "Prometheus endpoints of the started shards: shard i on PORT+i; 0: any free ports",
        metavar="PORT",
        default_text="off",
    )
    metrics_host: str = setting("127.0.0.1", "the address the metrics endpoints listen on")

    def __post_init__(self) -> None:
        try:
            if self.servers is not None:
                object.__setattr__(self, "servers", parse_servers(",".join(self.servers)))
            if self.max_restarts < 0:
                raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
            if self.servers is not None and self.checkpoint_dir is not None:
                raise ValueError(
                    "checkpoint_dir is for the shards the launcher starts; --servers keep their own checkpoints"
                )
            if self.resume and self.servers is None and self.checkpoint_dir is None:
                raise ValueError("resume needs --checkpoint-dir (the started shards' checkpoints) or --servers")
            check_port("metrics_port", self.metrics_port, top=65535 - self.shards)
            super().__post_init__()
        except ValueError as exc:
            raise UserError(message_with_flag(LaunchSettings, str(exc))) from None


@dataclass(frozen=True)
class LaunchedProcess:
    """This process's place in a launched run (``ranger-ps launch``, or the same variables set by hand).

    Attributes:
        rank: this copy's index, ``0 <= rank < world_size``; use it to take its part of the data.
        world_size: how many copies train together.
        local_rank: its index on this machine (pick ``cuda:LOCAL_RANK`` with several GPUs).
        local_world_size: how many copies run on this machine.
        servers: the shards' addresses, or None when no cluster was given (train in this process).
        token: the cluster's token (``RANGER_PS_TOKEN``), if it has one.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    servers: list[str] | None = None
    token: str | None = field(default=None, repr=False)

    @property
    def launched(self) -> bool:
        """Whether a cluster was given (``RANGER_PS_SERVERS`` is set)."""
        return self.servers is not None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> LaunchedProcess:
        """Read the launcher's variables; none at all is a run of one in this process.

        Raises:
            ValueError: a variable that is not a number, a rank outside ``[0, WORLD_SIZE)``, or a
                malformed ``RANGER_PS_SERVERS``; the message names the variable.
        """
        environ = os.environ if environ is None else environ
        numbers = {}
        for name in RANK_VARIABLES:
            text = environ.get(name, "").strip()
            if not text:
                continue
            try:
                numbers[name] = int(text)
            except ValueError:
                raise ValueError(f"{name}={text!r} is not a whole number") from None
        world = numbers.get("WORLD_SIZE", 1)
        rank = numbers.get("RANK", 0)
        if world < 1:
            raise ValueError(f"WORLD_SIZE must be >= 1, got {world}")
        if not 0 <= rank < world:
            raise ValueError(f"RANK must be in [0, WORLD_SIZE={world}), got {rank}")
        local_world = numbers.get("LOCAL_WORLD_SIZE", world)
        local_rank = numbers.get("LOCAL_RANK", rank % local_world)
        if local_world < 1 or not 0 <= local_rank < local_world:
            raise ValueError(f"LOCAL_RANK must be in [0, LOCAL_WORLD_SIZE={local_world}), got {local_rank}")
        text = environ.get(SERVERS_VARIABLE, "").strip()
        try:
            servers = parse_servers(text) if text else None
        except ValueError as exc:
            raise ValueError(f"{SERVERS_VARIABLE}: {exc}") from None
        token = environ.get(TOKEN_VARIABLE, "").strip() or None
        return cls(rank, world, local_rank, local_world, servers, token)

    def environ(self) -> dict[str, str]:
        """The variables that describe this place, for a child process (not the token: the launcher
        hands that on as the cluster's processes get it)."""
        out = {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
        }
        if self.servers is not None:
            out[SERVERS_VARIABLE] = ",".join(self.servers)
        return out
