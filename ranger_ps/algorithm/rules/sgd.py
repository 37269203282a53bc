"""SGD with momentum, dampening, Nesterov and L2 weight decay, exactly as ``torch.optim.SGD``."""

from __future__ import annotations

import torch

from ranger_ps.algorithm.rules.base import Hyperparameters, Rule, RuleDefaults
from ranger_ps.algorithm.rules.state import BlockState


def sgd(config: Hyperparameters, param: torch.Tensor, grad: torch.Tensor, state: BlockState) -> None:
    """SGD with momentum, dampening, Nesterov and weight decay, as ``torch.optim.SGD`` does it."""
    d_p = grad
    if config.weight_decay:
        d_p = d_p.add(param, alpha=config.weight_decay)
    if config.momentum:
        buf = state.tensors["momentum_buffer"]
        if state.step == 0:
            buf.copy_(d_p)
        else:
            buf.mul_(config.momentum).add_(d_p, alpha=1 - config.dampening)
        d_p = d_p.add(buf, alpha=config.momentum) if config.nesterov else buf
    param.add_(d_p, alpha=-config.lr)


def _state_names(config: Hyperparameters) -> tuple[str, ...]:
    return ("momentum_buffer",) if config.momentum else ()


RULE = Rule("sgd", sgd, _state_names, RuleDefaults(lr=0.05, momentum=0.9, betas=(0.9, 0.999), eps=1e-8))
