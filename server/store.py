"""A shard's blocks: values, versions and state in flat buffers, and the one place updates are applied.

Pure logic: no asyncio, no gRPC. Every method runs to completion without yielding, so callers on
an event loop see each push applied all at once and a block is never seen half-updated. The blocks
live in a :class:`~ranger_ps.algorithm.table.BlockTable` (flat per-dtype buffers: a push is applied
in a few vectorized calls); this module checks what arrives before any of it is used.

A pull reads each block's version when it reaches the block and its bytes when the frame is encoded;
a push applied between the two (while an earlier frame is on the wire) can only make the bytes newer
than the version says, so the worker fetches that block again next time and never misses an update.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ranger_ps.algorithm.blocks import BlockSpace, gather
from ranger_ps.algorithm.layout import Block, Layout
from ranger_ps.algorithm.quantize import Quantized, dequantize
from ranger_ps.algorithm.rules import RuleConfig
from ranger_ps.algorithm.table import BlockTable, NonFiniteUpdate, Part
from ranger_ps.errors import WireFormatError
from ranger_ps.storage.checkpoint import BlockRecord
from ranger_ps.wire.codec import (
    DTypeCodec,
    bytes_to_tensor,
    codec_for_name,
    codec_for_torch,
    codec_for_wire,
    tensor_bytes,
)
from ranger_ps.wire.frames import WireBlock
from ranger_ps.wire.runs import WireRun
from ranger_ps.wire.status import InvalidRequest, NonFinite, NotReady


@dataclass(frozen=True)
class Decoded:
    """A checked push: its blocks' positions in this shard, and their values per segment."""

    positions: torch.Tensor
    parts: list[Part]

    @property
    def nbytes(self) -> int:
        return sum(p.values.nbytes for p in self.parts)

    def __len__(self) -> int:
        return len(self.positions)

    def owned(self) -> Decoded:
        """The same push with values of its own (not views of a received frame or a shared region)."""
        return Decoded(self.positions, [Part(p.segment, p.local, p.values.clone()) for p in self.parts])


EMPTY = Decoded(torch.zeros(0, dtype=torch.int64), [])


@dataclass(frozen=True)
class PulledRun:
    """Blocks of one type that changed: ids ascending, their versions, their values back to back (a copy)."""

    block_ids: torch.Tensor
    versions: torch.Tensor
    values: torch.Tensor
    lengths: torch.Tensor  # elements per block


class ShardStore:
    """The blocks one shard owns, once a worker has initialized them."""

    def __init__(self, layout: Layout, block_ids: Sequence[int], rule: RuleConfig) -> None:
        self.layout = layout
        self.rule = rule
        self.space = BlockSpace(layout, block_ids)
        self.block_ids: tuple[int, ...] = self.space.ids
        self._index = {block_id: i for i, block_id in enumerate(self.block_ids)}
        self._table: BlockTable | None = None
        self.blocks_applied = 0

    @property
    def initialized(self) -> bool:
        return self._table is not None

    @property
    def num_elements(self) -> int:
        return sum(s.numel for s in self.space.segments)

    @property
    def nbytes(self) -> int:
        return sum(self.layout.blocks[b].nbytes for b in self.block_ids)

    @property
    def version_sum(self) -> int:
        return int(self._table.versions.sum()) if self._table is not None else 0

    def decode(self, blocks: Sequence[WireBlock], what: str = "push") -> Decoded:
        """Check every block (ownership, dtype, size, duplicates, finiteness) before any is used.

        Returns:
            The blocks' positions and values (converted to the blocks' own dtypes).
        """
        seen: set[int] = set()
        positions: list[int] = []
        values: list[torch.Tensor] = []
        for wire in blocks:
            position = self._index.get(wire.block_id)
            if position is None:
                raise InvalidRequest(f"{what}: block {wire.block_id} is not held by this shard")
            if wire.block_id in seen:
                raise InvalidRequest(f"{what}: block {wire.block_id} appears twice")
            seen.add(wire.block_id)
            tensor = self._values_of(wire, self.layout.blocks[wire.block_id], what)
            # A finite sum proves every entry finite (NaN and Inf propagate), at ~8x the speed of
            # isfinite().all(); only an overflowing sum needs the element-wise check.
            if not math.isfinite(float(tensor.sum())) and not bool(torch.isfinite(tensor).all()):
                raise NonFinite(f"{what}: block {wire.block_id} contains NaN or Inf")
            positions.append(position)
            values.append(tensor)
        return self._decoded(positions, values)

    def decode_runs(self, runs: Sequence[WireRun], what: str = "push") -> Decoded:
        """Check runs of blocks (ownership, order, type, size, scales, finiteness) before any is used.

        Each run must hold blocks of one type, strictly ascending; no block may appear twice.
        """
        parts: list[Part] = []
        found: list[torch.Tensor] = []
        for run in runs:
            ids = run.block_ids
            if not len(ids):
                if run.values.numel():
                    raise InvalidRequest(f"{what}: a run without blocks carries {run.values.numel()} values")
                continue
            if len(ids) > 1 and not bool((ids[1:] > ids[:-1]).all()):
                raise InvalidRequest(f"{what}: a run's block ids must be strictly ascending")
            try:
                positions = self.space.positions(ids)
            except ValueError as exc:
                raise InvalidRequest(f"{what}: {exc} (not held by this shard)") from None
            groups = self.space.by_segment(positions)
            if len(groups) != 1:
                raise InvalidRequest(f"{what}: a run mixes blocks of different types")
            ((segment, local),) = groups
            lengths = self.space.lengths[positions]
            values = self._run_values(run, self.space.segments[segment].dtype, lengths, what)
            if not math.isfinite(float(values.sum())) and not bool(torch.isfinite(values).all()):
                raise NonFinite(f"{what}: blocks {int(ids[0])}..{int(ids[-1])} contain NaN or Inf")
            parts.append(Part(segment, local, values))
            found.append(positions)
        if not parts:
            return EMPTY
        positions = torch.cat(found)
        if len(found) > 1 and len(torch.unique(positions)) != len(positions):
            raise InvalidRequest(f"{what}: a block appears twice")
        return Decoded(positions, parts)

    def _wire_codec(self, wire_dtype: int, own: DTypeCodec, what: str, subject: str) -> DTypeCodec:
        """The codec of values that arrive as ``wire_dtype`` for blocks of type ``own``: the blocks' own
        type, or for a push also the cluster's push dtype; anything else is refused naming ``subject``."""
        try:
            codec = codec_for_wire(wire_dtype)
        except WireFormatError:
            raise InvalidRequest(f"{what}: {subject} has unknown wire dtype {wire_dtype}") from None
        allowed = {own.wire}
        if what == "push" and self.rule.push_dtype is not None:
            allowed.add(codec_for_name(self.rule.push_dtype).wire)
        if codec.wire not in allowed:
            raise InvalidRequest(f"{what}: {subject} has wire dtype {codec.name}, expected {own.name}")
        return codec

    def _run_values(self, run: WireRun, own_dtype: torch.dtype, lengths: torch.Tensor, what: str) -> torch.Tensor:
        """A run's values in the blocks' own type, checked for type, size and scales."""
        own = codec_for_torch(own_dtype)
        codec = self._wire_codec(run.dtype, own, what, "a run")
        numel = int(lengths.sum())
        if run.values.numel() != numel:
            raise InvalidRequest(
                f"{what}: a run of {len(lengths)} blocks carries {run.values.numel()} {codec.name} elements, "
                f"expected {numel}"
            )
        if codec.name != "int8":
            return run.values if codec.wire == own.wire else run.values.to(own.torch_dtype)
        scales = run.scales
        if scales is None or len(scales) != len(lengths):
            raise InvalidRequest(f"{what}: an int8 run of {len(lengths)} blocks needs one scale per block")
        if not bool((torch.isfinite(scales) & (scales > 0)).all()):
            raise InvalidRequest(f"{what}: an int8 run needs finite scales > 0")
        per_element = torch.repeat_interleave(scales, lengths, output_size=numel)
        return (run.values.to(torch.float32) * per_element).to(own.torch_dtype)

    def _decoded(self, positions: list[int], values: list[torch.Tensor]) -> Decoded:
        """Blocks (in any order) as per-segment parts, each block's values end to end in the part."""
        if not positions:
            return EMPTY
        position_tensor = torch.tensor(positions, dtype=torch.int64)
        parts = []
        for segment, local in self.space.by_segment(position_tensor):
            wanted = set(self.space.segments[segment].positions[local].tolist())
            mine = [v for p, v in zip(positions, values, strict=True) if p in wanted]
            parts.append(Part(segment, local, torch.cat(mine) if len(mine) > 1 else mine[0]))
        return Decoded(position_tensor, parts)

    def _values_of(self, wire: WireBlock, block: Block, what: str) -> torch.Tensor:
        """A block's received values, checked for type and size.

        An init carries the block's own type; a push that type or the cluster's push dtype (float32,
        bfloat16, or int8 with a positive scale), converted to the block's type here.
        """
        own = codec_for_name(block.dtype)
        codec = self._wire_codec(wire.dtype, own, what, f"block {wire.block_id}")
        if wire.data.nbytes != block.numel * codec.itemsize:
            raise InvalidRequest(
                f"{what}: block {wire.block_id} has {wire.data.nbytes} bytes, expected {block.numel * codec.itemsize} "
                f"({block.numel} {codec.name} elements)"
            )
        payload = bytes_to_tensor(wire.data, codec.torch_dtype)
        if codec.name == "int8":
            if not (math.isfinite(wire.scale) and wire.scale > 0):
                raise InvalidRequest(f"{what}: int8 block {wire.block_id} needs a finite scale > 0, got {wire.scale}")
            return dequantize(Quantized(payload, wire.scale), own.torch_dtype)
        return payload if codec.wire == own.wire else payload.to(own.torch_dtype)

    def initialize(self, blocks: Sequence[WireBlock]) -> int:
        """Install the initial values of every block; all-or-nothing."""
        decoded = self.decode(blocks, "init")
        if len(decoded) != len(self.block_ids):
            missing = sorted(set(self.block_ids) - {self.block_ids[p] for p in decoded.positions.tolist()})
            raise InvalidRequest(f"init: {len(missing)} blocks missing, e.g. {missing[:5]}")
        table = BlockTable(self.space, self.rule)
        self._write_values(table, decoded.parts)
        table.versions.fill_(1)
        self._table = table
        return len(self.block_ids)

    def _write_values(self, table: BlockTable, parts: Sequence[Part]) -> None:
        for part in parts:
            index = self.space.element_index(part.segment, part.local)
            values = table.values[part.segment]
            if index is None:
                values.copy_(part.values)
            else:
                values.index_copy_(0, index, part.values.to(values.dtype))

    def apply(self, decoded: Decoded, *, contributions: int = 1) -> tuple[int, int]:
        """Apply one push's (already decoded and checked) values: truncation, then the rule or outer rule.

        ``contributions``: the values sum that many workers' pushes (bsp).

        Returns:
            (blocks applied, sum of their new versions).
        """
        table = self._require_table()
        if not len(decoded):
            return 0, 0
        try:
            table.apply(decoded.parts, contributions=contributions)
        except NonFiniteUpdate as exc:
            raise NonFinite(f"push: {exc}") from None
        self.blocks_applied += len(decoded)
        return len(decoded), int(table.versions[decoded.positions].sum())

    def apply_mean(self, contributions: Sequence[Decoded]) -> tuple[int, int]:
        """Apply several workers' pushes once (bsp): their sum, which the rule divides by their number.

        A worker that did not pick a block counts as zero, so the scale does not depend on how many
        picked it. Blocks nobody picked are not updated.
        """
        pushes = list(contributions)
        if not pushes:
            return 0, 0
        sums = [
            torch.zeros(s.numel, dtype=torch.float64 if s.dtype == torch.float64 else torch.float32)
            for s in self.space.segments
        ]
        touched = torch.zeros(len(self.space), dtype=torch.bool)
        for push in pushes:
            for part in push.parts:
                index = self.space.element_index(part.segment, part.local)
                if index is None:
                    sums[part.segment].add_(part.values)
                else:
                    sums[part.segment].index_add_(0, index, part.values.to(sums[part.segment].dtype))
            touched[push.positions] = True
        positions = touched.nonzero().flatten()
        parts = [
            Part(segment, local, gather(sums[segment], self.space.element_index(segment, local)))
            for segment, local in self.space.by_segment(positions)
        ]
        return self.apply(Decoded(positions, parts), contributions=len(pushes))

    def snapshot(self) -> list[BlockRecord]:
        """Copies of every block's value, version and state (a consistent cut: nothing yields)."""
        table = self._require_table()
        space = self.space
        return [
            BlockRecord(
                block_id=block_id,
                version=int(table.versions[position]),
                step=int(table.steps[position]),
                value=space.block(table.values, position).clone(),
                state={name: space.block(buffers, position).clone() for name, buffers in table.state.items()},
                residual=space.block(table.residual, position).clone() if table.residual is not None else None,
            )
            for position, block_id in enumerate(self.block_ids)
        ]

    def restore(self, records: dict[int, BlockRecord]) -> None:
        """Install saved blocks (every block of this shard must be there)."""
        missing = [b for b in self.block_ids if b not in records]
        if missing:
            raise ValueError(f"the checkpoints lack {len(missing)} of this shard's blocks, e.g. {missing[:5]}")
        table = BlockTable(self.space, self.rule)
        for position, block_id in enumerate(self.block_ids):
            record = records[block_id]
            self.space.block(table.values, position).copy_(record.value)
            for name, buffers in table.state.items():
                if name not in record.state:
                    raise ValueError(f"block {block_id}: the checkpoint lacks rule state {name!r}")
                self.space.block(buffers, position).copy_(record.state[name])
            if table.residual is not None and record.residual is not None:
                self.space.block(table.residual, position).copy_(record.residual)
            table.versions[position] = record.version
            table.steps[position] = record.step
        self._table = table

    def versions(self) -> list[int]:
        """Each block's version, in position order."""
        return self._require_table().versions.tolist()

    def version_tensor(self) -> torch.Tensor:
        """Each block's version, in position order (the live tensor: clone to keep)."""
        return self._require_table().versions

    def changed_runs(self, sent: torch.Tensor, *, copy: bool = True) -> list[PulledRun]:
        """Blocks whose version is above ``sent`` (one entry per position, advanced to what is returned),
        as runs per type, their values taken at once so they match their versions: copies, or without
        ``copy`` (a whole segment) the live buffer, for a caller that encodes them before anything
        else runs."""
        table = self._require_table()
        if len(sent) != len(self.block_ids):
            raise InvalidRequest(f"{len(sent)} known versions for a shard of {len(self.block_ids)} blocks")
        positions = table.changed(sent)
        out = []
        for part in table.read(positions, copy=copy):
            held = self.space.segments[part.segment].positions[part.local]
            out.append(
                PulledRun(
                    self.space.id_tensor[held], table.versions[held].clone(), part.values, self.space.lengths[held]
                )
            )
        sent[positions] = table.versions[positions]
        return out

    def newer_than(self, known_versions: Sequence[int]) -> Iterator[WireBlock]:
        """Blocks whose version is above what the caller holds (all of them when it holds none).

        Each yielded block's bytes are a view of the live value: encode them before yielding
        control to anything that could apply a push.
        """
        table = self._require_table()
        if known_versions and len(known_versions) != len(self.block_ids):
            raise InvalidRequest(
                f"pull: {len(known_versions)} known versions for a shard of {len(self.block_ids)} blocks"
            )
        if known_versions and max(known_versions) > int(table.versions.max()):
            raise InvalidRequest("pull: known versions beyond what this shard holds: register again to start afresh")
        known = torch.tensor(known_versions, dtype=torch.int64) if known_versions else None
        for position in table.changed(known).tolist():
            block = self.layout.blocks[self.block_ids[position]]
            codec = codec_for_name(block.dtype)
            value = self.space.block(table.values, position)
            yield WireBlock(block.block_id, int(table.versions[position]), codec.wire, tensor_bytes(value))

    def _require_table(self) -> BlockTable:
        if self._table is None:
            raise NotReady("this shard has not been initialized by a worker yet")
        return self._table
