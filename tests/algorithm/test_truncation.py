"""Tests for ranger_ps.algorithm.truncation: server-side truncation, residual and clipping of block gradients."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ranger_ps.algorithm.rules import RuleConfig, apply_update, new_block_state
from ranger_ps.algorithm.truncation import truncate


@pytest.fixture(scope="module", autouse=True)
def _warm_torch() -> None:
    """Pay torch's one-time lazy imports (torch.testing, about 1 s) outside any single test."""
    torch.testing.assert_close(torch.zeros(1), torch.zeros(1))


def _grad(seed: int, numel: int = 64, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- off by default ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sgd", "adamw", "ranger"])
def test_off_by_default_returns_the_same_tensor(name: str) -> None:
    grad = _grad(0)
    original = grad.clone()
    out = truncate(RuleConfig(rule=name, lr=0.01, outer="rule"), grad, None)
    assert out is grad
    assert torch.equal(grad, original)


# --- truncate_below ------------------------------------------------------------------------


def test_truncate_below_zeroes_small_entries_and_keeps_the_rest() -> None:
    grad = torch.tensor([0.5, -0.5, 0.49, -0.49, 0.0, 2.0, -3.0, 1e-9])
    out = truncate(RuleConfig(truncate_below=0.5, lr=0.01, momentum=0.0, outer="rule"), grad, None)
    assert out.tolist() == [0.5, -0.5, 0.0, 0.0, 0.0, 2.0, -3.0, 0.0]


def test_truncate_below_random() -> None:
    grad = _grad(1)
    threshold = 0.7
    out = truncate(RuleConfig(truncate_below=threshold, lr=0.01, momentum=0.0, outer="rule"), grad, None)
    small = grad.abs() < threshold
    assert small.any() and (~small).any()
    assert torch.equal(out[small], torch.zeros(int(small.sum())))
    assert torch.equal(out[~small], grad[~small])


def test_truncate_keeps_dtype() -> None:
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        grad = _grad(2, dtype=dtype)
        out = truncate(
            RuleConfig(truncate_below=0.5, clip_value=1.0, clip_norm=3.0, lr=0.01, momentum=0.0, outer="rule"),
            grad,
            None,
        )
        assert out.dtype == dtype
        assert out.shape == grad.shape


# --- residual ------------------------------------------------------------------------------


def test_residual_stores_what_truncation_removed() -> None:
    config = RuleConfig(truncate_below=0.5, truncation_residual=True, lr=0.01, momentum=0.0, outer="rule")
    residual = torch.zeros(4)
    out = truncate(config, torch.tensor([0.3, -0.2, 1.0, -0.6]), residual)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, 1.0, -0.6]))
    torch.testing.assert_close(residual, torch.tensor([0.3, -0.2, 0.0, 0.0]))
    # The residual is added to the next gradient: 0.3 + 0.3 now crosses the threshold.
    out = truncate(config, torch.tensor([0.3, -0.2, 0.1, 0.0]), residual)
    torch.testing.assert_close(out, torch.tensor([0.6, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(residual, torch.tensor([0.0, -0.4, 0.1, 0.0]))


def test_residual_without_threshold_is_flushed() -> None:
    config = RuleConfig(truncation_residual=True, lr=0.01, momentum=0.0, outer="rule")
    residual = torch.tensor([0.25, -1.0])
    grad = torch.tensor([1.0, 1.0])
    out = truncate(config, grad, residual)
    assert out.tolist() == [1.25, 0.0]
    assert residual.tolist() == [0.0, 0.0]
    assert grad.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("threshold", [0.1, 0.5, 1.5])
def test_residual_loses_no_mass(threshold: float) -> None:
    config = RuleConfig(truncate_below=threshold, truncation_residual=True, lr=0.01, momentum=0.0, outer="rule")
    gen = torch.Generator().manual_seed(3)
    residual = torch.zeros(32, dtype=torch.float64)
    applied = torch.zeros(32, dtype=torch.float64)
    pushed = torch.zeros(32, dtype=torch.float64)
    any_truncated = False
    for _ in range(200):
        grad = 0.3 * torch.randn(32, generator=gen, dtype=torch.float64)
        out = truncate(config, grad, residual)
        any_truncated |= bool((out == 0).any())
        applied += out
        pushed += grad
        torch.testing.assert_close(applied + residual, pushed, atol=1e-10, rtol=0)
        # What was applied is above the threshold; what is held back is below it.
        assert bool((out[out != 0].abs() >= threshold).all())
        assert bool((residual.abs() < threshold).all())
    assert any_truncated
    assert bool((applied != 0).any())


def test_truncation_without_residual_drops_mass() -> None:
    config = RuleConfig(truncate_below=0.5, lr=0.01, momentum=0.0, outer="rule")
    out = truncate(config, torch.tensor([0.3, 0.3]), None)
    assert out.tolist() == [0.0, 0.0]
    out = truncate(config, torch.tensor([0.3, 0.3]), None)
    assert out.tolist() == [0.0, 0.0]


# --- clipping ------------------------------------------------------------------------------


def test_clip_value_clamps() -> None:
    grad = torch.tensor([-5.0, -1.0, -0.5, 0.0, 0.5, 1.0, 5.0])
    out = truncate(RuleConfig(clip_value=1.0, lr=0.01, momentum=0.0, outer="rule"), grad, None)
    assert out.tolist() == [-1.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.0]


def test_clip_norm_scales_large_blocks() -> None:
    grad = _grad(4) * 10
    norm = torch.linalg.vector_norm(grad)
    assert norm > 5.0
    out = truncate(RuleConfig(clip_norm=5.0, lr=0.01, momentum=0.0, outer="rule"), grad, None)
    torch.testing.assert_close(out, grad * (5.0 / (norm + 1e-6)))
    assert float(torch.linalg.vector_norm(out)) == pytest.approx(5.0, rel=1e-5)
    # The same coefficient as torch.nn.utils.clip_grad_norm_.
    p = torch.nn.Parameter(torch.zeros_like(grad))
    p.grad = grad.clone()
    torch.nn.utils.clip_grad_norm_([p], 5.0)
    torch.testing.assert_close(out, p.grad)


def test_clip_norm_leaves_small_blocks_unchanged() -> None:
    grad = _grad(5) * 0.01
    assert torch.linalg.vector_norm(grad) < 1.0
    out = truncate(RuleConfig(clip_norm=1.0, lr=0.01, momentum=0.0, outer="rule"), grad, None)
    assert torch.equal(out, grad)


def test_clip_norm_of_a_zero_block() -> None:
    out = truncate(RuleConfig(clip_norm=1.0, lr=0.01, momentum=0.0, outer="rule"), torch.zeros(5), None)
    assert torch.equal(out, torch.zeros(5))


# --- the input is never modified -----------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        RuleConfig(truncate_below=0.5, lr=0.01, momentum=0.0, outer="rule"),
        RuleConfig(truncate_below=0.5, truncation_residual=True, lr=0.01, momentum=0.0, outer="rule"),
        RuleConfig(truncation_residual=True, lr=0.01, momentum=0.0, outer="rule"),
        RuleConfig(clip_value=0.3, lr=0.01, momentum=0.0, outer="rule"),
        RuleConfig(clip_norm=0.5, lr=0.01, momentum=0.0, outer="rule"),
        RuleConfig(
            truncate_below=0.2,
            truncation_residual=True,
            clip_value=1.0,
            clip_norm=2.0,
            lr=0.01,
            momentum=0.0,
            outer="rule",
        ),
    ],
    ids=str,
)
def test_input_grad_is_never_modified(config: RuleConfig) -> None:
    residual = torch.full((64,), 0.1) if config.truncation_residual else None
    for seed in range(3):
        grad = _grad(seed)
        original = grad.clone()
        out = truncate(config, grad, residual)
        assert torch.equal(grad, original)
        assert out.data_ptr() != grad.data_ptr()
        if residual is not None:
            assert out.data_ptr() != residual.data_ptr()


# --- order: residual add -> truncate -> clip_value -> clip_norm ----------------------------


def test_residual_is_added_before_truncating() -> None:
    # Residual first: 0.3 + 0.3 = 0.6 passes 0.5. Truncating first would drop the 0.3.
    residual = torch.tensor([0.3])
    out = truncate(
        RuleConfig(truncate_below=0.5, truncation_residual=True, lr=0.01, momentum=0.0, outer="rule"),
        torch.tensor([0.3]),
        residual,
    )
    torch.testing.assert_close(out, torch.tensor([0.6]))
    assert residual.tolist() == [0.0]


def test_truncation_comes_before_clip_value() -> None:
    # Truncate first: 0.8 survives 0.5, then clamps to 0.4. Clamping first would give 0.4 < 0.5 -> 0.
    out = truncate(
        RuleConfig(truncate_below=0.5, clip_value=0.4, lr=0.01, momentum=0.0, outer="rule"),
        torch.tensor([0.8, 0.3]),
        None,
    )
    torch.testing.assert_close(out, torch.tensor([0.4, 0.0]))


def test_truncation_comes_before_clip_norm() -> None:
    # Truncate first: [3, 0] -> norm 3 -> [~1, 0]. Clipping first: [0.991, 0.132] -> [0.991, 0].
    out = truncate(
        RuleConfig(truncate_below=0.5, clip_norm=1.0, lr=0.01, momentum=0.0, outer="rule"),
        torch.tensor([3.0, 0.4]),
        None,
    )
    torch.testing.assert_close(out, torch.tensor([3.0 / (3.0 + 1e-6), 0.0]))


def test_clip_value_comes_before_clip_norm() -> None:
    # Clamp first: [2, 2] -> norm 2.83 -> [0.707, 0.707]. Norm first: [0.6, 0.8], clamp no-op.
    out = truncate(
        RuleConfig(clip_value=2.0, clip_norm=1.0, lr=0.01, momentum=0.0, outer="rule"), torch.tensor([3.0, 4.0]), None
    )
    expected = torch.tensor([2.0, 2.0]) / (8.0**0.5 + 1e-6)
    torch.testing.assert_close(out, expected)


def test_full_pipeline_order() -> None:
    config = RuleConfig(
        truncate_below=0.5, truncation_residual=True, clip_value=1.0, clip_norm=1.5, lr=0.01, momentum=0.0, outer="rule"
    )
    residual = torch.tensor([0.3, 0.0, 0.0, 0.2])
    grad = torch.tensor([0.3, 5.0, -0.4, 0.2])
    out = truncate(config, grad, residual)
    # + residual: [0.6, 5.0, -0.4, 0.4]; truncate: [0.6, 5.0, 0, 0], residual [0, 0, -0.4, 0.4];
    # clamp: [0.6, 1.0, 0, 0]; norm 1.166 < 1.5, unchanged.
    torch.testing.assert_close(out, torch.tensor([0.6, 1.0, 0.0, 0.0]))
    # Only truncation feeds the residual; clipping's loss is not kept.
    torch.testing.assert_close(residual, torch.tensor([0.0, 0.0, -0.4, 0.4]))
    assert grad.tolist() == pytest.approx([0.3, 5.0, -0.4, 0.2])


# --- through apply_update ------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        RuleConfig(lr=1.0, truncate_below=0.6, momentum=0.0, outer="rule"),
        RuleConfig(lr=1.0, truncate_below=0.6, truncation_residual=True, momentum=0.0, outer="rule"),
        RuleConfig(lr=1.0, clip_value=0.5, momentum=0.0, outer="rule"),
        RuleConfig(lr=1.0, clip_norm=1.0, momentum=0.0, outer="rule"),
        RuleConfig(
            lr=1.0,
            truncate_below=0.3,
            truncation_residual=True,
            clip_value=1.0,
            clip_norm=2.0,
            momentum=0.0,
            outer="rule",
        ),
    ],
    ids=str,
)
def test_apply_update_truncates_before_the_rule(config: RuleConfig) -> None:
    numel, block = 48, 16
    param = _grad(10, numel)
    initial = param.clone()
    blocks = [param[i : i + block] for i in range(0, numel, block)]
    states = [new_block_state(config, block, param.dtype) for _ in blocks]
    residuals = [torch.zeros(block) for _ in blocks]
    for step in range(4):
        grad = _grad(20 + step, numel)
        original = grad.clone()
        grad_blocks = [grad[i : i + block] for i in range(0, numel, block)]
        expected = []
        for g, r in zip(grad_blocks, residuals, strict=True):
            expected.append(truncate(config, g, r if config.truncation_residual else None))
        before = param.clone()
        apply_update(config, blocks, grad_blocks, states)
        torch.testing.assert_close(param - before, -torch.cat(expected), atol=1e-6, rtol=0)
        assert torch.equal(grad, original)
        if config.truncation_residual:
            for state, r in zip(states, residuals, strict=True):
                assert state.residual is not None
                torch.testing.assert_close(state.residual, r)
    assert not torch.equal(param, initial)
    assert all(s.step == 4 for s in states)


def test_apply_update_clips_each_block_separately() -> None:
    config = RuleConfig(lr=1.0, clip_norm=1.0, momentum=0.0, outer="rule")
    param = torch.zeros(4)
    grads = [torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])]
    states = [new_block_state(config, 2, param.dtype) for _ in range(2)]
    apply_update(config, [param[:2], param[2:]], grads, states)
    torch.testing.assert_close(param, torch.tensor([-0.6, -0.8, -0.3, -0.4]), atol=1e-6, rtol=0)


def test_apply_update_residual_with_momentum_and_low_precision() -> None:
    # Truncation happens on the float32 gradient against a float32 residual, also for bfloat16.
    config = dataclasses.replace(
        RuleConfig(lr=0.1, momentum=0.9, outer="rule"), truncate_below=0.5, truncation_residual=True
    )
    param = torch.zeros(4, dtype=torch.bfloat16)
    state = new_block_state(config, 4, param.dtype)
    assert state.residual is not None
    assert state.residual.dtype == torch.float32
    grad = torch.tensor([0.25, 0.25, 1.0, -0.125], dtype=torch.bfloat16)
    apply_update(config, [param], [grad], [state])
    torch.testing.assert_close(state.residual, torch.tensor([0.25, 0.25, 0.0, -0.125]))
    torch.testing.assert_close(param, torch.tensor([0.0, 0.0, -0.1, 0.0], dtype=torch.bfloat16))
    apply_update(config, [param], [grad], [state])
    # 0.25 + 0.25 reaches the threshold on the second push.
    torch.testing.assert_close(state.residual, torch.tensor([0.0, 0.0, 0.0, -0.25]))
    assert param.dtype == torch.bfloat16
