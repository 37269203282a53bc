"""The worker side of Ranger: random subsample, random block selection with error feedback.

Per step a worker (1) computes its gradient on a random subset of its minibatch
(:func:`subsample_indices`), optionally centralizing it (:func:`centralize_`), (2) adds the gradient
to a per-block residual memory, (3) pushes the memory of a random subset of blocks
(:func:`choose_blocks`, with a density from :func:`density_at`) and (4) zeroes what it pushed
(:class:`ErrorFeedback`). Blocks not chosen keep their residual for a later step (Stich et al.,
"Sparsified SGD with memory", NeurIPS 2018). Every random draw comes from a generator seeded by
:func:`derive_seed` from (seed, worker id, step, purpose), so a run can be replayed exactly and any
process can recompute which blocks a worker pushed at a step.

Pushed values are *not* rescaled by ``1 / push_fraction``. Rescaling would make each push an
unbiased estimate of the dense gradient, but its variance grows like ``1 / push_fraction``; with a
momentum-based server rule that noise is amplified, and at small fractions training diverges or
converges worse. Error feedback instead delivers every bit of gradient mass eventually: a block
waits on average ``1 / push_fraction`` steps (geometrically distributed) and then sends everything
it accumulated, so the delay is bounded in expectation and nothing is lost or inflated.

Nothing here knows about gRPC or the network.
"""

from __future__ import annotations

import hashlib
import math
import operator
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ranger_ps.algorithm.layout import Block, Layout

# Purpose tags for derive_seed, so the block choice and the subsample of one step are independent.
_PURPOSE_BLOCKS = 1
_PURPOSE_SUBSAMPLE = 2
# Rounding before ceil, so 0.07 * 100 = 7.000000000000001 counts as 7 blocks.
_COUNT_DECIMALS = 9
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_SEED_MASK = (1 << 63) - 1


def _is_real(value: object) -> bool:
    # bool is an int subclass; True as a fraction is far more likely a mistake than a choice.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SelectionConfig:
    """How a worker picks what to compute on and what to push.

    Attributes:
        push_fraction: fraction of blocks pushed per step, in (0, 1].
        error_feedback: keep unpushed gradient in a residual memory (False: drop it).
        subsample: fraction of the minibatch the gradient is computed on, in (0, 1].
        warmup_steps: length of the density warm-up, >= 0 (0: no warm-up).
        warmup_start: density at step 1 of the warm-up, in [push_fraction, 1]; it decays
            geometrically to ``push_fraction`` (see :func:`density_at`).
        seed: base of every random draw, in [0, 2**63).
    """

    push_fraction: float = 1.0
    error_feedback: bool = True
    subsample: float = 1.0
    warmup_steps: int = 0
    warmup_start: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not _is_real(self.push_fraction) or not 0 < self.push_fraction <= 1:
            raise ValueError(f"push_fraction must be in (0, 1], got {self.push_fraction!r}")
        if not isinstance(self.error_feedback, bool):
            raise ValueError(f"error_feedback must be a bool, got {self.error_feedback!r}")
        if not _is_real(self.subsample) or not 0 < self.subsample <= 1:
            raise ValueError(f"subsample must be in (0, 1], got {self.subsample!r}")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not _is_real(self.warmup_start) or not self.push_fraction <= self.warmup_start <= 1:
            raise ValueError(
                f"warmup_start must be in [push_fraction, 1] = [{self.push_fraction}, 1], got {self.warmup_start!r}"
            )
        if not _is_int(self.seed) or not 0 <= self.seed <= _INT64_MAX:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, worker id, step, a purpose tag, ...).

    The seed is the first 8 bytes (little-endian) of the sha256 of the parts' little-endian signed
    8-byte encodings, with the top bit cleared. It is stable across processes, platforms and Python
    versions, unlike ``hash()``, which is salted per process.

    Args:
        *parts: integers in the signed 64-bit range.

    Returns:
        An int in [0, 2**63), suitable for ``torch.Generator.manual_seed``.

    Raises:
        ValueError: a part is not an integer or does not fit in 64 signed bits.
    """
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, bool):
            raise ValueError(f"seed parts must be ints, got {part!r}")
        try:
            value = operator.index(part)
        except TypeError:
            raise ValueError(f"seed parts must be ints, got {part!r}") from None
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"seed part {value} does not fit in a signed 64-bit integer")
        digest.update(struct.pack("<q", value))
    return int.from_bytes(digest.digest()[:8], "little") & _SEED_MASK


def _generator(*parts: int) -> torch.Generator:
    # Always a CPU generator: its stream is the same on every machine, whatever device trains.
    return torch.Generator(device="cpu").manual_seed(derive_seed(*parts))


def density_at(step: int, config: SelectionConfig) -> float:
    """Fraction of blocks to push at 1-based ``step``.

    During the warm-up (``step <= warmup_steps``) the density decays geometrically from
    ``warmup_start`` at step 1 towards ``push_fraction`` at step ``warmup_steps + 1``:
    ``warmup_start * (push_fraction / warmup_start) ** ((step - 1) / warmup_steps)``. Afterwards,
    and always when ``warmup_steps == 0``, it is ``push_fraction``. Dense early steps matter because
    the first gradients are the largest and the residual memory is still empty.

    Raises:
        ValueError: ``step < 1``.
    """
    if not _is_int(step) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")
    low, high = float(config.push_fraction), float(config.warmup_start)
    if step > config.warmup_steps:
        return low
    density: float = high * (low / high) ** ((step - 1) / config.warmup_steps)
    # Float error must not push the value outside the band the warm-up promises.
    return min(high, max(low, density))


def block_count(num_blocks: int, fraction: float) -> int:
    """How many of ``num_blocks`` a ``fraction`` selects: ``ceil(fraction * num_blocks)``.

    At least 1 when ``num_blocks > 0`` (a step always sends something), at most ``num_blocks``,
    0 for 0 blocks. The product is rounded to 9 decimals before the ceiling so that float error
    does not add a block (``0.07 * 100`` is 7.000000000000001 in binary floating point).

    Raises:
        ValueError: ``num_blocks < 0`` or ``fraction`` is not > 0.
    """
    if not _is_int(num_blocks) or num_blocks < 0:
        raise ValueError(f"num_blocks must be an int >= 0, got {num_blocks!r}")
    if not _is_real(fraction) or not fraction > 0:
        raise ValueError(f"fraction must be > 0, got {fraction!r}")
    if num_blocks == 0:
        return 0
    if fraction >= 1:
        return num_blocks
    count = math.ceil(round(fraction * num_blocks, _COUNT_DECIMALS))
    return min(num_blocks, max(1, count))


def _draw(n: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """``block_count(n, fraction)`` distinct values of ``range(n)``, sorted, as int64."""
    k = block_count(n, fraction)
    # randperm is a uniform permutation, so its first k entries are a uniform k-subset.
    picked = torch.randperm(n, generator=generator, dtype=torch.int64)[:k]
    return torch.sort(picked).values


def choose_blocks(num_blocks: int, fraction: float, *, seed: int, worker_id: int, step: int) -> list[int]:
    """The block ids a worker pushes at a step.

    ``block_count(num_blocks, fraction)`` distinct ids drawn uniformly without replacement from a
    CPU ``torch.Generator`` seeded with ``derive_seed(seed, worker_id, step, 1)``, sorted ascending.
    The same arguments give the same ids in any process.

    Args:
        num_blocks: ``layout.num_blocks``.
        fraction: density of this step (usually :func:`density_at`); ``>= 1`` returns every block
            without drawing.
        seed: the run's seed (``SelectionConfig.seed``).
        worker_id: this worker's id, so workers push different blocks.
        step: the worker's 1-based step.

    Returns:
        Sorted, distinct block ids.
    """
    if fraction >= 1:
        block_count(num_blocks, fraction)  # validates num_blocks
        return list(range(num_blocks))
    picked = _draw(num_blocks, fraction, _generator(seed, worker_id, step, _PURPOSE_BLOCKS))
    return [int(i) for i in picked.tolist()]


def subsample_indices(batch_size: int, fraction: float, *, seed: int, worker_id: int, step: int) -> torch.Tensor:
    """Indices of the minibatch examples to compute the gradient on.

    ``block_count(batch_size, fraction)`` of them (so at least one for a non-empty batch), drawn
    without replacement from a CPU generator seeded with ``derive_seed(seed, worker_id, step, 2)``.

    Args:
        batch_size: examples in the minibatch.
        fraction: ``SelectionConfig.subsample``; ``>= 1`` returns ``torch.arange(batch_size)``.
        seed: the run's seed.
        worker_id: this worker's id.
        step: the worker's 1-based step.

    Returns:
        A sorted int64 CPU tensor (move it to the batch's device to index).
    """
    if fraction >= 1:
        block_count(batch_size, fraction)  # validates batch_size
        return torch.arange(batch_size, dtype=torch.int64)
    return _draw(batch_size, fraction, _generator(seed, worker_id, step, _PURPOSE_SUBSAMPLE))


def centralize_(grad: torch.Tensor) -> torch.Tensor:
    """Gradient centralization (Yong et al., 2020) in place, as the reference Ranger does it.

    For a tensor with more than one dimension, subtract its mean over all dimensions but the first
    (one mean per output channel or row). Biases and other 1-D tensors are left unchanged: their
    one "row" is the whole tensor and centering it would remove its signal.

    Returns:
        ``grad``, modified in place.
    """
    if grad.dim() > 1:
        grad.sub_(grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True))
    return grad


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
