"""``bench train``: the default job (digits MLP, 2 shards, 2 workers) at several push fractions.

Each push fraction trains a local cluster (shard and worker processes, as ``ranger-ps local``
starts them), timed from outside; beside them the same model trains in one process with
``torch.optim.SGD`` and with :class:`ranger_ps.Ranger` without servers, and with torch
DistributedDataParallel over gloo (:mod:`ranger_ps.bench.baselines`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ranger_ps.bench import common
from ranger_ps.bench.baselines import train_ddp, train_single
from ranger_ps.bench.processes import bench_cluster, common_flags, start_shards
from ranger_ps.bench.settings import TrainSettings
from ranger_ps.config.worker import WorkerSettings
from ranger_ps.errors import ClusterError
from ranger_ps.settings import to_argv

log = logging.getLogger(__name__)

TRAIN_TARGET: common.Target = (
    "push_bytes_ratio_at_0.05",
    0.06,
    "bytes pushed per step at push fraction 0.05 <= 6% of dense",
)
TRAIN_TARGETS: tuple[common.Target, ...] = (
    TRAIN_TARGET,
    ("dense_steps_vs_ddp", 2.0, "steady steps/s, dense, the job's workers and shards >= 2x torch DDP (gloo)"),
    ("steps_at_0.01_vs_dense", 5.0, "steady steps/s at push fraction 0.01 >= 5x dense (on a model of >= 1,000 blocks)"),
    (
        "one_to_one_step_overhead",
        0.25,
        "one worker and one shard: time per step beyond a one-process torch.optim.SGD step <= 25%",
    ),
)


def run_train(settings: TrainSettings) -> dict[str, Any]:
    """The default job at several push fractions beside single-process SGD and DDP."""
    common.quiet_grpc_fork()
    load_before = common.load_average()
    rows: list[dict[str, Any]] = []
    for fraction in settings.fractions:
        log.info("train: ranger-ps push fraction %g", fraction)
        rows.append(_train_cluster(settings, fraction))
    if settings.one_to_one:
        log.info("train: ranger-ps, one worker and one shard, dense")
        one = _train_cluster(dataclasses.replace(settings, workers=1, shards=1), 1.0)
        rows.append(one | {"name": "ranger-ps, 1 worker and 1 shard", "kind": "ranger-ps-1x1"})
    if settings.single:
        log.info("train: one process, torch.optim.SGD")
        rows.append(train_single(settings))
    if settings.in_process:
        log.info("train: one process, ranger_ps.Ranger in-process")
        rows.append(_train_in_process(settings))
    if settings.ddp:
        log.info("train: torch DistributedDataParallel (gloo), %d processes", settings.workers)
        rows.append(train_ddp(settings))
    by_fraction = {r["push_fraction"]: r for r in rows if r["kind"] == "ranger-ps"}
    ratios: dict[str, float | None] = {
        f"push_bytes_ratio_at_{f:g}": by_fraction[f]["push_ratio"] if f in by_fraction else None
        for f in settings.fractions
    }
    ratios.setdefault("push_bytes_ratio_at_0.05", None)
    dense_row = by_fraction.get(1.0)
    for f, row in by_fraction.items():  # does a sparse push pay? steady steps/s against dense
        if f < 1:
            ratios[f"steps_at_{f:g}_vs_dense"] = (
                common.ratio(row["steps_per_second"], dense_row["steps_per_second"]) if dense_row else None
            )
    single = next((r for r in rows if r["kind"] == "torch-sgd"), None)
    dense = by_fraction.get(1.0)
    ratios["dense_steps_vs_single_sgd"] = (
        common.ratio(dense["steps_per_second"], single["steps_per_second"]) if dense and single else None
    )
    ddp = next((r for r in rows if r["kind"] == "ddp" and "error" not in r), None)
    ratios["dense_steps_vs_ddp"] = (
        common.ratio(dense["steps_per_second"], ddp["steps_per_second"]) if dense and ddp else None
    )
    one_row = next((r for r in rows if r["kind"] == "ranger-ps-1x1"), None)
    slower = common.ratio(single["steps_per_second"], one_row["steps_per_second"]) if one_row and single else None
    ratios["one_to_one_step_overhead"] = slower - 1 if slower is not None else None
    return {
        "benchmark": "train",
        "settings": {
            "fractions": list(settings.fractions),
            "epochs": settings.epochs,
            "block_size": settings.block_size,
            "workers": settings.workers,
            "shards": settings.shards,
            "rule": settings.rule,
            "dataset": settings.dataset,
            "model": settings.model,
            "batch_size": settings.batch_size,
            "seed": settings.seed,
            "num_blocks": _num_blocks(settings),
        },
        "machine": common.machine_info(),
        "load_average_before": load_before,
        "load_average_after": common.load_average(),
        "rows": rows,
        "ratios": ratios,
        "targets": common.check_targets(ratios, TRAIN_TARGETS),
    }


def _train_cluster(
    settings: TrainSettings, fraction: float, *, step_logs: bool = False, shared_memory: bool = True
) -> dict[str, Any]:
    """One local cluster (shard and worker processes, as ``ranger-ps local`` starts them), timed from outside.

    A worker's own ``wall_seconds`` includes its start-up (registration, the first optimizer's
    one-time imports): here shard 0's stats are polled, and the steady rate is the steps between
    10% and 90% of the run over the time they took.

    With ``step_logs`` the workers write step logs (``--metrics-csv``, with their per-epoch
    evaluations) and the row gains ``timeline`` (:func:`epoch_timeline`). Without ``shared_memory``
    the workers send every byte through gRPC frames, as across hosts.
    """
    from ranger_ps.client.sharded import ShardedClient
    from ranger_ps.workloads.data import load_dataset
    from ranger_ps.workloads.evaluation import evaluate_cluster
    from ranger_ps.workloads.job import planned_steps

    config = settings.train_config(push_fraction=fraction, shared_memory=shared_memory)
    n = len(load_dataset(config.dataset).y_train)
    planned = sum(planned_steps(config, n, w) for w in range(settings.workers))
    with bench_cluster() as cluster:
        _, addresses = start_shards(cluster, settings.shards, use_uvloop=settings.use_uvloop)
        reports = [cluster.run_dir / f"worker-{w}.json" for w in range(settings.workers)]
        logs = [cluster.run_dir / f"worker-{w}.csv" if step_logs else None for w in range(settings.workers)]
        started = time.monotonic()
        workers = [
            cluster.spawn(
                f"worker-{w}",
                [
                    "worker",
                    *to_argv(WorkerSettings(servers=addresses, worker_id=w, report=reports[w], metrics_csv=logs[w])),
                    *to_argv(config),
                    *common_flags(settings.use_uvloop),
                ],
            )
            for w in range(settings.workers)
        ]
        samples: list[tuple[float, int]] = []
        monitor = ShardedClient(addresses[:1], use_uvloop=settings.use_uvloop, call_timeout=5)
        try:
            while any(w.process.poll() is None for w in workers):
                cluster.check(workers)
                if time.monotonic() - started > settings.timeout:
                    raise ClusterError(f"the cluster did not finish within {settings.timeout:g}s")
                with contextlib.suppress(ClusterError):
                    reply = monitor.stats()[0]
                    samples.append((time.monotonic(), sum(r.pushes for r in reply.workers if not r.observer)))
                time.sleep(0.02)
        finally:
            monitor.close()
        ended = time.monotonic()
        cluster.check(workers)
        evaluation, _ = evaluate_cluster(config, addresses, use_uvloop=settings.use_uvloop)
        per_worker = [json.loads(r.read_text()) for r in reports]
        timeline = epoch_timeline([log for log in logs if log is not None]) if step_logs else None
    steps = sum(int(r["steps"]) for r in per_worker)
    flushed = sum(int(r.get("bytes_flushed", 0)) for r in per_worker)
    pushed = sum(int(r["bytes_pushed"]) for r in per_worker) - flushed  # per step: the final flushes apart
    dense = sum(int(r["bytes_pushed_dense"]) for r in per_worker)
    pulled = sum(int(r["bytes_pulled"]) for r in per_worker)
    steady = steady_rate(samples, planned)
    row: dict[str, Any] = {
        "name": f"ranger-ps push fraction {fraction:g}",
        "kind": "ranger-ps",
        "push_fraction": fraction,
        "processes": settings.workers + settings.shards,
        "steps": steps,
        "train_seconds": steps / steady if steady else ended - started,
        "wall_seconds": ended - started,
        "steps_per_second": steady or steps / (ended - started),
        "end_to_end_steps_per_second": steps / (ended - started),
        "bytes_pushed_per_step": pushed / steps,
        "bytes_dense_per_step": dense / steps,
        "push_ratio": pushed / dense,
        "bytes_pulled_per_step": pulled / steps,
        "bytes_flushed": flushed,
        "test_accuracy": evaluation.test_accuracy,
    }
    if timeline is not None:
        row["timeline"] = timeline
    return row


def steady_rate(
    samples: Sequence[tuple[float, int]], planned: int, low: float = 0.1, high: float = 0.9
) -> float | None:
    """Steps per second between ``low`` and ``high`` of ``planned`` steps, from (time, steps so far) samples.

    None when the samples do not span that window with any time between (a run too short to time).
    """
    first = next(((t, c) for t, c in samples if c >= low * planned), None)
    last = next(((t, c) for t, c in samples if c >= high * planned), None)
    if first is None or last is None or last[0] <= first[0] or last[1] <= first[1]:
        return None
    return (last[1] - first[1]) / (last[0] - first[0])


def epoch_timeline(step_logs: Sequence[Path]) -> list[tuple[float, float]]:
    """A cluster's ``(seconds, test accuracy)`` after each epoch, from its workers' step logs.

    Each worker evaluates its own weights after every epoch (the evaluation log beside its step
    log); the epoch's time is the step log's ``wall_seconds`` at the epoch's last step, before that
    evaluation (counted from when the worker opened the log, before it built the job and registered,
    so the earlier epochs' evaluations are inside it). Per epoch: the slowest worker's time (the
    cluster is there once every worker is) and the workers' mean accuracy; as many epochs as every
    worker evaluated.
    """
    from ranger_ps.observability.steplog import eval_log_path, read_eval_log, read_step_log

    per_worker = []
    for path in step_logs:
        seconds_at_step = {row.step: row.wall_seconds for row in read_step_log(path)}
        per_worker.append(
            [(seconds_at_step.get(e.step, 0.0), e.test_accuracy) for e in read_eval_log(eval_log_path(path))]
        )
    epochs = min((len(evaluations) for evaluations in per_worker), default=0)
    return [
        (max(w[epoch][0] for w in per_worker), sum(w[epoch][1] for w in per_worker) / len(per_worker))
        for epoch in range(epochs)
    ]


def _num_blocks(settings: TrainSettings) -> int:
    from ranger_ps.algorithm.layout import Layout
    from ranger_ps.workloads.job import build

    _, model, _ = build(settings.train_config())
    return Layout.from_named_tensors(model.named_parameters(), settings.block_size).num_blocks


def _train_in_process(settings: TrainSettings) -> dict[str, Any]:
    """``ranger_ps.Ranger`` without servers (dense): the optimizer's own overhead, no wire."""
    from ranger_ps.bench.convergence import run_in_process

    with common.torch_threads(1):
        result = run_in_process(settings.train_config(num_workers=1, push_fraction=1.0), shards=settings.shards)
    return {
        "name": "ranger_ps.Ranger in-process, one process",
        "kind": "ranger-in-process",
        "push_fraction": 1.0,
        "processes": 1,
        "steps": result.steps,
        "train_seconds": result.seconds,
        "wall_seconds": result.seconds,
        "steps_per_second": result.steps / result.seconds,
        "bytes_pushed_per_step": 0.0,
        "bytes_dense_per_step": result.bytes_pushed_dense / result.steps,
        "push_ratio": None,
        "bytes_pulled_per_step": 0.0,
        "test_accuracy": result.test_accuracy,
    }
