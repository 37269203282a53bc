"""The training loop: a plain PyTorch loop whose optimizer is :class:`ranger_ps.Ranger` on servers.

Each step computes the gradient on a random subsample of the minibatch; ``Ranger.step()`` then
selects blocks (error feedback), pushes them, and swaps in pulled weights (in the background with
``overlap``). At the end the worker pulls the final weights and evaluates them on the test set.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ranger_ps.algorithm.consistency import staleness_summary
from ranger_ps.algorithm.selection import subsample_indices
from ranger_ps.config.train import TrainConfig
from ranger_ps.observability.records import Evaluation, StepFn, StepInfo
from ranger_ps.optim import Ranger, running_statistics
from ranger_ps.wire.security import ClientSecurity
from ranger_ps.workloads.data import shard_indices
from ranger_ps.workloads.evaluation import EPOCH_EVAL_EXAMPLES, evaluate
from ranger_ps.workloads.job import (
    batch_loss,
    build,
    check_schedule,
    correct_predictions,
    lr_scheduler,
    planned_steps,
)
from ranger_ps.workloads.models import check_cluster_buffers

log = logging.getLogger(__name__)

EvalFn = Callable[[int, int, Evaluation], None]
"""Called after each epoch with (steps done, bytes pushed so far, evaluation of the worker's weights)."""


@dataclass(frozen=True)
class TrainResult:
    """What one worker did."""

    worker_id: int
    steps: int
    wall_seconds: float
    bytes_pushed: int
    bytes_pushed_dense: int
    bytes_flushed: int
    bytes_pulled: int
    evaluation: Evaluation
    staleness: dict[str, int]
    consistency: str


def train(
    config: TrainConfig,
    servers: list[str],
    *,
    worker_id: int | None = None,
    on_step: StepFn | None = None,
    on_eval: EvalFn | None = None,
    use_uvloop: bool = True,
    security: ClientSecurity | None = None,
) -> TrainResult:
    """Train against a cluster, then evaluate the final weights pulled from it.

    ``on_step`` is called after every step; ``on_eval`` after every epoch with an evaluation of the
    worker's current weights on (at most :data:`EPOCH_EVAL_EXAMPLES` of) the test split.
    """
    data, model, device = build(config)
    check_cluster_buffers(model, config.outer, truncates=config.truncates)
    check_schedule(config, planned_steps(config, len(data.y_train), worker_id or 0))  # before registering
    started = time.monotonic()
    optimizer = Ranger(
        model.named_parameters(),
        buffers=running_statistics(model),
        servers=servers,
        worker_id=worker_id,
        security=security,
        use_uvloop=use_uvloop,
        **config.connection_kwargs(),  # overlap, timeouts, shared memory, exchange
        **config.optimizer_kwargs(),
    )
    with optimizer:
        worker_id = optimizer.worker_id
        log.info(
            "worker %d registered with %d shards (layout %s, %d blocks)",
            worker_id, len(servers), optimizer.layout.fingerprint, optimizer.layout.num_blocks,
        )  # fmt: skip
        mine = shard_indices(len(data.y_train), worker_id, config.num_workers)
        total = planned_steps(config, len(data.y_train), worker_id)
        scheduler = lr_scheduler(optimizer, config, total)  # --lr-schedule (None: constant)
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + worker_id)
        step = 0
        for _epoch in range(config.epochs):
            order = mine[torch.randperm(len(mine), generator=generator)]
            for start in range(0, len(order), config.batch_size):
                batch = order[start : start + config.batch_size]
                keep = subsample_indices(
                    len(batch), config.subsample, seed=config.seed, worker_id=worker_id, step=step + 1
                )
                batch = batch[keep]
                x = data.prepare(data.x_train[batch].to(device, non_blocking=True))
                y = data.y_train[batch].to(device, non_blocking=True)
                optimizer.zero_grad(set_to_none=False)
                logits = model(x)
                loss = batch_loss(logits, y)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                step += 1
                if on_step is not None:
                    traffic = optimizer.traffic
                    on_step(
                        StepInfo(
                            worker_id=worker_id,
                            step=step,
                            planned=total,
                            loss=loss.item(),
                            batch_accuracy=correct_predictions(logits.detach(), y) / max(1, y.numel()),
                            wall_seconds=time.monotonic() - started,
                            bytes_pushed=traffic.bytes_pushed,
                            bytes_pulled=traffic.bytes_pulled,
                            bytes_pushed_dense=traffic.bytes_pushed_dense,
                        )
                    )
            if on_eval is not None:
                optimizer.synchronize()  # the weights this worker trains on now
                on_eval(step, optimizer.traffic.bytes_pushed, evaluate(model, data, device, limit=EPOCH_EVAL_EXAMPLES))
        optimizer.flush()  # nothing this worker computed is thrown away
        optimizer.refresh()  # the final weights: everything every worker pushed so far
        evaluation = evaluate(model, data, device)
        stats = optimizer.stats()
        traffic = optimizer.traffic
        return TrainResult(
            worker_id=worker_id,
            steps=step,
            wall_seconds=time.monotonic() - started,
            bytes_pushed=traffic.bytes_pushed,
            bytes_pushed_dense=traffic.bytes_pushed_dense,
            bytes_flushed=traffic.bytes_flushed,
            bytes_pulled=traffic.bytes_pulled,
            evaluation=evaluation,
            staleness=staleness_summary(
                [dict(s.staleness_counts) for s in stats], [dict(s.version_lag_counts) for s in stats]
            ),
            consistency=stats[0].consistency if stats else "",
        )


def result_report(result: TrainResult, config: TrainConfig, servers: list[str]) -> dict[str, Any]:
    """The report of a single worker (``ranger-ps worker --report``)."""
    return {
        "test_accuracy": result.evaluation.test_accuracy,
        "test_loss": result.evaluation.test_loss,
        "steps": result.steps,
        "wall_seconds": result.wall_seconds,
        "bytes_pushed": result.bytes_pushed,
        "bytes_pushed_dense": result.bytes_pushed_dense,
        "bytes_flushed": result.bytes_flushed,
        "bytes_pulled": result.bytes_pulled,
        "workers": 1,
        "shards": len(servers),
        "worker_id": result.worker_id,
        "servers": servers,
        "consistency": result.consistency,
        **result.staleness,
        "config": config.to_dict(),
    }
