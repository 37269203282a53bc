"""The optimizer's backend in this process: the shards' update, applied to the parameters here.

What a one-worker cluster does, without servers: each pushed block is truncated and updated with
its param group's rule and its own state. The state lives in the optimizer's ``state`` (views into
per-parameter tensors), so ``state_dict()`` carries it like any torch optimizer's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ranger_ps.algorithm.layout import Layout
from ranger_ps.algorithm.rules import BlockState, RuleConfig, apply_update
from ranger_ps.client.backend import Traffic
from ranger_ps.wire.stats import ShardStats

BlockStateOf = Callable[[int], BlockState]
"""The state of a block, by id (views into the optimizer's per-parameter state)."""


class LocalBackend:
    """Applies pushed blocks to the parameters in place.

    Args:
        layout: the parameters' layout.
        params: the parameters, in layout order.
        configs: each parameter's rule settings (its param group's), read at every step so that lr
            schedulers and per-group settings apply.
        block_state: the state of a block, by id.
    """

    def __init__(
        self,
        layout: Layout,
        params: Sequence[torch.Tensor],
        configs: Callable[[], Sequence[RuleConfig]],
        block_state: BlockStateOf,
    ) -> None:
        self.layout = layout
        self._params = list(params)
        self._configs = configs
        self._block_state = block_state

    @property
    def worker_id(self) -> int:
        return 0

    @property
    def traffic(self) -> Traffic:
        return Traffic()

    def exchange(self, pushed: Sequence[torch.Tensor], chosen: Sequence[int], step: int) -> None:
        configs = self._configs()
        views = self.layout.block_views([p.data.view(-1) for p in self._params])
        by_config: dict[RuleConfig, tuple[list[torch.Tensor], list[torch.Tensor], list[BlockState]]] = {}
        for block_id in chosen:
            block = self.layout.blocks[block_id]
            params, grads, states = by_config.setdefault(configs[block.param_index], ([], [], []))
            params.append(views[block_id])
            grads.append(pushed[block.param_index][block.offset : block.offset + block.numel])
            states.append(self._block_state(block_id))
        for config, (params, grads, states) in by_config.items():
            apply_update(config, params, grads, states)

    def synchronize(self) -> None:
        """Nothing is ever in flight in process."""

    def refresh(self) -> None:
        """The parameters are always current in process."""

    def stats(self) -> list[ShardStats]:
        return []

    def close(self) -> None:
        """Nothing to let go of."""
