"""The training loop: a plain PyTorch loop whose optimizer is :class:`ranger_ps.Ranger` on servers.

Each step computes the gradient on a random subsample of the minibatch; ``Ranger.step()`` then
selects blocks (error feedback), pushes them, and swaps in pulled weights (in the background with
``overlap``). At the end the worker pulls the final weights and evaluates them on the test set.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ranger_ps.config import TrainConfig
from ranger_ps.consistency import staleness_summary
from ranger_ps.errors import UserError
from ranger_ps.optim import Ranger
from ranger_ps.security import ClientSecurity
from ranger_ps.selection import subsample_indices
from ranger_ps.worker.data import Dataset, load_dataset, shard_indices
from ranger_ps.worker.models import build_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepInfo:
    """What one training step did, for progress bars, metrics and the step log.

    Byte counts are running totals of this worker since it started.
    """

    worker_id: int
    step: int
    planned: int
    loss: float
    batch_accuracy: float
    wall_seconds: float
    bytes_pushed: int
    bytes_pulled: int
    bytes_pushed_dense: int


StepFn = Callable[[StepInfo], None]
"""Called after each training step."""

EvalFn = Callable[[int, int, "Evaluation"], None]
"""Called after each epoch with (steps done, bytes pushed so far, evaluation of the worker's weights)."""

EPOCH_EVAL_EXAMPLES = 2048
"""The per-epoch evaluation (for curves) uses at most this many test examples; the final one uses all."""


@dataclass(frozen=True)
class Evaluation:
    """Loss and accuracy of a model on a dataset's test split."""

    test_accuracy: float
    test_loss: float


@dataclass(frozen=True)
class TrainResult:
    """What one worker did."""

    worker_id: int
    steps: int
    wall_seconds: float
    bytes_pushed: int
    bytes_pushed_dense: int
    bytes_pulled: int
    evaluation: Evaluation
    staleness: dict[str, int]
    consistency: str


def resolve_device(name: str) -> torch.device:
    """Check a ``--device`` value against what this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA devices here")
    elif device.type != "cpu":
        raise UserError(f"--device {name!r} is not supported (use cpu, cuda or cuda:N)")
    return device


def build(config: TrainConfig) -> tuple[Dataset, nn.Module, torch.device]:
    """Load the data and build the model, identically initialized on every worker."""
    device = resolve_device(config.device)
    data = load_dataset(config.dataset)
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.input_shape, data.num_classes).to(device)
    return data, model, device


def planned_steps(config: TrainConfig, num_examples: int, worker_index: int) -> int:
    """Steps one worker takes over all epochs."""
    mine = len(shard_indices(num_examples, worker_index, config.num_workers))
    return math.ceil(mine / config.batch_size) * config.epochs


def batch_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy for classification (logits (B, C), y (B,)) and language models alike
    (logits (B, T, V), y (B, T): every position predicts its next token)."""
    return nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction=reduction)


def correct_predictions(logits: torch.Tensor, y: torch.Tensor) -> int:
    """Predictions (examples, or tokens for a language model) whose arg-max is the target."""
    return int((logits.argmax(dim=-1) == y).sum())


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset, device: torch.device, batch_size: int = 1024, limit: int | None = None
) -> Evaluation:
    """Accuracy and mean cross-entropy on the test split (its first ``limit`` examples when given).

    For a language model both are per predicted token.
    """
    model.eval()
    correct = 0
    loss_sum = 0.0
    targets = 0
    end = len(data.y_test) if limit is None else min(limit, len(data.y_test))
    for start in range(0, end, batch_size):
        x = data.prepare(data.x_test[start : min(start + batch_size, end)].to(device))
        y = data.y_test[start : min(start + batch_size, end)].to(device)
        logits = model(x)
        loss_sum += float(batch_loss(logits, y, reduction="sum"))
        correct += correct_predictions(logits, y)
        targets += y.numel()
    model.train()
    n = max(1, targets)
    return Evaluation(correct / n, loss_sum / n)


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
    started = time.monotonic()
    optimizer = Ranger(
        model.named_parameters(),
        servers=servers,
        worker_id=worker_id,
        overlap=config.overlap,
        connect_timeout=config.connect_timeout,
        retry_timeout=config.retry_timeout,
        security=security,
        use_uvloop=use_uvloop,
        **config.optimizer_kwargs(),
    )
    with optimizer:
        assert optimizer.client is not None
        worker_id = optimizer.worker_id
        log.info(
            "worker %d registered with %d shards (layout %s, %d blocks)",
            worker_id, len(servers), optimizer.layout.fingerprint, optimizer.layout.num_blocks,
        )  # fmt: skip
        mine = shard_indices(len(data.y_train), worker_id, config.num_workers)
        total = planned_steps(config, len(data.y_train), worker_id)
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
                step += 1
                if on_step is not None:
                    on_step(
                        StepInfo(
                            worker_id=worker_id,
                            step=step,
                            planned=total,
                            loss=loss.item(),
                            batch_accuracy=correct_predictions(logits.detach(), y) / max(1, y.numel()),
                            wall_seconds=time.monotonic() - started,
                            bytes_pushed=optimizer.client.bytes_pushed,
                            bytes_pulled=optimizer.client.bytes_pulled,
                            bytes_pushed_dense=optimizer.bytes_pushed_dense,
                        )
                    )
            if on_eval is not None:
                optimizer.synchronize()  # the weights this worker trains on now
                on_eval(step, optimizer.client.bytes_pushed, evaluate(model, data, device, limit=EPOCH_EVAL_EXAMPLES))
        optimizer.refresh()  # the final weights: everything every worker pushed so far
        evaluation = evaluate(model, data, device)
        stats = optimizer.client.stats()
        return TrainResult(
            worker_id=worker_id,
            steps=step,
            wall_seconds=time.monotonic() - started,
            bytes_pushed=optimizer.client.bytes_pushed,
            bytes_pushed_dense=optimizer.bytes_pushed_dense,
            bytes_pulled=optimizer.client.bytes_pulled,
            evaluation=evaluation,
            staleness=staleness_summary(
                [dict(s.staleness_counts) for s in stats], [dict(s.version_lag_counts) for s in stats]
            ),
            consistency=optimizer.client.consistency,
        )


def evaluate_cluster(
    config: TrainConfig, servers: list[str], *, use_uvloop: bool = True, security: ClientSecurity | None = None
) -> tuple[Evaluation, int]:
    """Pull the current weights from a cluster as an observer (never a trainer) and evaluate them.

    Returns:
        The evaluation and the bytes pulled.
    """
    data, model, device = build(config)
    with Ranger(
        model.named_parameters(),
        servers=servers,
        observer=True,
        security=security,
        connect_timeout=config.connect_timeout,
        use_uvloop=use_uvloop,
        **config.optimizer_kwargs(),
    ) as optimizer:
        assert optimizer.client is not None
        return evaluate(model, data, device), optimizer.client.bytes_pulled


def result_report(result: TrainResult, config: TrainConfig, servers: list[str]) -> dict[str, Any]:
    """The report of a single worker (``ranger-ps worker --report``)."""
    return {
        "test_accuracy": result.evaluation.test_accuracy,
        "test_loss": result.evaluation.test_loss,
        "steps": result.steps,
        "wall_seconds": result.wall_seconds,
        "bytes_pushed": result.bytes_pushed,
        "bytes_pushed_dense": result.bytes_pushed_dense,
        "bytes_pulled": result.bytes_pulled,
        "workers": 1,
        "shards": len(servers),
        "worker_id": result.worker_id,
        "servers": servers,
        "consistency": result.consistency,
        **result.staleness,
        "config": config.to_dict(),
    }
