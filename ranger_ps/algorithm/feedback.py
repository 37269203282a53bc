"""Error feedback: what a worker did not push waits in a per-block memory for a later push.

Stich et al., "Sparsified SGD with memory", NeurIPS 2018. Nothing here knows about gRPC or the
network.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

from ranger_ps.algorithm.layout import Block, Layout


class ErrorFeedback:
    """Per-block error-feedback memory (Stich et al., "Sparsified SGD with memory", NeurIPS 2018).

    Each step's gradient is added to the memory; the chosen blocks' memory is pushed and zeroed, the
    rest waits. So, at every step, everything pushed so far plus the memory equals the sum of all
    gradients: no gradient mass is lost, only delayed.

    Args:
        layout: the :class:`~ranger_ps.algorithm.layout.Layout` the blocks come from.
        residuals: one flat (1-D) tensor per parameter, in layout order, holding the residual
            memory; the caller owns them (they may be views into an optimizer's state, so this
            class only modifies them in place, never rebinds them).
        enabled: False gives plain random dropping (no memory; ``residuals`` are left untouched).

    Raises:
        ValueError: ``residuals`` do not match the layout's parameters.
    """

    def __init__(self, layout: Layout, residuals: Sequence[torch.Tensor], *, enabled: bool = True) -> None:
        if len(residuals) != len(layout.params):
            raise ValueError(f"expected {len(layout.params)} residual tensors, got {len(residuals)}")
        for param, residual in zip(layout.params, residuals, strict=True):
            if residual.dim() != 1 or residual.numel() != param.numel:
                raise ValueError(
                    f"{param.name}: residual must be flat with {param.numel} elements, "
                    f"got shape {tuple(residual.shape)}"
                )
        self.layout = layout
        self.enabled = enabled
        self._residuals = tuple(residuals)
        self._memory = layout.block_views(self._residuals)

    def _check(self, grads: Sequence[torch.Tensor], chosen: Sequence[int]) -> list[Block]:
        """Validate a step's input before anything is modified, so a bad call changes nothing."""
        if len(grads) != len(self._residuals):
            raise ValueError(f"expected {len(self._residuals)} gradient tensors, got {len(grads)}")
        for param, grad, residual in zip(self.layout.params, grads, self._residuals, strict=True):
            if grad.shape != residual.shape:
                raise ValueError(
                    f"{param.name}: gradient must be flat with shape {tuple(residual.shape)}, got {tuple(grad.shape)}"
                )
        blocks = self.layout.blocks
        seen: set[int] = set()
        out = []
        for raw in chosen:
            if isinstance(raw, bool):
                raise ValueError(f"block ids must be ints, got {raw!r}")
            block_id = operator.index(raw)
            if not 0 <= block_id < len(blocks):
                raise ValueError(f"block id {block_id} out of range [0, {len(blocks)})")
            if block_id in seen:
                raise ValueError(f"block id {block_id} chosen twice")
            seen.add(block_id)
            out.append(blocks[block_id])
        return out

    def _fold(self, grads: Sequence[torch.Tensor], blocks: Sequence[Block]) -> list[torch.Tensor]:
        """Add the gradients to the memory; the per-block sources of what to push (views)."""
        if not self.enabled:
            return [grads[b.param_index][b.offset : b.offset + b.numel] for b in blocks]
        for residual, grad in zip(self._residuals, grads, strict=True):
            residual.add_(grad)
        return [self._memory[b.block_id] for b in blocks]

    def _clear(self, blocks: Sequence[Block]) -> None:
        if self.enabled:
            for b in blocks:
                self._memory[b.block_id].zero_()

    @torch.no_grad()
    def select(self, grads: Sequence[torch.Tensor], chosen: Sequence[int]) -> list[torch.Tensor]:
        """Fold this step's gradients into the memory and take out the chosen blocks.

        Enabled: ``memory += grad``; each chosen block's memory is copied out and then zeroed;
        unchosen blocks keep their accumulated value. Disabled: the chosen blocks of ``grad`` are
        copied and the memory is untouched. Nothing is rescaled by ``1 / push_fraction`` (see the
        module docstring).

        Args:
            grads: one flat tensor per parameter, same shapes as the residuals.
            chosen: distinct block ids (e.g. from :func:`choose_blocks`).

        Returns:
            One new tensor per chosen block, in the order of ``chosen`` (never views of the memory,
            which the next step overwrites).

        Raises:
            ValueError: a gradient has the wrong shape, or a block id is out of range or repeated;
                nothing is modified then.
        """
        blocks = self._check(grads, chosen)
        pushed = [source.clone() for source in self._fold(grads, blocks)]
        self._clear(blocks)
        return pushed

    @torch.no_grad()
    def select_flat(self, grads: Sequence[torch.Tensor], chosen: Sequence[int]) -> list[torch.Tensor]:
        """Like :meth:`select`, but returns whole flat tensors, one per parameter.

        Each holds the pushed values at the chosen blocks and zeros elsewhere, with the shape of the
        gradient (and the dtype :meth:`select` would give): what a client that takes whole
        per-parameter tensors plus block ids needs.
        """
        blocks = self._check(grads, chosen)
        sources = self._fold(grads, blocks)
        like = self._residuals if self.enabled else grads
        out = [torch.zeros_like(t) for t in like]
        for b, source in zip(blocks, sources, strict=True):
            out[b.param_index][b.offset : b.offset + b.numel].copy_(source)
        self._clear(blocks)
        return out

    @torch.no_grad()
    def residual_norm(self) -> float:
        """L2 norm of the whole memory (0.0 when disabled), for reports."""
        if not self.enabled:
            return 0.0
        # Per-tensor norms in float64, combined with hypot: no overflow or precision loss from
        # squaring large float32 sums.
        norms = [float(torch.linalg.vector_norm(r.detach(), dtype=torch.float64)) for r in self._residuals]
        return math.hypot(*norms)
