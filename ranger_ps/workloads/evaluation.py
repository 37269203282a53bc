"""Evaluating a model on its dataset's test split, in this process or as held by a cluster."""

from __future__ import annotations

import torch
from torch import nn

from ranger_ps.config.train import TrainConfig
from ranger_ps.observability.records import Evaluation
from ranger_ps.optim import Ranger, running_statistics
from ranger_ps.wire.security import ClientSecurity
from ranger_ps.workloads.data import Dataset
from ranger_ps.workloads.job import batch_loss, build, correct_predictions
from ranger_ps.workloads.models import check_cluster_buffers

EPOCH_EVAL_EXAMPLES = 2048
"""The per-epoch evaluation (for curves) uses at most this many test examples; the final one uses all."""


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


def evaluate_cluster(
    config: TrainConfig, servers: list[str], *, use_uvloop: bool = True, security: ClientSecurity | None = None
) -> tuple[Evaluation, int]:
    """Pull the current weights from a cluster as an observer (never a trainer) and evaluate them.

    Returns:
        The evaluation and the bytes pulled.
    """
    data, model, device = build(config)
    check_cluster_buffers(model, config.outer, truncates=config.truncates)
    with Ranger(
        model.named_parameters(),
        buffers=running_statistics(model),
        servers=servers,
        observer=True,
        security=security,
        use_uvloop=use_uvloop,
        **config.connection_kwargs(),
        **config.optimizer_kwargs(),
    ) as optimizer:
        return evaluate(model, data, device), optimizer.traffic.bytes_pulled
