"""Watching a worker train: progress bar, per-step CSV (and TensorBoard), Prometheus metrics.

:class:`RunWatcher` is what ``ranger-ps worker`` hands the training loop as its ``on_step`` and
``on_eval`` callbacks; each output is optional and they all see the same numbers.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from ranger_ps.observability.metrics import MetricsEndpoint, WorkerMetrics, start_metrics_server
from ranger_ps.observability.progress import Progress
from ranger_ps.observability.steplog import StepLog

if TYPE_CHECKING:
    from ranger_ps.observability.records import Evaluation, StepInfo

log = logging.getLogger(__name__)


class RunWatcher:
    """Fans one worker's step and evaluation records out to the outputs asked for.

    Args:
        description: label of the progress bar (``worker``; the worker id is added).
        progress: show a bar on a terminal, log lines otherwise.
        step_log: write per-step rows to this CSV (evaluations go next to it).
        metrics_port: serve Prometheus metrics on this port (0: any free port); None: off. The
            endpoint listens from the start; the worker's series appear with its first step, labelled
            with the id the servers gave it.
        metrics_host: the address the metrics endpoint listens on.
    """

    def __init__(
        self,
        description: str,
        *,
        progress: bool = True,
        step_log: Path | None = None,
        metrics_port: int | None = None,
        metrics_host: str = "127.0.0.1",
    ) -> None:
        self.description = description
        self._progress_enabled = progress
        self._bar: Progress | None = None
        self._last_seconds = 0.0
        self.step_log = StepLog(step_log) if step_log is not None else None
        self.metrics: WorkerMetrics | None = None
        self.registry: CollectorRegistry | None = None
        self.endpoint: MetricsEndpoint | None = None
        self.metrics_port: int | None = None
        if metrics_port is not None:
            self.registry = CollectorRegistry()
            try:
                self.endpoint, self.metrics_port = start_metrics_server(self.registry, metrics_host, metrics_port)
            except BaseException:
                self.close()
                raise
            log.info("%s: metrics on %s", description, self.endpoint.url)

    def on_step(self, info: StepInfo) -> None:
        """Record one training step everywhere."""
        step_seconds = info.wall_seconds - self._last_seconds
        self._last_seconds = info.wall_seconds
        if self._bar is None:
            self.description = f"{self.description} {info.worker_id}"
            self._bar = Progress(info.planned, self.description, enabled=self._progress_enabled)
        if self.registry is not None and self.metrics is None:
            self.metrics = WorkerMetrics(info.worker_id, registry=self.registry)
        ratio = info.bytes_pushed / info.bytes_pushed_dense if info.bytes_pushed_dense else math.nan
        rate = info.step / info.wall_seconds if info.wall_seconds > 0 else math.nan
        self._bar.update(info.step, loss=f"{info.loss:.3f}", steps_s=f"{rate:.0f}", push=f"{ratio:.1%}")
        if self.step_log is not None:
            self.step_log.log_step(
                info.step,
                info.loss,
                bytes_pushed=info.bytes_pushed,
                bytes_pulled=info.bytes_pulled,
                bytes_pushed_dense=info.bytes_pushed_dense,
                batch_accuracy=info.batch_accuracy,
            )
        if self.metrics is not None:
            self.metrics.record_step(
                info.loss, step_seconds, info.bytes_pushed, info.bytes_pulled, info.bytes_pushed_dense
            )

    def on_eval(self, step: int, bytes_pushed: int, evaluation: Evaluation) -> None:
        """Record an evaluation of the worker's weights on held-out data."""
        log.info(
            "%s: step %d: test accuracy %.4f, test loss %.4f",
            self.description, step, evaluation.test_accuracy, evaluation.test_loss,
        )  # fmt: skip
        if self.step_log is not None:
            self.step_log.log_evaluation(step, bytes_pushed, evaluation.test_loss, evaluation.test_accuracy)
        if self.metrics is not None:
            self.metrics.record_evaluation(evaluation.test_loss, evaluation.test_accuracy)

    def close(self) -> None:
        """Close the bar, flush and close the log, stop the endpoint; idempotent."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self.step_log is not None:
            self.step_log.close()
        if self.endpoint is not None:
            self.endpoint.close()

    def __enter__(self) -> RunWatcher:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
