"""Prometheus metrics: a real shard process scraped over HTTP agrees with its Stats RPC; worker metrics."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

from ranger_ps import Ranger
from ranger_ps.client.admin import fetch_stats
from ranger_ps.config.server import ServerConfig
from ranger_ps.errors import UserError
from ranger_ps.observability.metrics import (
    APPLY_SECONDS_BUCKETS,
    BucketCounts,
    ProcessMetrics,
    ServerMetrics,
    WorkerMetrics,
    bucketize,
    export_process_metrics,
    start_metrics_server,
)
from ranger_ps.server.shard import Shard
from tests.conftest import ranger_ps_cmd, stop_process, wait_for_file

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

#: The process metrics every endpoint exports (Linux), with their Prometheus types.
PROCESS_FAMILIES = {
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_virtual_memory_bytes": "gauge",
    "process_start_time_seconds": "gauge",
    "process_open_fds": "gauge",
    "process_max_fds": "gauge",
}
DEPRECATED = "Kept for compatibility; will be removed in a later major version."
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process_* metrics read /proc")


def _exposition(port: int, accept: str | None = None) -> str:
    """The text ``http://127.0.0.1:port/metrics`` serves (the Prometheus text format unless ``accept`` asks)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 200
        return str(reply.read().decode())


def _families(text: str) -> dict[str, Metric]:
    """The families of a text exposition, parsed by prometheus_client's parser, by family name."""
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert len(families) == len(list(text_string_to_metric_families(text))), "a family appears twice"
    return families


def _assert_no_created_series(text: str) -> None:
    """No ``_created`` series, in any form (a sample, or a family of its own with the parent's HELP)."""
    assert "_created" not in text
    assert not [name for name in _families(text) if name.endswith("_created")]


def _scrape(port: int) -> Samples:
    """Every sample of ``http://127.0.0.1:port/metrics``, keyed by (name, labels)."""
    text = _exposition(port)
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def _names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def _port_is_free(port: int) -> bool:
    """Whether nothing listens on ``port`` (connections of a closed endpoint may linger in TIME_WAIT)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@contextmanager
def _server(tmp_path: Path, *extra: str) -> Iterator[tuple[str, dict[str, Any], subprocess.Popen[bytes]]]:
    """A real shard process with metrics on a free port: (address, ready-file info, process)."""
    ready = tmp_path / "ready.json"
    process = subprocess.Popen(
        ranger_ps_cmd(
            "server", "--port", "0", "--ready-file", str(ready), "--metrics-port", "0", "--log-level", "INFO", *extra
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for_file(ready, process)
        info = json.loads(ready.read_text())
        yield f"{info['host']}:{info['port']}", info, process
    finally:
        stop_process(process)
        if process.stdout:
            process.stdout.close()


def _train(optimizer: Ranger, model: nn.Module, steps: int) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(16, 8, generator=generator)
        y = x.sum(dim=1, keepdim=True)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    optimizer.refresh()  # every push acknowledged (so applied) before anything is scraped


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_a_real_shard_serves_metrics_that_agree_with_its_stats_rpc(tmp_path: Path) -> None:
    steps = 6
    checkpoints = tmp_path / "checkpoints"
    extra = ("--checkpoint-dir", str(checkpoints), "--checkpoint-every-pushes", "1", "--checkpoint-every", "0")
    with _server(tmp_path, *extra) as (address, info, process):
        metrics_port = info["metrics_port"]
        assert isinstance(metrics_port, int) and metrics_port > 0
        before = _scrape(metrics_port)
        assert _value(before, "ranger_ps_pushes_total", shard="0") == 0
        assert _value(before, "ranger_ps_live_workers", shard="0") == 0
        assert math.isnan(_value(before, "ranger_ps_checkpoint_age_seconds", shard="0"))  # none written yet

        torch.manual_seed(0)
        model = nn.Linear(8, 1)
        optimizer = Ranger(model.named_parameters(), lr=0.05, servers=[address], block_size=4, connect_timeout=30)
        try:
            _train(optimizer, model, steps)
            samples = _scrape(metrics_port)
            (stats,) = fetch_stats([address])
        finally:
            optimizer.close()
        assert not isinstance(stats, str), stats

        def value(name: str) -> float:
            return _value(samples, name, shard="0")

        assert value("ranger_ps_pushes_total") == stats.pushes_applied == steps
        assert value("ranger_ps_blocks_applied_total") == stats.blocks_applied > 0
        assert value("ranger_ps_pulls_total") == stats.pulls_served > 0
        assert value("ranger_ps_received_bytes_total") == stats.bytes_received > 0
        assert value("ranger_ps_sent_bytes_total") == stats.bytes_sent > 0
        # The names from before the Prometheus conventions: still there, the same values.
        assert value("ranger_ps_bytes_received_total") == stats.bytes_received
        assert value("ranger_ps_bytes_sent_total") == stats.bytes_sent
        assert value("ranger_ps_live_workers") == 1
        assert value("ranger_ps_registered_workers") == 1
        assert value("ranger_ps_num_shards") == 1 and value("ranger_ps_initialized") == 1
        assert value("ranger_ps_blocks") == stats.num_blocks == 3  # 8 + 1 elements in blocks of 4
        assert 0 < value("ranger_ps_uptime_seconds") < 120
        # The apply latency histogram saw every push (async: one store update per push).
        assert value("ranger_ps_apply_seconds_count") == steps
        assert 0 < value("ranger_ps_apply_seconds_sum") < 10
        assert _value(samples, "ranger_ps_apply_seconds_bucket", shard="0", le="+Inf") == steps
        assert {f"{b:g}" for b in APPLY_SECONDS_BUCKETS} <= {
            f"{float(dict(labels)['le']):g}" for name, labels in samples if name == "ranger_ps_apply_seconds_bucket"
        }
        # Staleness: the same histogram the Stats RPC reports (the first push after joining is not counted).
        assert value("ranger_ps_staleness_clocks_count") == sum(stats.staleness_counts.values()) == steps - 1
        assert value("ranger_ps_version_lag_count") == sum(stats.version_lag_counts.values())
        # A checkpoint follows every push (written by a task that looks every 0.25 s).
        deadline = time.monotonic() + 30
        while math.isnan(age := _value(_scrape(metrics_port), "ranger_ps_checkpoint_age_seconds", shard="0")):
            assert time.monotonic() < deadline, "no checkpoint written within 30 s"
            time.sleep(0.1)
        assert 0 <= age < 60
        info_labels = next(dict(labels) for name, labels in samples if name == "ranger_ps_shard_info")
        assert info_labels["consistency"] == "async" and info_labels["rule"] == "sgd"

        # After the worker leaves: still registered, no longer live.
        after = _scrape(metrics_port)
        assert _value(after, "ranger_ps_live_workers", shard="0") == 0
        assert _value(after, "ranger_ps_registered_workers", shard="0") == 1

        stop_process(process)
        assert process.returncode == 0
        out = process.stdout.read().decode() if process.stdout else ""
        assert f"serves metrics on http://127.0.0.1:{metrics_port}/metrics" in out
    assert _port_is_free(metrics_port)  # the endpoint let go of its port on stop


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_without_checkpoints_there_is_no_checkpoint_age_and_the_metrics_port_is_in_the_ready_file(
    tmp_path: Path,
) -> None:
    with _server(tmp_path) as (_, info, _process):
        assert set(info) == {"host", "port", "pid", "metrics_port"}
        names = _names(_scrape(info["metrics_port"]))
    assert "ranger_ps_pushes_total" in names and "ranger_ps_apply_seconds_count" in names
    assert "ranger_ps_checkpoint_age_seconds" not in names


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ranger_ps_cmd(*args), capture_output=True, text=True, timeout=60)


@pytest.mark.e2e
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("70000", "--metrics-port must be in [0, 65535], got 70000"),
        ("-1", "--metrics-port must be in [0, 65535], got -1"),
        ("http", "argument --metrics-port: expected an integer or none, got 'http'"),
    ],
)
def test_a_bad_metrics_port_exits_2_with_a_message(value: str, needle: str) -> None:
    result = _run("server", "--port", "0", "--metrics-port", value)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert needle in result.stderr


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_a_taken_metrics_port_exits_2_with_a_message() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _run("server", "--port", "0", "--metrics-port", str(port))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"cannot serve metrics on 127.0.0.1:{port}" in result.stderr


def test_server_options_validate_the_metrics_port() -> None:
    assert ServerConfig(metrics_port=0).metrics_port == 0
    assert ServerConfig().metrics_port is None
    with pytest.raises(UserError, match="--metrics-port"):
        ServerConfig(metrics_port=65536)
    with pytest.raises(UserError, match="--metrics-host"):
        ServerConfig(metrics_port=0, metrics_host="")


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_worker_metrics_over_a_real_http_scrape() -> None:
    registry = CollectorRegistry()
    metrics = WorkerMetrics(3, registry=registry, window=2)
    endpoint, port = start_metrics_server(registry, "127.0.0.1", 0)
    with endpoint:
        assert endpoint.port == port > 0 and endpoint.url == f"http://127.0.0.1:{port}/metrics"
        empty = _scrape(port)
        assert _value(empty, "ranger_ps_worker_steps_total", worker="3") == 0
        assert math.isnan(_value(empty, "ranger_ps_worker_push_ratio", worker="3"))
        metrics.record_step(2.0, 0.5, bytes_pushed=100, bytes_pulled=300, bytes_pushed_dense=1000)
        metrics.record_step(1.5, 0.25, bytes_pushed=250, bytes_pulled=700, bytes_pushed_dense=2000)
        metrics.record_step(1.25, 0.25, bytes_pushed=300, bytes_pulled=900, bytes_pushed_dense=3000)
        metrics.record_evaluation(0.75, 0.875)
        samples = _scrape(port)
    assert _port_is_free(port)
    endpoint.close()  # idempotent

    def value(name: str) -> float:
        return _value(samples, f"ranger_ps_worker_{name}", worker="3")

    assert value("steps_total") == 3
    assert value("loss") == 1.25
    assert value("steps_per_second") == 4.0  # the last 2 steps took 0.5 s
    assert value("pushed_bytes_total") == 300
    assert value("pulled_bytes_total") == 900
    assert value("pushed_dense_bytes_total") == 3000
    assert value("bytes_pushed_total") == 300  # the deprecated names: the same values
    assert value("bytes_pulled_total") == 900
    assert value("bytes_pushed_dense_total") == 3000
    assert value("push_ratio") == pytest.approx(0.1)
    assert (value("test_loss"), value("test_accuracy")) == (0.75, 0.875)
    assert value("step_seconds_count") == 3 and value("step_seconds_sum") == 1.0
    # A private registry: nothing leaked into prometheus_client's global one.
    assert prometheus_client.REGISTRY.get_sample_value("ranger_ps_worker_steps_total", {"worker": "3"}) is None


def test_worker_metrics_reject_a_bad_window_and_registries_stay_apart() -> None:
    with pytest.raises(ValueError, match="window"):
        WorkerMetrics(0, window=0)
    first, second = WorkerMetrics(0), WorkerMetrics(0)  # each in its own registry: no duplicate error
    first.record_step(1.0, 0.1, bytes_pushed=1, bytes_pulled=1, bytes_pushed_dense=1)
    assert first.registry.get_sample_value("ranger_ps_worker_steps_total", {"worker": "0"}) == 1
    assert second.registry.get_sample_value("ranger_ps_worker_steps_total", {"worker": "0"}) == 0
    with pytest.raises(ValueError, match="Duplicated"):
        WorkerMetrics(1, registry=first.registry)


@pytest.mark.integration
def test_start_metrics_server_refuses_a_bad_or_taken_port() -> None:
    with pytest.raises(ValueError, match="65535"):
        start_metrics_server(CollectorRegistry(), "127.0.0.1", 70000)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError):
            start_metrics_server(CollectorRegistry(), "127.0.0.1", taken.getsockname()[1])


def test_server_metrics_retry_a_stats_copy_that_raced_the_event_loop() -> None:
    shard = Shard(1, 2)
    calls = 0

    def racing_stats() -> Any:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise RuntimeError("dictionary changed size during iteration")
        return shard.stats()

    metrics = ServerMetrics(racing_stats, shard_id=1)
    assert metrics.registry.get_sample_value("ranger_ps_num_shards", {"shard": "1"}) == 2
    assert calls == 3
    assert metrics.registry.get_sample_value("ranger_ps_checkpoint_age_seconds", {"shard": "1"}) is None

    def always_racing() -> Any:
        raise RuntimeError("dictionary changed size during iteration")

    broken = ServerMetrics(always_racing, shard_id=1)
    with pytest.raises(RuntimeError):
        broken.registry.get_sample_value("ranger_ps_num_shards", {"shard": "1"})


def test_server_metrics_observe_apply_and_staleness_buckets() -> None:
    shard = Shard(0, 1)
    shard.staleness.add(0, 5)
    shard.staleness.add(3, 2)
    shard.staleness.add(1000)
    age: list[float | None] = [None]
    metrics = ServerMetrics(shard.stats, shard_id=0, checkpoint_age=lambda: age[0])
    metrics.observe_apply(0.5, 3)
    registry = metrics.registry
    assert math.isnan(registry.get_sample_value("ranger_ps_checkpoint_age_seconds", {"shard": "0"}) or 0.0)
    age[0] = 12.5
    assert registry.get_sample_value("ranger_ps_apply_seconds_count", {"shard": "0"}) == 1
    assert registry.get_sample_value("ranger_ps_apply_seconds_bucket", {"shard": "0", "le": "0.25"}) == 0
    assert registry.get_sample_value("ranger_ps_apply_seconds_bucket", {"shard": "0", "le": "0.5"}) == 1
    labels = {"shard": "0"}
    assert registry.get_sample_value("ranger_ps_staleness_clocks_bucket", {**labels, "le": "0.0"}) == 5
    assert registry.get_sample_value("ranger_ps_staleness_clocks_bucket", {**labels, "le": "3.0"}) == 7
    assert registry.get_sample_value("ranger_ps_staleness_clocks_bucket", {**labels, "le": "128.0"}) == 7
    assert registry.get_sample_value("ranger_ps_staleness_clocks_bucket", {**labels, "le": "+Inf"}) == 8
    assert registry.get_sample_value("ranger_ps_staleness_clocks_sum", labels) == 1006
    assert registry.get_sample_value("ranger_ps_checkpoint_age_seconds", labels) == 12.5


def test_bucketize() -> None:
    assert bucketize({}, (0, 1)) == ([("0.0", 0.0), ("1.0", 0.0), ("+Inf", 0.0)], 0.0)
    assert bucketize({0: 2, 1: 1, 5: 1}, (0, 1)) == ([("0.0", 2.0), ("1.0", 3.0), ("+Inf", 4.0)], 6.0)


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_a_closed_endpoint_refuses_connections() -> None:
    endpoint, port = start_metrics_server(CollectorRegistry(), "127.0.0.1", 0)
    endpoint.close()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


#: Every family a shard exports with checkpointing on (text-format family names: counters without ``_total``).
SHARD_FAMILIES = {
    "ranger_ps_pushes": "counter",
    "ranger_ps_pulls": "counter",
    "ranger_ps_received_bytes": "counter",
    "ranger_ps_bytes_received": "counter",  # deprecated
    "ranger_ps_sent_bytes": "counter",
    "ranger_ps_bytes_sent": "counter",  # deprecated
    "ranger_ps_blocks_applied": "counter",
    "ranger_ps_checkpoint_failures": "counter",
    "ranger_ps_apply_seconds": "histogram",
    "ranger_ps_staleness_clocks": "histogram",
    "ranger_ps_version_lag": "histogram",
    "ranger_ps_uptime_seconds": "gauge",
    "ranger_ps_num_shards": "gauge",
    "ranger_ps_initialized": "gauge",
    "ranger_ps_blocks": "gauge",
    "ranger_ps_model_bytes": "gauge",
    "ranger_ps_applied_clock": "gauge",
    "ranger_ps_live_workers": "gauge",
    "ranger_ps_registered_workers": "gauge",
    "ranger_ps_live_observers": "gauge",
    "ranger_ps_checkpoint_age_seconds": "gauge",
    "ranger_ps_shard_info": "gauge",
}

#: Every family a worker exports (``ranger_ps_worker_`` left out).
WORKER_FAMILIES = {
    "steps": "counter",
    "loss": "gauge",
    "steps_per_second": "gauge",  # deprecated: rate(ranger_ps_worker_steps_total[1m])
    "step_seconds": "histogram",
    "pushed_bytes": "counter",
    "bytes_pushed": "counter",  # deprecated
    "pulled_bytes": "counter",
    "bytes_pulled": "counter",  # deprecated
    "pushed_dense_bytes": "counter",
    "bytes_pushed_dense": "counter",  # deprecated
    "push_ratio": "gauge",
    "test_loss": "gauge",
    "test_accuracy": "gauge",
}


def _assert_renamed(families: dict[str, Metric], old: str, new: str, samples: Samples, **labels: str) -> None:
    """``old`` is the deprecated twin of the counter ``new``: same value, a HELP naming the replacement."""
    assert not families[new].documentation.startswith("Deprecated"), families[new].documentation
    help_text = families[old].documentation
    assert help_text == f"Deprecated: use {new}_total (the same value). {families[new].documentation} {DEPRECATED}"
    assert _value(samples, f"{old}_total", **labels) == _value(samples, f"{new}_total", **labels)


def _proc_start_time(pid: int) -> float:
    """A process's start time (seconds since the epoch) computed from /proc as ``process_start_time_seconds`` is."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().split(b")")[-1].split()
    with open("/proc/stat", "rb") as system:
        boot = next(float(line.split()[1]) for line in system if line.startswith(b"btime "))
    return float(fields[19]) / os.sysconf("SC_CLK_TCK") + boot


def _assert_process_metrics(families: dict[str, Metric], samples: Samples, start_time: float) -> None:
    """The process metrics are there, plausible, and of the process that started at ``start_time``."""
    assert {name: families[name].type for name in PROCESS_FAMILIES} == PROCESS_FAMILIES
    assert _value(samples, "process_start_time_seconds") == start_time
    assert _value(samples, "process_cpu_seconds_total") > 0
    assert _value(samples, "process_resident_memory_bytes") > 0
    assert _value(samples, "process_virtual_memory_bytes") >= _value(samples, "process_resident_memory_bytes")
    assert 3 <= _value(samples, "process_open_fds") <= _value(samples, "process_max_fds")


@pytest.mark.e2e
@linux_only
@pytest.mark.timeout(120)
def test_a_real_shard_exports_conventional_names_beside_the_old_ones_and_its_process_metrics(tmp_path: Path) -> None:
    extra = ("--checkpoint-dir", str(tmp_path / "checkpoints"), "--checkpoint-every", "0")
    with _server(tmp_path, *extra) as (address, info, _process):
        torch.manual_seed(0)
        model = nn.Linear(8, 1)
        optimizer = Ranger(model.named_parameters(), lr=0.05, servers=[address], block_size=4, connect_timeout=30)
        try:
            _train(optimizer, model, 3)
        finally:
            optimizer.close()
        text = _exposition(info["metrics_port"])
        openmetrics = _exposition(info["metrics_port"], accept="application/openmetrics-text; version=1.0.0")
        shard_start_time = _proc_start_time(info["pid"])  # the shard process's, not this one's
    families = _families(text)
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families.values() for s in f.samples}
    assert {name: f.type for name, f in families.items()} == {**SHARD_FAMILIES, **PROCESS_FAMILIES}
    assert _value(samples, "ranger_ps_received_bytes_total", shard="0") > 0
    _assert_renamed(families, "ranger_ps_bytes_received", "ranger_ps_received_bytes", samples, shard="0")
    _assert_renamed(families, "ranger_ps_bytes_sent", "ranger_ps_sent_bytes", samples, shard="0")
    _assert_process_metrics(families, samples, shard_start_time)
    _assert_no_created_series(text)
    # The OpenMetrics format (served to a scraper that asks for it) parses strictly, also without _created.
    parsed = openmetrics_families(openmetrics)  # type: ignore[no-untyped-call]
    names = {s.name for family in parsed for s in family.samples}
    assert "ranger_ps_received_bytes_total" in names and "process_cpu_seconds_total" in names
    assert not [name for name in names if name.endswith("_created")]


@pytest.mark.integration
@linux_only
@pytest.mark.timeout(30)
def test_a_worker_endpoint_has_process_metrics_from_the_start_and_conventional_names_after_a_step() -> None:
    from ranger_ps.observability.records import StepInfo
    from ranger_ps.observability.watch import RunWatcher

    with RunWatcher("worker", progress=False, metrics_port=0) as watcher:
        assert watcher.metrics_port is not None
        before = _families(_exposition(watcher.metrics_port))
        assert set(before) == set(PROCESS_FAMILIES)  # the worker's own series come with its first step
        step = StepInfo(
            worker_id=5, step=1, planned=2, loss=0.5, batch_accuracy=0.5, wall_seconds=0.2,
            bytes_pushed=40, bytes_pulled=60, bytes_pushed_dense=80,
        )  # fmt: skip
        watcher.on_step(step)
        text = _exposition(watcher.metrics_port)
    families = _families(text)
    samples = {(s.name, frozenset(s.labels.items())): s.value for f in families.values() for s in f.samples}
    expected = {f"ranger_ps_worker_{name}": kind for name, kind in WORKER_FAMILIES.items()}
    assert {name: f.type for name, f in families.items()} == {**expected, **PROCESS_FAMILIES}
    for old, new in [("bytes_pushed", "pushed_bytes"), ("bytes_pulled", "pulled_bytes"),
                     ("bytes_pushed_dense", "pushed_dense_bytes")]:  # fmt: skip
        _assert_renamed(families, f"ranger_ps_worker_{old}", f"ranger_ps_worker_{new}", samples, worker="5")
    assert _value(samples, "ranger_ps_worker_pushed_dense_bytes_total", worker="5") == 80
    rate_help = families["ranger_ps_worker_steps_per_second"].documentation
    assert rate_help.startswith("Deprecated: use rate(ranger_ps_worker_steps_total[1m]).") and DEPRECATED in rate_help
    assert _value(samples, "ranger_ps_worker_steps_per_second", worker="5") == 5.0  # kept: one step of 0.2 s
    assert _value(samples, "ranger_ps_worker_step_seconds_count", worker="5") == 1
    _assert_process_metrics(families, samples, _proc_start_time(os.getpid()))
    _assert_no_created_series(text)


def test_bucket_counts_count_each_observation_in_the_first_bucket_that_holds_it() -> None:
    counts = BucketCounts((0.5, 1, 2))
    assert counts.snapshot() == ([("0.5", 0.0), ("1.0", 0.0), ("2.0", 0.0), ("+Inf", 0.0)], 0.0)
    for value in (0.5, 0.75, 1.0, 2.0, 9.0, 0.0):
        counts.observe(value)
    # An observation equal to a bound is in that bucket (Prometheus' le: less than or equal).
    assert counts.snapshot() == ([("0.5", 2.0), ("1.0", 4.0), ("2.0", 5.0), ("+Inf", 6.0)], 13.25)
    with pytest.raises(ValueError, match="strictly increasing"):
        BucketCounts((1, 1))
    with pytest.raises(ValueError, match="strictly increasing"):
        BucketCounts((2, 1))


def test_process_metrics_are_added_once_and_not_to_prometheus_clients_default_registry(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    assert export_process_metrics(registry) is True
    assert export_process_metrics(registry) is False  # already there: no second copy of every series
    assert export_process_metrics(prometheus_client.REGISTRY) is False  # it has its own process collector
    # Without a proc file system (macOS, Windows) there are no process metrics, and no error.
    assert list(ProcessMetrics(proc=str(tmp_path / "no-proc")).collect()) == []
    if sys.platform.startswith("linux"):
        assert registry.get_sample_value("process_open_fds") is not None
