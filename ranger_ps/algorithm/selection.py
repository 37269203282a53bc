"""The worker side of Ranger: random subsample, random block selection with error feedback.

Per step a worker (1) computes its gradient on a random subset of its minibatch
(:func:`subsample_indices`), optionally centralizing it (:func:`centralize_`), (2) adds the gradient
to a per-block residual memory, (3) pushes the memory of a random subset of blocks
(:func:`choose_blocks`, with a density from :func:`density_at`) and (4) zeroes what it pushed
(:class:`~ranger_ps.algorithm.feedback.ErrorFeedback` states it block by block; the optimizer's
flat buffers, :mod:`ranger_ps.optim.flat`, do the same for many blocks at once). Blocks not chosen
keep their residual for a later step (Stich et al., "Sparsified SGD with memory", NeurIPS 2018).
Every random draw comes from a generator seeded by :func:`derive_seed` from (seed, worker id, step,
purpose), so a run can be replayed exactly and any process can recompute which blocks a worker
pushed at a step.

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
from dataclasses import dataclass
from typing import ClassVar

import torch

from ranger_ps.settings import Settings, setting

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
class SelectionConfig(Settings):
    """How a worker picks the blocks it pushes (and the seed of every random draw)."""

    title: ClassVar[str] = "block selection"

    push_fraction: float = setting(1.0, "fraction of blocks pushed per step, in (0, 1] (1.0 = dense)")
    error_feedback: bool = setting(True, "keep what is not pushed for later pushes (off: drop it)")
    warmup_steps: int = setting(0, "steps over which the push density decays to --push-fraction (0: none)")
    warmup_start: float = setting(1.0, "push density at the first warm-up step, in [push fraction, 1]")
    seed: int = setting(0, "seeds model initialization, data order and block choice")
    local_steps: int = setting(1, "inner rule: push every H steps (DiLoCo-style local steps; 1 = every step)")

    def __post_init__(self) -> None:
        if not _is_real(self.push_fraction) or not 0 < self.push_fraction <= 1:
            raise ValueError(f"push_fraction must be in (0, 1], got {self.push_fraction!r}")
        if not isinstance(self.error_feedback, bool):
            raise ValueError(f"error_feedback must be a bool, got {self.error_feedback!r}")
        if not _is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not _is_real(self.warmup_start) or not self.push_fraction <= self.warmup_start <= 1:
            raise ValueError(
                f"warmup_start must be in [push_fraction, 1] = [{self.push_fraction}, 1], got {self.warmup_start!r}"
            )
        if not _is_int(self.seed) or not 0 <= self.seed <= _INT64_MAX:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        if not _is_int(self.local_steps) or self.local_steps < 1:
            raise ValueError(f"local_steps must be an int >= 1, got {self.local_steps!r}")
        super().__post_init__()


def check_fraction(name: str, value: object) -> None:
    """Raise ``ValueError`` unless ``value`` is a real number in (0, 1]."""
    if not _is_real(value) or not 0 < value <= 1:  # type: ignore[operator]
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


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
    return [int(i) for i in choose_block_ids(num_blocks, fraction, seed=seed, worker_id=worker_id, step=step).tolist()]


def choose_block_ids(num_blocks: int, fraction: float, *, seed: int, worker_id: int, step: int) -> torch.Tensor:
    """:func:`choose_blocks` as a sorted int64 tensor (what the flat engine indexes with)."""
    if fraction >= 1:
        block_count(num_blocks, fraction)  # validates num_blocks
        return torch.arange(num_blocks, dtype=torch.int64)
    return _draw(num_blocks, fraction, _generator(seed, worker_id, step, _PURPOSE_BLOCKS))


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
