"""Pushed values in fewer bytes: bfloat16, or int8 with a per-block scale.

A worker pushes blocks of its residual; quantizing them shrinks the bytes, and the quantization
error stays in the residual (the worker subtracts what the shards will actually add), so nothing is
lost, only delayed, exactly as with blocks that were not chosen. ``int8`` stores each block as
``round(x / scale)`` with ``scale = max|x| / 127`` (one float32 per block on the wire).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PUSH_DTYPES = ("float32", "bfloat16", "int8")
INT8_LEVELS = 127


@dataclass(frozen=True)
class Quantized:
    """One block as pushed: its payload and, for int8, the scale that turns it back into values."""

    payload: torch.Tensor
    scale: float | None = None


_FLOATING = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def quantize(values: torch.Tensor, dtype: str) -> Quantized:
    """One block's values as pushed: converted to a floating dtype (by name), or int8 with a scale."""
    if dtype in _FLOATING:
        return Quantized(values.to(_FLOATING[dtype], copy=True))  # never a view of what the caller zeroes next
    if dtype == "int8":
        peak = float(values.abs().max()) if values.numel() else 0.0
        scale = peak / INT8_LEVELS if peak > 0 else 1.0
        return Quantized(torch.round(values.float() / scale).clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8), scale)
    raise ValueError(f"push dtype must be int8 or a floating dtype, got {dtype!r}")


def dequantize(block: Quantized, dtype: torch.dtype) -> torch.Tensor:
    """The values a quantized block stands for, in ``dtype`` (a new tensor)."""
    if block.payload.dtype == torch.int8:
        if block.scale is None:
            raise ValueError("an int8 block needs its scale")
        return block.payload.to(torch.float32).mul_(block.scale).to(dtype)
    return block.payload.to(dtype, copy=True)


def quantize_blocks(values: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Many blocks laid end to end (``lengths`` each) as int8, in a few vectorized calls.

    Returns the int8 levels and one float32 scale per block, as :func:`quantize` would give block by
    block (a block of zeros gets scale 1).
    """
    lengths = lengths.to(values.device)
    owner = torch.repeat_interleave(torch.arange(len(lengths), device=values.device), lengths)
    peaks = torch.zeros(len(lengths), dtype=torch.float32, device=values.device)
    peaks.scatter_reduce_(0, owner, values.abs().float(), reduce="amax", include_self=True)
    scales = torch.where(peaks > 0, peaks / INT8_LEVELS, torch.ones_like(peaks))
    levels = torch.round(values.float() / scales[owner]).clamp_(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
    return levels, scales
