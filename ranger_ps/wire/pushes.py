"""How a push is laid out on the wire: chosen blocks grouped by shard, the header, the exact cost.

Pure functions shared by the client (which sends pushes) and by anything that needs to know what a
push costs without sending it (reports' ``bytes_pushed_dense``, the convergence benchmark).
"""

from __future__ import annotations

from collections.abc import Iterable

from ranger_ps.algorithm.layout import Layout
from ranger_ps.algorithm.placement import Placement
from ranger_ps.wire._proto import ranger_ps_pb2 as pb
from ranger_ps.wire.codec import codec_for_name
from ranger_ps.wire.frames import DEFAULT_CHUNK_BYTES, WireBlock, chunked_size

SECRET_BYTES = 16
"""Bytes of the secret a registration gives a worker (what shards issue)."""


def group_by_shard(layout: Layout, placement: Placement, block_ids: Iterable[int] | None) -> list[list[int]]:
    """Chosen block ids (all when None) grouped by shard, each group ascending.

    Raises:
        ValueError: a block id is out of range.
    """
    groups: list[list[int]] = [[] for _ in range(placement.num_shards)]
    for block_id in range(layout.num_blocks) if block_ids is None else block_ids:
        if not 0 <= block_id < layout.num_blocks:
            raise ValueError(f"block id {block_id} is outside [0, {layout.num_blocks})")
        groups[placement.shard_of[block_id]].append(block_id)
    return [sorted(ids) for ids in groups]


def push_header(worker_id: int, clock: int, secret: bytes = b"") -> pb.FrameHeader:
    """The header the first frame of every push carries (``secret``: the registration's, if any)."""
    return pb.FrameHeader(push=pb.PushHeader(worker_id=worker_id, clock=clock, secret=secret))


def push_wire_bytes(
    layout: Layout,
    placement: Placement,
    block_ids: Iterable[int] | None,
    *,
    worker_id: int,
    clock: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    push_dtype: str | None = None,
) -> int:
    """Exactly the bytes a push of these blocks puts on the wire, headers included, copying nothing.

    Blocks travel in ``push_dtype`` (default: each block's own; int8 blocks carry their scale).
    Every shard gets at least one frame (an empty push where none of its blocks was chosen).
    """
    zeros = memoryview(bytes(max((b.nbytes for b in layout.blocks), default=0)))
    header = push_header(worker_id, clock, b"\0" * SECRET_BYTES)  # a registration's secret rides on every push
    total = 0
    for ids in group_by_shard(layout, placement, block_ids):
        blocks = []
        for i in ids:
            codec = codec_for_name(push_dtype or layout.blocks[i].dtype)
            scale = 1.0 if codec.name == "int8" else 0.0
            blocks.append(WireBlock(i, 0, codec.wire, zeros[: layout.blocks[i].numel * codec.itemsize], scale))
        total += chunked_size(blocks, chunk_bytes=chunk_bytes, first_header=header, always_one=True)
    return total
