"""Ranger: RAdam + Lookahead, step for step as the widely used reference implementation.

Less Wright's ``Ranger`` (2019-2020): betas (0.95, 0.999), eps 1e-5, the un-rectified step while the
SMA length is at most ``n_sma_threshold`` (5), the rectified one after; every ``k`` (6) updates the
fast weights move ``alpha`` (0.5) of the way to the slow weights and are reset to them; decoupled
weight decay. Gradient centralization belongs to the worker
(:func:`ranger_ps.algorithm.selection.centralize_`), applied to the dense gradient, never here.
"""

from __future__ import annotations

import math

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


def ranger(config: Hyperparameters, param: torch.Tensor, grad: torch.Tensor, state: BlockState) -> None:
    """RAdam + Lookahead, step for step as the reference ``Ranger`` (gradient centralization excluded)."""
    beta1, beta2 = config.betas
    exp_avg, exp_avg_sq, slow = state.tensors["exp_avg"], state.tensors["exp_avg_sq"], state.tensors["slow_buffer"]
    if state.step == 0:
        slow.copy_(param)  # the reference creates the slow weights at a parameter's first step
    step = state.step + 1
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    step_size, rectified = radam_step_size(step, (beta1, beta2), config.n_sma_threshold)
    if config.weight_decay:
        param.add_(param, alpha=-config.weight_decay * config.lr)
    if rectified:
        denom = exp_avg_sq.sqrt().add_(config.eps)
        param.addcdiv_(exp_avg, denom, value=-step_size * config.lr)
    else:
        param.add_(exp_avg, alpha=-step_size * config.lr)
    if step % config.k == 0:
        slow.add_(param - slow, alpha=config.alpha)
        param.copy_(slow)


def _state_names(config: Hyperparameters) -> tuple[str, ...]:
    return ("exp_avg", "exp_avg_sq", "slow_buffer")


RULE = Rule("ranger", ranger, _state_names, RuleDefaults(lr=0.01, momentum=0.0, betas=(0.95, 0.999), eps=1e-5))
