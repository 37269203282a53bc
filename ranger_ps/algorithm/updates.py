"""What a shard (or the in-process optimizer standing in for one) does with pushed blocks.

Truncation and clipping first, then either the update rule over pushed gradients (``outer="rule"``,
the classic parameter server) or the outer rule over pushed weight changes
(:mod:`ranger_ps.algorithm.outer`). The shards and the in-process optimizer call this one
function, so a one-worker cluster and ``Ranger`` without servers compute the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ranger_ps.algorithm.outer import apply_outer
from ranger_ps.algorithm.rules import BlockState, RuleConfig, apply_update
from ranger_ps.algorithm.rules.apply import truncated


def apply_pushed(
    config: RuleConfig,
    values: Sequence[torch.Tensor],
    pushed: Sequence[torch.Tensor],
    states: Sequence[BlockState],
    *,
    contributions: int = 1,
) -> None:
    """Apply one push (or, under bsp, the sum of ``contributions`` workers' pushes) to blocks, in place.

    ``values`` are the blocks' weights, ``pushed`` what arrived for them (gradients under the rule
    outer mode, weight changes otherwise; never modified), ``states`` their states (advanced).
    """
    if config.outer == "rule":
        gradients = list(pushed) if contributions == 1 else torch._foreach_div(list(pushed), float(contributions))
        apply_update(config, values, gradients, states)
    else:
        apply_outer(config, values, truncated(config, pushed, states), states, contributions=contributions)
