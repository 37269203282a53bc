"""``ranger-ps local``: a whole cluster on this machine, trained end to end, with one report.

Part of the command-line edge: it starts shards and workers as subprocesses (see
:mod:`ranger_ps.launcher`) and, once every worker has finished, evaluates the servers' final
weights in this process (importing the worker package lazily, as the CLI may).
"""

from __future__ import annotations

import logging
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from ranger_ps.client import fetch_stats
from ranger_ps.config import TrainConfig
from ranger_ps.consistency import staleness_summary
from ranger_ps.errors import ClusterError
from ranger_ps.launcher import Child, Cluster, wait_all
from ranger_ps.progress import Progress
from ranger_ps.report import read_report
from ranger_ps.security import ClientSecurity, read_token

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LocalOptions:
    """How to lay out the local cluster.

    Attributes:
        workers: worker processes.
        shards: server processes.
        host: loopback address the servers listen on.
        run_dir: where process logs and per-process reports go (a temporary folder, removed after
            a successful run, when None; kept on failure).
        startup_timeout: seconds for the servers to come up.
        use_uvloop: pass ``--uvloop``/``--no-uvloop`` to the children.
        log_level: the children's log level.
        progress: show progress.
        consistency: the servers' consistency model (``async``, ``ssp:K``, ``bsp``).
        lease_seconds: the servers' worker lease.
        wait_seconds: the longest a pull waits at a barrier.
        token_file: a token the servers require and the workers send (the path travels, never the token).
        token: the token itself when it came from ``RANGER_PS_TOKEN`` (the children inherit the variable).
    """

    workers: int = 2
    shards: int = 2
    host: str = "127.0.0.1"
    run_dir: Path | None = None
    startup_timeout: float = 60.0
    use_uvloop: bool = True
    log_level: str = "INFO"
    progress: bool = True
    consistency: str = "async"
    lease_seconds: float = 5.0
    wait_seconds: float = 120.0
    token_file: Path | None = None
    token: str | None = field(default=None, repr=False)


def _planned_steps(config: TrainConfig, workers: int) -> int:
    from ranger_ps.worker.data import load_dataset
    from ranger_ps.worker.train import planned_steps

    n = len(load_dataset(config.dataset).y_train)
    return sum(planned_steps(config, n, w) for w in range(workers))


def _terminate_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_local(config: TrainConfig, options: LocalOptions) -> dict[str, Any]:
    """Start the cluster, train, evaluate the final weights, stop everything; returns the report."""
    from ranger_ps.cli import train_config_to_argv  # the flags must match the worker's parser
    from ranger_ps.worker.train import build

    if options.workers < 1 or options.shards < 1:
        raise ClusterError("--workers and --shards must be >= 1")
    build(config)  # fail fast on an unknown model, dataset or device, before any process starts
    started = time.monotonic()
    temporary = options.run_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="ranger-ps-")) if options.run_dir is None else options.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    common = ["--log-level", options.log_level, "--uvloop" if options.use_uvloop else "--no-uvloop"]
    if options.token_file is not None:
        common += ["--token-file", str(options.token_file)]
    security = ClientSecurity(token=read_token(options.token_file) if options.token_file else options.token)
    previous = signal.signal(signal.SIGTERM, _terminate_on_sigterm)
    ok = False
    try:
        with Cluster(run_dir, env={"OMP_NUM_THREADS": "1"}) as cluster:
            servers: list[Child] = []
            for shard in range(options.shards):
                ready = run_dir / f"shard-{shard}.ready.json"
                ready.unlink(missing_ok=True)
                servers.append(
                    cluster.spawn(
                        f"shard-{shard}",
                        [
                            "server",
                            "--host",
                            options.host,
                            "--port",
                            "0",
                            "--shard-id",
                            str(shard),
                            "--num-shards",
                            str(options.shards),
                            "--ready-file",
                            str(ready),
                            "--consistency",
                            options.consistency,
                            "--lease-seconds",
                            repr(options.lease_seconds),
                            "--wait-timeout",
                            repr(options.wait_seconds),
                            *common,
                        ],
                    )
                )
            addresses = []
            for shard, child in enumerate(servers):
                host, port = cluster.wait_ready(child, run_dir / f"shard-{shard}.ready.json", options.startup_timeout)
                addresses.append(f"{host}:{port}")
            log.info("servers up: %s (logs in %s)", ",".join(addresses), run_dir)

            worker_argv = train_config_to_argv(config, skip=("num_workers",))
            workers = [
                cluster.spawn(
                    f"worker-{w}",
                    [
                        "worker",
                        "--servers",
                        ",".join(addresses),
                        "--worker-id",
                        str(w),
                        "--num-workers",
                        str(options.workers),
                        "--report",
                        str(run_dir / f"worker-{w}.json"),
                        *worker_argv,
                        *common,
                    ],
                )
                for w in range(options.workers)
            ]
            bar = Progress(_planned_steps(config, options.workers), "training", enabled=options.progress)
            watcher = _ProgressWatcher(addresses, bar, options.use_uvloop, security)
            try:
                wait_all(cluster, workers, servers, poll=watcher.poll)
                watcher.poll()
            finally:
                bar.close()

            from ranger_ps.worker.train import evaluate_cluster

            evaluation, _ = evaluate_cluster(config, addresses, use_uvloop=options.use_uvloop, security=security)
            replies = fetch_stats(addresses, use_uvloop=options.use_uvloop, security=security)
            stats = [r for r in replies if not isinstance(r, str)]
            staleness = staleness_summary(
                [dict(s.staleness_counts) for s in stats], [dict(s.version_lag_counts) for s in stats]
            )
            for child in servers:
                code = cluster.stop(child)
                if code not in (0, None):
                    log.warning("%s exited with code %s on shutdown (see %s)", child.name, code, child.log_path)
        per_worker = [read_report(run_dir / f"worker-{w}.json") for w in range(options.workers)]
        ok = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        if temporary and ok:
            shutil.rmtree(run_dir, ignore_errors=True)
        elif not ok:
            log.error("process logs kept in %s", run_dir)

    return {
        "test_accuracy": evaluation.test_accuracy,
        "test_loss": evaluation.test_loss,
        "steps": sum(int(r["steps"]) for r in per_worker),
        "wall_seconds": time.monotonic() - started,
        "bytes_pushed": sum(int(r["bytes_pushed"]) for r in per_worker),
        "bytes_pushed_dense": sum(int(r["bytes_pushed_dense"]) for r in per_worker),
        "bytes_pulled": sum(int(r["bytes_pulled"]) for r in per_worker),
        "workers": options.workers,
        "shards": options.shards,
        "consistency": options.consistency,
        **staleness,
        "config": {
            **config.to_dict(),
            "workers": options.workers,
            "shards": options.shards,
            "consistency": options.consistency,
            "lease_seconds": options.lease_seconds,
            "wait_timeout": options.wait_seconds,
        },
        "per_worker": [
            {k: r[k] for k in ("worker_id", "steps", "test_accuracy", "bytes_pushed", "bytes_pulled", "wall_seconds")}
            for r in per_worker
        ],
    }


class _ProgressWatcher:
    """Turns the servers' view of worker clocks into progress (what the servers really applied)."""

    def __init__(self, addresses: list[str], bar: Progress, use_uvloop: bool, security: ClientSecurity) -> None:
        self.addresses = addresses
        self.security = security
        self.bar = bar
        self.use_uvloop = use_uvloop
        self._last = 0.0

    def poll(self) -> None:
        now = time.monotonic()
        if now - self._last < 0.5:
            return
        self._last = now
        from ranger_ps.client import fetch_stats

        replies = fetch_stats(self.addresses[:1], timeout=2.0, use_uvloop=self.use_uvloop, security=self.security)
        reply = replies[0]
        if isinstance(reply, str):
            return
        done = sum(w.clock for w in reply.workers if not w.observer)
        self.bar.update(done, pushes=reply.pushes_applied)
