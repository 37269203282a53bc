"""Ranger: RAdam + Lookahead, step for step as the widely used reference implementation.

Less Wright's ``Ranger`` (2019-2020): betas (0.95, 0.999), eps 1e-5, the un-rectified step while the
SMA length is at most ``n_sma_threshold`` (5), the rectified one after; every ``k`` (6) updates the
fast weights move ``alpha`` (0.5) of the way to the slow weights and are reset to them; decoupled
weight decay. Gradient centralization belongs to the worker
(:func:`ranger_ps.algorithm.selection.centralize_`), applied to the dense gradient, never here.

RAdam's rectification and bias correction count ``step``; Lookahead counts ``own_step`` (the
same number unless a worker of a cluster runs the rule with the cluster's clock as ``step``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ranger_ps.algorithm.rules.base import Hyperparameters, Rule, RuleDefaults
from ranger_ps.algorithm.rules.state import BlockState


def radam_step_size(step: int, betas: tuple[float, float], n_sma_threshold: float) -> tuple[float, bool]:
    """RAdam's step size at ``step`` (1-based) and whether the rectified update applies."""
    beta1, beta2 = betas
    beta2_t = beta2**step
    n_sma_max = 2 / (1 - beta2) - 1
    n_sma = n_sma_max - 2 * step * beta2_t / (1 - beta2_t)
    if n_sma > n_sma_threshold:
        rect = (1 - beta2_t) * (n_sma - 4) / (n_sma_max - 4) * (n_sma - 2) / n_sma * n_sma_max / (n_sma_max - 2)
        return math.sqrt(rect) / (1 - beta1**step), True
    return 1.0 / (1 - beta1**step), False


def ranger(
    config: Hyperparameters,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[BlockState],
    step: int,
    own_step: int | None = None,
) -> None:
    """One RAdam + Lookahead step of every block (all at their ``step``-th update), as the reference takes it."""
    beta1, beta2 = config.betas
    own_step = step if own_step is None else own_step
    params, grads = list(params), list(grads)
    exp_avgs = [s.tensors["exp_avg"] for s in states]
    exp_avg_sqs = [s.tensors["exp_avg_sq"] for s in states]
    slows = [s.tensors["slow_buffer"] for s in states]
    if own_step == 1:
        torch._foreach_copy_(slows, params)  # the reference creates the slow weights at a parameter's first step
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    step_size, rectified = radam_step_size(step, (beta1, beta2), config.n_sma_threshold)
    if config.weight_decay:
        torch._foreach_add_(params, params, alpha=-config.weight_decay * config.lr)
    if rectified:
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, config.eps)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, value=-step_size * config.lr)
    else:
        torch._foreach_add_(params, exp_avgs, alpha=-step_size * config.lr)
    if own_step % config.k == 0:
        torch._foreach_add_(slows, torch._foreach_sub(params, slows), alpha=config.alpha)
        torch._foreach_copy_(params, slows)


def _state_names(config: Hyperparameters) -> tuple[str, ...]:
    return ("exp_avg", "exp_avg_sq", "slow_buffer")


RULE = Rule("ranger", ranger, _state_names, RuleDefaults(lr=0.02, momentum=0.0, betas=(0.95, 0.999), eps=1e-5))
