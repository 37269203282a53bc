"""``bench apply``: the server-side update per rule in GB/s of parameters, beside a plain copy.

Each rule (:func:`ranger_ps.algorithm.rules.apply_update`) updates a model's blocks as a shard
does, beside ``torch``'s copy of the same bytes (the memory-bandwidth limit) whole and block by
block. Given the server's store (the command line passes ``ranger_ps.server.store.ShardStore``;
the library never imports the server), it also times a shard's whole push path for sgd: decoding
and checking every received block, then applying the rule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from ranger_ps.algorithm.layout import Layout, ParamInfo
from ranger_ps.algorithm.rules import RuleConfig, apply_update, new_block_state
from ranger_ps.bench import common
from ranger_ps.bench.settings import ApplySettings
from ranger_ps.config.train import TrainConfig
from ranger_ps.wire.codec import codec_for_name, tensor_bytes
from ranger_ps.wire.frames import WireBlock

log = logging.getLogger(__name__)

APPLY_TARGET: common.Target = ("sgd_vs_memcpy", 0.3, "server apply (sgd) >= 30% of memcpy bandwidth")


class PushStore(Protocol):
    """What the apply benchmark needs of a shard's store (``ranger_ps.server.store.ShardStore``)."""

    def initialize(self, blocks: Sequence[WireBlock]) -> object: ...

    def decode(self, blocks: Sequence[WireBlock]) -> Any: ...

    def apply(self, decoded: Any) -> object: ...


StoreFactory = Callable[[Layout, Sequence[int], RuleConfig], PushStore]
"""Builds a store of the given blocks of a layout for a rule: ``ShardStore`` itself fits."""


def _rule_config(name: str) -> RuleConfig:
    """The rule as the default job runs it (the CLI's per-rule learning rate and momentum)."""
    return TrainConfig(rule=name, outer="rule").rule_config()  # the update rule itself, where the weights live


def _blocks_of(flat: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    out = []
    offset = 0
    for n in sizes:
        out.append(flat[offset : offset + n])
        offset += n
    return out


def run_apply(settings: ApplySettings, server_store: StoreFactory | None = None) -> dict[str, Any]:
    """Server-side update throughput per rule beside a plain copy of the same bytes.

    Args:
        settings: what to measure.
        server_store: the shard's store class (``ranger_ps.server.store.ShardStore``, which the
            command line passes), or any callable building one from a layout, the block ids it
            holds and a rule. With it, and sgd among the rules, the result also has
            ``server_push_path``: decode, check and apply of a dense push as a shard runs them.
            Without it that part is left out.
    """
    numel = settings.model_bytes // 4
    nbytes = numel * 4
    sizes = [min(settings.block_size, numel - o) for o in range(0, numel, settings.block_size)]
    generator = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {
        "benchmark": "apply",
        "model_bytes": nbytes,
        "settings": {
            "model_mb": settings.model_mb,
            "block_size": settings.block_size,
            "num_blocks": len(sizes),
            "repeat": settings.repeat,
            "warmup": settings.warmup,
            "torch_threads": settings.threads,
        },
        "machine": common.machine_info(),
        "load_average_before": common.load_average(),
    }
    rules: dict[str, Any] = {}
    with common.torch_threads(settings.threads):
        out |= _memcpy(numel, sizes, settings.repeat, generator)
        grads = [torch.rand(n, generator=generator).sub_(0.5).mul_(1e-3) for n in sizes]
        configs: list[tuple[str, RuleConfig]] = [(name, _rule_config(name)) for name in settings.rules]
        if "sgd" in settings.rules:
            configs.append(("sgd_no_momentum", RuleConfig(rule="sgd", lr=0.05, momentum=0.0)))
        for label, config in configs:
            params = [torch.rand(n, generator=generator) for n in sizes]
            states = [new_block_state(config, n, torch.float32) for n in sizes]

            def update(config: RuleConfig = config, params: list[torch.Tensor] = params, states: Any = states) -> None:
                apply_update(config, params, grads, states)

            times = common.timed(update, settings.warmup, settings.repeat)
            rules[label] = {
                "gbps": common.gbps(nbytes, common.median(times)),
                "seconds": times,
                "rule": config.to_dict(),
                "state_tensors": len(config.state_names()),
            }
            log.info("apply: %s %.2f GB/s", label, rules[label]["gbps"])
        out["rules"] = rules
        if server_store is not None and "sgd" in settings.rules:
            out["server_push_path"] = _server_push_path(server_store, settings, sizes, grads)
    out["ratios"] = {f"{name}_vs_memcpy": common.ratio(row["gbps"], out["memcpy_gbps"]) for name, row in rules.items()}
    out["targets"] = common.check_targets(out["ratios"], (APPLY_TARGET,))
    out["load_average_after"] = common.load_average()
    return out


def _memcpy(numel: int, sizes: Sequence[int], repeat: int, generator: torch.Generator) -> dict[str, Any]:
    """``dst.copy_(src)`` of the whole model, and block by block (the rules' per-call overhead)."""
    src = torch.rand(numel, generator=generator)
    dst = torch.empty_like(src)
    whole = common.timed(lambda: dst.copy_(src), 1, repeat)
    src_blocks = _blocks_of(src, sizes)
    dst_blocks = _blocks_of(dst, sizes)

    def copy_blocks() -> None:
        for d, s in zip(dst_blocks, src_blocks, strict=True):
            d.copy_(s)

    per_block = common.timed(copy_blocks, 1, repeat)
    return {
        "memcpy_gbps": common.gbps(numel * 4, common.median(whole)),
        "memcpy_blocks_gbps": common.gbps(numel * 4, common.median(per_block)),
    }


def _server_push_path(
    server_store: StoreFactory, settings: ApplySettings, sizes: Sequence[int], grads: Sequence[torch.Tensor]
) -> dict[str, Any]:
    """What a shard does with a dense push besides the rule: decode and check every block, then apply."""
    try:
        wire = codec_for_name("float32").wire
        layout = Layout((ParamInfo("flat", (sum(sizes),), "float32"),), settings.block_size)
        store = server_store(layout, range(layout.num_blocks), _rule_config("sgd"))
        initial = torch.rand(sum(sizes))
        blocks = _blocks_of(initial, sizes)
        store.initialize(
            [WireBlock(b.block_id, 0, wire, tensor_bytes(v)) for b, v in zip(layout.blocks, blocks, strict=True)]
        )
        # Received messages are immutable bytes; the shard reads gradients straight out of them.
        wires = [WireBlock(i, 0, wire, memoryview(bytes(tensor_bytes(g)))) for i, g in enumerate(grads)]
        times = common.timed(lambda: store.apply(store.decode(wires)), settings.warmup, settings.repeat)
        decode_times = common.timed(lambda: store.decode(wires), 1, settings.repeat)
    except (TypeError, AttributeError, ValueError) as exc:  # the store's interface moved: say why
        return {"gbps": None, "error": f"{type(exc).__name__}: {exc}"}
    nbytes = sum(sizes) * 4
    return {
        "gbps": common.gbps(nbytes, common.median(times)),
        "decode_gbps": common.gbps(nbytes, common.median(decode_times)),
        "rule": "sgd",
    }
