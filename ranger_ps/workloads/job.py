"""A training job: the data, the model built identically on every worker, the loss, the step plan
and the learning rate over it.

These pieces are shared by the training worker, the local cluster (which checks a job before it
starts processes and counts its steps), and the benchmarks.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, StepLR

from ranger_ps.config.train import LrSchedule, TrainConfig
from ranger_ps.errors import UserError
from ranger_ps.workloads.data import Dataset, load_dataset, parse_spec, shard_indices
from ranger_ps.workloads.models import MODELS, build_model
from ranger_ps.workloads.plugins import is_plugin_spec, load_plugin


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


def check_job(config: TrainConfig) -> None:
    """The checks of a job that read no data and build no model: the device, the dataset's form, the
    model's name (a bring-your-own model's module is imported, its function not called).

    Cheap enough to run before a command announces its effective config, so a usage error is the
    only line a user sees.

    Raises:
        UserError: an unknown device, dataset form or model (one line naming the flag).
    """
    resolve_device(config.device)
    parse_spec(config.dataset)
    if config.model in MODELS:
        return
    if is_plugin_spec(config.model):
        load_plugin(config.model, "--model")
    else:
        build_model(config.model, (), 0)  # not a built-in nor a plugin: raises its "unknown model" error


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


def lr_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, planned: int) -> LRScheduler | None:
    """The torch scheduler ``--lr-schedule`` asks for over ``planned`` steps (None for ``constant``).

    Step it once after every ``optimizer.step()``; it scales each param group's lr as it is when
    the scheduler is made (``--lr``). ``cosine`` is a :class:`~torch.optim.lr_scheduler.LambdaLR`
    of the closed form that :class:`~torch.optim.lr_scheduler.LinearLR` (from ``lr / (warmup + 1)``)
    followed by :class:`~torch.optim.lr_scheduler.CosineAnnealingLR` (``T_max`` the steps after the
    warm-up, ``eta_min`` the ``min`` fraction of each group's own lr) give; ``step`` is
    :class:`~torch.optim.lr_scheduler.StepLR` whose period is ``every`` epochs of this worker's steps.

    Args:
        optimizer: the optimizer whose param groups' lr the schedule sets.
        config: the job (its ``lr_schedule`` and ``epochs``).
        planned: the steps this worker takes (:func:`planned_steps`), a whole number of epochs.

    Raises:
        UserError: a warm-up that does not end before the last planned step.
    """
    schedule = LrSchedule.parse(config.lr_schedule)
    if schedule.kind == "step":
        steps_per_epoch = max(1, planned // config.epochs)
        return StepLR(optimizer, step_size=schedule.every * steps_per_epoch, gamma=schedule.gamma)
    if schedule.kind != "cosine":
        return None
    check_schedule(config, planned)
    return LambdaLR(optimizer, functools.partial(_cosine_factor, schedule, planned - schedule.warmup))


def check_schedule(config: TrainConfig, planned: int) -> None:
    """Refuse a schedule that cannot run over ``planned`` steps (a worker's, or the fewest of any worker's).

    Raises:
        UserError: a warm-up that does not end before the last planned step.
    """
    schedule = LrSchedule.parse(config.lr_schedule)
    if schedule.kind == "cosine" and schedule.warmup >= planned:
        raise UserError(
            f"--lr-schedule {config.lr_schedule}: the warm-up of {schedule.warmup} steps does not end before the "
            f"last of the {planned} steps this worker plans"
        )


def _cosine_factor(schedule: LrSchedule, cosine_steps: int, step: int) -> float:
    """The fraction of lr in use for the step after ``step`` steps: linear warm-up, then half a cosine."""
    if step < schedule.warmup:
        return (step + 1) / (schedule.warmup + 1)
    progress = min(step - schedule.warmup, cosine_steps) / cosine_steps
    lowest = schedule.min_factor
    return lowest + (1 - lowest) * (1 + math.cos(math.pi * progress)) / 2


def batch_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy for classification (logits (B, C), y (B,)) and language models alike
    (logits (B, T, V), y (B, T): every position predicts its next token)."""
    return nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction=reduction)


def correct_predictions(logits: torch.Tensor, y: torch.Tensor) -> int:
    """Predictions (examples, or tokens for a language model) whose arg-max is the target."""
    return int((logits.argmax(dim=-1) == y).sum())
