"""AdamW, exactly as ``torch.optim.AdamW`` (single-tensor path, no amsgrad)."""

from __future__ import annotations

import math

import torch

from ranger_ps.algorithm.rules.base import Hyperparameters, Rule, RuleDefaults
from ranger_ps.algorithm.rules.state import BlockState


def adamw(config: Hyperparameters, param: torch.Tensor, grad: torch.Tensor, state: BlockState) -> None:
    """AdamW as ``torch.optim.AdamW`` does it (single-tensor path, no amsgrad)."""
    beta1, beta2 = config.betas
    step = state.step + 1
    exp_avg, exp_avg_sq = state.tensors["exp_avg"], state.tensors["exp_avg_sq"]
    param.mul_(1 - config.lr * config.weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = config.lr / bias_correction1
    denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(config.eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def _state_names(config: Hyperparameters) -> tuple[str, ...]:
    return ("exp_avg", "exp_avg_sq")


RULE = Rule("adamw", adamw, _state_names, RuleDefaults(lr=0.003, momentum=0.0, betas=(0.9, 0.999), eps=1e-8))
