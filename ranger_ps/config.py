"""Training settings shared by the worker, the local cluster and the report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ranger_ps.errors import UserError
from ranger_ps.layout import DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE
from ranger_ps.rules import RuleConfig


@dataclass(frozen=True)
class TrainConfig:
    """What a worker trains and how.

    Attributes:
        model: model name (see ``ranger_ps.worker.models``).
        dataset: dataset name (see ``ranger_ps.worker.data``).
        epochs: passes over the worker's share of the training set.
        batch_size: examples per step and worker.
        lr: learning rate of the update rule.
        momentum: momentum of the update rule.
        seed: seeds model initialization (identical on every worker) and data order.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        block_size: elements per block (the unit of pushes and pulls).
        num_workers: how many workers share the training set (each takes every n-th example).
        overlap: pull the next weights while the next step computes (one step of staleness).
        connect_timeout: how long to wait for servers to come up (seconds).
    """

    model: str = "mlp"
    dataset: str = "digits"
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    seed: int = 0
    device: str = "cpu"
    block_size: int = DEFAULT_BLOCK_SIZE
    num_workers: int = 1
    overlap: bool = True
    connect_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise UserError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not 1 <= self.block_size <= MAX_BLOCK_SIZE:
            raise UserError(f"--block-size must be in [1, {MAX_BLOCK_SIZE}], got {self.block_size}")
        if self.num_workers < 1:
            raise UserError(f"--num-workers must be >= 1, got {self.num_workers}")
        if self.connect_timeout <= 0:
            raise UserError(f"--connect-timeout must be > 0, got {self.connect_timeout}")
        try:
            self.rule()
        except ValueError as exc:
            raise UserError(str(exc)) from None

    def rule(self) -> RuleConfig:
        """The server-side update rule these settings ask for."""
        return RuleConfig(name="sgd", lr=self.lr, momentum=self.momentum)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
