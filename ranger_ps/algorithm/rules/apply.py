"""Applying pushed values to blocks: truncation, then the rule, with the rule state advanced.

The parameter server and the in-process optimizer call the very same :func:`apply_update`, which is
what makes "distributed equals local" hold exactly. Blocks are updated together, one
``torch._foreach_*`` call per operation for every group of blocks at the same step count (with
dense pushes, one group): the same kernels as a per-block loop, without a Python call per block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ranger_ps.algorithm.rules.config import RuleConfig
from ranger_ps.algorithm.rules.registry import rule_named
from ranger_ps.algorithm.rules.state import BlockState, by_step, in_compute_precision, store_back, zeroed_state
from ranger_ps.algorithm.truncation import TruncationSettings, truncate


def new_block_state(config: RuleConfig, numel: int, param_dtype: torch.dtype) -> BlockState:
    """A fresh, zeroed state for one block of ``numel`` elements under these settings."""
    return zeroed_state(config.state_names(), numel, param_dtype, residual=config.truncation_residual)


def truncated(
    config: TruncationSettings, grads: Sequence[torch.Tensor], states: Sequence[BlockState]
) -> list[torch.Tensor]:
    """Each block's pushed values after truncation and clipping (residuals updated); as given when off."""
    if not config.truncates:
        return list(grads)
    return [truncate(config, g, s.residual) for g, s in zip(grads, states, strict=True)]


def apply_update(
    config: RuleConfig,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[BlockState],
    *,
    step: int | None = None,
) -> None:
    """Truncate the gradients, then apply the rule to each block, in place.

    ``params`` are the blocks' values (written in place), ``grads`` their gradients (never
    modified), ``states`` their states (updated, counters advanced). Each block takes its own
    update count as its step, unless ``step`` gives one step for all (a worker's inner rule on the
    cluster's clock); Lookahead-like periods always count the block's own updates.
    """
    if len(params) != len(grads) or len(params) != len(states):
        raise ValueError(f"{len(params)} blocks, {len(grads)} gradients and {len(states)} states")
    if not params:
        return
    update = rule_named(config.rule).update
    compute = in_compute_precision(params)
    cast = [g.to(c.dtype) for g, c in zip(grads, compute, strict=True)]
    cast = truncated(config, cast, states)
    for own, members in by_step(states).items():
        update(
            config,
            [compute[i] for i in members],
            [cast[i] for i in members],
            [states[i] for i in members],
            own + 1 if step is None else step,
            own + 1,
        )
    store_back(params, compute)
    torch._foreach_add_([s.counter for s in states], 1)
