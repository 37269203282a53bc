"""The outer rule: what a shard does with a push.

Two places can hold an update rule. The *inner* rule runs on each worker, densely, over the
worker's view (the weights it last pulled plus its own update it has not pushed yet); what the
worker owes the cluster is a residual in weight units, and random blocks of it are pushed. The
*outer* rule runs on the shards over what is pushed:

- ``mean`` (the default): add the pushed weight changes divided by the number of workers; each
  worker's inner learning rate is its ``lr`` times ``sqrt(num_workers)`` (docs/algorithm.md has the
  measurements behind both);
- ``sum``: add the pushed weight changes;
- ``sgd``: SGD with Nesterov momentum over the pushed changes as pseudo-gradients (DiLoCo's outer
  optimizer), with ``outer_lr`` and ``outer_momentum``;
- ``rule``: the classic parameter server: workers push gradients (error feedback in gradient
  units) and the shards run the update rule with its state (exactly ``torch.optim`` on one worker).

Server-side truncation and clipping apply to whatever is pushed, before the outer rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ranger_ps.algorithm.quantize import PUSH_DTYPES
from ranger_ps.algorithm.rules.sgd import sgd
from ranger_ps.algorithm.rules.state import BlockState, in_compute_precision, store_back
from ranger_ps.algorithm.truncation import check_finite
from ranger_ps.settings import Settings, setting

OUTER_RULES = ("mean", "sum", "sgd", "rule")
WIRE_DEFAULT_OUTER = "rule"
"""What a registration that names no outer rule means: v1 clients push gradients for the shards' rule."""

_SGD_DEFAULTS = (0.7, 0.9)  # DiLoCo's outer learning rate and Nesterov momentum


@dataclass(frozen=True)
class OuterSettings(Settings):
    """Where the update rule runs, and what the shards do with a push."""

    title: ClassVar[str] = "outer rule (on the shards)"

    outer: str = setting(
        "mean",
        "what the shards do with a push: mean (add the pushed weight changes / --num-workers; the workers run "
        "--rule), sum (add them), sgd (Nesterov SGD over them, as DiLoCo), rule (classic: workers push gradients "
        "and the shards run --rule)",
        choices=OUTER_RULES,
    )
    outer_lr: float = setting(None, "outer sgd: learning rate", default_text="0.7 for --outer sgd")
    outer_momentum: float = setting(None, "outer sgd: Nesterov momentum", default_text="0.9 for --outer sgd")
    num_workers: int = setting(
        1, "how many workers train together (the mean outer rule divides by it; each trains on every n-th example)"
    )
    push_dtype: str | None = setting(
        None,
        "what pushed values travel as: float32, bfloat16, or int8 with a per-block scale (the rounding error "
        "stays in the residual); the shards accept this or the parameters' own dtype",
        choices=PUSH_DTYPES,
        default_text="the parameters' own dtype",
    )

    def __post_init__(self) -> None:
        if self.outer not in OUTER_RULES:
            raise ValueError(f"outer must be one of {', '.join(OUTER_RULES)}, got {self.outer!r}")
        if self.outer == "sgd":
            lr, momentum = _SGD_DEFAULTS
            object.__setattr__(self, "outer_lr", lr if self.outer_lr is None else float(self.outer_lr))
            object.__setattr__(self, "outer_momentum", momentum if self.outer_momentum is None else self.outer_momentum)
            check_finite("outer_lr", self.outer_lr, low=0.0)
            check_finite("outer_momentum", self.outer_momentum, low=0.0)
            if not self.outer_momentum < 1:
                raise ValueError(f"outer_momentum must be in [0, 1), got {self.outer_momentum}")
        else:
            for name, neutral in (("outer_lr", 1.0), ("outer_momentum", 0.0)):
                value = getattr(self, name)
                if value is not None and value != neutral:
                    raise ValueError(f"{name} applies to the sgd outer rule, not to {self.outer}")
                object.__setattr__(self, name, neutral)
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 1:
            raise ValueError(f"num_workers must be an int >= 1, got {self.num_workers!r}")
        if self.push_dtype is not None and self.push_dtype not in PUSH_DTYPES:
            raise ValueError(f"push_dtype must be one of {', '.join(PUSH_DTYPES)}, got {self.push_dtype!r}")
        super().__post_init__()

    @property
    def inner(self) -> bool:
        """Whether the update rule runs on the workers (pushes are weight changes)."""
        return self.outer != "rule"

    @property
    def inner_lr_scale(self) -> float:
        """What the workers multiply their learning rate by (``sqrt(num_workers)`` under ``mean``)."""
        return math.sqrt(self.num_workers) if self.outer == "mean" else 1.0

    def outer_state_names(self) -> tuple[str, ...]:
        """The state a block carries on the shards for the outer rule (not ``rule``: that is the rule's)."""
        return ("momentum_buffer",) if self.outer == "sgd" and self.outer_momentum else ()


@dataclass(frozen=True)
class OuterSgd:
    """The outer sgd's hyper-parameters as the sgd rule reads them."""

    lr: float
    momentum: float
    dampening: float = 0.0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    alpha: float = 0.5
    k: int = 6
    n_sma_threshold: float = 5.0

    @property
    def nesterov(self) -> bool:
        return self.momentum > 0


def apply_outer(
    config: OuterSettings,
    values: Sequence[torch.Tensor],
    pushed: Sequence[torch.Tensor],
    states: Sequence[BlockState],
    *,
    contributions: int = 1,
) -> None:
    """Apply already-truncated pushed weight changes to blocks with the outer rule (not ``rule``).

    ``contributions`` is how many workers' pushes ``pushed`` sums (bsp combines a clock's pushes:
    their mean is what ``mean`` adds). Counters are advanced.
    """
    if config.outer == "rule":
        raise ValueError("the rule outer mode applies the update rule (apply_update), not apply_outer")
    if not values:
        return
    computed = in_compute_precision(values)
    changes = [c.to(v.dtype) for c, v in zip(pushed, computed, strict=True)]
    if config.outer == "mean":
        torch._foreach_add_(
            computed, changes, alpha=1.0 / (config.num_workers if contributions == 1 else contributions)
        )
    elif config.outer == "sum":
        torch._foreach_add_(computed, changes)
    else:
        scale = -1.0 / contributions  # pseudo-gradient: minus the (mean) change
        gradients = torch._foreach_mul(changes, scale)
        groups: dict[int, list[int]] = {}
        for index, state in enumerate(states):
            groups.setdefault(state.step, []).append(index)
        hyper = OuterSgd(config.outer_lr, config.outer_momentum)
        for own, members in groups.items():
            sgd(
                hyper,
                [computed[i] for i in members],
                [gradients[i] for i in members],
                [states[i] for i in members],
                own + 1,
            )
    store_back(values, computed)
    torch._foreach_add_([s.counter for s in states], 1)
