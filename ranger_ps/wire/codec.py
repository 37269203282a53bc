"""Tensor <-> bytes for the wire, keyed by the wire's ``DType`` enum.

Tensors travel as their raw little-endian bytes: a flat, contiguous tensor is viewed as bytes
without a copy, and received bytes become a tensor with ``torch.frombuffer`` (again no copy).
The registry below is checked complete against the wire enum at import, so adding a dtype to the
.proto without a codec fails loudly.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import torch

from ranger_ps.errors import WireFormatError
from ranger_ps.wire._proto import ranger_ps_pb2 as pb

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships wheels for
    raise ImportError("ranger-ps sends tensors as little-endian bytes and needs a little-endian host")


@dataclass(frozen=True)
class DTypeCodec:
    """How one wire dtype maps to torch."""

    wire: pb.DType
    torch_dtype: torch.dtype
    itemsize: int
    name: str


_CODECS: tuple[DTypeCodec, ...] = (
    DTypeCodec(pb.FLOAT32, torch.float32, 4, "float32"),
    DTypeCodec(pb.FLOAT16, torch.float16, 2, "float16"),
    DTypeCodec(pb.BFLOAT16, torch.bfloat16, 2, "bfloat16"),
    DTypeCodec(pb.FLOAT64, torch.float64, 8, "float64"),
)

BY_WIRE: dict[int, DTypeCodec] = {c.wire: c for c in _CODECS}
BY_TORCH: dict[torch.dtype, DTypeCodec] = {c.torch_dtype: c for c in _CODECS}
BY_NAME: dict[str, DTypeCodec] = {c.name: c for c in _CODECS}

_missing = {v.number for v in pb.DType.DESCRIPTOR.values if v.number != pb.DTYPE_UNSPECIFIED} - set(BY_WIRE)
if _missing:  # pragma: no cover - guards future edits of the .proto
    raise ImportError(f"no codec for wire dtypes {sorted(_missing)}")


def codec_for_torch(dtype: torch.dtype) -> DTypeCodec:
    """Return the codec of a torch dtype, or raise ``ValueError`` naming the supported ones."""
    try:
        return BY_TORCH[dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {dtype}; supported: {', '.join(BY_NAME)}") from None


def codec_for_wire(wire: int) -> DTypeCodec:
    """Return the codec of a wire dtype, or raise :class:`WireFormatError`."""
    try:
        return BY_WIRE[wire]
    except KeyError:
        raise WireFormatError(f"unknown wire dtype {wire}") from None


def codec_for_name(name: str) -> DTypeCodec:
    """Return the codec for a dtype name such as ``"float32"``."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; supported: {', '.join(BY_NAME)}") from None


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """View a tensor's elements as raw bytes (no copy when it is contiguous and on the CPU).

    The view is only valid while ``tensor`` lives and is not modified.
    """
    codec_for_torch(tensor.dtype)
    flat = tensor.detach()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    # uint8 reinterpretation works for every dtype, bfloat16 included (numpy has no bfloat16).
    return flat.view(torch.uint8).numpy().data


def bytes_to_tensor(data: bytes | bytearray | memoryview, dtype: torch.dtype) -> torch.Tensor:
    """Make a flat tensor over ``data`` without copying it.

    The result shares memory with ``data``; it is read-only in spirit when ``data`` is
    immutable (callers copy into their own buffers before writing).

    Raises:
        WireFormatError: the length is not a whole number of elements.
    """
    codec = codec_for_torch(dtype)
    view = memoryview(data)
    if view.nbytes % codec.itemsize:
        raise WireFormatError(f"{view.nbytes} bytes is not a whole number of {codec.name} elements")
    if view.nbytes == 0:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():
        # frombuffer warns that immutable bytes are not writable; we never write through it.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=dtype)
