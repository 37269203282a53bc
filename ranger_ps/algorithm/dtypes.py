"""The element types a parameter may have, and tensors as raw little-endian bytes.

A flat, contiguous tensor is viewed as bytes without a copy, and bytes become a tensor with
``torch.frombuffer`` (again no copy): that is how blocks travel and how checkpoints store them.
The wire's own enum for these types lives in :mod:`ranger_ps.wire.codec`.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass

import torch

from ranger_ps.errors import WireFormatError

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships wheels for
    raise ImportError("ranger-ps stores tensors as little-endian bytes and needs a little-endian host")


@dataclass(frozen=True)
class DType:
    """One supported element type (``parameter``: a model's weights may have it; int8 only travels)."""

    name: str
    torch_dtype: torch.dtype
    itemsize: int
    parameter: bool = True


DTYPES: tuple[DType, ...] = (
    DType("float32", torch.float32, 4),
    DType("float16", torch.float16, 2),
    DType("bfloat16", torch.bfloat16, 2),
    DType("float64", torch.float64, 8),
    DType("int8", torch.int8, 1, parameter=False),
)
BY_NAME: dict[str, DType] = {d.name: d for d in DTYPES}
BY_TORCH: dict[torch.dtype, DType] = {d.torch_dtype: d for d in DTYPES}


def dtype_named(name: str) -> DType:
    """The type called ``name`` (``"float32"``); ``ValueError`` naming the supported ones otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; supported: {', '.join(BY_NAME)}") from None


def parameter_dtype(name: str) -> DType:
    """The type called ``name``, which a parameter may have; ``ValueError`` otherwise."""
    kind = dtype_named(name)
    if not kind.parameter:
        raise ValueError(f"parameters may not be {name}; supported: {', '.join(d.name for d in DTYPES if d.parameter)}")
    return kind


def dtype_of(torch_dtype: torch.dtype) -> DType:
    """The type of a torch dtype; ``ValueError`` naming the supported ones otherwise."""
    try:
        return BY_TORCH[torch_dtype]
    except KeyError:
        raise ValueError(f"unsupported dtype {torch_dtype}; supported: {', '.join(BY_NAME)}") from None


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """View a tensor's elements as raw bytes (no copy when it is contiguous and on the CPU).

    The view is only valid while ``tensor`` lives and is not modified.
    """
    dtype_of(tensor.dtype)
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
    kind = dtype_of(dtype)
    view = memoryview(data)
    if view.nbytes % kind.itemsize:
        raise WireFormatError(f"{view.nbytes} bytes is not a whole number of {kind.name} elements")
    if view.nbytes == 0:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():
        # frombuffer warns that immutable bytes are not writable; we never write through it.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=dtype)
