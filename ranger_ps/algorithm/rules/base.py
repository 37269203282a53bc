"""What every update rule declares: its update function, its state, its default hyper-parameters."""

from __future__ import annotations

from collections.abc import Sequence
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


class Update(Protocol):
    """One step of many blocks that all take their ``step``-th update, in place (values and states).

    ``step`` is the count bias corrections and rectification use; ``own_step`` (default: ``step``)
    the count period-based behaviour (Lookahead) uses. The two differ only where a worker runs the
    rule with the cluster's clock. Counters are not advanced here (:func:`apply_update` does it).
    """

    def __call__(
        self,
        config: Hyperparameters,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        states: Sequence[BlockState],
        step: int,
        own_step: int | None = None,
    ) -> None: ...


class StateNames(Protocol):
    def __call__(self, config: Hyperparameters) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class RuleDefaults:
    """A rule's hyper-parameters where the settings leave them to the rule (``None``)."""

    lr: float
    momentum: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float = 0.0


@dataclass(frozen=True)
class Rule:
    """One update rule as the registry knows it.

    Attributes:
        name: what ``--rule`` and ``rule=`` call it.
        update: the vectorized update of many blocks at one step.
        state_names: the state tensors a block carries under given settings.
        defaults: hyper-parameters used where the settings say "the rule's default".
    """

    name: str
    update: Update
    state_names: StateNames
    defaults: RuleDefaults
