"""``ranger-ps local``: a whole cluster on this machine, trained end to end, with one report.

Part of the command-line edge: it starts shards and workers as subprocesses (see
:mod:`ranger_ps.orchestration.launcher`) and, once every worker has finished, evaluates the servers' final
weights in this process (importing the worker package lazily, as the CLI may).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ranger_ps.algorithm.consistency import staleness_summary
from ranger_ps.client.admin import fetch_stats
from ranger_ps.config.local import LocalSettings
from ranger_ps.config.server import MembershipSettings
from ranger_ps.config.train import TrainConfig
from ranger_ps.config.worker import WorkerSettings
from ranger_ps.observability.progress import Progress
from ranger_ps.observability.report import read_report
from ranger_ps.observability.steplog import eval_log_path, read_last_step
from ranger_ps.orchestration.launcher import (
    INHERITED_VARIABLES,
    Cluster,
    child_environment,
    common_argv,
    metrics_settings,
    run_folder,
    start_shards,
    wait_all,
)
from ranger_ps.settings import to_argv
from ranger_ps.wire.security import ClientSecurity, read_token

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """How the local cluster's processes run (from the command's common flags and environment).

    Attributes:
        use_uvloop: pass ``--uvloop``/``--no-uvloop`` to the children.
        log_level: the children's log level.
        progress: show progress.
        token: the token itself when it came from ``RANGER_PS_TOKEN`` (the children inherit the
            variable; it never travels in argv).
    """

    use_uvloop: bool = True
    log_level: str = "INFO"
    progress: bool = True
    token: str | None = field(default=None, repr=False)


def plan_local(config: TrainConfig, options: LocalSettings) -> list[int]:
    """Check the job as the workers will run it, before any process starts; returns each worker's
    planned steps.

    Raises:
        UserError: an unknown model, dataset or device, a model whose buffers the settings cannot
            keep consistent, or a schedule longer than a worker's run.
    """
    from ranger_ps.workloads.job import build, check_schedule, planned_steps
    from ranger_ps.workloads.models import check_cluster_buffers

    data, model, _ = build(config)
    check_cluster_buffers(model, config.outer, truncates=config.truncates)
    planned = [planned_steps(config, len(data.y_train), w) for w in range(options.workers)]
    check_schedule(config, min(planned))
    return planned


def run_local(
    config: TrainConfig,
    options: LocalSettings,
    context: RunContext | None = None,
    *,
    planned: list[int] | None = None,
) -> dict[str, Any]:
    """Start the cluster, train, evaluate the final weights, stop everything; returns the report.

    ``planned``: what :func:`plan_local` returned, when the caller already checked the job.
    """
    context = context or RunContext()
    planned = plan_local(config, options) if planned is None else planned
    started = time.monotonic()
    common = common_argv(context.log_level, use_uvloop=context.use_uvloop, token_file=options.token_file)
    security = ClientSecurity(token=read_token(options.token_file) if options.token_file else context.token)
    with run_folder(options.run_dir, "ranger-ps-") as run_dir:
        step_log_dir = options.step_log_dir or run_dir
        step_log_dir.mkdir(parents=True, exist_ok=True)
        with Cluster(run_dir, env=child_environment(os.environ, keep=INHERITED_VARIABLES)) as cluster:
            servers, addresses = start_shards(
                cluster,
                options.shards,
                MembershipSettings.from_settings(options),
                host=options.host,
                timeout=options.startup_timeout,
                argv=common,
                metrics=lambda shard: metrics_settings(options.metrics_port, options.metrics_host, shard),
            )
            log.info("servers up: %s (logs in %s)", ",".join(addresses), run_dir)
            if options.metrics_port is not None:
                for shard in range(options.shards):
                    ready = json.loads((run_dir / f"shard-{shard}.ready.json").read_text())
                    log.info(
                        "shard %d metrics: http://%s:%s/metrics", shard, options.metrics_host, ready["metrics_port"]
                    )

            step_logs = [step_log_dir / f"worker-{w}.csv" for w in range(options.workers)]
            for path in step_logs:  # an earlier run's logs in the same folder must not be read as this one's
                path.unlink(missing_ok=True)
                eval_log_path(path).unlink(missing_ok=True)
            workers = [
                cluster.spawn(
                    f"worker-{w}",
                    [
                        "worker",
                        *to_argv(_worker_settings(options, w, addresses, run_dir, step_logs[w])),
                        *to_argv(dataclasses.replace(config, num_workers=options.workers)),
                        *common,
                    ],
                )
                for w in range(options.workers)
            ]
            bar = Progress(sum(planned), "training", enabled=context.progress)
            watcher = _ProgressWatcher(addresses, bar, context.use_uvloop, security, step_logs)
            try:
                wait_all(cluster, workers, servers, poll=watcher.poll)
                watcher.poll()
            finally:
                bar.close()

            from ranger_ps.workloads.evaluation import evaluate_cluster

            evaluation, _ = evaluate_cluster(config, addresses, use_uvloop=context.use_uvloop, security=security)
            replies = fetch_stats(addresses, use_uvloop=context.use_uvloop, security=security)
            stats = [r for r in replies if not isinstance(r, str)]
            staleness = staleness_summary(
                [dict(s.staleness_counts) for s in stats], [dict(s.version_lag_counts) for s in stats]
            )
            for child in servers:
                code = cluster.stop(child)
                if code not in (0, None):
                    log.warning("%s exited with code %s on shutdown (see %s)", child.name, code, child.log_path)
        per_worker = [read_report(run_dir / f"worker-{w}.json") for w in range(options.workers)]
        plot = _plot(step_logs, options.plot_path, config) if options.plot_path is not None else None

    return {
        "test_accuracy": evaluation.test_accuracy,
        "test_loss": evaluation.test_loss,
        "steps": sum(int(r["steps"]) for r in per_worker),
        "wall_seconds": time.monotonic() - started,
        "bytes_pushed": sum(int(r["bytes_pushed"]) for r in per_worker),
        "bytes_pushed_dense": sum(int(r["bytes_pushed_dense"]) for r in per_worker),
        "bytes_flushed": sum(int(r.get("bytes_flushed", 0)) for r in per_worker),
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
        "step_logs": [str(p) for p in step_logs] if options.step_log_dir is not None else [],
        "plot": str(plot) if plot is not None else None,
    }


def _worker_settings(
    options: LocalSettings, index: int, addresses: list[str], run_dir: Path, step_log: Path
) -> WorkerSettings:
    """What the ``index``-th worker is told besides the training settings."""
    return WorkerSettings(
        servers=addresses,
        worker_id=index,
        report=run_dir / f"worker-{index}.json",
        metrics_csv=step_log,
        ready_file=run_dir / f"worker-{index}.ready.json" if options.metrics_port is not None else None,
        **metrics_settings(options.metrics_port, options.metrics_host, options.shards + index),
    )


def _plot(step_logs: list[Path], out: Path, config: TrainConfig) -> Path | None:
    """Draw the run's curves; a failure to plot is reported, never fatal (the training is done)."""
    from ranger_ps.observability.plot import plot_run

    title = f"{config.model} on {config.dataset}: {config.rule}, push fraction {config.push_fraction:g}"
    try:
        path = plot_run(step_logs, out, title=title)
    except (OSError, ValueError) as exc:
        log.warning("could not draw %s: %s", out, exc)
        return None
    log.info("plot of loss and accuracy written to %s", path)
    return path


class _ProgressWatcher:
    """Progress of the whole run from the workers' step logs (their last rows): the steps each finished,
    loss, rate and push ratio; the pushes the first shard applied from its stats."""

    def __init__(
        self, addresses: list[str], bar: Progress, use_uvloop: bool, security: ClientSecurity, step_logs: list[Path]
    ) -> None:
        self.addresses = addresses
        self.security = security
        self.bar = bar
        self.use_uvloop = use_uvloop
        self.step_logs = step_logs
        self._first: tuple[float, int] | None = None  # (when, steps) of the first progress seen
        self._last = 0.0

    def poll(self) -> None:
        now = time.monotonic()
        if now - self._last < 0.5:
            return
        self._last = now
        from ranger_ps.client.admin import fetch_stats

        replies = fetch_stats(self.addresses[:1], timeout=2.0, use_uvloop=self.use_uvloop, security=self.security)
        reply = replies[0]
        if isinstance(reply, str):
            return
        # Each worker's own count of the steps it finished (a worker that joins late starts its clock at
        # the cluster's, so the shards' clocks would overstate the steps taken).
        rows = [row for row in map(read_last_step, self.step_logs) if row is not None]
        done = sum(row.step for row in rows)
        postfix: dict[str, object] = {"pushes": reply.pushes_applied}
        if rows:
            postfix["loss"] = f"{sum(r.loss for r in rows) / len(rows):.3f}"
            dense = sum(r.bytes_pushed_dense for r in rows)
            if dense:
                postfix["push"] = f"{sum(r.bytes_pushed for r in rows) / dense:.1%}"
        if self._first is None and done > 0:
            self._first = (now, done)
        if self._first is not None and now > self._first[0]:
            postfix["steps_s"] = f"{(done - self._first[1]) / (now - self._first[0]):.0f}"
        self.bar.update(done, **postfix)
