"""Tests for ranger_ps.algorithm.rules: every rule against its reference, block states, and RuleConfig.

States are always made by ``new_block_state`` and updates always go through ``apply_update``:
that is the path the parameter server and the in-process optimizer take.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import msgpack
import pytest
import torch

from ranger_ps.algorithm.layout import Layout, ParamInfo
from ranger_ps.algorithm.rules import (
    RULE_NAMES,
    RULES,
    BlockState,
    RuleConfig,
    adamw,
    apply_update,
    new_block_state,
    radam_step_size,
    ranger,
    sgd,
    state_dtype,
)

STEPS = 30
SHAPE = (7, 5)
NUMEL = 35


def _sgd_settings() -> list[dict[str, Any]]:
    out = []
    for momentum, nesterov, dampening, weight_decay in itertools.product(
        (0.0, 0.9), (False, True), (0.0, 0.1), (0.0, 1e-2)
    ):
        if nesterov and (momentum == 0 or dampening != 0):
            continue
        out.append({"momentum": momentum, "nesterov": nesterov, "dampening": dampening, "weight_decay": weight_decay})
    return out


SETTINGS = _sgd_settings()
IDS = ["m{momentum}-n{nesterov:d}-d{dampening}-wd{weight_decay}".format(**s) for s in SETTINGS]
MOMENTUM_SETTINGS = [s for s in SETTINGS if s["momentum"] > 0]
MOMENTUM_IDS = [i for i, s in zip(IDS, SETTINGS, strict=True) if s["momentum"] > 0]


@pytest.fixture(scope="module", autouse=True)
def _warm_torch_optim() -> None:
    """Pay torch.optim's one-time lazy imports (about 2 s, torch._dynamo) outside any single test."""
    param = torch.nn.Parameter(torch.zeros(1))
    param.grad = torch.zeros(1)
    torch.optim.SGD([param], lr=0.1).step()
    torch.optim.AdamW([param], lr=0.1, foreach=False).step()


def _data(seed: int, shape: tuple[int, ...] = SHAPE, steps: int = STEPS) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    init = torch.randn(shape, generator=gen)
    grads = [torch.randn(shape, generator=gen) for _ in range(steps)]
    return init, grads


def _states(config: RuleConfig, blocks: Iterable[torch.Tensor]) -> list[BlockState]:
    return [new_block_state(config, b.numel(), b.dtype) for b in blocks]


def _blocked(layout: Layout, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return layout.block_views(layout.flat_views(tensors))


def _torch_sgd_run(init: torch.Tensor, grads: list[torch.Tensor], lr: float, settings: dict[str, Any]) -> torch.Tensor:
    param = torch.nn.Parameter(init.clone())
    optimizer = torch.optim.SGD([param], lr=lr, **settings)
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
    return param.detach()


# --- SGD -----------------------------------------------------------------------------------


def test_settings_grid() -> None:
    # momentum 0: 2 dampenings x 2 decays; momentum 0.9: (2 dampenings + nesterov) x 2 decays.
    assert len(SETTINGS) == 10
    assert all(not s["nesterov"] or (s["momentum"] > 0 and s["dampening"] == 0) for s in SETTINGS)


@pytest.mark.parametrize("settings", SETTINGS, ids=IDS)
def test_sgd_matches_torch(settings: dict[str, Any]) -> None:
    lr = 0.05
    init, grads = _data(seed=1)
    expected = _torch_sgd_run(init, grads, lr, settings)
    config = RuleConfig(lr=lr, **settings, outer="rule")
    param = init.clone()
    state = new_block_state(config, NUMEL, param.dtype)
    for grad in grads:
        apply_update(config, [param.view(-1)], [grad.view(-1)], [state])
    torch.testing.assert_close(param, expected, atol=1e-6, rtol=0)
    assert state.step == STEPS
    assert ("momentum_buffer" in state.tensors) == (settings["momentum"] > 0)


@pytest.mark.parametrize("settings", MOMENTUM_SETTINGS, ids=MOMENTUM_IDS)
def test_momentum_buffer_matches_torch(settings: dict[str, Any]) -> None:
    lr = 0.05
    init, grads = _data(seed=2)
    param_t = torch.nn.Parameter(init.clone())
    optimizer = torch.optim.SGD([param_t], lr=lr, **settings)
    config = RuleConfig(lr=lr, **settings, outer="rule")
    param = init.clone()
    state = new_block_state(config, NUMEL, param.dtype)
    for grad in grads[:5]:
        param_t.grad = grad.clone()
        optimizer.step()
        apply_update(config, [param.view(-1)], [grad.view(-1)], [state])
        torch.testing.assert_close(
            state.tensors["momentum_buffer"], optimizer.state[param_t]["momentum_buffer"].view(-1), atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("block_size", [1, 4, 8, 34, 35])
@pytest.mark.parametrize("settings", SETTINGS, ids=IDS)
def test_sgd_split_into_blocks_matches_torch(settings: dict[str, Any], block_size: int) -> None:
    lr = 0.05
    init, grads = _data(seed=3)
    expected = _torch_sgd_run(init, grads, lr, settings)
    config = RuleConfig(lr=lr, **settings, outer="rule")
    layout = Layout((ParamInfo("w", SHAPE, "float32"),), block_size)
    param = init.clone()
    blocks = _blocked(layout, [param])
    states = _states(config, blocks)
    for grad in grads:
        apply_update(config, blocks, _blocked(layout, [grad]), states)
    torch.testing.assert_close(param, expected, atol=1e-6, rtol=0)
    assert all(s.step == STEPS for s in states)
    if settings["momentum"]:
        assert [s.tensors["momentum_buffer"].numel() for s in states] == [b.numel for b in layout.blocks]


@pytest.mark.parametrize("settings", SETTINGS, ids=IDS)
def test_sgd_blocks_updated_one_call_each(settings: dict[str, Any]) -> None:
    # A server applies blocks in separate calls (different pushes); the result is the same.
    lr = 0.05
    init, grads = _data(seed=4)
    expected = _torch_sgd_run(init, grads, lr, settings)
    config = RuleConfig(lr=lr, **settings, outer="rule")
    layout = Layout((ParamInfo("w", SHAPE, "float32"),), 6)
    param = init.clone()
    blocks = _blocked(layout, [param])
    states = _states(config, blocks)
    for grad in grads:
        grad_blocks = _blocked(layout, [grad])
        for index in reversed(range(len(blocks))):
            apply_update(config, [blocks[index]], [grad_blocks[index]], [states[index]])
    torch.testing.assert_close(param, expected, atol=1e-6, rtol=0)


def test_sgd_several_parameters_several_blocks() -> None:
    settings: dict[str, Any] = {"momentum": 0.9, "nesterov": True, "dampening": 0.0, "weight_decay": 1e-2}
    lr = 0.1
    gen = torch.Generator().manual_seed(5)
    shapes = [(4, 3), (5,), (2, 2, 2)]
    inits = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(STEPS)]
    params_t = [torch.nn.Parameter(t.clone()) for t in inits]
    optimizer = torch.optim.SGD(params_t, lr=lr, **settings)
    for step_grads in grads:
        for p, g in zip(params_t, step_grads, strict=True):
            p.grad = g.clone()
        optimizer.step()
    layout = Layout.from_named_tensors([(f"p{i}", t) for i, t in enumerate(inits)], block_size=3)
    params = [t.clone() for t in inits]
    blocks = _blocked(layout, params)
    config = RuleConfig(lr=lr, **settings, outer="rule")
    states = _states(config, blocks)
    for step_grads in grads:
        apply_update(config, blocks, _blocked(layout, step_grads), states)
    for ours, theirs in zip(params, params_t, strict=True):
        torch.testing.assert_close(ours, theirs.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", RULE_NAMES)
@pytest.mark.parametrize("settings", SETTINGS, ids=IDS)
def test_update_leaves_gradients_untouched(settings: dict[str, Any], name: str) -> None:
    if name != "sgd":
        settings = {"weight_decay": settings["weight_decay"]}
    init, grads = _data(seed=6)
    originals = [g.clone() for g in grads]
    config = RuleConfig(rule=name, lr=0.1, **settings, outer="rule")
    param = init.clone().view(-1)
    state = new_block_state(config, NUMEL, param.dtype)
    for grad in grads[:8]:
        apply_update(config, [param], [grad.view(-1)], [state])
    for grad, original in zip(grads, originals, strict=True):
        assert torch.equal(grad, original)


def test_sgd_plain_step_exact() -> None:
    config = RuleConfig(lr=0.5, momentum=0.0, outer="rule")
    param = torch.tensor([1.0, 2.0, -3.0])
    state = new_block_state(config, 3, param.dtype)
    apply_update(config, [param], [torch.tensor([2.0, -2.0, 0.0])], [state])
    assert param.tolist() == [0.0, 3.0, -3.0]
    assert state.step == 1
    assert state.tensors == {}
    assert state.residual is None


def test_apply_update_rejects_mismatched_lengths() -> None:
    config = RuleConfig(lr=0.01, momentum=0.0, outer="rule")
    state = new_block_state(config, 2, torch.float32)
    with pytest.raises(ValueError):
        apply_update(config, [torch.zeros(2)], [torch.zeros(2), torch.zeros(2)], [state])
    with pytest.raises(ValueError):
        apply_update(config, [torch.zeros(2)], [torch.zeros(2)], [state, state])


def test_apply_update_with_no_blocks_is_a_no_op() -> None:
    apply_update(RuleConfig(lr=0.01, momentum=0.0, outer="rule"), [], [], [])


def test_rule_registry() -> None:
    assert set(RULES) == set(RULE_NAMES) == {"sgd", "adamw", "ranger"}
    assert RULES["sgd"].update is sgd
    assert RULES["adamw"].update is adamw
    assert RULES["ranger"].update is ranger
    with pytest.raises(ValueError, match="rule must be one of sgd, adamw, ranger"):
        RuleConfig(rule="adam", lr=0.01, outer="rule")


# --- block states --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "names"),
    [
        (RuleConfig(lr=0.01, momentum=0.0, outer="rule"), ()),
        (RuleConfig(momentum=0.9, lr=0.01, outer="rule"), ("momentum_buffer",)),
        (RuleConfig(rule="adamw", lr=0.01, outer="rule"), ("exp_avg", "exp_avg_sq")),
        (RuleConfig(rule="ranger", lr=0.01, outer="rule"), ("exp_avg", "exp_avg_sq", "slow_buffer")),
    ],
    ids=["sgd", "sgd-momentum", "adamw", "ranger"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_new_block_state(config: RuleConfig, names: tuple[str, ...], dtype: torch.dtype) -> None:
    assert config.state_names() == names
    state = new_block_state(config, 11, dtype)
    expected_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    assert state_dtype(dtype) == expected_dtype
    assert tuple(state.tensors) == names
    for tensor in state.tensors.values():
        assert tensor.shape == (11,)
        assert tensor.dtype == expected_dtype
        assert not tensor.any()
    assert state.step == 0
    assert state.counter.dtype == torch.int64
    assert state.counter.shape == (1,)
    assert state.residual is None
    with_residual = new_block_state(dataclasses.replace(config, truncation_residual=True), 11, dtype)
    assert with_residual.residual is not None
    assert with_residual.residual.shape == (11,)
    assert with_residual.residual.dtype == expected_dtype
    assert not with_residual.residual.any()


def test_block_state_counter_advances_in_place() -> None:
    counter = torch.zeros(3, dtype=torch.int64)
    state = BlockState({}, counter[1:2])  # a view into a larger tensor, as an optimizer keeps it
    assert state.step == 0
    state.advance()
    state.advance()
    assert state.step == 2
    assert counter.tolist() == [0, 2, 0]
    assert BlockState().step == 0
    assert BlockState().tensors == {}


@pytest.mark.parametrize("name", RULE_NAMES)
def test_rule_functions_do_not_advance_the_counter(name: str) -> None:
    config = RuleConfig(rule=name, lr=0.1, outer="rule")
    param = torch.randn(6, generator=torch.Generator().manual_seed(7))
    state = new_block_state(config, 6, param.dtype)
    RULES[name].update(config, [param], [torch.ones(6)], [state], 1)
    assert state.step == 0
    apply_update(config, [param], [torch.ones(6)], [state])
    assert state.step == 1


def test_block_state_views_are_updated_in_place() -> None:
    # The in-process optimizer keeps state tensors as views into per-parameter tensors.
    config = RuleConfig(rule="adamw", lr=0.1, outer="rule")
    exp_avg, exp_avg_sq = torch.zeros(8), torch.zeros(8)
    counters = torch.zeros(2, dtype=torch.int64)
    states = [
        BlockState(
            {"exp_avg": exp_avg[i * 4 : i * 4 + 4], "exp_avg_sq": exp_avg_sq[i * 4 : i * 4 + 4]}, counters[i : i + 1]
        )
        for i in range(2)
    ]
    param = torch.zeros(8)
    grad = torch.arange(8, dtype=torch.float32)
    apply_update(config, [param[:4], param[4:]], [grad[:4], grad[4:]], states)
    torch.testing.assert_close(exp_avg, 0.1 * grad)
    torch.testing.assert_close(exp_avg_sq, 0.001 * grad * grad)
    assert counters.tolist() == [1, 1]


# --- AdamW ---------------------------------------------------------------------------------


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.8, 0.99)], ids=str)
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adamw_matches_torch(weight_decay: float, betas: tuple[float, float]) -> None:
    lr, eps, steps = 0.01, 1e-8, 50
    init, grads = _data(seed=8, steps=steps)
    param_t = torch.nn.Parameter(init.clone())
    optimizer = torch.optim.AdamW([param_t], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
    config = RuleConfig(rule="adamw", lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, outer="rule")
    layout = Layout((ParamInfo("w", SHAPE, "float32"),), block_size=12)
    assert layout.num_blocks == 3
    param = init.clone()
    blocks = _blocked(layout, [param])
    states = _states(config, blocks)
    for grad in grads:
        param_t.grad = grad.clone()
        optimizer.step()
        apply_update(config, blocks, _blocked(layout, [grad]), states)
        torch.testing.assert_close(param, param_t.detach(), atol=1e-6, rtol=0)
    assert all(s.step == steps for s in states)
    torch_state = optimizer.state[param_t]
    for name in ("exp_avg", "exp_avg_sq"):
        ours = torch.cat([s.tensors[name] for s in states])
        torch.testing.assert_close(ours, torch_state[name].view(-1), atol=1e-6, rtol=0)


def test_adamw_defaults() -> None:
    config = RuleConfig(rule="adamw", lr=0.01, outer="rule")
    assert config.betas == (0.9, 0.999)
    assert config.eps == 1e-8


# --- Ranger --------------------------------------------------------------------------------


class ReferenceRanger(torch.optim.Optimizer):
    """Ranger as the widely used reference (Less Wright, 2019-2020) computes it.

    RAdam (un-rectified while the SMA length is at most the threshold) plus Lookahead (every
    ``k`` steps the slow weights move ``alpha`` towards the fast ones, which are reset to them),
    with gradient centralization for tensors of more than one dimension. Written from the
    reference's description; it shares no code with ranger_ps.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        alpha: float = 0.5,
        k: int = 6,
        n_sma_threshhold: float = 5,
        betas: tuple[float, float] = (0.95, 0.999),
        eps: float = 1e-5,
        weight_decay: float = 0.0,
        use_gc: bool = True,
    ) -> None:
        defaults = {
            "lr": lr,
            "alpha": alpha,
            "k": k,
            "n_sma_threshhold": n_sma_threshhold,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)
        self.use_gc = use_gc
        self.gc_gradient_threshold = 1

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        assert closure is None
        for group in self.param_groups:
            lr, alpha, k = group["lr"], group["alpha"], group["k"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.float().clone()
                p32 = p.data.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p32)
                    state["exp_avg_sq"] = torch.zeros_like(p32)
                    state["slow_buffer"] = p.data.clone()
                if self.use_gc and grad.dim() > self.gc_gradient_threshold:
                    grad.add_(-grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True))
                state["step"] += 1
                step = state["step"]
                exp_avg, exp_avg_sq, slow = state["exp_avg"], state["exp_avg_sq"], state["slow_buffer"]
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                beta2_t = beta2**step
                n_sma_max = 2 / (1 - beta2) - 1
                n_sma = n_sma_max - 2 * step * beta2_t / (1 - beta2_t)
                rectified = n_sma > group["n_sma_threshhold"]
                if rectified:
                    step_size = math.sqrt(
                        (1 - beta2_t)
                        * (n_sma - 4)
                        / (n_sma_max - 4)
                        * (n_sma - 2)
                        / n_sma
                        * n_sma_max
                        / (n_sma_max - 2)
                    ) / (1 - beta1**step)
                else:
                    step_size = 1.0 / (1 - beta1**step)
                if group["weight_decay"]:
                    p32.add_(p32, alpha=-group["weight_decay"] * lr)
                if rectified:
                    p32.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(group["eps"]), value=-step_size * lr)
                else:
                    p32.add_(exp_avg, alpha=-step_size * lr)
                p.data.copy_(p32)
                if step % k == 0:
                    slow.add_(p.data - slow, alpha=alpha)
                    p.data.copy_(slow)
        return None


def _centralize(grad: torch.Tensor) -> torch.Tensor:
    """Gradient centralization as the worker does it: dims > 1 lose their mean over dims 1.."""
    if grad.dim() <= 1:
        return grad
    return grad - grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True)


def test_radam_switches_to_the_rectified_step_at_step_6() -> None:
    rectified = [radam_step_size(step, (0.95, 0.999), 5.0)[1] for step in range(1, 30)]
    assert rectified == [False] * 5 + [True] * 24
    for step in range(1, 6):
        size, _ = radam_step_size(step, (0.95, 0.999), 5.0)
        assert size == pytest.approx(1 / (1 - 0.95**step), rel=1e-12)


def _at_step(step: int) -> Callable[[str], str]:
    return lambda message: f"step {step}: {message}"


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("use_gc", [True, False], ids=["gc", "no-gc"])
def test_ranger_matches_reference(use_gc: bool, weight_decay: float) -> None:
    lr, steps = 0.01, 25
    gen = torch.Generator().manual_seed(9)
    inits = [torch.randn(8, 5, generator=gen), torch.randn(5, generator=gen)]
    grads = [[torch.randn(t.shape, generator=gen) for t in inits] for _ in range(steps)]
    params_t = [torch.nn.Parameter(t.clone()) for t in inits]
    reference = ReferenceRanger(params_t, lr=lr, weight_decay=weight_decay, use_gc=use_gc)
    config = RuleConfig(rule="ranger", lr=lr, weight_decay=weight_decay, outer="rule")
    assert config.betas == (0.95, 0.999)
    assert config.eps == 1e-5
    layout = Layout.from_named_tensors([("weight", inits[0]), ("bias", inits[1])], block_size=16)
    assert [b.numel for b in layout.blocks] == [16, 16, 8, 5]
    params = [t.clone() for t in inits]
    blocks = _blocked(layout, params)
    states = _states(config, blocks)
    for step, step_grads in enumerate(grads, start=1):
        for p, g in zip(params_t, step_grads, strict=True):
            p.grad = g.clone()
        reference.step()
        pushed = [_centralize(g) if use_gc else g for g in step_grads]
        grad_blocks = _blocked(layout, pushed)
        for index in range(len(blocks)):  # each block on its own, as separate pushes arrive
            apply_update(config, [blocks[index]], [grad_blocks[index]], [states[index]])
        for ours, theirs in zip(params, params_t, strict=True):
            torch.testing.assert_close(ours, theirs.detach(), atol=1e-6, rtol=0, msg=_at_step(step))
    assert all(s.step == steps for s in states)
    for name in ("exp_avg", "exp_avg_sq", "slow_buffer"):
        ours_flat = torch.cat([s.tensors[name] for s in states])
        theirs_flat = torch.cat([reference.state[p][name].reshape(-1) for p in params_t])
        torch.testing.assert_close(ours_flat, theirs_flat, atol=1e-6, rtol=0)


def test_ranger_gradient_centralization_matters() -> None:
    # The comparison above would be vacuous if centralizing changed nothing.
    gen = torch.Generator().manual_seed(10)
    init = torch.randn(8, 5, generator=gen)
    grad = torch.randn(8, 5, generator=gen) + 1.0
    finals = []
    for use_gc in (True, False):
        p = torch.nn.Parameter(init.clone())
        optimizer = ReferenceRanger([p], lr=0.01, use_gc=use_gc)
        for _ in range(3):
            p.grad = grad.clone()
            optimizer.step()
        finals.append(p.detach())
    assert not torch.allclose(finals[0], finals[1], atol=1e-4)


def test_ranger_lookahead_syncs_every_k_updates() -> None:
    config = RuleConfig(rule="ranger", lr=0.1, k=3, alpha=0.5, outer="rule")
    init = torch.tensor([1.0, -2.0, 3.0])
    param = init.clone()
    state = new_block_state(config, 3, param.dtype)
    for step in range(1, 7):
        before = param.clone()
        apply_update(config, [param], [torch.tensor([1.0, 1.0, -1.0])], [state])
        if step % 3 == 0:
            # Fast weights reset to the slow ones, which moved half-way from their old value.
            assert torch.equal(param, state.tensors["slow_buffer"])
        else:
            assert not torch.equal(param, before)
    assert state.step == 6


# --- low precision -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_sgd_momentum(dtype: torch.dtype) -> None:
    lr, momentum, weight_decay = 0.05, 0.9, 0.01
    init, grads = _data(seed=11)
    config = RuleConfig(lr=lr, momentum=momentum, weight_decay=weight_decay, outer="rule")
    layout = Layout((ParamInfo("w", SHAPE, str(dtype).removeprefix("torch.")),), block_size=16)
    param = init.to(dtype)
    blocks = _blocked(layout, [param])
    states = _states(config, blocks)
    for state in states:
        assert state.tensors["momentum_buffer"].dtype == torch.float32
    # Reference: float32 arithmetic and float32 momentum, the parameter rounded to dtype each step.
    ref = init.to(dtype)
    buf = torch.zeros(NUMEL)
    for step, grad in enumerate(grads):
        low_grad = grad.to(dtype)
        apply_update(config, blocks, _blocked(layout, [low_grad]), states)
        p32 = ref.float().view(-1)
        d_p = low_grad.float().view(-1) + weight_decay * p32
        buf = d_p.clone() if step == 0 else buf * momentum + d_p
        ref = (p32 - lr * buf).to(dtype).view(SHAPE)
        assert param.dtype == dtype
        torch.testing.assert_close(param, ref)
    assert all(s.tensors["momentum_buffer"].dtype == torch.float32 for s in states)
    torch.testing.assert_close(torch.cat([s.tensors["momentum_buffer"] for s in states]), buf, atol=1e-5, rtol=1e-5)
    # It did not just stay put: the run moved the parameter well beyond one rounding step.
    assert (param.float() - init).abs().max() > 0.1


@pytest.mark.parametrize("name", ["adamw", "ranger"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_adaptive_rules_keep_dtype(dtype: torch.dtype, name: str) -> None:
    init, grads = _data(seed=12, steps=8)
    config = RuleConfig(rule=name, lr=0.01, weight_decay=0.01, outer="rule")
    param = init.to(dtype).view(-1)
    reference = init.to(dtype).view(-1)
    state = new_block_state(config, NUMEL, dtype)
    ref_state = new_block_state(config, NUMEL, torch.float32)
    for grad in grads:
        low_grad = grad.to(dtype).view(-1)
        apply_update(config, [param], [low_grad], [state])
        p32 = reference.float()
        apply_update(config, [p32], [low_grad.float()], [ref_state])
        reference = p32.to(dtype)
        assert param.dtype == dtype
        torch.testing.assert_close(param, reference)
    assert all(t.dtype == torch.float32 for t in state.tensors.values())


# --- RuleConfig ----------------------------------------------------------------------------


CONFIGS = [
    RuleConfig(lr=0.01, momentum=0.0, outer="rule"),
    RuleConfig(lr=0.3, momentum=0.9, nesterov=True, weight_decay=1e-4, outer="rule"),
    RuleConfig(lr=1e-5, momentum=0.5, dampening=0.25, outer="rule"),
    RuleConfig(lr=2.0, dampening=1.0, momentum=0.0, outer="rule"),
    RuleConfig(rule="adamw", lr=1e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01, outer="rule"),
    RuleConfig(rule="ranger", lr=0.01, outer="rule"),
    RuleConfig(
        rule="ranger",
        alpha=0.8,
        k=5,
        n_sma_threshold=4.0,
        truncate_below=1e-3,
        truncation_residual=True,
        lr=0.01,
        outer="rule",
    ),
    RuleConfig(clip_value=1.5, clip_norm=10.0, lr=0.01, momentum=0.0, outer="rule"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_msgpack_round_trip(config: RuleConfig) -> None:
    data = config.to_msgpack()
    assert isinstance(data, bytes)
    back = RuleConfig.from_msgpack(data)
    assert back == config
    assert back.differences(config) == []
    assert RuleConfig.from_msgpack(data).to_msgpack() == data
    assert RuleConfig.from_dict(config.to_dict()) == config


def test_msgpack_is_a_plain_map() -> None:
    raw = msgpack.unpackb(RuleConfig(lr=0.5, momentum=0.0, outer="rule").to_msgpack(), raw=False)
    assert raw == {
        "name": "sgd",
        "lr": 0.5,
        "momentum": 0.0,
        "dampening": 0.0,
        "nesterov": False,
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "alpha": 0.5,
        "k": 6,
        "n_sma_threshold": 5.0,
        "truncate_below": 0.0,
        "truncation_residual": False,
        "clip_value": None,
        "clip_norm": None,
        "outer": "rule",
        "outer_lr": 1.0,
        "outer_momentum": 0.0,
        "num_workers": 1,
        "push_dtype": None,
    }
    assert RuleConfig(lr=0.5, momentum=0.0, outer="rule").to_dict() == raw
    assert set(raw) == {f.name for f in dataclasses.fields(RuleConfig)} - {"rule"} | {"name"}


def test_from_msgpack_fills_defaults_for_missing_keys() -> None:
    assert RuleConfig.from_msgpack(msgpack.packb({})) == RuleConfig(outer="rule")
    assert RuleConfig.from_msgpack(msgpack.packb({"lr": 0.5})) == RuleConfig(lr=0.5, outer="rule")
    # None is "the rule's default" on the wire as in Python and on the command line.
    assert (
        RuleConfig.from_msgpack(msgpack.packb({"name": "adamw", "lr": None})).lr
        == RuleConfig(rule="adamw", outer="rule").lr
    )
    ranger_config = RuleConfig.from_msgpack(msgpack.packb({"name": "ranger"}))
    assert ranger_config.betas == (0.95, 0.999)
    assert ranger_config.eps == 1e-5
    explicit = RuleConfig.from_msgpack(msgpack.packb({"name": "adamw", "betas": None, "eps": None}))
    assert explicit == RuleConfig(rule="adamw", betas=(0.9, 0.999), eps=1e-8, outer="rule")


def test_from_msgpack_accepts_integers_for_floats() -> None:
    config = RuleConfig.from_msgpack(
        msgpack.packb({"lr": 1, "momentum": 0, "weight_decay": 0, "betas": [0, 0], "clip_norm": 2, "eps": 0})
    )
    assert config == RuleConfig(
        lr=1.0, weight_decay=0.0, betas=(0.0, 0.0), clip_norm=2.0, eps=0.0, momentum=0.0, outer="rule"
    )
    assert type(config.lr) is float
    assert type(config.weight_decay) is float
    assert type(config.clip_norm) is float
    assert all(type(b) is float for b in config.betas)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="reserved-byte"),
        pytest.param(b"\x82\xa2lr", id="truncated-map"),
        pytest.param(msgpack.packb({"lr": 0.1}) + b"\x00", id="trailing-data"),
        pytest.param(b"{'lr': 0.1}", id="text"),
    ],
)
def test_from_msgpack_rejects_non_msgpack(data: bytes) -> None:
    with pytest.raises(ValueError):
        RuleConfig.from_msgpack(data)


@pytest.mark.parametrize("value", [[1, 2], 3, "sgd", None, 0.5, b"lr"], ids=repr)
def test_from_msgpack_rejects_non_map(value: object) -> None:
    with pytest.raises(ValueError, match="map"):
        RuleConfig.from_msgpack(msgpack.packb(value))


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param({"lr": 0.1, "beta": 0.9}, id="unknown-str"),
        pytest.param({"learning_rate": 0.1}, id="misspelt"),
        pytest.param({b"lr": 0.1}, id="bytes-key"),
        pytest.param({1: 0.1}, id="int-key"),
    ],
)
def test_from_msgpack_rejects_unknown_keys(raw: dict[Any, Any]) -> None:
    with pytest.raises(ValueError):
        RuleConfig.from_msgpack(msgpack.packb(raw))


def test_unknown_key_is_named() -> None:
    with pytest.raises(ValueError, match="beta"):
        RuleConfig.from_msgpack(msgpack.packb({"beta": 0.9}))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("lr", "0.1"),
        ("lr", True),
        ("lr", False),
        ("lr", [0.1]),
        ("lr", b"\x00"),
        ("momentum", "0.9"),
        ("momentum", True),
        ("weight_decay", {"a": 1}),
        ("nesterov", 1),
        ("nesterov", 0),
        ("nesterov", "true"),
        ("nesterov", 1.0),
        ("name", 5),
        ("name", b"sgd"),
        ("name", None),
        ("betas", 0.9),
        ("betas", [0.9]),
        ("betas", [0.9, 0.99, 0.999]),
        ("betas", [0.9, "0.99"]),
        ("betas", [True, 0.99]),
        ("eps", "1e-8"),
        ("alpha", None),
        ("k", 6.0),
        ("k", True),
        ("k", None),
        ("n_sma_threshold", "5"),
        ("truncate_below", None),
        ("truncation_residual", 1),
        ("truncation_residual", None),
        ("clip_value", "1"),
        ("clip_norm", True),
    ],
    ids=lambda v: repr(v),
)
def test_from_msgpack_rejects_wrong_types(key: str, value: object) -> None:
    with pytest.raises(ValueError, match=key):
        RuleConfig.from_msgpack(msgpack.packb({key: value}))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": -0.1},
        {"lr": math.nan},
        {"lr": math.inf},
        {"momentum": 1.0},
        {"momentum": 1.5},
        {"momentum": -0.1},
        {"momentum": math.nan},
        {"momentum": math.inf},
        {"dampening": -0.1},
        {"dampening": 1.1},
        {"dampening": math.nan},
        {"dampening": math.inf},
        {"weight_decay": -1e-3},
        {"weight_decay": math.nan},
        {"weight_decay": math.inf},
        {"nesterov": True, "momentum": 0.0},
        {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
        {"name": "adam"},
        {"name": ""},
        {"name": "adamw", "momentum": 0.9},
        {"name": "ranger", "momentum": 0.5},
        {"name": "ranger", "momentum": 0.5, "nesterov": True},
        {"betas": (1.0, 0.999)},
        {"betas": (0.9, 1.0)},
        {"betas": (-0.1, 0.999)},
        {"betas": (math.nan, 0.999)},
        {"betas": (0.9, math.inf)},
        {"name": "adamw", "betas": (0.9, math.nan)},
        {"eps": -1e-8},
        {"eps": math.nan},
        {"eps": math.inf},
        {"alpha": -0.1},
        {"alpha": 1.5},
        {"alpha": math.nan},
        {"k": 0},
        {"k": -1},
        {"n_sma_threshold": math.nan},
        {"n_sma_threshold": math.inf},
        {"truncate_below": -1e-3},
        {"truncate_below": math.nan},
        {"truncate_below": math.inf},
        {"clip_value": 0.0},
        {"clip_value": -1.0},
        {"clip_value": math.nan},
        {"clip_value": math.inf},
        {"clip_norm": 0.0},
        {"clip_norm": -1.0},
        {"clip_norm": math.nan},
        {"clip_norm": math.inf},
    ],
    ids=repr,
)
def test_invalid_values_raise(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RuleConfig(**{"rule" if key == "name" else key: value for key, value in kwargs.items()}, outer="rule")
    # The same values arriving over the wire are refused too.
    with pytest.raises(ValueError):
        RuleConfig.from_msgpack(msgpack.packb(kwargs))


def test_nan_weight_decay_is_rejected() -> None:
    with pytest.raises(ValueError, match="weight_decay"):
        RuleConfig(weight_decay=math.nan, lr=0.01, momentum=0.0, outer="rule")


def test_valid_edge_values() -> None:
    RuleConfig(momentum=0.0, dampening=1.0, lr=0.01, outer="rule")
    RuleConfig(momentum=0.999999, nesterov=True, lr=0.01, outer="rule")
    RuleConfig(lr=1e-12, momentum=0.0, outer="rule")
    RuleConfig(rule="adamw", betas=(0.0, 0.0), eps=0.0, lr=0.01, outer="rule")
    RuleConfig(rule="ranger", alpha=0.0, k=1, lr=0.01, outer="rule")
    RuleConfig(rule="ranger", alpha=1.0, n_sma_threshold=0.0, lr=0.01, outer="rule")
    RuleConfig(truncate_below=0.0, clip_value=1e-12, clip_norm=1e-12, lr=0.01, momentum=0.0, outer="rule")


def test_config_is_frozen() -> None:
    config = RuleConfig(lr=0.01, momentum=0.0, outer="rule")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0  # type: ignore[misc]


def test_rule_defaults_resolve() -> None:
    assert RuleConfig(rule="ranger", lr=0.01, outer="rule") == RuleConfig(
        rule="ranger", betas=(0.95, 0.999), eps=1e-5, lr=0.01, outer="rule"
    )
    assert RuleConfig(rule="adamw", lr=0.01, outer="rule") == RuleConfig(
        rule="adamw", betas=(0.9, 0.999), eps=1e-8, lr=0.01, outer="rule"
    )
    assert RuleConfig(rule="ranger", betas=(0.9, 0.99), lr=0.01, outer="rule").betas == (0.9, 0.99)


def _keys(differences: list[str]) -> list[str]:
    return [d.split(":", 1)[0] for d in differences]


def test_differences_lists_exactly_the_differing_keys() -> None:
    base = RuleConfig(lr=0.1, momentum=0.9, outer="rule")
    assert base.differences(base) == []
    assert base.differences(RuleConfig(lr=0.1, momentum=0.9, outer="rule")) == []
    assert _keys(base.differences(RuleConfig(lr=0.2, momentum=0.9, outer="rule"))) == ["lr"]
    other = RuleConfig(lr=0.2, momentum=0.5, dampening=0.1, weight_decay=1e-4, outer="rule")
    assert _keys(base.differences(other)) == ["lr", "momentum", "dampening", "weight_decay"]
    assert _keys(other.differences(base)) == ["lr", "momentum", "dampening", "weight_decay"]
    assert _keys(base.differences(RuleConfig(lr=0.1, momentum=0.9, nesterov=True, outer="rule"))) == ["nesterov"]


def test_differences_between_rules_include_resolved_defaults() -> None:
    adam, rang = RuleConfig(rule="adamw", lr=0.01, outer="rule"), RuleConfig(rule="ranger", lr=0.01, outer="rule")
    assert _keys(adam.differences(rang)) == ["rule", "weight_decay", "betas", "eps"]  # adamw's is 0.01
    assert RuleConfig(rule="adamw", betas=(0.95, 0.999), eps=1e-5, lr=0.01, outer="rule").differences(rang) == [
        "rule: 'adamw' != 'ranger'",
        "weight_decay: 0.01 != 0.0",
    ]
    assert RuleConfig(rule="adamw", betas=(0.95, 0.999), eps=1e-5, lr=0.01, weight_decay=0.0, outer="rule").differences(
        rang
    ) == ["rule: 'adamw' != 'ranger'"]


def test_weight_decay_defaults_per_rule_as_torch_optim() -> None:
    """adamw takes torch.optim.AdamW's 0.01, sgd and ranger 0; an explicit value (0 too) is kept, and the
    handshake carries the resolved number, so a worker leaving it out and one giving 0.01 agree."""
    assert [RuleConfig(rule=r).weight_decay for r in ("sgd", "adamw", "ranger")] == [0.0, 0.01, 0.0]
    assert RuleConfig(rule="adamw", weight_decay=0.0).weight_decay == 0.0
    assert RuleConfig(rule="sgd", weight_decay=0.5).weight_decay == 0.5
    implicit, explicit = (
        RuleConfig(rule="adamw", outer="rule"),
        RuleConfig(rule="adamw", weight_decay=0.01, outer="rule"),
    )
    assert implicit.to_dict()["weight_decay"] == 0.01
    assert implicit.differences(explicit) == [] and implicit.to_msgpack() == explicit.to_msgpack()
    assert RuleConfig.from_msgpack(implicit.to_msgpack()) == implicit
    zero = RuleConfig(rule="adamw", weight_decay=0.0, outer="rule")
    assert RuleConfig.from_msgpack(zero.to_msgpack()).weight_decay == 0.0
    assert implicit.differences(zero) == ["weight_decay: 0.01 != 0.0"]


def test_differences_show_both_values() -> None:
    ours = RuleConfig(lr=0.1, momentum=0.0, outer="rule")
    theirs = RuleConfig(lr=0.2, momentum=0.0, outer="rule")
    assert ours.differences(theirs) == ["lr: 0.1 != 0.2"]
    assert theirs.differences(ours) == ["lr: 0.2 != 0.1"]


_BASE_VALUES: dict[str, Any] = {
    "lr": 0.5,
    "momentum": 0.5,
    "dampening": 0.0,
    "nesterov": False,
    "weight_decay": 0.1,
    "betas": (0.9, 0.99),
    "eps": 1e-8,
    "alpha": 0.5,
    "k": 6,
    "n_sma_threshold": 5.0,
    "truncate_below": 0.0,
    "truncation_residual": False,
    "clip_value": None,
    "clip_norm": None,
    "outer": "sgd",
    "outer_lr": 0.5,
    "outer_momentum": 0.5,
    "num_workers": 2,
    "push_dtype": None,
}
_CHANGED_VALUES: dict[str, Any] = {
    "lr": 0.25,
    "momentum": 0.25,
    "dampening": 0.5,
    "nesterov": True,
    "weight_decay": 0.0,
    "betas": (0.8, 0.99),
    "eps": 1e-6,
    "alpha": 0.75,
    "k": 5,
    "n_sma_threshold": 4.0,
    "truncate_below": 0.1,
    "truncation_residual": True,
    "clip_value": 1.0,
    "clip_norm": 2.0,
    "outer": "mean",
    "outer_lr": 0.25,
    "outer_momentum": 0.25,
    "num_workers": 3,
    "push_dtype": "int8",
}


def test_value_tables_cover_every_field() -> None:
    fields = {f.name for f in dataclasses.fields(RuleConfig)} - {"rule"}
    assert set(_BASE_VALUES) == set(_CHANGED_VALUES) == fields


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(RuleConfig) if f.name != "rule"])
def test_each_field_is_compared(field: str) -> None:
    if field != "outer":
        base = RuleConfig(**_BASE_VALUES)
        other = RuleConfig(**{**_BASE_VALUES, field: _CHANGED_VALUES[field]})
    else:  # the outer lr and momentum belong to sgd alone: switch between the other modes
        base, other = RuleConfig(outer="mean"), RuleConfig(outer="sum")
    assert _keys(base.differences(other)) == [field]
    assert _keys(other.differences(base)) == [field]


@pytest.mark.parametrize("settings", SETTINGS, ids=IDS)
def test_batched_sgd_is_bitwise_the_per_block_rule(settings: dict[str, Any]) -> None:
    """apply_update's one-call-per-operation path over many blocks equals the rule applied to each block
    alone exactly, with some blocks seen before and some fresh (momentum buffers initialized by copy)."""
    config = RuleConfig(rule="sgd", **settings, outer="rule")
    _check_batched_equals_per_block(config)


@pytest.mark.parametrize("name", ["adamw", "ranger"])
def test_batched_adaptive_rules_are_bitwise_the_per_block_rule(name: str) -> None:
    _check_batched_equals_per_block(RuleConfig(rule=name, lr=0.05, weight_decay=0.01, k=2, outer="rule"))


def _check_batched_equals_per_block(config: RuleConfig) -> None:
    update = RULES[config.rule].update
    generator = torch.Generator().manual_seed(7)
    sizes = (5, 64, 1, 33)
    batched = [torch.randn(n, generator=generator) for n in sizes]
    looped = [p.clone() for p in batched]
    states_batched = [new_block_state(config, n, torch.float32) for n in sizes]
    states_looped = [new_block_state(config, n, torch.float32) for n in sizes]
    for step in range(4):
        chosen = [i for i in range(len(sizes)) if (i + step) % 3 != 0]  # blocks join at different steps
        grads = [torch.randn(sizes[i], generator=generator) for i in chosen]
        apply_update(config, [batched[i] for i in chosen], grads, [states_batched[i] for i in chosen])
        for i, grad in zip(chosen, grads, strict=True):
            update(config, [looped[i]], [grad], [states_looped[i]], states_looped[i].step + 1)
            states_looped[i].advance()
    for i in range(len(sizes)):
        assert torch.equal(batched[i], looped[i])
        assert states_batched[i].step == states_looped[i].step
        for name, tensor in states_batched[i].tensors.items():
            assert torch.equal(tensor, states_looped[i].tensors[name]), name
