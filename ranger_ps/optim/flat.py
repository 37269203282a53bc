"""The optimizer's flat buffers: its parameters, what it owes the cluster, and its rule state.

All are laid out by one :class:`~ranger_ps.algorithm.blocks.BlockSpace` over every block of the
layout, so a block is a run of a buffer and choosing, gathering, quantizing and landing blocks are
a few vectorized torch calls whatever the push fraction. The parameters themselves become views
into the parameter buffers (the way DDP's gradient buckets and FSDP's flat parameters work): the
model keeps its tensors, their storage is the optimizer's.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ranger_ps.algorithm.blocks import BlockSpace, gather, scatter
from ranger_ps.algorithm.dtypes import dtype_named, dtype_of
from ranger_ps.algorithm.layout import Layout
from ranger_ps.algorithm.quantize import quantize_blocks
from ranger_ps.algorithm.rules import state_dtype
from ranger_ps.client.backend import Run

Buffers = list[torch.Tensor]
"""One flat tensor per segment of the block space."""


class FlatState:
    """Flat buffers over every block of a layout, with per-parameter views.

    Args:
        layout: the parameters' layout.
        params: the parameters, in layout order; from now on their storage is :attr:`params`.
        names: the state buffers wanted besides the parameters (zeroed, in the state dtype).

    Raises:
        ValueError: parameters of one dtype live on different devices.
    """

    def __init__(self, layout: Layout, params: Sequence[torch.Tensor], names: Iterable[str]) -> None:
        self.layout = layout
        self.space = BlockSpace(layout)
        self.spans = [self.space.param_span(i) for i in range(len(params))]
        devices: dict[int, torch.device] = {}
        for (segment, _, _), p in zip(self.spans, params, strict=True):
            if devices.setdefault(segment, p.device) != p.device:
                raise ValueError(
                    "Ranger keeps each dtype's parameters in one flat buffer: parameters of one dtype must be on "
                    f"one device (found {devices[segment]} and {p.device})"
                )
        self.devices = [devices.get(i, torch.device("cpu")) for i in range(len(self.space.segments))]
        self.params: Buffers = [
            torch.empty(s.numel, dtype=s.dtype, device=d)
            for s, d in zip(self.space.segments, self.devices, strict=True)
        ]
        with torch.no_grad():
            for p, view in zip(params, self.param_views(self.params), strict=True):
                view.copy_(p.detach().reshape(-1))
                p.data = view.view(p.shape)
        self._bound = [p.data_ptr() for p in params]
        self.buffers: dict[str, Buffers] = {name: self.zeros() for name in names}
        self.block_param = torch.tensor([b.param_index for b in layout.blocks], dtype=torch.int64)

    def zeros(self) -> Buffers:
        """New zeroed buffers in the state dtype, one per segment."""
        return [
            torch.zeros(s.numel, dtype=state_dtype(s.dtype), device=d)
            for s, d in zip(self.space.segments, self.devices, strict=True)
        ]

    def buffer(self, name: str) -> Buffers:
        """The state buffers called ``name`` (created zeroed the first time)."""
        if name not in self.buffers:
            self.buffers[name] = self.zeros()
        return self.buffers[name]

    def param_views(self, buffers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each parameter's flat view into ``buffers``."""
        return [buffers[segment][start:end] for segment, start, end in self.spans]

    def check_bound(self, params: Sequence[torch.Tensor]) -> None:
        """Refuse to go on when a parameter no longer lives in its buffer (``model.to()`` or ``.half()``
        after creating the optimizer gives a parameter new storage: the optimizer would train a copy)."""
        for index, (p, pointer) in enumerate(zip(params, self._bound, strict=True)):
            if p.data_ptr() != pointer:
                raise RuntimeError(
                    f"parameter {self.layout.params[index].name!r} was given new storage after the optimizer was "
                    "created (model.to(), .half(), ...): create the optimizer after moving the model"
                )

    def trained_blocks(self, block_ids: torch.Tensor, has_grad: Sequence[bool]) -> torch.Tensor:
        """The blocks of ``block_ids`` whose parameter has a gradient this step."""
        if all(has_grad):
            return block_ids
        mask = torch.tensor(list(has_grad), dtype=torch.bool)[self.block_param[block_ids]]
        return block_ids[mask]

    def nonzero_blocks(self, buffers: Buffers) -> torch.Tensor:
        """Ids (ascending) of the blocks with a nonzero element in ``buffers``."""
        found = []
        for segment, (info, buffer) in enumerate(zip(self.space.segments, buffers, strict=True)):
            if not len(info.positions):
                continue
            owner = self.space.block_of_elements(segment, torch.arange(len(info.positions))).to(buffer.device)
            mass = torch.zeros(len(info.positions), dtype=torch.float64, device=buffer.device)
            mass.index_add_(0, owner, buffer.abs().double())
            found.append(self.space.id_tensor[info.positions[(mass > 0).cpu()]])
        return torch.sort(torch.cat(found)).values if found else torch.zeros(0, dtype=torch.int64)

    # -- pushing and landing ----------------------------------------------------------------------

    def take(self, owed: Buffers, block_ids: torch.Tensor, dtype: str | None) -> list[Run]:
        """Take blocks out of ``owed`` (a residual): one run per segment, in ``dtype`` (default: the
        parameters' own).

        What the shards will add is subtracted from ``owed``: all of it for a lossless push, leaving
        the rounding error otherwise (it waits there like a block not chosen).
        """
        out = []
        for segment, local in self.space.by_segment(self.space.positions(block_ids)):
            info = self.space.segments[segment]
            index = self.space.element_index(segment, local, owed[segment].device)
            values = gather(owed[segment], index)
            run = quantized(info.positions[local], values, info.lengths[local], dtype or dtype_of(info.dtype).name)
            if run.scales is None and run.values.dtype == values.dtype:  # lossless: paid in full
                if index is None:
                    owed[segment].zero_()
                else:
                    owed[segment].index_fill_(0, index, 0)
            else:
                sent = run.dequantized(values.dtype, info.lengths[local].to(values.device))
                scatter(owed[segment], index, values.sub_(sent))
            out.append(Run(self.space.id_tensor[run.block_ids], run.values.to("cpu"), _cpu(run.scales)))
        return out

    def drop_unchosen(self, owed: Buffers, block_ids: torch.Tensor) -> None:
        """Plain random dropping (error feedback off): what is owed outside ``block_ids`` leaves the
        parameters and the residual, as if it had never been computed."""
        for segment, (params, residual) in enumerate(zip(self.params, owed, strict=True)):
            local = self._local_in(segment, block_ids)
            index = self.space.element_index(segment, local, residual.device) if len(local) else None
            kept = gather(residual, index) if len(local) else None
            params.sub_(residual.to(params.dtype))
            residual.zero_()
            if kept is not None and index is not None:
                params.index_add_(0, index, kept.to(params.dtype))
                residual.index_copy_(0, index, kept)
            elif kept is not None:  # every block of the segment was chosen
                params.add_(kept.to(params.dtype))
                residual.copy_(kept)

    def _local_in(self, segment: int, block_ids: torch.Tensor) -> torch.Tensor:
        for index, local in self.space.by_segment(self.space.positions(block_ids)):
            if index == segment:
                return local
        return torch.zeros(0, dtype=torch.int64)

    def land(self, runs: Sequence[Run], *, residual: Buffers | None = None, slow: Buffers | None = None) -> None:
        """Write pulled blocks into the parameters: as they are, or as ``pulled + residual`` when given.

        ``slow`` (Lookahead's slow weights) moves by as much as the parameters do, so landing never
        pulls the slow weights away from this worker's own trajectory.
        """
        for run in runs:
            ((segment, local),) = self.space.by_segment(self.space.positions(run.block_ids))
            params = self.params[segment]
            index = self.space.element_index(segment, local, params.device)
            new = run.values.to(params.device)
            if residual is not None:
                new = new.to(residual[segment].dtype) + gather(residual[segment], index)
            if slow is not None:
                moved = new - gather(params, index).to(new.dtype)
                if index is None:
                    slow[segment].add_(moved)
                else:
                    slow[segment].index_add_(0, index, moved)
            scatter(params, index, new)


def quantized(block_ids: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor, dtype: str) -> Run:
    """A run of blocks as pushed: in a floating dtype, or int8 with a scale per block."""
    if dtype != "int8":
        return Run(block_ids, values.to(dtype_named(dtype).torch_dtype))
    levels, scales = quantize_blocks(values, lengths)
    return Run(block_ids, levels, scales)


def _cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.to("cpu")
