"""Prometheus metrics: a shard's counters, a worker's progress, and the HTTP endpoint serving them.

Every process keeps its metrics in its own :class:`~prometheus_client.CollectorRegistry` (never
prometheus_client's global default registry), so several shards or workers can live in one process
(tests, ``ranger-ps local``) without their series colliding.

- **Server side** (:class:`ServerMetrics`): a custom collector reads :meth:`Shard.stats
  <ranger_ps.wire.stats.ShardStats>` at scrape time, so the counters are exactly what the
  ``Stats`` RPC reports and never drift from it; the apply latency is a histogram fed by the
  shard's ``apply_observers`` hook (:meth:`ServerMetrics.observe_apply`).
- **Worker side** (:class:`WorkerMetrics`): the training loop calls
  :meth:`WorkerMetrics.record_step` after every step (byte counts are running totals).
- :func:`start_metrics_server` serves a registry on ``http://HOST:PORT/metrics`` from a daemon
  thread, with the process's ``process_*`` metrics (:class:`ProcessMetrics`) added to it;
  :meth:`MetricsEndpoint.close` stops it.

The metric names, types and labels are listed in ``docs/observability.md``. They follow the
Prometheus conventions (base units at the end of the name: ``_seconds``, ``_bytes``; ``_total`` on
counters). Names from before that rule are still exported beside their replacements, with the same
value and a HELP that names the replacement (:data:`DEPRECATED_NAMES`); they are kept for
compatibility and will be removed in a later major version.

No ``_created`` series: prometheus_client's ``Counter``/``Histogram`` objects export one per series
(in the plain-text format as a separate gauge family carrying the parent's HELP), so every family
here is built by a collector at scrape time, and the two latency histograms are kept by
:class:`BucketCounts`. prometheus_client's ``disable_created_metrics()`` would do the same but for
the whole process, including the metrics of a training script that imports ranger-ps.

Threading: the endpoint answers scrapes on prometheus_client's HTTP threads while a shard lives on
an asyncio loop in the main thread. :meth:`Shard.stats` only reads ints and copies dicts; a copy
that races with the loop can fail with "dictionary changed size during iteration", so the collector
retries it a few times instead of locking the loop.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:
    from ranger_ps.wire.stats import ShardStats, WorkerStats

log = logging.getLogger(__name__)

PREFIX = "ranger_ps"

#: Apply-latency buckets (seconds): 10 us .. 1 s, about three per decade.
APPLY_SECONDS_BUCKETS: tuple[float, ...] = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip

#: Staleness buckets (clocks behind, and block versions behind): exact for small values, then powers of 2.
STALENESS_BUCKETS: tuple[int, ...] = (0, 1, 2, 3, 4, 8, 16, 32, 64, 128)

#: Worker step-duration buckets (seconds): 1 ms .. 60 s.
STEP_SECONDS_BUCKETS: tuple[float, ...] = (
    1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

_STATS_ATTEMPTS = 5

#: Names exported for compatibility beside their conventional replacements (family names: counters
#: get ``_total`` on the wire): deprecated name -> replacement. Same value; the HELP names the
#: replacement. Kept for compatibility; will be removed in a later major version.
DEPRECATED_NAMES: Mapping[str, str] = {
    f"{PREFIX}_bytes_received": f"{PREFIX}_received_bytes",
    f"{PREFIX}_bytes_sent": f"{PREFIX}_sent_bytes",
    f"{PREFIX}_worker_bytes_pushed": f"{PREFIX}_worker_pushed_bytes",
    f"{PREFIX}_worker_bytes_pulled": f"{PREFIX}_worker_pulled_bytes",
    f"{PREFIX}_worker_bytes_pushed_dense": f"{PREFIX}_worker_pushed_dense_bytes",
}


def bucketize(counts: Mapping[int, int], bounds: Sequence[float]) -> tuple[list[tuple[str, float]], float]:
    """Exact value counts as cumulative Prometheus buckets (``+Inf`` last) and the sum of the values.

    Args:
        counts: value -> how many times it was seen (a :class:`ranger_ps.algorithm.consistency.Histogram`'s counts).
        bounds: the buckets' upper bounds, increasing.

    Returns:
        ``([(le, cumulative count), ..., ("+Inf", total)], sum of value * count)``.
    """
    buckets = []
    for bound in bounds:
        buckets.append((str(float(bound)), float(sum(c for v, c in counts.items() if v <= bound))))
    buckets.append(("+Inf", float(sum(counts.values()))))
    return buckets, float(sum(v * c for v, c in counts.items()))


class BucketCounts:
    """Observations counted into fixed histogram buckets; thread-safe (one thread observes, scrapes read).

    What a prometheus_client ``Histogram`` keeps, without its ``_created`` series: a collector
    exports :meth:`snapshot` as a ``HistogramMetricFamily`` sample.

    Args:
        bounds: the buckets' upper bounds, increasing (``+Inf`` is added).
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"bucket bounds must be strictly increasing, got {list(bounds)}")
        self._lock = threading.Lock()
        self._counts = [0] * (len(self.bounds) + 1)  # per bucket, not cumulative; the last is +Inf
        self._sum = 0.0

    def observe(self, value: float) -> None:
        """Count one observation (into the first bucket whose bound is >= ``value``)."""
        index = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[tuple[str, float]], float]:
        """``([(le, cumulative count), ..., ("+Inf", total)], sum)``, as :func:`bucketize` returns them."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        bounds = [*map(floatToGoString, self.bounds), "+Inf"]
        cumulative = [float(sum(counts[: i + 1])) for i in range(len(counts))]
        return list(zip(bounds, cumulative, strict=True)), total


class ServerMetrics(Collector):
    """A shard's metrics: a collector over ``Shard.stats()`` plus the apply-latency histogram.

    Registers itself (and the histogram) in ``registry`` (a new private one when None). Wire it to
    a shard with ``shard.apply_observers.append(metrics.observe_apply)``.

    Args:
        stats: returns the shard's current :class:`~ranger_ps.wire.stats.ShardStats`
            (``shard.stats``); called on the HTTP thread at every scrape.
        shard_id: this shard's index (the ``shard`` label of the apply histogram).
        registry: where to register; default: a new private :class:`CollectorRegistry`.
        checkpoint_age: seconds since the shard last wrote a good checkpoint, or None while it
            has written none (the gauge is then NaN). Leave it None when checkpointing is off: the
            gauge is then not exported at all.
        checkpoint_failures: how many checkpoints failed to write since start (a counter; it
            grows at every failed attempt until one succeeds). None when checkpointing is off:
            not exported.
    """

    def __init__(
        self,
        stats: Callable[[], ShardStats],
        *,
        shard_id: int,
        registry: CollectorRegistry | None = None,
        checkpoint_age: Callable[[], float | None] | None = None,
        checkpoint_failures: Callable[[], int] | None = None,
    ) -> None:
        self._stats = stats
        self._shard_label = str(shard_id)
        self._checkpoint_age = checkpoint_age
        self._checkpoint_failures = checkpoint_failures
        self.registry = registry if registry is not None else CollectorRegistry()
        self._apply = BucketCounts(APPLY_SECONDS_BUCKETS)
        self.registry.register(self)

    def observe_apply(self, seconds: float, blocks: int) -> None:
        """The shard's apply observer: record one store update's duration (``blocks`` is unused)."""
        del blocks  # counted by the blocks-applied counter, read from the shard's stats
        self._apply.observe(seconds)

    def snapshot(self) -> ShardStats:
        """The shard's stats, retried if a dict changed size under the copy (scrape vs event loop)."""
        for attempt in range(_STATS_ATTEMPTS):
            try:
                return self._stats()
            except (RuntimeError, KeyError):
                if attempt == _STATS_ATTEMPTS - 1:
                    raise
                time.sleep(0.001 * (attempt + 1))
        raise AssertionError("unreachable")

    def describe(self) -> Iterable[Metric]:
        """The families this collector yields, without samples (lets the registry check names)."""
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        """Read the shard's stats and yield every family (called by the registry at each scrape)."""
        return list(self._families(self.snapshot()))

    def _families(self, stats: ShardStats | None) -> Iterator[Metric]:
        labels = ["shard"]
        values = [self._shard_label]
        for kind, name, doc, read in _SHARD_SCALARS:
            value = None if stats is None else float(read(stats))
            yield from _scalar_families(kind, f"{PREFIX}_{name}", doc, labels, values, value)
        apply = HistogramMetricFamily(
            f"{PREFIX}_apply_seconds",
            "Time to apply one update (a push, or a bsp clock's combined pushes) to the shard's store.",
            labels=labels,
        )
        if stats is not None:
            apply.add_metric(values, *self._apply.snapshot())
        yield apply
        for name, doc, counts_of in _SHARD_HISTOGRAMS:
            histogram = HistogramMetricFamily(f"{PREFIX}_{name}", doc, labels=labels)
            if stats is not None:
                buckets, total = bucketize(counts_of(stats), STALENESS_BUCKETS)
                histogram.add_metric(values, buckets, total)
            yield histogram
        if self._checkpoint_age is not None:
            age = GaugeMetricFamily(
                f"{PREFIX}_checkpoint_age_seconds",
                "Seconds since the shard last wrote a good checkpoint (NaN while it has written none).",
                labels=labels,
            )
            if stats is not None:
                seconds = self._checkpoint_age()
                age.add_metric(values, math.nan if seconds is None else seconds)
            yield age
        if self._checkpoint_failures is not None:
            failures = CounterMetricFamily(
                f"{PREFIX}_checkpoint_failures",
                "Checkpoints that failed to write (full disk, folder gone or read-only); health is NOT_SERVING "
                "from a failure until a checkpoint succeeds.",
                labels=labels,
            )
            if stats is not None:
                failures.add_metric(values, float(self._checkpoint_failures()))
            yield failures
        info = InfoMetricFamily(f"{PREFIX}_shard", "What the shard runs (value always 1).", labels=labels)
        if stats is not None:
            info.add_metric(
                values,
                {
                    "num_shards": str(stats.num_shards),
                    "version": stats.version,
                    "consistency": stats.consistency,
                    "rule": stats.rule,
                    "layout": stats.layout_fingerprint,
                },
            )
        yield info


def _scalar_family(kind: str, name: str, doc: str, labels: list[str]) -> CounterMetricFamily | GaugeMetricFamily:
    if kind == "counter":
        return CounterMetricFamily(name, doc, labels=labels)
    return GaugeMetricFamily(name, doc, labels=labels)


def _scalar_families(
    kind: str, name: str, doc: str, labels: list[str], values: list[str], value: float | None
) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    """The family ``name`` (no sample when ``value`` is None: describe), then its deprecated old name, if any."""
    yield _with_value(_scalar_family(kind, name, doc, labels), values, value)
    for old, new in DEPRECATED_NAMES.items():
        if new == name:
            suffix = "_total" if kind == "counter" else ""
            deprecated = (
                f"Deprecated: use {new}{suffix} (the same value). {doc} "
                "Kept for compatibility; will be removed in a later major version."
            )
            yield _with_value(_scalar_family(kind, old, deprecated, labels), values, value)


def _with_value(
    family: CounterMetricFamily | GaugeMetricFamily, values: list[str], value: float | None
) -> CounterMetricFamily | GaugeMetricFamily:
    if value is not None:
        family.add_metric(values, value)
    return family


def _trainers(stats: ShardStats) -> list[WorkerStats]:
    return [w for w in stats.workers if not w.observer]


# (type, name, help, how to read it from the stats); counters get "_total" appended on the wire.
_SHARD_SCALARS: tuple[tuple[str, str, str, Callable[[ShardStats], float]], ...] = (
    ("counter", "pushes", "Pushes the shard accepted (applied, or queued for a bsp clock).",
     lambda s: s.pushes_applied),
    ("counter", "pulls", "Pulls the shard served.", lambda s: s.pulls_served),
    ("counter", "received_bytes", "Bytes of push and init messages received.", lambda s: s.bytes_received),
    ("counter", "sent_bytes", "Bytes of pull replies sent.", lambda s: s.bytes_sent),
    ("counter", "blocks_applied", "Block updates applied to the shard's store.", lambda s: s.blocks_applied),
    ("gauge", "uptime_seconds", "Seconds since the shard started.", lambda s: s.uptime_seconds),
    ("gauge", "num_shards", "How many shards the model is spread over.", lambda s: s.num_shards),
    ("gauge", "initialized", "1 once the shard holds initialized weights, else 0.", lambda s: s.initialized),
    ("gauge", "blocks", "Blocks this shard holds.", lambda s: s.num_blocks),
    ("gauge", "model_bytes", "Bytes of weights this shard holds.", lambda s: s.nbytes),
    ("gauge", "applied_clock", "bsp: the last clock applied; otherwise the slowest live worker's clock.",
     lambda s: s.applied_clock),
    ("gauge", "live_workers", "Live training workers (observers excluded): the ones the barriers wait for.",
     lambda s: sum(1 for w in _trainers(s) if w.live)),
    ("gauge", "registered_workers", "Training workers the shard knows, live or not.", lambda s: len(_trainers(s))),
    ("gauge", "live_observers", "Live observers (evaluators that only pull).",
     lambda s: sum(1 for w in s.workers if w.observer and w.live)),
)  # fmt: skip

_SHARD_HISTOGRAMS: tuple[tuple[str, str, Callable[[ShardStats], Mapping[int, int]]], ...] = (
    ("staleness_clocks", "Per push: how many clocks the pushing worker's view was behind its own clock.",
     lambda s: s.staleness_counts),
    ("version_lag", "Per pushed block: updates the block received between the worker's pull and its push.",
     lambda s: s.version_lag_counts),
)  # fmt: skip


class WorkerMetrics(Collector):
    """A training worker's progress, for the training loop to update after every step.

    Registers itself in ``registry`` (a new private one when None). Every series carries the
    label ``worker`` (the worker id). Thread-safe: the loop records, the HTTP thread reads.

    Args:
        worker_id: this worker's id (the ``worker`` label).
        registry: where to register; default: a new private :class:`CollectorRegistry`.
        window: steps over which ``steps_per_second`` is averaged.
    """

    def __init__(self, worker_id: int | str, *, registry: CollectorRegistry | None = None, window: int = 20) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.worker_id = str(worker_id)
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._state = WorkerProgress()
        self._recent: deque[float] = deque(maxlen=window)
        self._step_seconds = BucketCounts(STEP_SECONDS_BUCKETS)
        self.registry.register(self)

    def record_step(
        self, loss: float, step_seconds: float, bytes_pushed: int, bytes_pulled: int, bytes_pushed_dense: int
    ) -> None:
        """One training step is done.

        Args:
            loss: the step's training loss.
            step_seconds: the step's wall time.
            bytes_pushed: bytes this worker pushed so far (a running total, not this step's).
            bytes_pulled: bytes this worker pulled so far (a running total).
            bytes_pushed_dense: bytes it would have pushed so far sending every block (a running total).
        """
        self._step_seconds.observe(step_seconds)
        with self._lock:
            self._recent.append(step_seconds)
            elapsed = sum(self._recent)
            self._state = dataclasses.replace(
                self._state,
                steps=self._state.steps + 1,
                loss=float(loss),
                steps_per_second=len(self._recent) / elapsed if elapsed > 0 else math.nan,
                bytes_pushed=bytes_pushed,
                bytes_pulled=bytes_pulled,
                bytes_pushed_dense=bytes_pushed_dense,
            )

    def record_evaluation(self, test_loss: float, test_accuracy: float) -> None:
        """The latest evaluation on held-out data (accuracy in [0, 1])."""
        with self._lock:
            self._state = dataclasses.replace(
                self._state, test_loss=float(test_loss), test_accuracy=float(test_accuracy)
            )

    @property
    def state(self) -> WorkerProgress:
        """The values as of the last record (immutable)."""
        with self._lock:
            return self._state

    def describe(self) -> Iterable[Metric]:
        """The families this collector yields, without samples."""
        return list(self._families(None))

    def collect(self) -> Iterable[Metric]:
        """The current values (called by the registry at each scrape)."""
        return list(self._families(self.state))

    def _families(self, state: WorkerProgress | None) -> Iterator[Metric]:
        labels = ["worker"]
        values = [self.worker_id]
        for kind, name, doc, read in _WORKER_SCALARS:
            value = None if state is None else float(read(state))
            yield from _scalar_families(kind, f"{PREFIX}_worker_{name}", doc, labels, values, value)
        step_seconds = HistogramMetricFamily(
            f"{PREFIX}_worker_step_seconds",
            "Wall time of one training step (forward, backward, push and pull).",
            labels=labels,
        )
        if state is not None:
            step_seconds.add_metric(values, *self._step_seconds.snapshot())
        yield step_seconds


@dataclasses.dataclass(frozen=True)
class WorkerProgress:
    """A worker's values as of its last :meth:`WorkerMetrics.record_step` / ``record_evaluation``."""

    steps: int = 0
    loss: float = math.nan
    steps_per_second: float = math.nan
    bytes_pushed: int = 0
    bytes_pulled: int = 0
    bytes_pushed_dense: int = 0
    test_loss: float = math.nan
    test_accuracy: float = math.nan

    @property
    def push_ratio(self) -> float:
        """Bytes pushed / bytes a dense push would have sent (NaN before any push)."""
        return self.bytes_pushed / self.bytes_pushed_dense if self.bytes_pushed_dense > 0 else math.nan


_WORKER_SCALARS: tuple[tuple[str, str, str, Callable[[WorkerProgress], float]], ...] = (
    ("counter", "steps", "Training steps done.", lambda s: s.steps),
    ("gauge", "loss", "Training loss of the last step.", lambda s: s.loss),
    ("gauge", "steps_per_second",
     f"Deprecated: use rate({PREFIX}_worker_steps_total[1m]). Steps per second over the last few steps. "
     "Kept for compatibility; will be removed in a later major version.", lambda s: s.steps_per_second),
    ("counter", "pushed_bytes", "Bytes of gradients pushed.", lambda s: s.bytes_pushed),
    ("counter", "pulled_bytes", "Bytes of weights pulled.", lambda s: s.bytes_pulled),
    ("counter", "pushed_dense_bytes", "Bytes the pushes would have taken sending every block.",
     lambda s: s.bytes_pushed_dense),
    ("gauge", "push_ratio", "Bytes pushed / bytes a dense push would have sent (NaN before any).",
     lambda s: s.push_ratio),
    ("gauge", "test_loss", "Loss of the last evaluation (NaN: none yet).", lambda s: s.test_loss),
    ("gauge", "test_accuracy", "Accuracy of the last evaluation, 0..1 (NaN: none yet).", lambda s: s.test_accuracy),
)  # fmt: skip


class ProcessMetrics(Collector):
    """This process's ``process_*`` metrics: prometheus_client's :class:`ProcessCollector`, with a describe().

    ``process_cpu_seconds_total``, ``process_resident_memory_bytes``, ``process_virtual_memory_bytes``,
    ``process_start_time_seconds``, ``process_open_fds`` and ``process_max_fds``, read from
    ``/proc/self`` at each scrape. Where there is no ``/proc`` (macOS, Windows) it yields nothing;
    a file it cannot read leaves out only the values that come from it. The describe() lets a
    registry refuse a second copy (see :func:`export_process_metrics`).

    Args:
        proc: where the proc file system is mounted.
    """

    NAMES: tuple[tuple[str, str], ...] = (
        ("counter", "process_cpu_seconds"),
        ("gauge", "process_resident_memory_bytes"),
        ("gauge", "process_virtual_memory_bytes"),
        ("gauge", "process_start_time_seconds"),
        ("gauge", "process_open_fds"),
        ("gauge", "process_max_fds"),
    )

    def __init__(self, proc: str = "/proc") -> None:
        self._collector = ProcessCollector(proc=proc, registry=None)

    def describe(self) -> Iterable[Metric]:
        """The families, without samples (lets the registry check names)."""
        return [_scalar_family(kind, name, "", []) for kind, name in self.NAMES]

    def collect(self) -> Iterable[Metric]:
        """Read ``/proc/self`` (called by the registry at each scrape)."""
        return self._collector.collect()


def export_process_metrics(registry: CollectorRegistry) -> bool:
    """Add :class:`ProcessMetrics` to ``registry`` unless it has them; returns whether it added them.

    prometheus_client's global default ``REGISTRY`` has its own ``process_*`` collector already.
    """
    if registry is REGISTRY:
        return False
    try:
        registry.register(ProcessMetrics())
    except ValueError:  # "Duplicated timeseries": added before (an endpoint started again on it)
        return False
    return True


class MetricsEndpoint:
    """A running ``/metrics`` HTTP endpoint (see :func:`start_metrics_server`); close() stops it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self.server = server
        self.thread = thread
        self.host = str(server.server_address[0])
        self.port = int(server.server_address[1])
        self._closed = False

    @property
    def url(self) -> str:
        """``http://HOST:PORT/metrics`` (IPv6 hosts bracketed)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving, release the port and wait for the serving thread; idempotent. Blocks up to ~0.5 s."""
        if self._closed:
            return
        self._closed = True
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout)

    def __enter__(self) -> MetricsEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> tuple[MetricsEndpoint, int]:
    """Serve ``registry`` on ``http://host:port/metrics`` from a daemon thread.

    The registry also gets this process's ``process_*`` metrics (:func:`export_process_metrics`,
    once), so every shard and worker endpoint has them from its first scrape.

    Args:
        registry: the process's private registry.
        host: address to listen on (``127.0.0.1``; ``0.0.0.0`` in containers).
        port: port to listen on; 0 picks a free one.

    Returns:
        The endpoint (``close()`` it to stop) and the port it is bound to.

    Raises:
        OSError: the port is taken or the address is not local.
        ValueError: ``port`` is outside [0, 65535].
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"metrics port must be in [0, 65535], got {port}")
    export_process_metrics(registry)
    server, thread = start_http_server(port, addr=host, registry=registry)
    endpoint = MetricsEndpoint(server, thread)
    log.debug("metrics served on %s", endpoint.url)
    return endpoint, endpoint.port
