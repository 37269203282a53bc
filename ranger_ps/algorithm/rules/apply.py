"""Applying pushed values to blocks: truncation, then the rule, with the rule state advanced.

The parameter server and the in-process optimizer call the very same :func:`apply_update`, which is
what makes "distributed equals local" hold exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ranger_ps.algorithm.rules.config import RuleConfig
from ranger_ps.algorithm.rules.registry import rule_named
from ranger_ps.algorithm.rules.state import LOW_PRECISION, BlockState, zeroed_state
from ranger_ps.algorithm.truncation import truncate


def new_block_state(config: RuleConfig, numel: int, param_dtype: torch.dtype) -> BlockState:
    """A fresh, zeroed state for one block of ``numel`` elements under these settings."""
    return zeroed_state(config.state_names(), numel, param_dtype, residual=config.truncation_residual)


def apply_update(
    config: RuleConfig,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[BlockState],
) -> None:
    """Truncate the gradients, then apply the rule to each block, in place.

    ``params`` are the blocks' values (written in place), ``grads`` their gradients (never
    modified), ``states`` their states (updated, counters advanced).
    """
    if _can_batch(config, params, grads):
        _sgd_batched(config, list(params), list(grads), states)
        return
    update = rule_named(config.rule).update
    for param, grad, state in zip(params, grads, states, strict=True):
        compute = param.float() if param.dtype in LOW_PRECISION else param
        g = truncate(config, grad.to(compute.dtype), state.residual)
        update(config, compute, g, state)
        if compute is not param:
            param.copy_(compute)
        state.advance()


def _can_batch(config: RuleConfig, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> bool:
    """Whether :func:`_sgd_batched` computes exactly what the per-block loop would.

    It does for sgd without truncation or clipping on full-precision blocks whose gradients already
    have the parameters' dtype: the same kernels run on the same tensors, only dispatched as one
    ``torch._foreach_*`` call per operation instead of one Python call per block and operation.
    """
    if config.rule != "sgd" or len(params) < 2 or config.truncates:
        return False
    dtype = params[0].dtype
    return dtype not in LOW_PRECISION and all(p.dtype == dtype for p in params) and all(g.dtype == dtype for g in grads)


def _sgd_batched(
    config: RuleConfig, params: list[torch.Tensor], grads: list[torch.Tensor], states: Sequence[BlockState]
) -> None:
    """:func:`~ranger_ps.algorithm.rules.sgd.sgd` over many blocks at once (bitwise the same result)."""
    d_ps = grads
    if config.weight_decay:
        d_ps = list(torch._foreach_add(grads, params, alpha=config.weight_decay))
    if config.momentum:
        bufs = [s.tensors["momentum_buffer"] for s in states]
        fresh = [i for i, s in enumerate(states) if s.step == 0]
        if fresh:
            torch._foreach_copy_([bufs[i] for i in fresh], [d_ps[i] for i in fresh])
        seen = [i for i, s in enumerate(states) if s.step != 0] if fresh else range(len(states))
        if len(seen):
            running = [bufs[i] for i in seen]
            torch._foreach_mul_(running, config.momentum)
            torch._foreach_add_(running, [d_ps[i] for i in seen], alpha=1 - config.dampening)
        d_ps = list(torch._foreach_add(d_ps, bufs, alpha=config.momentum)) if config.nesterov else bufs
    torch._foreach_add_(params, d_ps, alpha=-config.lr)
    torch._foreach_add_([s.counter for s in states], 1)
