"""Shard checkpoints: msgpack files that cannot run code, checked block by block.

A file holds one shard's state at one moment, as a stream of msgpack objects:

1. a header map: format name and version, shard id and count, the layout, the rule settings, the
   consistency model, the applied clock, each worker's clock, counters, creation time, block count,
   and the CRC32 of the header's own encoding without that field;
2. one map per block: block id, version, update count, dtype, element count, the raw bytes of the
   weights and of every rule-state tensor (and of the truncation residual), and a CRC32 over all of
   them;
3. a footer map with the block count, so a truncated file is detected.

Files are written to a temporary name in the same folder, fsynced, renamed atomically, and the
folder fsynced; a write that fails removes its temporary file and leaves every earlier file as it
was. A torn, truncated or bit-flipped file fails to load with :class:`CheckpointError`, and
:func:`load_newest` falls back to the previous good file with a warning naming the bad one. Blocks
are stored individually, so a checkpoint can be restored onto any shard count (each new shard takes
the blocks its placement gives it). msgpack only: nothing in a checkpoint can execute code when
loaded (no pickle, no ``torch.load``).

**Generations.** The files written by one shard count (``num_shards`` in the header) form a
*generation* (:class:`Generation`, :func:`load_generations`); it is *complete* when every shard
``0..num_shards-1`` of it has a good file. After a write, :func:`write` keeps the newest ``keep``
files of that (generation, shard) and deletes the writer's files of older generations only once
the writer's generation is complete (shard 0 also removes older generations' files of shard ids
the new count no longer has): an older generation is never deleted while a newer one is
incomplete, since a shard of the newer one that has not written yet still restores from it.
A file whose header cannot be read is never deleted by pruning.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import zlib
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import torch

from ranger_ps.algorithm.dtypes import bytes_to_tensor, dtype_named, dtype_of, tensor_bytes
from ranger_ps.algorithm.layout import Layout, ParamInfo, is_positional_name, running_statistics

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


def write(checkpoint: ShardCheckpoint, directory: Path, *, keep: int = 3, create: bool = True) -> Path:
    """Write a checkpoint atomically and durably, then prune (see the module docstring).

    The bytes go to ``<name>.tmp`` in ``directory``, are fsynced, and the file is renamed to its
    final name; when anything fails (a full disk, a folder that vanished or turned read-only) the
    temporary file is removed and the error raised: no partial file is left and no earlier file is
    touched. Pruning runs only after a successful rename.

    Args:
        checkpoint: what to save.
        directory: the checkpoint folder.
        keep: files kept per (generation, shard); at least 1.
        create: create ``directory`` when it is missing. A server passes False: its folder was
            checked at start, and one that vanished since is an error, not a new empty folder.

    Returns:
        The path of the new file.

    Raises:
        OSError: the file could not be written (nothing was left behind).
    """
    if create:
        directory.mkdir(parents=True, exist_ok=True)
    elif not directory.is_dir():
        gone = not directory.exists()
        raise OSError(
            errno.ENOENT if gone else errno.ENOTDIR,
            "the checkpoint folder is gone" if gone else "the checkpoint folder is no longer a folder",
            str(directory),
        )
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
    try:
        _write_stream(tmp, header, checkpoint.blocks)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    written = CheckpointFile(target, checkpoint.shard_id, sequence, checkpoint.num_shards, checkpoint.created)
    try:
        _prune(directory, written, keep)
    except OSError as exc:  # the new file is safe; old ones are only left for the next write to remove
        log.warning("could not prune old checkpoints in %s: %s", directory, exc)
    return target


def _write_stream(path: Path, header: dict[str, Any], blocks: list[BlockRecord]) -> None:
    packer = msgpack.Packer(use_bin_type=True)
    with open(path, "wb") as out:
        out.write(packer.pack(header))
        for block in blocks:
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
        out.write(packer.pack({"end": True, "blocks": len(blocks)}))
        out.flush()
        os.fsync(out.fileno())


def _prune(directory: Path, written: CheckpointFile, keep: int) -> None:
    """Delete what ``written`` made redundant (see the module docstring); never fails the write."""
    generations = load_generations(directory)
    mine = next((g for g in generations if g.num_shards == written.num_shards), None)
    doomed: list[Path] = []
    if mine is not None and keep > 0:
        doomed += mine.files.get(written.shard_id, [])[:-keep]
    superseded = [
        path
        for generation in generations
        if generation.num_shards != written.num_shards and generation.created < written.created
        for shard_id, paths in generation.files.items()
        if shard_id == written.shard_id or (written.shard_id == 0 and shard_id >= written.num_shards)
        for path in paths
    ]
    # An older generation goes only once this one is complete: until then a shard of this
    # generation that has not written yet restores from it.
    if superseded and mine is not None and mine.complete(assume_good=written.shard_id):
        doomed += superseded
    for path in doomed:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove old checkpoint %s: %s", path, exc)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _objects(path: Path, *, read_size: int = 0) -> Generator[Any, None, None]:
    with open(path, "rb") as source:
        unpacker = msgpack.Unpacker(
            source,
            read_size=read_size,
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


def _checked_header(path: Path, header: object) -> dict[str, Any]:
    """The first object of a checkpoint file, verified to be a header of this format with a good checksum."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a ranger-ps checkpoint")
    if header.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {header.get('format_version')} is not supported")
    if header.get("crc32") != _header_crc(header):
        raise CheckpointError(f"{path}: header checksum mismatch")
    return header


def read(path: Path) -> ShardCheckpoint:
    """Load and verify one checkpoint file.

    Raises:
        CheckpointError: the file is unreadable, torn, truncated, corrupted or of another format.
    """
    try:
        objects = _objects(path)
        header = _checked_header(path, next(objects, None))
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


@dataclass(frozen=True)
class CheckpointFile:
    """A checkpoint file as its name and its verified header describe it (its blocks unread)."""

    path: Path
    shard_id: int
    sequence: int
    num_shards: int
    created: float


def read_header(path: Path) -> CheckpointFile:
    """Read and verify only the header of a checkpoint file (cheap: the blocks are not read).

    Raises:
        CheckpointError: the file is unreadable, not a ranger-ps checkpoint, or its header is damaged
            or disagrees with the file's name.
    """
    match = _NAME.match(path.name)
    if match is None:
        raise CheckpointError(f"{path}: not a checkpoint file name (shard-<id>-<sequence>.ckpt)")
    try:
        with contextlib.closing(_objects(path, read_size=1 << 16)) as objects:
            header = _checked_header(path, next(objects, None))
        shard_id, num_shards = int(header["shard_id"]), int(header["num_shards"])
        created = float(header["created"])
    except OSError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: malformed header ({exc})") from None
    if shard_id != int(match.group(1)) or not 0 <= shard_id < num_shards:
        raise CheckpointError(f"{path}: header says shard {shard_id} of {num_shards}, which the name contradicts")
    return CheckpointFile(path, shard_id, int(match.group(2)), num_shards, created)


@dataclass
class Generation:
    """The checkpoint files one shard count (``num_shards``) wrote to a folder.

    Files are grouped by their verified headers; blocks are read only when asked for
    (:meth:`checkpoint`), once, newest file first, falling back past bad files with a warning.

    Attributes:
        num_shards: the shard count that wrote these files.
        created: the newest creation time among its files (orders generations).
        files: shard id -> its files of this generation, oldest first.
    """

    num_shards: int
    created: float
    files: dict[int, list[Path]]
    _loaded: dict[int, tuple[Path, ShardCheckpoint] | None] = field(default_factory=dict, repr=False)

    def checkpoint(self, shard_id: int) -> ShardCheckpoint | None:
        """The newest good checkpoint of ``shard_id`` in this generation (None when it has none)."""
        found = self._load(shard_id)
        return found[1] if found is not None else None

    def path(self, shard_id: int) -> Path | None:
        """The file :meth:`checkpoint` comes from (None when the shard has no good file here)."""
        found = self._load(shard_id)
        return found[0] if found is not None else None

    def _load(self, shard_id: int) -> tuple[Path, ShardCheckpoint] | None:
        if shard_id not in self._loaded:
            self._loaded[shard_id] = None
            for path in reversed(self.files.get(shard_id, [])):
                try:
                    saved = read(path)
                except CheckpointError as exc:
                    log.warning("skipping bad checkpoint %s: %s", path, exc)
                    continue
                if saved.num_shards == self.num_shards and saved.shard_id == shard_id:
                    self._loaded[shard_id] = (path, saved)
                    break
        return self._loaded[shard_id]

    def checkpoints(self) -> list[ShardCheckpoint]:
        """Every shard's newest good checkpoint of this generation, in shard order (missing ones left out)."""
        return [c for s in sorted(self.files) if (c := self.checkpoint(s)) is not None]

    def missing(self, *, assume_good: int | None = None) -> list[int]:
        """Shard ids of ``0..num_shards-1`` without a good file in this generation.

        Args:
            assume_good: a shard id not to read (its file was just written).
        """
        absent = [s for s in range(self.num_shards) if not self.files.get(s)]
        if absent:  # decided by names and headers alone: no block is read
            return absent
        return [s for s in range(self.num_shards) if s != assume_good and self.checkpoint(s) is None]

    def complete(self, *, assume_good: int | None = None) -> bool:
        """Whether every shard of this generation has a good file (see :meth:`missing`)."""
        return not self.missing(assume_good=assume_good)

    def describe(self) -> str:
        """``3 shards, complete`` or ``3 shards, incomplete: shard 2 has no good file``."""
        missing = self.missing()
        if not missing:
            return f"{self.num_shards} shard{'s' if self.num_shards > 1 else ''}, complete"
        which = f"shard {missing[0]} has" if len(missing) == 1 else f"shards {missing} have"
        return f"{self.num_shards} shard{'s' if self.num_shards > 1 else ''}, incomplete: {which} no good file"


def load_generations(directory: Path) -> list[Generation]:
    """The generations of checkpoints in ``directory``, newest first (by their newest file's creation
    time, then by the highest file number).

    Files whose header cannot be read are left out (with a warning); no block is read here.
    """
    groups: dict[int, dict[int, list[CheckpointFile]]] = {}
    for shard_id, paths in list_checkpoints(directory).items():
        for path in paths:
            try:
                info = read_header(path)
            except CheckpointError as exc:
                if path.exists():  # a file pruned meanwhile by its shard is not worth a warning
                    log.warning("skipping bad checkpoint %s: %s", path, exc)
                continue
            groups.setdefault(info.num_shards, {}).setdefault(shard_id, []).append(info)
    generations = []
    order: dict[int, tuple[float, int]] = {}
    for count, shards in groups.items():
        files = {s: [f.path for f in sorted(infos, key=lambda f: f.sequence)] for s, infos in sorted(shards.items())}
        created = max(f.created for infos in shards.values() for f in infos)
        generations.append(Generation(count, created, files))
        # Equal creation times (copied files, coarse clocks) fall back to the file numbers, which grow per shard.
        order[count] = (created, max(f.sequence for infos in shards.values() for f in infos))
    generations.sort(key=lambda g: order[g.num_shards], reverse=True)
    return generations


def newest_complete(generations: list[Generation]) -> Generation | None:
    """The newest generation in which every shard has a good file, or None."""
    return next((g for g in generations if g.complete()), None)


def generations_warning(generations: list[Generation]) -> str | None:
    """One line for a folder whose newest generation is incomplete or that holds several; None otherwise."""
    if not generations or (len(generations) == 1 and generations[0].complete()):
        return None
    chosen = newest_complete(generations)
    listed = "; ".join(g.describe() for g in generations)
    if chosen is None:
        return f"{len(generations)} generation(s) and none complete ({listed})"
    if chosen is generations[0]:
        return f"{len(generations)} generations ({listed}); the newest, {chosen.num_shards}-shard one is used"
    return (
        f"the newest generation is incomplete ({listed}); the newest complete one ({chosen.num_shards} shards) is "
        "used, and blocks trained since by the newer shards are not in it"
    )


def load_cluster_generations(directory: Path) -> list[tuple[int, list[ShardCheckpoint]]]:
    """Checkpoints grouped by cluster size, newest generation first.

    Within a generation (one shard count), each shard id's newest good file of that count; every
    file's blocks are read (use :func:`load_generations` to read only what is needed).
    """
    out = []
    for generation in load_generations(directory):
        saved = generation.checkpoints()
        if saved:
            out.append((generation.num_shards, saved))
    return out


def assemble_weights(checkpoints: list[ShardCheckpoint]) -> dict[str, torch.Tensor]:
    """Whole parameters, by name, from the blocks of one generation's checkpoints (one file per shard).

    Raises:
        CheckpointError: the checkpoints disagree on the layout, come from several generations or
            repeat a shard, or lack some blocks.
    """
    if not checkpoints:
        raise CheckpointError("no checkpoints")
    first = checkpoints[0]
    layout = first.layout
    for other in checkpoints[1:]:
        if other.layout.fingerprint != layout.fingerprint:
            difference = layout.difference(
                other.layout, mine=f"shard {first.shard_id}'s file has", theirs=f"shard {other.shard_id}'s has"
            )
            raise CheckpointError(f"the checkpoints hold different models: {difference}")
    counts = sorted({c.num_shards for c in checkpoints})
    if len(counts) > 1:
        raise CheckpointError(
            f"the checkpoints come from different generations (shard counts {counts}): assemble one generation"
        )
    ids = [c.shard_id for c in checkpoints]
    if len(set(ids)) != len(ids):
        raise CheckpointError(
            f"several checkpoints of one shard (shard ids {sorted(ids)}): assemble one file per shard"
        )
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


def positional_names(weights: Mapping[str, torch.Tensor]) -> bool:
    """Whether exported weights are keyed ``0.0, 0.1, ...``: the optimizer was given parameters without names
    (``model.parameters()``), so ``model.load_state_dict`` refuses them until :func:`named_state_dict` names them
    (buffers kept consistent beside them may still carry their own names)."""
    return any(is_positional_name(name) for name in weights)


def named_state_dict(weights: Mapping[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Exported weights keyed as ``model.state_dict()`` names them, for a strict ``model.load_state_dict``.

    The first entries are the parameters: positional keys (``0.0, 0.1, ...``: :func:`positional_names`)
    are given the model's names in order, the order in which the optimizer received
    ``model.parameters()`` (with several param groups, the groups' order); named keys must be the
    model's own names. Either way the count, and each parameter's shape and dtype, must match the
    model's. Entries after them are the running statistics a cluster kept consistent
    (``Ranger(..., buffers=...)``), by name, or as ``buffers.0, buffers.1, ...`` in the order of
    :func:`~ranger_ps.algorithm.layout.running_statistics`. The model's other buffers in its state
    dict, which no cluster holds (``num_batches_tracked``, constant tables), are taken from ``model``
    as they are; running statistics the weights lack are left out, so a strict load says so.

    Args:
        weights: ``{name: tensor}`` as :func:`assemble_weights` (or ``checkpoint export``) gives them.
        model: the model the weights are for (its parameters' values are not used).

    Returns:
        The tensors keyed by the model's names, parameters first, then its buffers.

    Raises:
        ValueError: the weights do not fit the model; the message names the first differing tensor.
    """
    params = list(model.named_parameters())
    items = list(weights.items())
    held, extra = items[: len(params)], items[len(params) :]
    saved = Layout.from_named_tensors(held)
    wanted = Layout.from_named_tensors(params)
    positional = positional_names(dict(held))
    difference = saved.difference(wanted, mine="the checkpoint has", theirs="the model has", names=not positional)
    if difference is None and len(extra) and len(held) < len(params):
        difference = f"{len(items)} tensors, the model has {len(params)} parameters"
    if difference is not None:
        how = "in order, by position" if positional else "by name"
        raise ValueError(f"the weights do not fit the model ({how}): {difference}")
    out = {p.name: weights[s.name] for s, p in zip(saved.params, wanted.params, strict=True)}
    statistics = running_statistics(model)
    by_name = dict(statistics)
    for index, (key, value) in enumerate(extra):
        name = statistics[index][0] if key == f"buffers.{index}" and index < len(statistics) else key
        target = by_name.get(name)
        if target is None:
            raise ValueError(
                f"the weights do not fit the model: the checkpoint has {key!r}, no running statistic of the model"
            )
        if tuple(target.shape) != tuple(value.shape) or target.dtype != value.dtype:
            raise ValueError(
                f"the weights do not fit the model: {name!r}: the checkpoint has {tuple(value.shape)} {value.dtype}, "
                f"the model has {tuple(target.shape)} {target.dtype}"
            )
        out[name] = value
    buffers = dict(model.named_buffers())
    for name, value in model.state_dict().items():
        if name in buffers and name not in out and name not in by_name:
            out[name] = value.detach().clone()
    return out


def describe(checkpoints: list[ShardCheckpoint], files: dict[int, list[Path]]) -> dict[str, Any]:
    """A JSON-ready summary of some shards' checkpoints (one generation's, for ``checkpoint inspect``)."""
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


def describe_folder(generations: list[Generation]) -> dict[str, Any]:
    """A JSON-ready summary of a checkpoint folder (``ranger-ps checkpoint inspect``).

    The top level describes the generation an export would use (the newest complete one; the
    newest one with a readable file when none is complete) and names it in ``generation``; ``generations`` lists every
    generation, newest first, with its shards; ``warning`` is :func:`generations_warning`'s line.
    """
    chosen = newest_complete(generations) or next((g for g in generations if g.checkpoints()), None)
    summary = describe(chosen.checkpoints(), chosen.files) if chosen is not None else describe([], {})
    summary["generation"] = chosen.num_shards if chosen is not None else None
    summary["complete"] = chosen.complete() if chosen is not None else False
    summary["generations"] = [
        {
            "num_shards": g.num_shards,
            "complete": g.complete(),
            "missing_shards": g.missing(),
            "created": g.created,
            "shards": describe(g.checkpoints(), g.files)["shards"],
        }
        for g in generations
    ]
    summary["warning"] = generations_warning(generations)
    return summary
