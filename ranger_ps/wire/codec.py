"""Element types on the wire: the ``DType`` enum of the .proto, mapped onto the supported types.

The registry below is checked complete against the wire enum at import, so adding a dtype to the
.proto without a type fails loudly. Tensors travel as their raw little-endian bytes
(:func:`~ranger_ps.algorithm.dtypes.tensor_bytes`, :func:`~ranger_ps.algorithm.dtypes.bytes_to_tensor`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ranger_ps.algorithm.dtypes import BY_NAME, DType, bytes_to_tensor, dtype_named, dtype_of, tensor_bytes
from ranger_ps.errors import WireFormatError
from ranger_ps.wire._proto import ranger_ps_pb2 as pb

__all__ = ["DTypeCodec", "bytes_to_tensor", "codec_for_name", "codec_for_torch", "codec_for_wire", "tensor_bytes"]


@dataclass(frozen=True)
class DTypeCodec:
    """How one supported type is named on the wire."""

    wire: pb.DType
    dtype: DType

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.dtype.torch_dtype

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def name(self) -> str:
        return self.dtype.name


_WIRE_NAMES = {
    pb.FLOAT32: "float32",
    pb.FLOAT16: "float16",
    pb.BFLOAT16: "bfloat16",
    pb.FLOAT64: "float64",
    pb.INT8: "int8",
}
BY_WIRE: dict[int, DTypeCodec] = {wire: DTypeCodec(wire, BY_NAME[name]) for wire, name in _WIRE_NAMES.items()}
_BY_DTYPE_NAME: dict[str, DTypeCodec] = {c.name: c for c in BY_WIRE.values()}

_missing = {v.number for v in pb.DType.DESCRIPTOR.values if v.number != pb.DTYPE_UNSPECIFIED} - set(BY_WIRE)
if _missing or set(_BY_DTYPE_NAME) != set(BY_NAME):  # pragma: no cover - guards future edits
    raise ImportError(f"wire dtypes and supported dtypes disagree (no codec for wire dtypes {sorted(_missing)})")


def codec_for_torch(dtype: torch.dtype) -> DTypeCodec:
    """The codec of a torch dtype, or ``ValueError`` naming the supported ones."""
    return _BY_DTYPE_NAME[dtype_of(dtype).name]


def codec_for_wire(wire: int) -> DTypeCodec:
    """The codec of a wire dtype, or :class:`WireFormatError`."""
    try:
        return BY_WIRE[wire]
    except KeyError:
        raise WireFormatError(f"unknown wire dtype {wire}") from None


def codec_for_name(name: str) -> DTypeCodec:
    """The codec for a dtype name such as ``"float32"``."""
    return _BY_DTYPE_NAME[dtype_named(name).name]
