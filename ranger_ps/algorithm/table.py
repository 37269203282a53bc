"""A set of blocks with their values, versions, update counts and state, updated in a few torch calls.

This is what a shard holds (and what the in-process optimizer holds when it stands in for one):
values in flat per-dtype buffers (:class:`~ranger_ps.algorithm.blocks.BlockSpace`), and beside them
one flat buffer per state tensor of the outer rule or the rule, the truncation residual, a version
and an update count per block. :meth:`BlockTable.apply` takes a push (the blocks' pushed values end
to end, per segment) and applies truncation, then the outer rule or the rule, with one vectorized
pass per group of blocks at the same update count (a dense push is one group, and touches the
buffers without gathering).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ranger_ps.algorithm.blocks import BlockSpace, gather, runs, scatter
from ranger_ps.algorithm.outer import OuterSgd
from ranger_ps.algorithm.rules import BlockState, RuleConfig, rule_named, state_dtype
from ranger_ps.algorithm.rules.sgd import sgd
from ranger_ps.algorithm.rules.state import LOW_PRECISION
from ranger_ps.algorithm.truncation import truncate_runs


@dataclass(frozen=True)
class Part:
    """The pushed values of some blocks of one segment: ``local`` indices within the segment, and their
    values end to end in that order (any floating dtype: converted where they are applied)."""

    segment: int
    local: torch.Tensor
    values: torch.Tensor


class NonFiniteUpdate(ValueError):
    """An update that would make a weight NaN or infinite (nothing of it was applied)."""


@dataclass(frozen=True)
class _Staged:
    """Blocks' new values (and state) computed aside, waiting to be written."""

    segment: int
    local: torch.Tensor
    index: torch.Tensor | None
    values: torch.Tensor
    states: dict[str, torch.Tensor]
    residual: torch.Tensor | None


def _finite(values: torch.Tensor) -> bool:
    """Whether every value is finite (a finite sum proves it; only an overflowing one needs the check)."""
    return math.isfinite(float(values.sum())) or bool(torch.isfinite(values).all())


class BlockTable:
    """Blocks with values, versions, update counts, state and truncation residuals.

    Args:
        space: where the blocks live.
        config: the rule, the outer rule and truncation (what a push means).
        values: the values' buffers, one per segment (default: zeroed ones). Passing buffers shares
            them (the in-process optimizer's parameters, under the rule mode).
    """

    def __init__(self, space: BlockSpace, config: RuleConfig, values: list[torch.Tensor] | None = None) -> None:
        self.space = space
        self.config = config
        self.values = values if values is not None else space.buffers()
        self.versions = torch.zeros(len(space), dtype=torch.int64)
        self.steps = torch.zeros(len(space), dtype=torch.int64)
        self.state = {name: self._zeros() for name in config.state_names()}
        self.residual = self._zeros() if config.truncation_residual else None

    # -- applying pushes --------------------------------------------------------------------------

    def apply(self, parts: Sequence[Part], *, contributions: int = 1) -> None:
        """Apply one push (or, under bsp, the sum of ``contributions`` workers' pushes): truncation, then
        the outer rule or the rule; versions and update counts of the pushed blocks advance.

        All or nothing: every new value is computed aside first, and a push that would make a weight
        NaN or infinite changes nothing.

        Raises:
            NonFiniteUpdate: the update would make a weight non-finite.
        """
        staged = [piece for part in parts for piece in self._stage_part(part, contributions)]
        for piece in staged:
            if not _finite(piece.values):
                block = int(self.space.id_tensor[self.space.segments[piece.segment].positions[piece.local[0]]])
                raise NonFiniteUpdate(f"the update would make weights of block {block} (or a block with it) non-finite")
        for piece in staged:
            self._commit(piece)
        positions = torch.cat([self.space.segments[p.segment].positions[p.local] for p in parts]) if parts else None
        if positions is not None and positions.shape[0]:
            self.versions[positions] += 1
            self.steps[positions] += 1

    def _stage_part(self, part: Part, contributions: int) -> list[_Staged]:
        config = self.config
        segment = self.space.segments[part.segment]
        values = self.values[part.segment]
        simple = config.outer in ("mean", "sum") and not config.truncates and values.dtype not in LOW_PRECISION
        if simple:  # values[elements] + pushed / workers
            index = self.space.element_index(part.segment, part.local, values.device)
            new = gather(values, index).add_(part.values.to(values.dtype), alpha=self._add_scale(contributions))
            return [_Staged(part.segment, part.local, index, new, {}, None)]
        steps = self.steps[segment.positions[part.local]]
        lengths = segment.lengths[part.local]
        ends = torch.cumsum(lengths, 0)
        out = []
        for step in torch.unique(steps).tolist():
            members = (steps == step).nonzero().flatten()
            local = part.local[members]
            if len(members) == len(part.local):
                pushed = part.values
            else:  # this group's blocks' values, out of the push
                starts = ends[members] - lengths[members]
                pushed = gather(part.values, runs(starts, lengths[members]))
            out.append(self._stage_group(part.segment, local, pushed, int(step), contributions))
        return out

    def _add_scale(self, contributions: int) -> float:
        if self.config.outer == "mean":
            return 1.0 / (self.config.num_workers if contributions == 1 else contributions)
        return 1.0

    def _stage_group(
        self, segment: int, local: torch.Tensor, pushed: torch.Tensor, step: int, contributions: int
    ) -> _Staged:
        """Blocks that all had ``step`` updates: their new values and state, computed aside."""
        config = self.config
        values = self.values[segment]
        index = self.space.element_index(segment, local, values.device)
        compute = torch.float32 if values.dtype in LOW_PRECISION else values.dtype
        v = gather(values, index).to(compute)
        states = {name: gather(buffers[segment], index) for name, buffers in self.state.items()}
        residual = gather(self.residual[segment], index) if self.residual is not None else None
        g = pushed.to(compute)
        if config.truncates:
            owner = self.space.block_of_elements(segment, local).to(values.device)
            g = truncate_runs(config, g, residual, owner, len(local))
        if config.outer == "rule":
            g = g if contributions == 1 else g / contributions
            rule_named(config.rule).update(config, [v], [g], [BlockState(states)], step + 1, step + 1)
        elif config.outer == "sgd":
            outer = OuterSgd(config.outer_lr, config.outer_momentum)
            sgd(outer, [v], [g.mul(-1.0 / contributions)], [BlockState(states)], step + 1)
        else:
            v.add_(g, alpha=self._add_scale(contributions))
        return _Staged(segment, local, index, v, states, residual)

    def _commit(self, piece: _Staged) -> None:
        scatter(self.values[piece.segment], piece.index, piece.values)
        for name, buffers in self.state.items():
            if name in piece.states:
                scatter(buffers[piece.segment], piece.index, piece.states[name])
        if piece.residual is not None and self.residual is not None:
            scatter(self.residual[piece.segment], piece.index, piece.residual)

    def reconfigure(self, config: RuleConfig) -> None:
        """Apply later pushes under new settings (an lr schedule in process); state a new setting needs
        starts at zero, state it no longer needs is kept."""
        if config == self.config:
            return
        self.config = config
        for name in config.state_names():
            if name not in self.state:
                self.state[name] = self._zeros()
        if config.truncation_residual and self.residual is None:
            self.residual = self._zeros()

    def _zeros(self) -> list[torch.Tensor]:
        return [
            torch.zeros(s.numel, dtype=state_dtype(s.dtype), device=v.device)
            for s, v in zip(self.space.segments, self.values, strict=True)
        ]

    # -- reading ------------------------------------------------------------------------------------

    def changed(self, known: torch.Tensor | None) -> torch.Tensor:
        """Positions of the blocks whose version is above ``known`` (every block when None)."""
        if known is None:
            return torch.arange(len(self.space))
        return (self.versions > known).nonzero().flatten()

    def read(self, positions: torch.Tensor, *, copy: bool = True) -> list[Part]:
        """The current values of blocks, end to end per segment: copies, safe to send while updates go on
        (without ``copy``, a whole segment is the live buffer itself)."""
        if not copy:
            out = []
            for segment, local in self.space.by_segment(positions):
                index = self.space.element_index(segment, local, self.values[segment].device)
                out.append(Part(segment, local, _part(self.values[segment], index)))
            return out
        return [
            Part(
                segment,
                local,
                gather(self.values[segment], self.space.element_index(segment, local, self.values[segment].device)),
            )
            for segment, local in self.space.by_segment(positions)
        ]


def _part(buffer: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """The elements ``index`` of a buffer: the buffer itself when None (updated in place), a copy otherwise."""
    return buffer if index is None else buffer.index_select(0, index)
