"""A block's rule state: its update count, its state tensors and its truncation residual.

State tensors are allocated up front (:func:`new_block_state`) so the in-process optimizer can keep
them as views into per-parameter tensors; low-precision parameters (float16, bfloat16) keep float32
state and are updated in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


class BlockState:
    """One block's rule state: its update count and its state tensors.

    ``counter`` is a one-element int64 tensor (so it can be a view into an optimizer's state and
    travel in ``state_dict``); ``tensors`` maps state names to flat tensors of the block's size.
    """

    __slots__ = ("counter", "tensors", "residual")

    def __init__(
        self,
        tensors: dict[str, torch.Tensor] | None = None,
        counter: torch.Tensor | None = None,
        residual: torch.Tensor | None = None,
    ) -> None:
        self.tensors = tensors if tensors is not None else {}
        self.counter = counter if counter is not None else torch.zeros(1, dtype=torch.int64)
        self.residual = residual  # truncation residual, when the settings keep one

    @property
    def step(self) -> int:
        """Updates this block has received."""
        return int(self.counter[0])

    def advance(self) -> None:
        self.counter.add_(1)


def state_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """Rule state is float32 for low-precision parameters, the parameter's dtype otherwise."""
    return torch.float32 if param_dtype in LOW_PRECISION else param_dtype


def zeroed_state(names: Sequence[str], numel: int, param_dtype: torch.dtype, *, residual: bool) -> BlockState:
    """A fresh, zeroed state with the named tensors (and a truncation residual when asked)."""
    dtype = state_dtype(param_dtype)
    tensors = {name: torch.zeros(numel, dtype=dtype) for name in names}
    return BlockState(tensors, residual=torch.zeros(numel, dtype=dtype) if residual else None)


def in_compute_precision(values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors updates are computed in: float32 copies of low-precision values, the values themselves otherwise."""
    return [v.float() if v.dtype in LOW_PRECISION else v for v in values]


def store_back(values: Sequence[torch.Tensor], computed: Sequence[torch.Tensor]) -> None:
    """Write float32 results back into the low-precision values they were computed for."""
    pairs = [(v, c) for v, c in zip(values, computed, strict=True) if c is not v]
    if pairs:
        torch._foreach_copy_([v for v, _ in pairs], [c for _, c in pairs])


def by_step(states: Sequence[BlockState]) -> dict[int, list[int]]:
    """Positions of the states, grouped by their update count (blocks at one step update together)."""
    groups: dict[int, list[int]] = {}
    for index, state in enumerate(states):
        groups.setdefault(state.step, []).append(index)
    return groups
