"""SGD with momentum, dampening, Nesterov and L2 weight decay, exactly as ``torch.optim.SGD``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ranger_ps.algorithm.rules.base import Hyperparameters, Rule, RuleDefaults
from ranger_ps.algorithm.rules.state import BlockState


def sgd(
    config: Hyperparameters,
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[BlockState],
    step: int,
    own_step: int | None = None,
) -> None:
    """One SGD step of every block (all at their ``step``-th update), as ``torch.optim.SGD`` takes it.

    One ``torch._foreach_*`` call per operation over all blocks: the same kernels as the
    single-tensor path on the same tensors, so the result is bitwise the same.
    """
    d_ps = list(grads)
    if config.weight_decay:
        d_ps = list(torch._foreach_add(d_ps, list(params), alpha=config.weight_decay))
    if config.momentum:
        bufs = [s.tensors["momentum_buffer"] for s in states]
        if step == 1:
            torch._foreach_copy_(bufs, d_ps)
        else:
            torch._foreach_mul_(bufs, config.momentum)
            torch._foreach_add_(bufs, d_ps, alpha=1 - config.dampening)
        d_ps = list(torch._foreach_add(d_ps, bufs, alpha=config.momentum)) if config.nesterov else bufs
    torch._foreach_add_(list(params), d_ps, alpha=-config.lr)


def _state_names(config: Hyperparameters) -> tuple[str, ...]:
    return ("momentum_buffer",) if config.momentum else ()


RULE = Rule("sgd", sgd, _state_names, RuleDefaults(lr=0.05, momentum=0.9, betas=(0.9, 0.999), eps=1e-8))
