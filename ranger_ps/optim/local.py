"""The optimizer's backend in this process: what one shard holding every block would do.

Each push is applied with :func:`~ranger_ps.algorithm.updates.apply_pushed`, the shards' own
update (truncation, then the update rule or the outer rule), to blocks that live in the
optimizer's ``state`` (views into per-parameter tensors), so ``state_dict()`` carries everything
like any torch optimizer's. Under the classic rule mode the pushed blocks are the parameters
themselves; otherwise they are the server copy, and the blocks that changed are handed back for the
optimizer to land in its view.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ranger_ps.algorithm.layout import Layout
from ranger_ps.algorithm.quantize import Quantized, dequantize
from ranger_ps.algorithm.rules import BlockState, RuleConfig
from ranger_ps.algorithm.updates import apply_pushed
from ranger_ps.client.backend import OutgoingBlock, PulledBlock, Traffic
from ranger_ps.wire.stats import ShardStats

BlockOf = Callable[[int], tuple[torch.Tensor, BlockState]]
"""A block's values and state, by id (views into the optimizer's per-parameter tensors)."""


class LocalBackend:
    """Applies pushed blocks in place, as a one-shard cluster would (at once: never overlapped).

    Args:
        layout: the parameters' layout.
        configs: each parameter's rule settings (its param group's), read at every push so that lr
            schedulers and per-group settings apply.
        block: a block's values and state, by id.
        hands_back: whether the blocks it updates are a server copy the optimizer lands (otherwise
            they are the parameters themselves).
    """

    def __init__(
        self,
        layout: Layout,
        configs: Callable[[], Sequence[RuleConfig]],
        block: BlockOf,
        *,
        hands_back: bool,
    ) -> None:
        self.layout = layout
        self._configs = configs
        self._block = block
        self._hands_back = hands_back
        self._changed: dict[int, None] = {}
        self.overlap = False

    @property
    def worker_id(self) -> int:
        return 0

    @property
    def traffic(self) -> Traffic:
        return Traffic()

    def exchange(self, blocks: Sequence[OutgoingBlock], steps: int) -> None:
        configs = self._configs()
        by_config: dict[RuleConfig, tuple[list[torch.Tensor], list[torch.Tensor], list[BlockState]]] = {}
        for outgoing in blocks:
            values, state = self._block(outgoing.block_id)
            config = configs[self.layout.blocks[outgoing.block_id].param_index]
            group = by_config.setdefault(config, ([], [], []))
            group[0].append(values)
            group[1].append(dequantize(Quantized(outgoing.payload, outgoing.scale or None), values.dtype))
            group[2].append(state)
            if self._hands_back:
                self._changed[outgoing.block_id] = None
        for config, (block_values, pushed, states) in by_config.items():
            apply_pushed(config, block_values, pushed, states)

    def collect(self) -> list[PulledBlock]:
        changed, self._changed = self._changed, {}
        return [PulledBlock(block_id, 0, self._block(block_id)[0]) for block_id in changed]

    def pull_all(self) -> list[PulledBlock]:
        return self.collect()

    def stats(self) -> list[ShardStats]:
        return []

    def close(self) -> None:
        """Nothing to let go of."""
