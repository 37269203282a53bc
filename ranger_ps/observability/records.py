"""What training reports: the records every observer (bar, CSV, metrics) is handed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


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


@dataclass(frozen=True)
class Evaluation:
    """Loss and accuracy of a model on a dataset's test split."""

    test_accuracy: float
    test_loss: float


StepFn = Callable[[StepInfo], None]
"""Called after each training step."""
