"""Server-side gradient truncation and clipping, applied before the update rule.

Order, per block: add the truncation residual (when kept), zero the entries with
``|g| < truncate_below`` (the zeroed part becomes the new residual), clamp entries to
``clip_value``, scale the block to an L2 norm of at most ``clip_norm`` (the coefficient
``clip_norm / (norm + 1e-6)`` capped at 1, as ``torch.nn.utils.clip_grad_norm_`` computes it).
Everything is off by default, and then the gradient is returned as it came (no copy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ranger_ps.algorithm.rules import RuleConfig


def truncate(config: RuleConfig, grad: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """The gradient to apply for one block; ``residual`` (when given) is updated in place.

    ``grad`` itself is never modified.
    """
    g = grad
    if residual is not None:
        g = g + residual
    if config.truncate_below > 0:
        keep = g.abs() >= config.truncate_below
        kept = torch.where(keep, g, torch.zeros((), dtype=g.dtype))
        if residual is not None:
            residual.copy_(g - kept)
        g = kept
    elif residual is not None:
        residual.zero_()
    if config.clip_value is not None:
        g = g.clamp(-config.clip_value, config.clip_value)
    if config.clip_norm is not None:
        norm = torch.linalg.vector_norm(g)
        coef = torch.clamp(config.clip_norm / (norm + 1e-6), max=1.0)
        g = g * coef
    return g
