"""Shard checkpoints: msgpack files that cannot run code, checked block by block.

A file holds one shard's state at one moment, as a stream of msgpack objects:

1. a header map: format name and version, shard id and count, the layout, the rule settings, the
   consistency model, the applied clock, each worker's clock, counters, creation time, block count,
   and the CRC32 of the header's own encoding without that field;
2. one map per block: block id, version, update count, dtype, element count, the raw bytes of the
   weights and of every rule-state tensor (and of the truncation residual), and a CRC32 over all of
   them;
3. a footer map with the block count, so a truncated file is detected.

Files are written to a temporary name, fsynced, renamed atomically, and the folder fsynced; the
newest ``keep`` files of a shard are kept. A torn, truncated or bit-flipped file fails to load with
:class:`CheckpointError`, and :func:`load_newest` falls back to the previous good file with a
warning naming the bad one. Blocks are stored individually, so a checkpoint can be restored onto
any shard count (each new shard takes the blocks its placement gives it). msgpack only: nothing in
a checkpoint can execute code when loaded (no pickle, no ``torch.load``).
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import torch

from ranger_ps.algorithm.dtypes import bytes_to_tensor, dtype_named, dtype_of, tensor_bytes
from ranger_ps.algorithm.layout import Layout, ParamInfo

log = logging.getLogger(__name__)

FORMAT = "ranger-ps-checkpoint"
FORMAT_VERSION = 1
_NAME = re.compile(r"^shard-(\d+)-(\d+)\.ckpt$")
# Decoding limits: a corrupted length field must not make the reader allocate gigabytes.
_MAX_BIN = 1 << 31
_MAX_ITEMS = 1 << 24


class CheckpointError(Exception):
    """A checkpoint file that is missing, torn, truncated, corrupted or of another format."""


@dataclass
class BlockRecord:
    """One block as saved: values, version, update count, rule state, truncation residual."""

    block_id: int
    version: int
    step: int
    value: torch.Tensor
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    residual: torch.Tensor | None = None


@dataclass
class ShardCheckpoint:
    """Everything one shard saves."""

    shard_id: int
    num_shards: int
    layout: Layout
    rule: dict[str, Any]
    consistency: str
    applied_clock: int
    clocks: dict[int, int]
    counters: dict[str, int]
    created: float
    blocks: list[BlockRecord]


def _layout_to_plain(layout: Layout) -> dict[str, Any]:
    return {
        "params": [[p.name, list(p.shape), p.dtype] for p in layout.params],
        "block_size": layout.block_size,
        "fingerprint": layout.fingerprint,
    }


def _layout_from_plain(raw: Any) -> Layout:
    try:
        layout = Layout(
            tuple(ParamInfo(str(n), tuple(int(d) for d in shape), str(dtype)) for n, shape, dtype in raw["params"]),
            int(raw["block_size"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"bad layout in header: {exc}") from None
    if layout.fingerprint != raw.get("fingerprint"):
        raise CheckpointError("layout fingerprint in header does not match the layout")
    return layout


def _crc(*parts: bytes | memoryview) -> int:
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc


def _block_crc(record: dict[str, Any]) -> int:
    """CRC32 over a block entry's every field (ids, versions, dtypes, state names) and all its bytes."""
    state = record["state"]
    meta = [
        record["block_id"], record["version"], record["step"], record["dtype"], record["state_dtype"],
        record["numel"], sorted(state), record["residual"] is not None,
    ]  # fmt: skip
    parts = [msgpack.packb(meta, use_bin_type=True), record["value"], *(state[k] for k in sorted(state))]
    if record["residual"] is not None:
        parts.append(record["residual"])
    return _crc(*parts)


def _header_crc(header: dict[str, Any]) -> int:
    body = {k: v for k, v in header.items() if k != "crc32"}
    return zlib.crc32(msgpack.packb(body, use_bin_type=True))


def checkpoint_path(directory: Path, shard_id: int, sequence: int) -> Path:
    return directory / f"shard-{shard_id}-{sequence:08d}.ckpt"


def list_checkpoints(directory: Path) -> dict[int, list[Path]]:
    """Checkpoint files per shard id, oldest first."""
    out: dict[int, list[tuple[int, Path]]] = {}
    if not directory.is_dir():
        return {}
    for entry in directory.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_file():
            out.setdefault(int(match.group(1)), []).append((int(match.group(2)), entry))
    return {shard: [p for _, p in sorted(files)] for shard, files in sorted(out.items())}


def write(checkpoint: ShardCheckpoint, directory: Path, *, keep: int = 3) -> Path:
    """Write a checkpoint atomically and durably; keep the newest ``keep`` files of this shard."""
    directory.mkdir(parents=True, exist_ok=True)
    existing = list_checkpoints(directory).get(checkpoint.shard_id, [])
    sequence = int(_NAME.match(existing[-1].name).group(2)) + 1 if existing else 1  # type: ignore[union-attr]
    target = checkpoint_path(directory, checkpoint.shard_id, sequence)
    tmp = target.with_name(target.name + ".tmp")
    header: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "shard_id": checkpoint.shard_id,
        "num_shards": checkpoint.num_shards,
        "layout": _layout_to_plain(checkpoint.layout),
        "rule": checkpoint.rule,
        "consistency": checkpoint.consistency,
        "applied_clock": checkpoint.applied_clock,
        "clocks": {str(k): v for k, v in checkpoint.clocks.items()},
        "counters": checkpoint.counters,
        "created": checkpoint.created,
        "blocks": len(checkpoint.blocks),
    }
    header["crc32"] = _header_crc(header)
    packer = msgpack.Packer(use_bin_type=True)
    with open(tmp, "wb") as out:
        out.write(packer.pack(header))
        for block in checkpoint.blocks:
            value = tensor_bytes(block.value)
            state = {name: tensor_bytes(t) for name, t in sorted(block.state.items())}
            residual = tensor_bytes(block.residual) if block.residual is not None else None
            state_like = next(iter(block.state.values()), block.residual if block.residual is not None else block.value)
            record: dict[str, Any] = {
                "block_id": block.block_id,
                "version": block.version,
                "step": block.step,
                "dtype": dtype_of(block.value.dtype).name,
                "state_dtype": dtype_of(state_like.dtype).name,
                "numel": block.value.numel(),
                "value": value,
                "state": state,
                "residual": residual,
            }
            record["crc32"] = _block_crc(record)
            out.write(packer.pack(record))
        out.write(packer.pack({"end": True, "blocks": len(checkpoint.blocks)}))
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, target)
    _fsync_dir(directory)
    for old in (existing + [target])[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return target


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _objects(path: Path) -> Iterator[Any]:
    with open(path, "rb") as source:
        unpacker = msgpack.Unpacker(
            source,
            raw=False,
            strict_map_key=False,
            max_bin_len=_MAX_BIN,
            max_str_len=1 << 20,
            max_array_len=_MAX_ITEMS,
            max_map_len=_MAX_ITEMS,
        )
        try:
            yield from unpacker
        except (ValueError, msgpack.UnpackException, msgpack.ExtraData) as exc:
            raise CheckpointError(f"{path}: not a valid msgpack stream ({exc})") from None


def read(path: Path) -> ShardCheckpoint:
    """Load and verify one checkpoint file.

    Raises:
        CheckpointError: the file is unreadable, torn, truncated, corrupted or of another format.
    """
    try:
        objects = _objects(path)
        header = next(objects, None)
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a ranger-ps checkpoint")
        if header.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: format version {header.get('format_version')} is not supported")
        if header.get("crc32") != _header_crc(header):
            raise CheckpointError(f"{path}: header checksum mismatch")
        layout = _layout_from_plain(header["layout"])
        blocks: list[BlockRecord] = []
        footer: Any = None
        for obj in objects:
            if isinstance(obj, dict) and obj.get("end") is True:
                footer = obj
                break
            blocks.append(_read_block(path, obj, layout))
        if footer is None or footer.get("blocks") != len(blocks) or header["blocks"] != len(blocks):
            raise CheckpointError(f"{path}: truncated ({len(blocks)} of {header['blocks']} blocks, no footer)")
        return ShardCheckpoint(
            shard_id=int(header["shard_id"]),
            num_shards=int(header["num_shards"]),
            layout=layout,
            rule=dict(header["rule"]),
            consistency=str(header["consistency"]),
            applied_clock=int(header["applied_clock"]),
            clocks={int(k): int(v) for k, v in header["clocks"].items()},
            counters={str(k): int(v) for k, v in header["counters"].items()},
            created=float(header["created"]),
            blocks=blocks,
        )
    except OSError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed ({exc})") from None


def _read_block(path: Path, obj: Any, layout: Layout) -> BlockRecord:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: block entry is not a map")
    block_id = int(obj["block_id"])
    if not 0 <= block_id < layout.num_blocks:
        raise CheckpointError(f"{path}: block id {block_id} is outside the layout")
    spec = layout.blocks[block_id]
    value_bytes, state_bytes, residual_bytes = obj["value"], obj["state"], obj["residual"]
    if _block_crc(obj) != obj["crc32"]:
        raise CheckpointError(f"{path}: block {block_id} checksum mismatch")
    dtype = dtype_named(obj["dtype"]).torch_dtype
    state_dtype = dtype_named(obj["state_dtype"]).torch_dtype
    if obj["dtype"] != spec.dtype or int(obj["numel"]) != spec.numel:
        raise CheckpointError(f"{path}: block {block_id} does not match the layout")

    def tensor(data: bytes, kind: torch.dtype) -> torch.Tensor:
        t = bytes_to_tensor(data, kind)
        if t.numel() != spec.numel:
            raise CheckpointError(f"{path}: block {block_id} has {t.numel()} elements, expected {spec.numel}")
        return t.clone()

    return BlockRecord(
        block_id=block_id,
        version=int(obj["version"]),
        step=int(obj["step"]),
        value=tensor(value_bytes, dtype),
        state={str(k): tensor(v, state_dtype) for k, v in state_bytes.items()},
        residual=tensor(residual_bytes, state_dtype) if residual_bytes is not None else None,
    )


def load_newest(directory: Path, shard_id: int) -> ShardCheckpoint | None:
    """The newest good checkpoint of one shard (None when it has none); bad files are skipped with a warning."""
    for path in reversed(list_checkpoints(directory).get(shard_id, [])):
        try:
            return read(path)
        except CheckpointError as exc:
            log.warning("skipping bad checkpoint %s: %s", path, exc)
    return None


def load_cluster(directory: Path) -> list[ShardCheckpoint]:
    """The newest good checkpoint of every shard id found in ``directory``."""
    out = []
    for shard_id in list_checkpoints(directory):
        checkpoint = load_newest(directory, shard_id)
        if checkpoint is not None:
            out.append(checkpoint)
    return out


def load_cluster_generations(directory: Path) -> list[tuple[int, list[ShardCheckpoint]]]:
    """Checkpoints grouped by cluster size, newest generation first.

    Within a generation (one shard count), each shard id's newest good file of that count.
    """
    by_count: dict[int, dict[int, ShardCheckpoint]] = {}
    for shard_id, paths in list_checkpoints(directory).items():
        for path in reversed(paths):
            try:
                saved = read(path)
            except CheckpointError as exc:
                log.warning("skipping bad checkpoint %s: %s", path, exc)
                continue
            by_count.setdefault(saved.num_shards, {}).setdefault(shard_id, saved)
    generations = [(count, list(shards.values())) for count, shards in by_count.items()]
    generations.sort(key=lambda g: max(c.created for c in g[1]), reverse=True)
    return generations


def assemble_weights(checkpoints: list[ShardCheckpoint]) -> dict[str, torch.Tensor]:
    """Whole parameters, by name, from the blocks of a cluster's checkpoints.

    Raises:
        CheckpointError: the checkpoints disagree on the layout or lack some blocks.
    """
    if not checkpoints:
        raise CheckpointError("no checkpoints")
    layout = checkpoints[0].layout
    if any(c.layout.fingerprint != layout.fingerprint for c in checkpoints):
        raise CheckpointError("the checkpoints hold different models (layout fingerprints differ)")
    blocks = {b.block_id: b for c in checkpoints for b in c.blocks}
    missing = [b.block_id for b in layout.blocks if b.block_id not in blocks]
    if missing:
        raise CheckpointError(
            f"{len(missing)} blocks are in no checkpoint (e.g. {missing[:5]}): a shard's files are missing"
        )
    flats = [torch.empty(p.numel, dtype=p.torch_dtype) for p in layout.params]
    for block in layout.blocks:
        flats[block.param_index][block.offset : block.offset + block.numel].copy_(blocks[block.block_id].value)
    return {p.name: flat.view(p.shape) for p, flat in zip(layout.params, flats, strict=True)}


def describe(checkpoints: list[ShardCheckpoint], files: dict[int, list[Path]]) -> dict[str, Any]:
    """A JSON-ready summary of a checkpoint folder (``ranger-ps checkpoint inspect``)."""
    shards = []
    for c in sorted(checkpoints, key=lambda c: c.shard_id):
        shards.append(
            {
                "shard_id": c.shard_id,
                "num_shards": c.num_shards,
                "files": [str(p.name) for p in files.get(c.shard_id, [])],
                "created": c.created,
                "blocks": len(c.blocks),
                "elements": sum(b.value.numel() for b in c.blocks),
                "version_sum": sum(b.version for b in c.blocks),
                "applied_clock": c.applied_clock,
                "worker_clocks": {str(k): v for k, v in sorted(c.clocks.items())},
                "counters": c.counters,
            }
        )
    first = checkpoints[0] if checkpoints else None
    return {
        "layout_fingerprint": first.layout.fingerprint if first else None,
        "parameters": [[p.name, list(p.shape), p.dtype] for p in first.layout.params] if first else [],
        "block_size": first.layout.block_size if first else None,
        "rule": first.rule if first else None,
        "consistency": first.consistency if first else None,
        "shards": shards,
    }
