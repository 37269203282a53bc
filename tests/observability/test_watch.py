"""RunWatcher: one worker's steps and evaluations to the step log and a live Prometheus endpoint."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ranger_ps.observability.records import Evaluation, StepInfo
from ranger_ps.observability.steplog import eval_log_path, read_eval_log, read_step_log
from ranger_ps.observability.watch import RunWatcher


def _step(step: int) -> StepInfo:
    return StepInfo(
        worker_id=3,
        step=step,
        planned=4,
        loss=1.0 / step,
        batch_accuracy=0.5,
        wall_seconds=0.1 * step,
        bytes_pushed=100 * step,
        bytes_pulled=120 * step,
        bytes_pushed_dense=200 * step,
    )


def _scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_steps_and_evaluations_reach_the_csv_and_the_endpoint_labelled_with_the_assigned_id(tmp_path: Path) -> None:
    csv = tmp_path / "worker.csv"
    with RunWatcher("worker", progress=False, step_log=csv, metrics_port=0) as watcher:
        assert watcher.metrics_port and watcher.endpoint is not None
        assert "ranger_ps_worker_steps_total" not in _scrape(watcher.endpoint.url)  # nothing before the first step
        for step in range(1, 5):
            watcher.on_step(_step(step))
        watcher.on_eval(4, 400, Evaluation(test_accuracy=0.75, test_loss=0.5))
        samples = _scrape(watcher.endpoint.url)
        label = (("worker", "3"),)
        assert samples["ranger_ps_worker_steps_total"][label] == 4
        assert samples["ranger_ps_worker_push_ratio"][label] == 0.5
        assert samples["ranger_ps_worker_bytes_pulled_total"][label] == 480
        assert samples["ranger_ps_worker_test_accuracy"][label] == 0.75
        assert watcher.description == "worker 3"
        url = watcher.endpoint.url
    rows = read_step_log(csv)
    assert [r.step for r in rows] == [1, 2, 3, 4] and rows[-1].bytes_pushed == 400
    assert [(e.step, e.test_accuracy) for e in read_eval_log(eval_log_path(csv))] == [(4, 0.75)]
    with pytest.raises(OSError):
        urllib.request.urlopen(url, timeout=2)  # closed with the watcher


@pytest.mark.timeout(30)
def test_without_outputs_it_only_counts_progress(tmp_path: Path) -> None:
    with RunWatcher("worker", progress=False) as watcher:
        watcher.on_step(_step(1))
        assert watcher.endpoint is None and watcher.step_log is None and watcher.metrics is None
