"""Server-side gradient truncation and clipping, applied before the update rule.

Order, per block: add the truncation residual (when kept), zero the entries with
``|g| < truncate_below`` (the zeroed part becomes the new residual), clamp entries to
``clip_value``, scale the block to an L2 norm of at most ``clip_norm`` (the coefficient
``clip_norm / (norm + 1e-6)`` capped at 1, as ``torch.nn.utils.clip_grad_norm_`` computes it).
Everything is off by default, and then the gradient is returned as it came (no copy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ranger_ps.settings import Settings, setting


def check_finite(name: str, value: float, *, low: float | None = None, high: float | None = None) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is finite and within ``[low, high]``."""
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


@dataclass(frozen=True)
class TruncationSettings(Settings):
    """What the shards do to a pushed block before the update rule."""

    title: ClassVar[str] = "server-side truncation"

    truncate_below: float = setting(0.0, "server side: zero pushed entries with |x| below this (0 = off)")
    truncation_residual: bool = setting(False, "server side: keep what truncation removed and apply it later")
    clip_value: float | None = setting(None, "server side: clamp pushed entries to this magnitude")
    clip_norm: float | None = setting(None, "server side: cap each pushed block's L2 norm")

    def __post_init__(self) -> None:
        check_finite("truncate_below", self.truncate_below, low=0.0)
        for name in ("clip_value", "clip_norm"):
            value = getattr(self, name)
            if value is not None:
                check_finite(name, value)
                if not value > 0:
                    raise ValueError(f"{name} must be > 0 when set, got {value}")
        super().__post_init__()

    @property
    def truncates(self) -> bool:
        """Whether any truncation or clipping is on."""
        return (
            self.truncate_below > 0
            or self.truncation_residual
            or self.clip_value is not None
            or self.clip_norm is not None
        )


def truncate(config: TruncationSettings, grad: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
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


def truncate_runs(
    config: TruncationSettings,
    pushed: torch.Tensor,
    residual: torch.Tensor | None,
    block_of_element: torch.Tensor,
    blocks: int,
) -> torch.Tensor:
    """:func:`truncate` over many blocks laid end to end in one flat tensor, in a few vectorized calls.

    ``block_of_element`` says which of the ``blocks`` each element belongs to (clipping by norm is per
    block). ``residual`` (the same elements' truncation residual, when kept) is updated in place;
    ``pushed`` is never modified.
    """
    g = pushed
    if residual is not None:
        g = g + residual
    if config.truncate_below > 0:
        kept = torch.where(g.abs() >= config.truncate_below, g, torch.zeros((), dtype=g.dtype))
        if residual is not None:
            residual.copy_(g - kept)
        g = kept
    elif residual is not None:
        residual.zero_()
    if config.clip_value is not None:
        g = g.clamp(-config.clip_value, config.clip_value)
    if config.clip_norm is not None:
        squares = torch.zeros(blocks, dtype=torch.float64, device=g.device).index_add_(
            0, block_of_element, g.double().square()
        )
        coef = torch.clamp(config.clip_norm / (squares.sqrt() + 1e-6), max=1.0).to(g.dtype)
        g = g * coef[block_of_element]
    return g
