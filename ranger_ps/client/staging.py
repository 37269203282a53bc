"""Moving blocks between an accelerator and the wire through pinned host memory.

A model on a GPU pushes gradients and receives weights as host bytes. Copying straight from device
tensors into pageable memory makes every copy synchronous and staged by the driver; instead each
parameter gets two page-locked (pinned) host buffers, one for pushes and one for pulls, and only the
blocks that move are copied, asynchronously (``non_blocking=True``):

- push: the chosen blocks are copied device -> pinned buffer, the copying streams are synchronized
  once (the frames are encoded from the buffer right after), and the client encodes frames from
  the buffer;
- pull: each pulled block is copied from the received message into the pinned buffer, then
  pinned buffer -> device asynchronously; an event recorded after the copies is waited on before
  the buffer is written again, so the device never reads a buffer being overwritten.

On a machine without CUDA the buffers are ordinary memory and the copies are plain copies (the
same code path, which is how the tests exercise it).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ranger_ps.algorithm.layout import Layout

if TYPE_CHECKING:
    from ranger_ps.client.backend import PulledBlock


def needs_staging(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether any tensor lives off the CPU (and so should go through pinned staging buffers)."""
    return any(t.device.type != "cpu" for t in tensors)


class PinnedStaging:
    """Pinned host buffers for one layout's parameters, for the push and the pull direction.

    Args:
        layout: the parameters and their blocks.
        devices: the device of each layout parameter (where its gradients and weights live).
        pin: page-lock the buffers (default: when CUDA is available).
    """

    def __init__(self, layout: Layout, devices: Sequence[torch.device], *, pin: bool | None = None) -> None:
        if len(devices) != len(layout.params):
            raise ValueError(f"expected {len(layout.params)} devices, got {len(devices)}")
        pin = torch.cuda.is_available() if pin is None else pin
        self.layout = layout
        self.devices = list(devices)
        self.push_buffers = [torch.empty(p.numel, dtype=p.torch_dtype, pin_memory=pin) for p in layout.params]
        self.pull_buffers = [torch.empty(p.numel, dtype=p.torch_dtype, pin_memory=pin) for p in layout.params]
        self._push_views = layout.block_views(self.push_buffers)
        self._pull_views = layout.block_views(self.pull_buffers)
        self._pull_done: list[Any] = []  # CUDA events recorded after the last host -> device copies

    def to_host(self, flats: Sequence[torch.Tensor], block_ids: Iterable[int] | None) -> list[torch.Tensor]:
        """Copy the blocks ``block_ids`` (all when None) of per-parameter flat tensors into the push buffers.

        Returns the push buffers (flat, per parameter). Only the named blocks are current: pass the
        same ``block_ids`` to the client. The buffers may be written again once the client has
        encoded its frames (``ShardedClient.push`` does that before it returns).
        """
        ids = range(self.layout.num_blocks) if block_ids is None else block_ids
        used: set[torch.device] = set()
        for block_id in ids:
            block = self.layout.blocks[block_id]
            source = flats[block.param_index][block.offset : block.offset + block.numel]
            self._push_views[block_id].copy_(source.detach(), non_blocking=True)
            used.add(source.device)
        for device in used:
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()  # the bytes are in host memory now
        return self.push_buffers

    def to_device(self, blocks: Iterable[PulledBlock], block_views: Sequence[torch.Tensor]) -> int:
        """Copy pulled blocks into ``block_views`` (the parameters' per-block views) through the pull buffers.

        Returns the number of blocks copied. The device copies are asynchronous; work queued
        afterwards on the same stream (the next forward pass) sees them.
        """
        for event in self._pull_done:
            event.synchronize()  # the previous copies out of the pull buffers are complete
        self._pull_done = []
        used: set[torch.device] = set()
        count = 0
        with torch.no_grad():
            for block in blocks:
                staged = self._pull_views[block.block_id]
                staged.copy_(block.values)
                target = block_views[block.block_id]
                target.copy_(staged, non_blocking=True)
                used.add(target.device)
                count += 1
        for device in used:
            if device.type == "cuda":
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(torch.cuda.current_stream(device))
                self._pull_done.append(event)
        return count
