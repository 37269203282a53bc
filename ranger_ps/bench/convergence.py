"""The convergence benchmark: accuracy and bytes pushed across push fractions, workers, rules and seeds.

A case with one worker trains in this process with :class:`ranger_ps.Ranger` (the trajectory a
one-worker cluster follows: ``tests/optim/test_distributed.py`` proves the two equal), without
process start-up in the measurement; a case with several workers is a real ``ranger-ps local``
cluster (shards and workers as processes on loopback). Bytes are what the wire carries for the
pushes, frame headers included (:func:`ranger_ps.wire.pushes.push_wire_bytes` in process, the
workers' own counts on a cluster); "dense" is every block at every step in the parameters' dtype.

Every sparse one-worker case is also compared with the dense run stopped once it pushed as many
bytes ("dense at equal bytes"): what the same budget buys without sparsity.
"""

from __future__ import annotations

import dataclasses
import itertools
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ranger_ps.algorithm.placement import Placement
from ranger_ps.algorithm.selection import subsample_indices
from ranger_ps.bench.settings import ConvergenceSettings
from ranger_ps.config.local import LocalSettings
from ranger_ps.config.train import TrainConfig
from ranger_ps.optim import Ranger
from ranger_ps.orchestration.local import RunContext, run_local
from ranger_ps.wire.pushes import push_wire_bytes
from ranger_ps.workloads.evaluation import evaluate
from ranger_ps.workloads.job import batch_loss, build, lr_scheduler, planned_steps


@dataclass(frozen=True)
class CaseResult:
    """One cell of the grid, one seed."""

    dataset: str
    rule: str
    outer: str
    workers: int
    local_steps: int
    push_dtype: str
    push_fraction: float
    error_feedback: bool
    seed: int
    test_accuracy: float
    test_loss: float
    steps: int
    bytes_pushed: int
    bytes_pushed_dense: int
    seconds: float
    dense_at_equal_bytes: float | None = None

    @property
    def push_ratio(self) -> float:
        return self.bytes_pushed / self.bytes_pushed_dense if self.bytes_pushed_dense else 0.0

    @property
    def cell(self) -> tuple[str, str, str, int, int, str, bool]:
        """What identifies the cell this result belongs to (all but the fraction and the seed)."""
        return (
            self.dataset, self.rule, self.outer, self.workers, self.local_steps, self.push_dtype, self.error_feedback
        )  # fmt: skip


def run_in_process(config: TrainConfig, *, shards: int = 2, max_bytes: int | None = None) -> CaseResult:
    """Train one configuration with one worker in this process and evaluate it.

    With ``max_bytes`` the run stops once its pushes reach that many bytes (dense at equal bytes).
    """
    torch.set_num_threads(1)  # comparable timings, whatever else runs on the machine
    data, model, device = build(config)
    optimizer = Ranger(model.named_parameters(), **config.optimizer_kwargs())
    placement = Placement.compute(optimizer.layout, shards)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003)
    # --lr-schedule, as a one-worker cluster's worker applies it (its planned steps: the whole split)
    scheduler = lr_scheduler(optimizer, config, planned_steps(config, len(data.y_train), 0))
    started = time.monotonic()
    step = bytes_pushed = bytes_dense = 0
    pushes = 0

    def count_pushes() -> None:
        nonlocal bytes_pushed, pushes
        if optimizer.pushes != pushes:
            pushes = optimizer.pushes
            bytes_pushed += push_wire_bytes(
                optimizer.layout, placement, optimizer.last_chosen, worker_id=0, clock=pushes,
                push_dtype=config.push_dtype,
            )  # fmt: skip

    for _epoch in range(config.epochs):
        order = torch.randperm(len(data.y_train), generator=generator)
        for start in range(0, len(order), config.batch_size):
            if max_bytes is not None and bytes_pushed >= max_bytes:
                break
            batch = order[start : start + config.batch_size]
            batch = batch[subsample_indices(len(batch), config.subsample, seed=config.seed, worker_id=0, step=step + 1)]
            optimizer.zero_grad()
            loss = batch_loss(model(data.prepare(data.x_train[batch].to(device))), data.y_train[batch].to(device))
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            step += 1
            count_pushes()
            bytes_dense += push_wire_bytes(optimizer.layout, placement, None, worker_id=0, clock=step)
    if max_bytes is None:
        optimizer.flush()
        count_pushes()
    evaluation = evaluate(model, data, device)
    return _result(config, 1, evaluation.test_accuracy, evaluation.test_loss, step, bytes_pushed, bytes_dense, started)


def run_cluster(config: TrainConfig, *, workers: int, shards: int = 2) -> CaseResult:
    """Train one configuration on a real local cluster (``workers`` worker processes) and evaluate it."""
    started = time.monotonic()
    report = run_local(
        dataclasses.replace(config, num_workers=workers),
        LocalSettings(workers=workers, shards=shards),
        RunContext(progress=False, log_level="WARNING"),
    )
    return _result(
        config, workers, report["test_accuracy"], report["test_loss"], report["steps"], report["bytes_pushed"],
        report["bytes_pushed_dense"], started,
    )  # fmt: skip


def _result(
    config: TrainConfig,
    workers: int,
    accuracy: float,
    loss: float,
    steps: int,
    pushed: int,
    dense: int,
    started: float,
) -> CaseResult:
    return CaseResult(
        dataset=config.dataset,
        rule=config.rule,
        outer=config.outer,
        workers=workers,
        local_steps=config.local_steps,
        push_dtype=config.push_dtype or "native",
        push_fraction=config.push_fraction,
        error_feedback=config.error_feedback,
        seed=config.seed,
        test_accuracy=accuracy,
        test_loss=loss,
        steps=steps,
        bytes_pushed=pushed,
        bytes_pushed_dense=dense,
        seconds=time.monotonic() - started,
    )


def run_grid(
    base: TrainConfig,
    settings: ConvergenceSettings,
    *,
    on_case: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Every combination of the settings' axes, each seed (dense runs once per cell's other axes)."""
    results = []
    axes = itertools.product(
        settings.datasets, settings.rules, settings.workers, settings.local_steps_axis, settings.push_dtypes,
        settings.fractions, settings.seeds,
    )  # fmt: skip
    for dataset, rule, workers, local_steps, push_dtype, fraction, seed in axes:
        # The base's settings hold for its own rule; the other rules take their defaults, except the
        # weight decay, pinned to 0: docs/convergence.md's tables were measured without weight decay
        # for every rule, before adamw's default became torch.optim.AdamW's 0.01.
        same = rule == base.rule
        config = base.replace(
            dataset=dataset, rule=rule, lr=base.lr if same else None, momentum=base.momentum if same else None,
            weight_decay=base.weight_decay if same else 0.0, betas=None, eps=None, use_gc=None,
            push_fraction=fraction, local_steps=local_steps, seed=seed, num_workers=workers,
            push_dtype=None if push_dtype == "native" else push_dtype,
        )  # fmt: skip
        if workers == 1:
            result = run_in_process(config, shards=settings.shards)
            if fraction < 1:
                dense = run_in_process(
                    config.replace(push_fraction=1.0, push_dtype=None), shards=settings.shards,
                    max_bytes=result.bytes_pushed,
                )  # fmt: skip
                result = dataclasses.replace(result, dense_at_equal_bytes=dense.test_accuracy)
        else:
            result = run_cluster(config, workers=workers, shards=settings.shards)
        results.append(result)
        if on_case is not None:
            on_case(result)
    return results


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def markdown_table(results: Sequence[CaseResult]) -> str:
    """Mean over seeds per cell and fraction, against the same cell's dense mean (same seeds)."""
    groups: dict[tuple[Any, ...], list[CaseResult]] = {}
    for r in results:
        groups.setdefault((*r.cell, r.push_fraction), []).append(r)
    dense = {key[:-1]: _mean([r.test_accuracy for r in rs]) for key, rs in groups.items() if key[-1] >= 1}
    lines = [
        "| dataset | rule | outer | workers | H | push dtype | push fraction | seeds | test accuracy (min-max) "
        "| vs dense | MB pushed | of dense | dense at equal bytes |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, rs in groups.items():
        accuracy = _mean([r.test_accuracy for r in rs])
        reference = dense.get(key[:-1]) if key[-1] < 1 else None
        delta = f"{100 * (accuracy - reference):+.2f} pt" if reference is not None else ""
        equal = [r.dense_at_equal_bytes for r in rs if r.dense_at_equal_bytes is not None]
        spread = f"{min(r.test_accuracy for r in rs):.4f}-{max(r.test_accuracy for r in rs):.4f}"
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {key[5]} | {key[7]:g} | {len(rs)} | "
            f"{accuracy:.4f} ({spread}) | {delta} | {_mean([r.bytes_pushed for r in rs]) / 1e6:.2f} | "
            f"{100 * _mean([r.push_ratio for r in rs]):.1f}% | {f'{_mean(equal):.4f}' if equal else ''} |"
        )
    return "\n".join(lines)


def results_json(results: Sequence[CaseResult]) -> list[dict[str, Any]]:
    """JSON-ready rows."""
    return [asdict(r) | {"push_ratio": r.push_ratio} for r in results]
