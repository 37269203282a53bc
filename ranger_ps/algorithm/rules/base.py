"""What every update rule declares: its update function, its state, its default hyper-parameters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from ranger_ps.algorithm.rules.state import BlockState


class Hyperparameters(Protocol):
    """What a rule reads of its settings (:class:`~ranger_ps.algorithm.rules.config.RuleConfig` has it all)."""

    @property
    def lr(self) -> float: ...
    @property
    def momentum(self) -> float: ...
    @property
    def dampening(self) -> float: ...
    @property
    def nesterov(self) -> bool: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def betas(self) -> tuple[float, float]: ...
    @property
    def eps(self) -> float: ...
    @property
    def alpha(self) -> float: ...
    @property
    def k(self) -> int: ...
    @property
    def n_sma_threshold(self) -> float: ...


Update = Callable[[Hyperparameters, torch.Tensor, torch.Tensor, BlockState], None]
"""``update(config, param, grad, state)``: one block's update, in place (``param`` and ``state``)."""


@dataclass(frozen=True)
class RuleDefaults:
    """A rule's hyper-parameters where ``RuleConfig`` leaves them to the rule (``None``)."""

    lr: float
    momentum: float
    betas: tuple[float, float]
    eps: float


@dataclass(frozen=True)
class Rule:
    """One update rule as the registry knows it.

    Attributes:
        name: what ``--rule`` and ``rule=`` call it.
        update: the pure per-block update.
        state_names: the state tensors a block carries under given settings.
        defaults: hyper-parameters used where the settings say "the rule's default".
    """

    name: str
    update: Update
    state_names: Callable[[Hyperparameters], tuple[str, ...]]
    defaults: RuleDefaults
