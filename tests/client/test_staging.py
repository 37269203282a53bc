"""Pinned staging between device tensors and the wire (the GPU path's copies), on CPU tensors."""

from __future__ import annotations

import pytest
import torch

from ranger_ps.algorithm.layout import Layout
from ranger_ps.client.backend import PulledBlock
from ranger_ps.client.staging import PinnedStaging, needs_staging


def _layout() -> Layout:
    return Layout.from_named_tensors([("w", torch.zeros(4, 5)), ("b", torch.zeros(7))], block_size=6)


def test_needs_staging_only_off_the_cpu() -> None:
    assert not needs_staging([torch.zeros(2), torch.zeros(3)])
    assert needs_staging([torch.zeros(2, device="meta")])


def test_to_host_copies_exactly_the_chosen_blocks() -> None:
    layout = _layout()
    staging = PinnedStaging(layout, [torch.device("cpu")] * 2, pin=False)
    for buffer in staging.push_buffers:
        buffer.fill_(-1.0)
    flats = [torch.arange(20, dtype=torch.float32), torch.arange(100, 107, dtype=torch.float32)]
    chosen = [1, layout.num_blocks - 1]
    out = staging.to_host(flats, chosen)
    assert out is staging.push_buffers
    views = layout.block_views(out)
    sources = layout.block_views(flats)
    for block in layout.blocks:
        if block.block_id in chosen:
            assert torch.equal(views[block.block_id], sources[block.block_id])
        else:
            assert bool((views[block.block_id] == -1.0).all())  # untouched: only chosen blocks are copied


def test_to_host_all_blocks_when_none_chosen() -> None:
    layout = _layout()
    staging = PinnedStaging(layout, [torch.device("cpu")] * 2, pin=False)
    flats = [torch.randn(20), torch.randn(7)]
    out = staging.to_host(flats, None)
    assert all(torch.equal(a, b) for a, b in zip(out, flats, strict=True))


def test_to_device_writes_the_pulled_blocks_into_the_parameters() -> None:
    layout = _layout()
    staging = PinnedStaging(layout, [torch.device("cpu")] * 2, pin=False)
    params = [torch.zeros(20), torch.zeros(7)]
    views = layout.block_views(params)
    pulled = [
        PulledBlock(block.block_id, 3, torch.full((block.numel,), float(block.block_id + 1)))
        for block in layout.blocks
        if block.block_id % 2 == 0
    ]
    assert staging.to_device(pulled, views) == len(pulled)
    for block in layout.blocks:
        expected = float(block.block_id + 1) if block.block_id % 2 == 0 else 0.0
        assert bool((views[block.block_id] == expected).all())


def test_devices_must_match_the_layout() -> None:
    with pytest.raises(ValueError, match="expected 2 devices"):
        PinnedStaging(_layout(), [torch.device("cpu")], pin=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_round_trip_through_pinned_buffers_on_cuda() -> None:
    layout = _layout()
    device = torch.device("cuda")
    staging = PinnedStaging(layout, [device, device])
    assert all(b.is_pinned() for b in staging.push_buffers + staging.pull_buffers)
    flats = [torch.randn(20, device=device), torch.randn(7, device=device)]
    host = staging.to_host(flats, None)
    assert all(torch.equal(h, f.cpu()) for h, f in zip(host, flats, strict=True))
    params = [torch.zeros(20, device=device), torch.zeros(7, device=device)]
    pulled = [PulledBlock(b.block_id, 1, v) for b, v in zip(layout.blocks, layout.block_views(host), strict=True)]
    staging.to_device(pulled, layout.block_views(params))
    torch.cuda.synchronize()
    assert all(torch.equal(p, f) for p, f in zip(params, flats, strict=True))
