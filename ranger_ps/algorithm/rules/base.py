"""What every update rule declares: its update function, its state, its default hyper-parameters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ranger_ps.algorithm.rules.state import BlockState

if TYPE_CHECKING:
    from ranger_ps.algorithm.rules.config import RuleConfig

Update = Callable[["RuleConfig", torch.Tensor, torch.Tensor, BlockState], None]
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
    state_names: Callable[[RuleConfig], tuple[str, ...]]
    defaults: RuleDefaults
