"""The convergence experiment: accuracy and bytes pushed across push fractions, error feedback, rules.

Each case trains one model with :class:`ranger_ps.Ranger` in-process, one worker: the same
trajectory a one-worker cluster follows (``tests/optim/test_distributed.py`` proves the two equal), without
process start-up in the measurement. Bytes are what the wire would carry for each step's chosen
blocks over ``shards`` shards, frame headers included (:func:`ranger_ps.wire.pushes.push_wire_bytes`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ranger_ps.algorithm.placement import Placement
from ranger_ps.algorithm.selection import subsample_indices
from ranger_ps.config.train import TrainConfig
from ranger_ps.optim import Ranger
from ranger_ps.wire.pushes import push_wire_bytes
from ranger_ps.workloads.evaluation import evaluate
from ranger_ps.workloads.job import batch_loss, build


@dataclass(frozen=True)
class CaseResult:
    """One cell of the grid."""

    dataset: str
    rule: str
    push_fraction: float
    error_feedback: bool
    test_accuracy: float
    test_loss: float
    steps: int
    bytes_pushed: int
    bytes_pushed_dense: int
    seconds: float

    @property
    def push_ratio(self) -> float:
        return self.bytes_pushed / self.bytes_pushed_dense if self.bytes_pushed_dense else 0.0


def run_case(config: TrainConfig, *, shards: int = 2) -> CaseResult:
    """Train one configuration in-process and evaluate it."""
    torch.set_num_threads(1)  # comparable timings, whatever else runs on the machine
    data, model, device = build(config)
    optimizer = Ranger(model.named_parameters(), **config.optimizer_kwargs())
    placement = Placement.compute(optimizer.layout, shards)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003)
    started = time.monotonic()
    step = bytes_pushed = bytes_dense = 0
    for _epoch in range(config.epochs):
        order = torch.randperm(len(data.y_train), generator=generator)
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            batch = batch[subsample_indices(len(batch), config.subsample, seed=config.seed, worker_id=0, step=step + 1)]
            optimizer.zero_grad()
            loss = batch_loss(model(data.prepare(data.x_train[batch].to(device))), data.y_train[batch].to(device))
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            step += 1
            layout = optimizer.layout
            bytes_pushed += push_wire_bytes(layout, placement, optimizer.last_chosen, worker_id=0, clock=step)
            bytes_dense += push_wire_bytes(layout, placement, None, worker_id=0, clock=step)
    evaluation = evaluate(model, data, device)
    return CaseResult(
        dataset=config.dataset,
        rule=config.rule,
        push_fraction=config.push_fraction,
        error_feedback=config.error_feedback,
        test_accuracy=evaluation.test_accuracy,
        test_loss=evaluation.test_loss,
        steps=step,
        bytes_pushed=bytes_pushed,
        bytes_pushed_dense=bytes_dense,
        seconds=time.monotonic() - started,
    )


def run_grid(
    base: TrainConfig,
    *,
    datasets: Sequence[str],
    rules: Sequence[str],
    fractions: Sequence[float],
    error_feedback: Sequence[bool] = (True, False),
    shards: int = 2,
    on_case: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Every combination; error feedback is irrelevant (and run once) at push fraction 1."""
    results = []
    for dataset, rule, fraction, feedback in itertools.product(datasets, rules, fractions, error_feedback):
        if fraction >= 1 and not feedback:
            continue
        values = asdict(base) | {
            "dataset": dataset,
            "rule": rule,
            "push_fraction": fraction,
            "error_feedback": feedback,
            "lr": None,
            "momentum": None,
            "use_gc": None,
            "betas": None,
            "eps": None,
        }
        if base.rule == rule:  # explicit lr/momentum given for the base rule apply to it
            values |= {"lr": base.lr, "momentum": base.momentum}
        result = run_case(TrainConfig(**values), shards=shards)
        results.append(result)
        if on_case is not None:
            on_case(result)
    return results


def markdown_table(results: Sequence[CaseResult]) -> str:
    """The results as a Markdown table, accuracy deltas against each (dataset, rule)'s dense run."""
    dense = {(r.dataset, r.rule): r.test_accuracy for r in results if r.push_fraction >= 1}
    lines = [
        "| dataset | rule | push fraction | error feedback | test accuracy | vs dense | MB pushed | of dense |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        base = dense.get((r.dataset, r.rule))
        delta = f"{100 * (r.test_accuracy - base):+.1f} pt" if base is not None else ""
        lines.append(
            f"| {r.dataset} | {r.rule} | {r.push_fraction:g} | {'on' if r.error_feedback else 'off'} | "
            f"{r.test_accuracy:.4f} | {delta} | {r.bytes_pushed / 1e6:.2f} | {100 * r.push_ratio:.1f}% |"
        )
    return "\n".join(lines)


def results_json(results: Sequence[CaseResult]) -> list[dict[str, Any]]:
    """JSON-ready rows."""
    return [asdict(r) | {"push_ratio": r.push_ratio} for r in results]
