"""Tests for ranger_ps.algorithm.dtypes and ranger_ps.wire.codec: tensor <-> raw little-endian bytes, wire dtypes."""

from __future__ import annotations

import pytest
import torch

from ranger_ps.algorithm.dtypes import BY_NAME, BY_TORCH
from ranger_ps.errors import WireFormatError
from ranger_ps.wire._proto import ranger_ps_pb2 as pb
from ranger_ps.wire.codec import (
    BY_WIRE,
    bytes_to_tensor,
    codec_for_name,
    codec_for_torch,
    codec_for_wire,
    tensor_bytes,
)

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _random(numel: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=gen, dtype=torch.float64).to(dtype)


def _assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-exact equality (also treats NaNs and signed zeros strictly)."""
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    a = actual.contiguous().view(torch.uint8)
    e = expected.contiguous().view(torch.uint8)
    assert torch.equal(a, e)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("numel", [1, 3, 1000, 65537])
def test_round_trip(dtype: torch.dtype, numel: int) -> None:
    original = _random(numel, dtype)
    data = tensor_bytes(original)
    assert isinstance(data, memoryview)
    assert data.nbytes == numel * codec_for_torch(dtype).itemsize
    back = bytes_to_tensor(data, dtype)
    assert back.dim() == 1
    _assert_same_bits(back, original)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_round_trip_through_immutable_bytes(dtype: torch.dtype) -> None:
    original = _random(17, dtype, seed=3)
    back = bytes_to_tensor(bytes(tensor_bytes(original)), dtype)
    _assert_same_bits(back, original)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_special_values_round_trip(dtype: torch.dtype) -> None:
    original = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1.0, -2.5], dtype=dtype)
    back = bytes_to_tensor(tensor_bytes(original), dtype)
    _assert_same_bits(back, original)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (0, 5), (3, 0, 2)])
def test_empty_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    data = tensor_bytes(torch.empty(shape, dtype=dtype))
    assert data.nbytes == 0
    back = bytes_to_tensor(data, dtype)
    assert back.dtype == dtype
    assert back.shape == (0,)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("data", [b"", bytearray(), memoryview(b"")], ids=["bytes", "bytearray", "memoryview"])
def test_empty_bytes_give_empty_tensor(dtype: torch.dtype, data: bytes | bytearray | memoryview) -> None:
    back = bytes_to_tensor(data, dtype)
    assert back.dtype == dtype
    assert back.numel() == 0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_scalar_tensor(dtype: torch.dtype) -> None:
    original = torch.tensor(1.5, dtype=dtype)
    back = bytes_to_tensor(tensor_bytes(original), dtype)
    _assert_same_bits(back, original.reshape(1))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_multidimensional_tensor_is_flattened_in_row_major_order(dtype: torch.dtype) -> None:
    original = _random(24, dtype).reshape(2, 3, 4)
    back = bytes_to_tensor(tensor_bytes(original), dtype)
    _assert_same_bits(back, original.reshape(-1))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_transposed_input_round_trips_by_value(dtype: torch.dtype) -> None:
    base = _random(5 * 7, dtype).reshape(5, 7)
    transposed = base.t()
    assert not transposed.is_contiguous()
    back = bytes_to_tensor(tensor_bytes(transposed), dtype)
    _assert_same_bits(back, transposed.reshape(-1))
    # The logical (transposed) order travels, not the storage order.
    assert not torch.equal(back.view(torch.uint8), base.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_strided_input_round_trips_by_value(dtype: torch.dtype) -> None:
    base = _random(101, dtype, seed=7)
    strided = base[1::3]
    assert not strided.is_contiguous()
    back = bytes_to_tensor(tensor_bytes(strided), dtype)
    _assert_same_bits(back, strided.clone())


def test_non_contiguous_bytes_outlive_the_temporary_copy() -> None:
    base = _random(64, torch.float32).reshape(8, 8)
    expected = base.t().contiguous().reshape(-1).clone()
    data = tensor_bytes(base.t())
    # Churn the allocator; the view must still hold the transposed values.
    for _ in range(10):
        torch.full((64,), 123.0).add_(1)
    _assert_same_bits(bytes_to_tensor(bytes(data), torch.float32), expected)


def test_requires_grad_tensor_is_accepted() -> None:
    original = _random(9, torch.float32).requires_grad_()
    back = bytes_to_tensor(tensor_bytes(original), torch.float32)
    _assert_same_bits(back, original.detach())


def test_contiguous_tensor_bytes_is_zero_copy() -> None:
    original = torch.zeros(4, dtype=torch.float32)
    data = tensor_bytes(original)
    original[2] = 1.0
    back = bytes_to_tensor(bytes(data), torch.float32)
    assert back.tolist() == [0.0, 0.0, 1.0, 0.0]


def test_bytes_are_little_endian() -> None:
    data = tensor_bytes(torch.tensor([1.0], dtype=torch.float32))
    assert bytes(data) == b"\x00\x00\x80\x3f"
    data = tensor_bytes(torch.tensor([1.0], dtype=torch.bfloat16))
    assert bytes(data) == b"\x80\x3f"


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_partial_element_raises_wire_format_error(dtype: torch.dtype) -> None:
    itemsize = codec_for_torch(dtype).itemsize
    for nbytes in range(1, 3 * itemsize):
        if nbytes % itemsize == 0:
            continue
        with pytest.raises(WireFormatError):
            bytes_to_tensor(b"\x00" * nbytes, dtype)


def test_wire_format_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        bytes_to_tensor(b"\x00\x00\x00", torch.float32)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64], ids=str)
def test_unsupported_dtype_raises_value_error(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="unsupported dtype"):
        tensor_bytes(torch.zeros(4, dtype=dtype))
    with pytest.raises(ValueError, match="unsupported dtype"):
        bytes_to_tensor(b"\x00" * 64, dtype)
    with pytest.raises(ValueError):
        codec_for_torch(dtype)


def test_unsupported_dtype_is_not_a_wire_format_error() -> None:
    with pytest.raises(ValueError) as info:
        bytes_to_tensor(b"\x00" * 8, torch.int64)
    assert not isinstance(info.value, WireFormatError)


def test_registry_covers_every_wire_dtype() -> None:
    wire_values = {v.number for v in pb.DType.DESCRIPTOR.values}
    assert pb.DTYPE_UNSPECIFIED in wire_values
    assert set(BY_WIRE) == wire_values - {pb.DTYPE_UNSPECIFIED}
    assert pb.DTYPE_UNSPECIFIED not in BY_WIRE


def test_registry_tables_are_consistent() -> None:
    assert len(BY_WIRE) == len(BY_TORCH) == len(BY_NAME)
    for wire, entry in BY_WIRE.items():
        assert entry.wire == wire
        assert BY_TORCH[entry.torch_dtype] is entry.dtype
        assert BY_NAME[entry.name] is entry.dtype
        assert codec_for_wire(wire) is entry
        assert codec_for_name(entry.name) is entry
        assert codec_for_torch(entry.torch_dtype) is entry
        assert torch.empty(0, dtype=entry.torch_dtype).element_size() == entry.itemsize
        assert pb.DType.Name(wire) == entry.name.upper()


def test_unknown_wire_dtype_raises_wire_format_error() -> None:
    with pytest.raises(WireFormatError):
        codec_for_wire(pb.DTYPE_UNSPECIFIED)
    with pytest.raises(WireFormatError):
        codec_for_wire(99)


def test_unknown_name_raises_value_error() -> None:
    with pytest.raises(ValueError, match="unknown dtype"):
        codec_for_name("int64")


def test_bytes_to_tensor_shares_memory_with_bytearray() -> None:
    buf = bytearray(tensor_bytes(torch.arange(8, dtype=torch.float32)))
    tensor = bytes_to_tensor(buf, torch.float32)
    assert tensor.tolist() == [float(i) for i in range(8)]
    # Writing the buffer shows through the tensor ...
    buf[0:4] = bytes(tensor_bytes(torch.tensor([42.0])))
    assert tensor[0].item() == 42.0
    # ... and writing the tensor shows through the buffer: no copy either way.
    tensor[7] = -1.0
    assert bytes(buf[28:32]) == bytes(tensor_bytes(torch.tensor([-1.0])))


def test_bytes_to_tensor_shares_memory_with_memoryview_slice() -> None:
    buf = bytearray(16)
    tensor = bytes_to_tensor(memoryview(buf)[8:16], torch.float32)
    assert tensor.shape == (2,)
    tensor.fill_(1.0)
    assert bytes(buf[:8]) == b"\x00" * 8
    assert bytes(buf[8:]) == b"\x00\x00\x80\x3f" * 2


def test_bytes_to_tensor_does_not_warn_for_immutable_bytes(recwarn: pytest.WarningsRecorder) -> None:
    bytes_to_tensor(b"\x00" * 8, torch.float32)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
