"""AdamW, exactly as ``torch.optim.AdamW`` (single-tensor path, no amsgrad)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ranger_ps.algorithm.rules.base import Hyperparameters, Rule, RuleDefaults
from ranger_ps.algorithm.rules.state import BlockState


def adamw(
    config: Hyperparameters,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[BlockState],
    step: int,
    own_step: int | None = None,
) -> None:
    """One AdamW step of every block (all at their ``step``-th update), as ``torch.optim.AdamW`` takes it."""
    beta1, beta2 = config.betas
    params, grads = list(params), list(grads)
    exp_avgs = [s.tensors["exp_avg"] for s in states]
    exp_avg_sqs = [s.tensors["exp_avg_sq"] for s in states]
    torch._foreach_mul_(params, 1 - config.lr * config.weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = config.lr / bias_correction1
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denoms, math.sqrt(bias_correction2))
    torch._foreach_add_(denoms, config.eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, value=-step_size)


def _state_names(config: Hyperparameters) -> tuple[str, ...]:
    return ("exp_avg", "exp_avg_sq")


# weight_decay 0.01 as torch.optim.AdamW's default (sgd and ranger default to 0, as torch.optim.SGD does).
RULE = Rule(
    "adamw", adamw, _state_names, RuleDefaults(lr=0.006, momentum=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
)
