"""``ranger-ps launch``: the torchrun of ranger-ps. Starts shards (or uses running ones) and
``--workers`` copies of the user's own script or module, and supervises them.

Each copy gets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and
``RANGER_PS_SERVERS`` (see :class:`~ranger_ps.config.launch.LaunchedProcess`), so
``Ranger(model.parameters(), servers="env")`` finds the cluster and ``ranger_ps.rank()`` /
``world_size()`` split the data. A worker that fails is started again up to ``--max-restarts``
times; after that the others train on (the parameter servers do not need every worker) and the
launch exits 1 at the end naming it, or, with ``--fail-fast``, everything stops at once.

A run starts from fresh weights: started shards with a ``--checkpoint-dir`` that already holds
checkpoints, or ``--servers`` that already hold trained weights, are refused unless the user asks
to ``--resume``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from ranger_ps.client.admin import fetch_stats
from ranger_ps.config.launch import LaunchedProcess, LaunchSettings
from ranger_ps.config.server import MembershipSettings
from ranger_ps.errors import ClusterError, UserError
from ranger_ps.orchestration.launcher import (
    INHERITED_VARIABLES,
    Child,
    Cluster,
    child_environment,
    common_argv,
    metrics_settings,
    run_folder,
    start_shards,
)
from ranger_ps.settings import TOKEN_VARIABLE
from ranger_ps.storage.checkpoint import list_checkpoints
from ranger_ps.wire.security import ClientSecurity, read_token

log = logging.getLogger(__name__)


NOT_RETRIED = (2, 130)
"""Exit codes a restart cannot help: a usage error (the same settings fail the same way) and an interrupt."""


@dataclass(frozen=True)
class LaunchTarget:
    """What every worker runs: a script file or a module (``-m``), with its arguments."""

    program: str
    module: bool = False
    args: tuple[str, ...] = ()

    def command(self) -> list[str]:
        """The whole argv, run by this Python."""
        head = ["-m", self.program] if self.module else [self.program]
        return [sys.executable, *head, *self.args]

    def check(self) -> None:
        """Refuse a script that does not exist before anything starts.

        Raises:
            UserError: the script is missing or not a file (a module is found by the workers).
        """
        if self.module:
            if not self.program or self.program.startswith("."):
                raise UserError(f"-m needs a module name such as package.module, got {self.program!r}")
            return
        path = Path(self.program)
        if not path.is_file():
            raise UserError(f"{self.program}: no such script (give a .py file, or -m MODULE)")


@dataclass
class LaunchResult:
    """How a launch ended.

    Attributes:
        servers: the shards' addresses.
        finished: the ranks that exited 0.
        failed: rank -> its last exit code, for the ranks that failed for good.
        restarts: rank -> how many times it was started again.
        wall_seconds: from the first shard to the last worker.
    """

    servers: list[str]
    finished: list[int] = field(default_factory=list)
    failed: dict[int, int] = field(default_factory=dict)
    restarts: dict[int, int] = field(default_factory=dict)
    wall_seconds: float = 0.0


@dataclass
class _Worker:
    child: Child
    restarts: int = 0


def check_fresh_run(settings: LaunchSettings, security: ClientSecurity, *, use_uvloop: bool = True) -> None:
    """Refuse to start a run on top of an earlier one unless ``--resume`` says so (and refuse
    ``--resume`` when there is nothing to resume).

    Raises:
        UserError: checkpoints or trained weights found without ``--resume``, none found with it, or
            ``--servers`` that do not answer.
    """
    if settings.checkpoint_dir is not None:
        found = list_checkpoints(settings.checkpoint_dir)
        files = sum(len(paths) for paths in found.values())
        if files and not settings.resume:
            raise UserError(
                f"--checkpoint-dir {settings.checkpoint_dir} already holds {files} checkpoint files of an earlier "
                "run: pass --resume to continue from them, or give another folder for a fresh run"
            )
        if not files and settings.resume:
            raise UserError(f"--resume: --checkpoint-dir {settings.checkpoint_dir} holds no checkpoint to resume from")
    if settings.servers is None:
        return
    replies = fetch_stats(settings.servers, timeout=10.0, use_uvloop=use_uvloop, security=security)
    trained = []
    for address, reply in zip(settings.servers, replies, strict=True):
        if isinstance(reply, str):
            raise UserError(f"--servers: {address} does not answer: {reply}")
        if reply.layout_fingerprint and reply.pushes_applied:
            trained.append(f"{address} ({reply.pushes_applied} pushes applied)")
    if trained and not settings.resume:
        raise UserError(
            "the servers already hold trained weights: " + ", ".join(trained) + "; pass --resume to train on from "
            "them, or restart the servers (without their checkpoints) for a fresh run"
        )
    if not trained and settings.resume:
        raise UserError("--resume: the servers hold no trained weights yet")


def run_launch(
    settings: LaunchSettings,
    target: LaunchTarget,
    *,
    log_level: str = "INFO",
    use_uvloop: bool = True,
    env_token: str | None = None,
    echo: IO[str] | None = None,
) -> LaunchResult:
    """Start the shards (unless ``settings.servers``) and the workers, supervise them, stop the shards.

    Args:
        env_token: the token from ``RANGER_PS_TOKEN`` (the processes inherit the variable).
        echo: where the workers' output is copied, prefixed (with ``settings.tee``; default stdout).

    Raises:
        UserError: a missing script, or a run that would start on top of an earlier one.
        ClusterError: a shard failed, every worker failed, a worker failed with ``--fail-fast``, or
            some worker failed for good (raised once the others have finished).
    """
    target.check()
    token = read_token(settings.token_file) if settings.token_file is not None else env_token
    check_fresh_run(settings, ClientSecurity(token=token), use_uvloop=use_uvloop)
    started = time.monotonic()
    common = common_argv(log_level, use_uvloop=use_uvloop, token_file=settings.token_file)
    env = child_environment(os.environ, keep=INHERITED_VARIABLES)
    if token is not None:
        env[TOKEN_VARIABLE] = token  # the workers' Ranger(servers="env") reads it
    with run_folder(settings.run_dir, "ranger-ps-launch-") as run_dir, Cluster(run_dir, env=env) as cluster:
        servers: list[Child] = []
        if settings.servers is None:
            servers, addresses = start_shards(
                cluster,
                settings.shards,
                MembershipSettings.from_settings(settings),
                host=settings.host,
                timeout=settings.startup_timeout,
                argv=common,
                metrics=lambda shard: metrics_settings(settings.metrics_port, settings.metrics_host, shard),
                checkpoint_dir=settings.checkpoint_dir,
            )
            log.info("servers up: %s (logs in %s)", ",".join(addresses), run_dir)
        else:
            addresses = list(settings.servers)
        result = LaunchResult(addresses)
        _Supervisor(cluster, settings, target, addresses, echo or sys.stdout).run(servers, result)
        for child in servers:  # a clean stop: each shard writes its final checkpoint
            code = cluster.stop(child, timeout=30.0)
            if code not in (0, None):
                raise cluster.failure(child, f"exited with code {code} on shutdown")
        result.wall_seconds = time.monotonic() - started
        if result.failed:
            failed = ", ".join(f"rank {rank} (exit code {code})" for rank, code in sorted(result.failed.items()))
            raise ClusterError(
                f"{len(result.failed)} of {settings.workers} workers failed: {failed}; "
                f"{len(result.finished)} finished (logs in {run_dir})"
            )
    return result


class _Supervisor:
    """Starts the workers, restarts the ones that fail, and decides when the run is over."""

    def __init__(
        self, cluster: Cluster, settings: LaunchSettings, target: LaunchTarget, servers: Sequence[str], echo: IO[str]
    ) -> None:
        self.cluster = cluster
        self.settings = settings
        self.target = target
        self.servers = list(servers)
        self.echo = echo if settings.tee else None

    def _spawn(self, rank: int, *, again: bool = False) -> Child:
        place = LaunchedProcess(rank, self.settings.workers, rank, self.settings.workers, self.servers)
        return self.cluster.spawn_command(
            f"worker-{rank}",
            self.target.command(),
            echo=self.echo,
            env={**place.environ(), **self.process_env},
            append=again,
        )

    @property
    def process_env(self) -> dict[str, str]:
        """What a user's script gets besides its place: its share of the cores for torch's threads (as
        torchrun does, unless the user set ``OMP_NUM_THREADS``) and unbuffered output, so its lines
        show as they are printed and none are lost when it is killed."""
        threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // self.settings.workers))
        return {"OMP_NUM_THREADS": threads, "PYTHONUNBUFFERED": os.environ.get("PYTHONUNBUFFERED", "1")}

    def run(self, servers: Sequence[Child], result: LaunchResult, *, interval: float = 0.1) -> None:
        running = {rank: _Worker(self._spawn(rank)) for rank in range(self.settings.workers)}
        while running:
            for server in servers:
                if server.process.poll() is not None:
                    raise self.cluster.failure(server, f"exited with code {server.process.returncode} during training")
            for rank, worker in list(running.items()):
                code = worker.child.process.poll()
                if code is None:
                    continue
                self.cluster.stop(worker.child)  # closes its log (after the echo copied everything)
                if code == 0:
                    result.finished.append(rank)
                    del running[rank]
                elif worker.restarts < self.settings.max_restarts and code not in NOT_RETRIED:
                    worker.restarts += 1
                    result.restarts[rank] = worker.restarts
                    log.warning(
                        "worker %d exited with code %d; starting it again (%d of %d)",
                        rank, code, worker.restarts, self.settings.max_restarts,
                    )  # fmt: skip
                    worker.child = self._spawn(rank, again=True)
                else:
                    del running[rank]
                    result.failed[rank] = code
                    if self.settings.fail_fast:
                        raise self.cluster.failure(worker.child, f"exited with code {code} (--fail-fast)")
                    if not running and not result.finished:
                        raise self.cluster.failure(worker.child, f"exited with code {code}; every worker failed")
                    log.warning(
                        "worker %d exited with code %d; the others train on (%d running; its log: %s)",
                        rank, code, len(running), worker.child.log_path,
                    )  # fmt: skip
            time.sleep(interval)
