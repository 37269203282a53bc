"""The training loop: compute a gradient, push it, swap in pulled weights, evaluate at the end."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ranger_ps.client import PulledBlock, PushResult, ShardedClient
from ranger_ps.config import TrainConfig
from ranger_ps.errors import UserError
from ranger_ps.layout import Layout
from ranger_ps.worker.data import Dataset, load_dataset, shard_indices
from ranger_ps.worker.models import build_model

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, float], None]
"""Called after each step with (steps done, steps planned, last loss)."""


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


def model_layout(model: nn.Module, block_size: int) -> Layout:
    """The layout of a model's parameters."""
    return Layout.from_named_tensors(model.named_parameters(), block_size)


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, device: torch.device, batch_size: int = 1024) -> Evaluation:
    """Accuracy and mean cross-entropy on the test split."""
    model.eval()
    correct = 0
    loss_sum = 0.0
    for start in range(0, len(data.y_test), batch_size):
        x = data.x_test[start : start + batch_size].to(device)
        y = data.y_test[start : start + batch_size].to(device)
        logits = model(x)
        loss_sum += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(dim=1) == y).sum())
    model.train()
    n = max(1, len(data.y_test))
    return Evaluation(correct / n, loss_sum / n)


def _block_views(model: nn.Module, layout: Layout) -> list[torch.Tensor]:
    return layout.block_views([p.data.view(-1) for p in model.parameters()])


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def train(
    config: TrainConfig,
    servers: list[str],
    *,
    worker_id: int | None = None,
    progress: ProgressFn | None = None,
    use_uvloop: bool = True,
) -> TrainResult:
    """Train against a cluster, then evaluate the final weights pulled from it."""
    data, model, device = build(config)
    layout = model_layout(model, config.block_size)
    started = time.monotonic()
    with ShardedClient(servers, connect_timeout=config.connect_timeout, use_uvloop=use_uvloop) as client:
        worker_id = client.register(layout, config.rule(), list(model.parameters()), worker_id)
        log.info("worker %d registered with %d shards (layout %s)", worker_id, len(servers), layout.fingerprint)
        views = _block_views(model, layout)
        client.apply_pulled(client.pull().result(), views)
        bytes_dense = 0

        mine = shard_indices(len(data.y_train), worker_id, config.num_workers)
        steps_per_epoch = max(1, math.ceil(len(mine) / config.batch_size))
        total = steps_per_epoch * config.epochs
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + worker_id)
        pending: Future[list[PulledBlock]] | None = None
        handle: Future[PushResult] | None = None
        step = 0
        loss_value = math.nan
        for _epoch in range(config.epochs):
            order = mine[torch.randperm(len(mine), generator=generator)]
            for start in range(0, len(order), config.batch_size):
                if pending is not None:
                    client.apply_pulled(pending.result(), views)
                    pending = None
                batch = order[start : start + config.batch_size]
                x = data.x_train[batch].to(device, non_blocking=True)
                y = data.y_train[batch].to(device, non_blocking=True)
                model.zero_grad(set_to_none=False)
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()  # type: ignore[no-untyped-call]
                loss_value = float(loss)
                handle = client.push(_grads(model), None, clock=step + 1)
                bytes_dense += client.push_wire_bytes(None, clock=step + 1)
                pending = client.pull(after=handle)
                if not config.overlap:
                    handle.result()
                    client.apply_pulled(pending.result(), views)
                    pending = None
                step += 1
                if progress is not None:
                    progress(step, total, loss_value)
            if handle is not None:
                handle.result()  # surface a failed push before the next epoch
        if pending is not None:
            client.apply_pulled(pending.result(), views)
        # The final weights: everything every worker pushed so far.
        client.apply_pulled(client.pull().result(), views)
        evaluation = evaluate(model, data, device)
        wall = time.monotonic() - started
        return TrainResult(
            worker_id=worker_id,
            steps=step,
            wall_seconds=wall,
            bytes_pushed=client.bytes_pushed,
            bytes_pushed_dense=bytes_dense,
            bytes_pulled=client.bytes_pulled,
            evaluation=evaluation,
        )


def evaluate_cluster(config: TrainConfig, servers: list[str], *, use_uvloop: bool = True) -> tuple[Evaluation, int]:
    """Pull the current weights from a cluster (without registering as a trainer) and evaluate them.

    Returns:
        The evaluation and the bytes pulled.
    """
    data, model, device = build(config)
    layout = model_layout(model, config.block_size)
    with ShardedClient(servers, connect_timeout=config.connect_timeout, use_uvloop=use_uvloop) as client:
        client.register(layout, config.rule(), list(model.parameters()), observer=True)
        client.apply_pulled(client.pull().result(), _block_views(model, layout))
        return evaluate(model, data, device), client.bytes_pulled


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
        "config": config.to_dict(),
    }
