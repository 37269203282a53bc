"""Tests for ranger_ps.algorithm.selection: seeds, block choice, subsample, warm-up, centralization, error feedback."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch

from ranger_ps.algorithm.feedback import ErrorFeedback
from ranger_ps.algorithm.layout import Layout, ParamInfo
from ranger_ps.algorithm.selection import (
    SelectionConfig,
    block_count,
    centralize_,
    check_fraction,
    choose_blocks,
    density_at,
    derive_seed,
    subsample_indices,
)

# Four parameters of uneven sizes with block_size 4: blocks of 4 and shorter tails, and a
# one-element parameter that is a single block.
LAYOUT = Layout(
    (
        ParamInfo("w1", (3, 5), "float32"),
        ParamInfo("b1", (3,), "float32"),
        ParamInfo("w2", (2, 4), "float32"),
        ParamInfo("s", (1,), "float32"),
    ),
    block_size=4,
)


def _zeros(layout: Layout = LAYOUT) -> list[torch.Tensor]:
    return [torch.zeros(p.numel, dtype=torch.float32) for p in layout.params]


def _grads(gen: torch.Generator, layout: Layout = LAYOUT) -> list[torch.Tensor]:
    return [torch.randn(p.numel, generator=gen) for p in layout.params]


# --- SelectionConfig -------------------------------------------------------------------------------


def test_config_defaults_are_dense() -> None:
    config = SelectionConfig()
    assert config.push_fraction == 1.0 and config.error_feedback
    assert density_at(1, config) == 1.0
    assert type(density_at(1, SelectionConfig(push_fraction=1, warmup_start=1))) is float


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"push_fraction": 0}, "push_fraction"),
        ({"push_fraction": 1.5}, "push_fraction"),
        ({"push_fraction": -0.1}, "push_fraction"),
        ({"push_fraction": math.nan}, "push_fraction"),
        ({"push_fraction": True}, "push_fraction"),
        ({"error_feedback": 1}, "error_feedback"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.0}, "warmup_steps"),
        ({"push_fraction": 0.5, "warmup_start": 0.4}, "warmup_start"),
        ({"warmup_start": 1.01}, "warmup_start"),
        ({"seed": -1}, "seed"),
        ({"seed": 1 << 63}, "seed"),
        ({"seed": 1.0}, "seed"),
    ],
)
def test_config_validation_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must"):
        SelectionConfig(**kwargs)


@pytest.mark.parametrize("value", [0.0, 2, math.nan, True])
def test_subsample_fractions_are_checked(value: object) -> None:
    with pytest.raises(ValueError, match=r"^subsample must be in \(0, 1\]"):
        check_fraction("subsample", value)


def test_config_push_fraction_message() -> None:
    with pytest.raises(ValueError, match=r"^push_fraction must be in \(0, 1\], got 0$"):
        SelectionConfig(push_fraction=0)


def test_config_accepts_edges() -> None:
    SelectionConfig(push_fraction=1, warmup_steps=0, warmup_start=1, seed=(1 << 63) - 1)
    SelectionConfig(push_fraction=0.01, warmup_start=0.01, warmup_steps=10)


# --- derive_seed ----------------------------------------------------------------------------------


def test_derive_seed_is_pinned() -> None:
    # Hard-coded: a change here silently changes every run's block choices and subsamples.
    assert derive_seed(0, 0, 1, 1) == 4204866451171790006
    assert derive_seed() == 1449310910991872227
    assert derive_seed(-1, (1 << 63) - 1) == 3648127865178377346


def test_derive_seed_properties() -> None:
    seeds = {derive_seed(s, w, t, p) for s in range(3) for w in range(3) for t in range(3) for p in (1, 2)}
    assert len(seeds) == 54
    assert all(0 <= s < 1 << 63 for s in seeds)
    # Order matters and parts are not concatenated as text ("1", "23" vs "12", "3").
    assert derive_seed(1, 2) != derive_seed(2, 1)
    assert derive_seed(1, 23) != derive_seed(12, 3)


@pytest.mark.parametrize("bad", [1 << 63, -(1 << 63) - 1, 1.5, True])
def test_derive_seed_rejects(bad: Any) -> None:
    with pytest.raises(ValueError):
        derive_seed(0, bad)


# --- block_count ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_blocks", "fraction", "expected"),
    [
        (0, 0.5, 0),
        (0, 1.0, 0),
        (1000, 1e-9, 1),
        (1, 0.01, 1),
        (100, 0.07, 7),
        (100, 0.29, 29),
        (10, 0.25, 3),
        (7, 1.0, 7),
        (7, 3.0, 7),
        (3, 0.999, 3),
    ],
)
def test_block_count(num_blocks: int, fraction: float, expected: int) -> None:
    assert block_count(num_blocks, fraction) == expected


def test_block_count_float_guard_over_a_grid() -> None:
    # k/100 of 100 blocks is exactly k blocks for every k, although k/100 * 100 often is not k.
    for k in range(1, 101):
        assert block_count(100, k / 100) == k


@pytest.mark.parametrize(("num_blocks", "fraction"), [(-1, 0.5), (10, 0.0), (10, -0.5), (10, math.nan)])
def test_block_count_rejects(num_blocks: int, fraction: float) -> None:
    with pytest.raises(ValueError):
        block_count(num_blocks, fraction)


# --- choose_blocks --------------------------------------------------------------------------------


def test_choose_blocks_shape_and_determinism() -> None:
    for step in range(1, 30):
        chosen = choose_blocks(40, 0.3, seed=7, worker_id=1, step=step)
        assert len(chosen) == 12
        assert chosen == sorted(set(chosen))
        assert all(0 <= b < 40 for b in chosen)
        assert chosen == choose_blocks(40, 0.3, seed=7, worker_id=1, step=step)


def test_choose_blocks_uses_its_documented_generator() -> None:
    # Anyone (another process, a test of the server) can recompute a worker's choice from the spec.
    gen = torch.Generator().manual_seed(derive_seed(3, 2, 5, 1))
    expected = sorted(torch.randperm(50, generator=gen)[:10].tolist())
    assert choose_blocks(50, 0.2, seed=3, worker_id=2, step=5) == expected


def test_choose_blocks_varies_with_worker_step_and_seed() -> None:
    base = choose_blocks(100, 0.1, seed=0, worker_id=0, step=1)
    assert choose_blocks(100, 0.1, seed=0, worker_id=1, step=1) != base
    assert choose_blocks(100, 0.1, seed=0, worker_id=0, step=2) != base
    assert choose_blocks(100, 0.1, seed=1, worker_id=0, step=1) != base
    choices = {tuple(choose_blocks(100, 0.1, seed=0, worker_id=w, step=t)) for w in range(4) for t in range(1, 26)}
    assert len(choices) == 100


def test_choose_blocks_is_uniform() -> None:
    counts: Counter[int] = Counter()
    for step in range(1, 2001):
        counts.update(choose_blocks(50, 0.1, seed=0, worker_id=0, step=step))
    # Expected 200 per block, standard deviation about 13.4: [100, 300] is a loose 7-sigma band.
    assert sorted(counts) == list(range(50))
    assert all(100 <= c <= 300 for c in counts.values()), counts


def test_choose_blocks_edges() -> None:
    assert choose_blocks(9, 1.0, seed=0, worker_id=0, step=1) == list(range(9))
    assert choose_blocks(0, 1.0, seed=0, worker_id=0, step=1) == []
    assert choose_blocks(0, 0.5, seed=0, worker_id=0, step=1) == []
    assert len(choose_blocks(9, 1e-6, seed=0, worker_id=0, step=1)) == 1
    with pytest.raises(ValueError):
        choose_blocks(-1, 1.0, seed=0, worker_id=0, step=1)


# --- subsample_indices ----------------------------------------------------------------------------


def test_subsample_indices() -> None:
    idx = subsample_indices(32, 0.25, seed=0, worker_id=3, step=4)
    assert idx.dtype == torch.int64 and idx.shape == (8,)
    assert torch.equal(idx, torch.unique(idx))  # sorted and distinct
    assert 0 <= int(idx.min()) and int(idx.max()) < 32
    assert torch.equal(idx, subsample_indices(32, 0.25, seed=0, worker_id=3, step=4))
    assert not torch.equal(idx, subsample_indices(32, 0.25, seed=0, worker_id=3, step=5))
    # Independent of the block choice of the same step (another purpose tag).
    gen = torch.Generator().manual_seed(derive_seed(0, 3, 4, 2))
    assert torch.equal(idx, torch.sort(torch.randperm(32, generator=gen)[:8]).values)


def test_subsample_indices_edges() -> None:
    full = subsample_indices(5, 1.0, seed=0, worker_id=0, step=1)
    assert torch.equal(full, torch.arange(5)) and full.dtype == torch.int64
    assert subsample_indices(5, 0.01, seed=0, worker_id=0, step=1).numel() == 1
    empty = subsample_indices(0, 0.5, seed=0, worker_id=0, step=1)
    assert empty.numel() == 0 and empty.dtype == torch.int64


# --- density_at -----------------------------------------------------------------------------------


def test_density_without_warmup() -> None:
    config = SelectionConfig(push_fraction=0.2, warmup_start=0.9)
    assert all(density_at(step, config) == 0.2 for step in (1, 2, 1000))


def test_density_warmup_endpoints_and_decay() -> None:
    config = SelectionConfig(push_fraction=0.05, warmup_steps=10, warmup_start=0.8)
    densities = [density_at(step, config) for step in range(1, 15)]
    assert densities[0] == 0.8
    assert densities[10:] == [0.05] * 4  # steps 11..14
    assert all(a > b for a, b in zip(densities[:10], densities[1:11], strict=True))
    # Geometric: a constant ratio from one step to the next.
    ratios = [b / a for a, b in zip(densities[:10], densities[1:11], strict=True)]
    assert ratios == pytest.approx([(0.05 / 0.8) ** 0.1] * 10)
    assert density_at(6, config) == pytest.approx(0.8 * (0.05 / 0.8) ** 0.5)


def test_density_flat_warmup_and_bad_step() -> None:
    config = SelectionConfig(push_fraction=0.3, warmup_steps=5, warmup_start=0.3)
    assert [density_at(s, config) for s in range(1, 8)] == [0.3] * 7
    for bad in (0, -1):
        with pytest.raises(ValueError, match="step"):
            density_at(bad, config)


# --- centralize_ ----------------------------------------------------------------------------------


def test_centralize_leaves_vectors_alone() -> None:
    for grad in (torch.randn(7), torch.tensor(3.0)):
        before = grad.clone()
        assert centralize_(grad) is grad
        assert torch.equal(grad, before)


@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 5, 5)])
def test_centralize_multidim(shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    grad = torch.randn(shape, generator=gen) + 3.0
    before = grad.clone()
    pointer = grad.data_ptr()
    out = centralize_(grad)
    assert out is grad and grad.data_ptr() == pointer
    dims = tuple(range(1, len(shape)))
    assert grad.mean(dim=dims).abs().max() < 1e-5
    # Only a per-row constant was removed.
    assert torch.allclose(grad, before - before.mean(dim=dims, keepdim=True), atol=1e-6)


# --- ErrorFeedback --------------------------------------------------------------------------------


def test_error_feedback_rejects_mismatched_residuals() -> None:
    with pytest.raises(ValueError, match="expected 4 residual"):
        ErrorFeedback(LAYOUT, _zeros()[:3])
    bad = _zeros()
    bad[0] = torch.zeros(14)
    with pytest.raises(ValueError, match="w1"):
        ErrorFeedback(LAYOUT, bad)
    bad[0] = torch.zeros(3, 5)  # right count, not flat
    with pytest.raises(ValueError, match="w1"):
        ErrorFeedback(LAYOUT, bad)


def test_select_rejects_bad_ids_and_changes_nothing() -> None:
    residuals = _zeros()
    feedback = ErrorFeedback(LAYOUT, residuals)
    grads = _grads(torch.Generator().manual_seed(0))
    n = LAYOUT.num_blocks
    for chosen, message in (([n], "out of range"), ([-1], "out of range"), ([1, 2, 1], "twice")):
        with pytest.raises(ValueError, match=message):
            feedback.select(grads, chosen)
        with pytest.raises(ValueError, match=message):
            feedback.select_flat(grads, chosen)
    with pytest.raises(ValueError, match="gradient"):
        feedback.select(grads[:2], [0])
    with pytest.raises(ValueError, match="w2"):
        feedback.select([grads[0], grads[1], grads[2].reshape(2, 4), grads[3]], [0])
    assert all(not r.any() for r in residuals)


@pytest.mark.parametrize("flat", [False, True])
def test_error_feedback_loses_no_gradient_mass(flat: bool) -> None:
    residuals = _zeros()
    feedback = ErrorFeedback(LAYOUT, residuals)
    gen = torch.Generator().manual_seed(1)
    total = _zeros(LAYOUT)
    delivered = _zeros(LAYOUT)
    for step in range(1, 201):
        grads = _grads(gen)
        for t, g in zip(total, grads, strict=True):
            t.add_(g)
        fraction = (step % 4 + 1) / 8
        chosen = choose_blocks(LAYOUT.num_blocks, fraction, seed=0, worker_id=0, step=step)
        if step % 3 == 0:
            chosen = chosen[::-1]  # order of chosen must not matter
        if flat:
            for d, pushed in zip(delivered, feedback.select_flat(grads, chosen), strict=True):
                d.add_(pushed)
        else:
            views = LAYOUT.block_views(delivered)
            for block_id, pushed in zip(chosen, feedback.select(grads, chosen), strict=True):
                views[block_id].add_(pushed)
    for t, d, r in zip(total, delivered, residuals, strict=True):
        torch.testing.assert_close(d + r, t, atol=1e-5, rtol=0)
    assert feedback.residual_norm() == pytest.approx(
        math.sqrt(sum(float(r.double().square().sum()) for r in residuals))
    )
    assert feedback.residual_norm() > 0


def test_select_pushes_memory_then_zeroes_it() -> None:
    residuals = _zeros()
    feedback = ErrorFeedback(LAYOUT, residuals)
    blocks = LAYOUT.blocks
    ones = [torch.ones(p.numel) for p in LAYOUT.params]
    # Block 0 is never chosen: it accumulates; block 1 is chosen every step: it pushes one step's worth.
    for step in range(1, 4):
        pushed = feedback.select(ones, [1])
        assert torch.equal(pushed[0], torch.ones(blocks[1].numel))
        memory = LAYOUT.block_views(residuals)
        assert torch.equal(memory[0], torch.full((blocks[0].numel,), float(step)))
        assert not memory[1].any()
    # Now push block 0: it carries all three steps plus this one.
    (pushed0,) = feedback.select(ones, [0])
    assert torch.equal(pushed0, torch.full((blocks[0].numel,), 4.0))
    assert not LAYOUT.block_views(residuals)[0].any()


def test_select_returns_copies_and_modifies_residuals_in_place() -> None:
    residuals = _zeros()
    originals = [r.data_ptr() for r in residuals]
    feedback = ErrorFeedback(LAYOUT, residuals)
    grads = _grads(torch.Generator().manual_seed(2))
    pushed = feedback.select(grads, [0, 5])
    kept = [p.clone() for p in pushed]
    feedback.select(grads, [0, 5])  # would overwrite the first result if it were a view
    assert all(torch.equal(a, b) for a, b in zip(pushed, kept, strict=True))
    assert [r.data_ptr() for r in residuals] == originals


def test_residuals_may_be_views_into_a_caller_buffer() -> None:
    # The optimizer may keep all residuals in one buffer; updates must land there.
    buffer = torch.zeros(LAYOUT.numel)
    residuals = list(torch.split(buffer, [p.numel for p in LAYOUT.params]))
    feedback = ErrorFeedback(LAYOUT, residuals)
    feedback.select([torch.ones(p.numel) for p in LAYOUT.params], [])
    assert torch.equal(buffer, torch.ones(LAYOUT.numel))


def test_disabled_pushes_raw_gradients_and_keeps_no_memory() -> None:
    residuals = _zeros()
    feedback = ErrorFeedback(LAYOUT, residuals, enabled=False)
    gen = torch.Generator().manual_seed(3)
    for step in range(1, 20):
        grads = _grads(gen)
        chosen = choose_blocks(LAYOUT.num_blocks, 0.3, seed=0, worker_id=0, step=step)
        pushed = feedback.select(grads, chosen)
        views = LAYOUT.block_views(grads)
        for block_id, values in zip(chosen, pushed, strict=True):
            assert torch.equal(values, views[block_id])
            assert values.data_ptr() != views[block_id].data_ptr()
        flat = feedback.select_flat(grads, chosen)
        expected = [torch.zeros_like(g) for g in grads]
        for block_id in chosen:
            LAYOUT.block_views(expected)[block_id].copy_(views[block_id])
        assert all(torch.equal(a, b) for a, b in zip(flat, expected, strict=True))
    assert all(not r.any() for r in residuals)
    assert feedback.residual_norm() == 0.0


def test_select_flat_equals_select_scattered() -> None:
    gen = torch.Generator().manual_seed(4)
    via_select, via_flat = ErrorFeedback(LAYOUT, _zeros()), ErrorFeedback(LAYOUT, _zeros())
    for step in range(1, 15):
        grads = _grads(gen)
        chosen = choose_blocks(LAYOUT.num_blocks, 0.4, seed=1, worker_id=0, step=step)
        expected = [torch.zeros_like(g) for g in grads]
        views = LAYOUT.block_views(expected)
        for block_id, values in zip(chosen, via_select.select(grads, chosen), strict=True):
            views[block_id].copy_(values)
        flat = via_flat.select_flat(grads, chosen)
        assert [f.shape for f in flat] == [g.shape for g in grads]
        assert all(torch.equal(a, b) for a, b in zip(flat, expected, strict=True))
    assert via_select.residual_norm() == via_flat.residual_norm()


def test_gradients_requiring_grad_do_not_leak_autograd() -> None:
    feedback = ErrorFeedback(LAYOUT, _zeros())
    grads = [torch.randn(p.numel, requires_grad=True) for p in LAYOUT.params]
    pushed = feedback.select(grads, [0, 1])
    assert not any(p.requires_grad for p in pushed)
    assert not any(p.requires_grad for p in feedback.select_flat(grads, [2]))
