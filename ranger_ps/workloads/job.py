"""A training job: the data, the model built identically on every worker, the loss and the step plan.

These pieces are shared by the training worker, the local cluster (which checks a job before it
starts processes and counts its steps), and the benchmarks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ranger_ps.config.train import TrainConfig
from ranger_ps.errors import UserError
from ranger_ps.workloads.data import Dataset, load_dataset, shard_indices
from ranger_ps.workloads.models import build_model


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
