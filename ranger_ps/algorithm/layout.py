"""The model as the servers see it: named parameters cut into fixed-size blocks.

A :class:`Layout` is an ordered list of parameters (name, shape, dtype) and a block size. Each
parameter is cut into consecutive blocks of at most ``block_size`` elements; a block never spans
two parameters. Block ids count up from 0 in parameter order. The fingerprint is a hash of
everything that decides the blocks, so servers and workers can prove they agree.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import msgpack
import torch

from ranger_ps.algorithm.dtypes import dtype_named, dtype_of, parameter_dtype

DEFAULT_BLOCK_SIZE = 65_536
# One block must fit comfortably inside one gRPC message (see rpc.MAX_MESSAGE_BYTES).
MAX_BLOCK_SIZE = 1 << 22
# Bounds on what a layout may describe, checked before anything is built from it: a 37-byte
# request must not make a server enumerate 2**40 blocks. 2**22 blocks of the default size is a
# 1 TiB float32 model.
MAX_BLOCKS = 1 << 22
MAX_PARAMS = 1 << 16
# The name :class:`ranger_ps.Ranger` gives a parameter passed without one: ``group.index``.
_POSITIONAL_NAME = re.compile(r"^\d+\.\d+$")


def is_positional_name(name: str) -> bool:
    """Whether ``name`` is the ``group.index`` name of a parameter given without a name (``model.parameters()``)."""
    return _POSITIONAL_NAME.match(name) is not None


@dataclass(frozen=True)
class ParamInfo:
    """One named parameter."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return dtype_named(self.dtype).torch_dtype

    @property
    def itemsize(self) -> int:
        return dtype_named(self.dtype).itemsize

    def describe(self) -> str:
        """``'fc.weight' (64, 32) float32``."""
        return f"{self.name!r} {self.shape} {self.dtype}"


@dataclass(frozen=True)
class Block:
    """A contiguous run of one parameter's flattened elements."""

    block_id: int
    param_index: int
    offset: int
    numel: int
    dtype: str
    itemsize: int

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


@dataclass(frozen=True)
class Layout:
    """Parameters and their blocks; immutable and hashable by fingerprint."""

    params: tuple[ParamInfo, ...]
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        if not 1 <= self.block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be in [1, {MAX_BLOCK_SIZE}], got {self.block_size}")
        if len(self.params) > MAX_PARAMS:
            raise ValueError(f"a layout may hold at most {MAX_PARAMS} parameters, got {len(self.params)}")
        blocks = sum(-(-p.numel // self.block_size) for p in self.params if all(d >= 0 for d in p.shape))
        if blocks > MAX_BLOCKS:
            raise ValueError(f"a layout may cut into at most {MAX_BLOCKS} blocks, got {blocks} (raise block_size)")
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError("parameter names must be unique")
        for p in self.params:
            parameter_dtype(p.dtype)
            if any(d < 0 for d in p.shape):
                raise ValueError(f"parameter {p.name!r} has a negative dimension: {p.shape}")

    @classmethod
    def from_named_tensors(
        cls, named: Iterable[tuple[str, torch.Tensor]], block_size: int = DEFAULT_BLOCK_SIZE
    ) -> Layout:
        """Build the layout of ``model.named_parameters()`` (or any named tensors)."""
        params = tuple(ParamInfo(name, tuple(int(d) for d in t.shape), dtype_of(t.dtype).name) for name, t in named)
        return cls(params, block_size)

    @cached_property
    def blocks(self) -> tuple[Block, ...]:
        out: list[Block] = []
        for index, param in enumerate(self.params):
            itemsize = param.itemsize
            for offset in range(0, param.numel, self.block_size):
                numel = min(self.block_size, param.numel - offset)
                out.append(Block(len(out), index, offset, numel, param.dtype, itemsize))
        return tuple(out)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def nbytes(self) -> int:
        return sum(p.numel * p.itemsize for p in self.params)

    @cached_property
    def fingerprint(self) -> str:
        """A short hash of names, shapes, dtypes and block size (order matters)."""
        canonical = msgpack.packb(
            [1, self.block_size, [[p.name, list(p.shape), p.dtype] for p in self.params]], use_bin_type=True
        )
        return hashlib.sha256(canonical).hexdigest()[:16]

    @property
    def positional(self) -> bool:
        """Whether every parameter has the ``group.index`` name of one given without a name."""
        return bool(self.params) and all(is_positional_name(p.name) for p in self.params)

    def difference(
        self, other: Layout, *, mine: str = "this layout has", theirs: str = "the other has", names: bool = True
    ) -> str | None:
        """The first way ``other`` differs from this layout, in words; None when they are the same.

        The first parameter (in order) whose name, shape or dtype differs is named with both sides'
        versions; else a differing parameter count names the first parameter one side lacks; a
        differing block size is added. ``mine`` and ``theirs`` say who holds each layout ("the
        shard holds", "this worker has").

        Args:
            other: the layout to compare with.
            mine: the words for this layout's side.
            theirs: the words for ``other``'s side.
            names: compare names too (False: only shapes and dtypes, position by position, as when
                positional names are mapped onto a model's).

        Returns:
            ``parameter 3 'fc.weight': the shard holds shape (64, 32) float32, this worker has (64, 16)
            float32``, ``parameter count: the shard holds 5, this worker has 6 (from parameter 5 'head.bias'
            (10,) float32 on, only this worker has them)``, ``block size: the shard holds 65536, this
            worker has 4096``, several joined with ``; ``, or None.
        """
        found: list[str] = []
        for index, (a, b) in enumerate(zip(self.params, other.params, strict=False)):
            if names and a.name != b.name:
                found.append(f"parameter {index}: {mine} {a.describe()}, {theirs} {b.describe()}")
                shapes = [(p.shape, p.dtype) for p in self.params] == [(p.shape, p.dtype) for p in other.params]
                if shapes and self.positional != other.positional:
                    found[-1] += (
                        " (the same shapes and dtypes: one side gave the optimizer model.named_parameters(), the "
                        "other model.parameters(), which names them 0.0, 0.1, ...)"
                    )
                break
            if a.shape != b.shape or a.dtype != b.dtype:
                label = repr(a.name) if a.name == b.name else f"{a.name!r}/{b.name!r}"
                found.append(
                    f"parameter {index} {label}: {mine} shape {a.shape} {a.dtype}, {theirs} {b.shape} {b.dtype}"
                )
                break
        else:
            if len(self.params) != len(other.params):
                longer, side = (self, mine) if len(self.params) > len(other.params) else (other, theirs)
                index = min(len(self.params), len(other.params))
                found.append(
                    f"parameter count: {mine} {len(self.params)}, {theirs} {len(other.params)} (from parameter "
                    f"{index} {longer.params[index].describe()} on, only {side} them)"
                )
        if self.block_size != other.block_size:
            found.append(f"block size: {mine} {self.block_size}, {theirs} {other.block_size}")
        return "; ".join(found) or None

    def flat_views(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Flat views of tensors aligned with ``params`` (each of the parameter's shape, or already flat).

        Raises:
            ValueError: a count or shape differs, or a tensor is not contiguous (a flat copy would
                silently lose writes made through it).
        """
        if len(tensors) != len(self.params):
            raise ValueError(f"expected {len(self.params)} tensors, got {len(tensors)}")
        views = []
        for param, tensor in zip(self.params, tensors, strict=True):
            if tuple(tensor.shape) != param.shape and tuple(tensor.shape) != (param.numel,):
                raise ValueError(f"{param.name}: shape {tuple(tensor.shape)} != layout {param.shape}")
            if not tensor.is_contiguous():
                raise ValueError(f"{param.name}: tensor is not contiguous")
            views.append(tensor.view(-1))
        return views

    def block_views(self, flats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Slice flat per-parameter tensors into per-block views (no copies)."""
        return [flats[b.param_index][b.offset : b.offset + b.numel] for b in self.blocks]


def running_statistics(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers of ``model`` that change while it trains and that workers should share: the running
    mean and variance of its normalization layers (BatchNorm, SyncBatchNorm, InstanceNorm with
    ``track_running_stats``), named as ``model.named_buffers()`` names them.

    ``Ranger(..., buffers=running_statistics(model))`` keeps just those consistent; constant buffers
    (masks, position tables) stay each worker's own and cost no traffic.
    """
    out = []
    for prefix, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._NormBase) and module.track_running_stats:
            for name in ("running_mean", "running_var"):
                buffer = getattr(module, name, None)
                if isinstance(buffer, torch.Tensor) and buffer.is_floating_point():
                    out.append((f"{prefix}.{name}" if prefix else name, buffer))
    return out
