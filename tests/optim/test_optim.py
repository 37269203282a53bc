"""Tests for ranger_ps.Ranger in-process (no servers): a drop-in ``torch.optim.Optimizer``.

A small MLP trained on real data (sklearn's digits) with ``block_size=100`` (so every weight is cut
into several blocks) must follow torch's SGD / AdamW and the reference Ranger step for step; the
optimizer must behave as a torch optimizer (param groups, LR schedulers, closures, ``zero_grad``,
``.grad is None``), checkpoint exactly through ``state_dict``, and update exactly the randomly
chosen blocks with error feedback.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import ranger_ps
from ranger_ps import Ranger
from ranger_ps.algorithm.selection import choose_blocks
from tests.algorithm.test_rules import ReferenceRanger

STEPS = 50
BATCH = 32
BLOCK_SIZE = 100
# Linear(64, 32) + Linear(32, 10): weights of 2048 and 320 elements, biases of 32 and 10.
MLP_NUMELS = (2048, 32, 320, 10)
MLP_BLOCKS = sum(-(-n // BLOCK_SIZE) for n in MLP_NUMELS)  # 21 + 1 + 4 + 1 = 27

Batch = tuple[torch.Tensor, torch.Tensor]
Factory = Callable[[Iterable[torch.Tensor]], torch.optim.Optimizer]


def _warm_torch_optim() -> None:
    """Pay torch.optim's one-time lazy imports (about 1.5 s, torch._dynamo) at collection, not in a test."""
    param = nn.Parameter(torch.zeros(1))
    param.grad = torch.zeros(1)
    torch.optim.SGD([param], lr=0.1).step()
    torch.optim.AdamW([param], lr=0.1, foreach=False).step()
    Ranger([param], lr=0.1).step()


_warm_torch_optim()


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    """One intra-op thread while this module runs.

    The tensors here are tiny: with several threads on a busy machine, thread hand-offs cost far
    more than the arithmetic (a backward pass of the MLP went from under 1 ms to 15 ms).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batches() -> list[Batch]:
    """A fixed sequence of digits minibatches (8x8 images scaled to [0, 1]) from a seeded generator."""
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target, dtype=torch.int64)
    assert x.shape == (1797, 64)
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        index = torch.randint(0, x.shape[0], (BATCH,), generator=gen)
        out.append((x[index], y[index]))
    return out


def _mlp(seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


def _backward(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> torch.Tensor:
    optimizer.zero_grad()
    x, y = batch
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()  # type: ignore[no-untyped-call]
    return loss.detach()


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Batch) -> None:
    _backward(model, optimizer, batch)
    optimizer.step()


def _at_step(step: int, name: str = "") -> Callable[[str], str]:
    where = f"step {step}" + (f", {name}" if name else "")
    return lambda message: f"{where}: {message}"


def _assert_params_close(ours: nn.Module, theirs: nn.Module, step: int) -> None:
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=0, msg=_at_step(step, name))


def _lockstep(ours: Factory, theirs: Factory, batches: list[Batch], steps: int = STEPS) -> nn.Module:
    """Train two identical MLPs side by side; their parameters must agree after every step."""
    model = _mlp()
    twin = copy.deepcopy(model)
    initial = [p.detach().clone() for p in model.parameters()]
    optimizer, reference = ours(model.parameters()), theirs(twin.parameters())
    if isinstance(optimizer, Ranger):
        assert optimizer.layout.num_blocks == MLP_BLOCKS
    for step, batch in enumerate(batches[:steps], start=1):
        _train_step(model, optimizer, batch)
        _train_step(twin, reference, batch)
        _assert_params_close(model, twin, step)
    # Not vacuous: every parameter moved.
    for before, p in zip(initial, model.parameters(), strict=True):
        assert not torch.equal(before, p.detach())
    return model


# --- exactness on a real model ---------------------------------------------------------------

SGD_SETTINGS: list[dict[str, Any]] = [
    {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
    {"momentum": 0.9, "dampening": 0.1},
    {"momentum": 0.0},
]


@pytest.mark.parametrize("settings", SGD_SETTINGS, ids=["nesterov-wd", "dampening", "plain"])
def test_sgd_matches_torch_sgd(batches: list[Batch], settings: dict[str, Any]) -> None:
    _lockstep(
        lambda params: Ranger(params, lr=0.05, block_size=BLOCK_SIZE, **settings),
        lambda params: torch.optim.SGD(params, lr=0.05, **settings),
        batches,
    )


@pytest.mark.parametrize(
    "settings",
    [{"betas": (0.9, 0.999), "eps": 1e-8}, {"betas": (0.8, 0.99), "eps": 1e-6}],
    ids=["default-betas", "other-betas"],
)
def test_adamw_matches_torch_adamw(batches: list[Batch], settings: dict[str, Any]) -> None:
    _lockstep(
        lambda params: Ranger(params, lr=0.01, rule="adamw", weight_decay=0.01, block_size=BLOCK_SIZE, **settings),
        lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.01, foreach=False, **settings),
        batches,
    )


@pytest.mark.parametrize("weight_decay", [0.0, 1e-3], ids=["wd0", "wd1e-3"])
@pytest.mark.parametrize("use_gc", [True, False], ids=["gc", "no-gc"])
def test_ranger_matches_reference_ranger(batches: list[Batch], use_gc: bool, weight_decay: float) -> None:
    # 50 steps: the un-rectified steps 1-5, the switch at 6, Lookahead syncs at 6, 12, 18, ...
    _lockstep(
        lambda params: Ranger(
            params, lr=0.01, rule="ranger", use_gc=use_gc, weight_decay=weight_decay, block_size=BLOCK_SIZE
        ),
        lambda params: ReferenceRanger(params, lr=0.01, use_gc=use_gc, weight_decay=weight_decay),
        batches,
    )


def test_ranger_rule_defaults_to_gradient_centralization(batches: list[Batch]) -> None:
    _lockstep(
        lambda params: Ranger(params, lr=0.01, rule="ranger", block_size=BLOCK_SIZE),
        lambda params: ReferenceRanger(params, lr=0.01),
        batches,
        steps=20,
    )


def test_seed_usage_works_as_written(batches: list[Batch]) -> None:
    model = _mlp()
    twin = copy.deepcopy(model)
    optimizer = ranger_ps.Ranger(model.parameters(), lr=0.001, momentum=0.9)
    reference = torch.optim.SGD(twin.parameters(), lr=0.001, momentum=0.9)
    for step, batch in enumerate(batches, start=1):
        _train_step(model, optimizer, batch)
        _train_step(twin, reference, batch)
        _assert_params_close(model, twin, step)


# --- torch.optim.Optimizer behaviour ---------------------------------------------------------------


def test_is_a_torch_optimizer() -> None:
    optimizer = Ranger(_mlp().parameters(), lr=0.1)
    assert isinstance(optimizer, torch.optim.Optimizer)
    assert len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_param_groups_with_different_lr(batches: list[Batch]) -> None:
    def groups(params: Iterable[torch.Tensor]) -> list[dict[str, Any]]:
        first, second, third, fourth = list(params)
        return [{"params": [first, second], "lr": 0.1}, {"params": [third, fourth]}]

    _lockstep(
        lambda params: Ranger(groups(params), lr=0.01, momentum=0.9, block_size=BLOCK_SIZE),
        lambda params: torch.optim.SGD(groups(params), lr=0.01, momentum=0.9),
        batches,
        steps=20,
    )


def test_param_groups_lr_is_not_ignored(batches: list[Batch]) -> None:
    # The per-group comparison above would be vacuous if a single lr gave the same weights.
    finals = []
    for first_lr in (0.1, 0.01):
        model = _mlp()
        first, second, third, fourth = model.parameters()
        groups: list[dict[str, Any]] = [{"params": [first, second], "lr": first_lr}, {"params": [third, fourth]}]
        optimizer = Ranger(groups, lr=0.01, block_size=BLOCK_SIZE)
        for batch in batches[:3]:
            _train_step(model, optimizer, batch)
        finals.append(next(iter(model.parameters())).detach())
    assert not torch.allclose(finals[0], finals[1])


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_step_lr_scheduler_is_honoured(batches: list[Batch], rule: str) -> None:
    model = _mlp()
    twin = copy.deepcopy(model)
    optimizer: torch.optim.Optimizer
    reference: torch.optim.Optimizer
    if rule == "sgd":
        optimizer = Ranger(model.parameters(), lr=0.1, momentum=0.9, block_size=BLOCK_SIZE)
        reference = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    else:
        optimizer = Ranger(model.parameters(), lr=0.01, rule="adamw", weight_decay=0.01, block_size=BLOCK_SIZE)
        reference = torch.optim.AdamW(twin.parameters(), lr=0.01, weight_decay=0.01, foreach=False)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=5, gamma=0.5) for o in (optimizer, reference)]
    base_lr = optimizer.param_groups[0]["lr"]
    for step, batch in enumerate(batches[:20], start=1):
        _train_step(model, optimizer, batch)
        _train_step(twin, reference, batch)
        for scheduler in schedulers:
            scheduler.step()
        _assert_params_close(model, twin, step)
        assert optimizer.param_groups[0]["lr"] == reference.param_groups[0]["lr"]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(base_lr * 0.5**4)


def test_lr_changed_by_hand_between_steps(batches: list[Batch]) -> None:
    model = _mlp()
    twin = copy.deepcopy(model)
    optimizer = Ranger(model.parameters(), lr=0.05, momentum=0.9, block_size=BLOCK_SIZE)
    reference = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    for step, batch in enumerate(batches[:12], start=1):
        for o in (optimizer, reference):
            o.param_groups[0]["lr"] = 0.05 / step
        _train_step(model, optimizer, batch)
        _train_step(twin, reference, batch)
        _assert_params_close(model, twin, step)


def test_scheduler_may_reach_lr_zero(batches: list[Batch]) -> None:
    model = _mlp()
    twin = copy.deepcopy(model)
    optimizer = Ranger(model.parameters(), lr=0.05, momentum=0.9, block_size=BLOCK_SIZE)
    reference = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    warmup = [torch.optim.lr_scheduler.LambdaLR(o, lambda epoch: min(1.0, epoch / 5)) for o in (optimizer, reference)]
    assert optimizer.param_groups[0]["lr"] == 0.0
    for step, batch in enumerate(batches[:10], start=1):
        _train_step(model, optimizer, batch)
        _train_step(twin, reference, batch)
        for scheduler in warmup:
            scheduler.step()
        _assert_params_close(model, twin, step)


def test_closure_is_called_and_its_loss_returned(batches: list[Batch]) -> None:
    model = _mlp()
    twin = copy.deepcopy(model)
    optimizer = Ranger(model.parameters(), lr=0.05, momentum=0.9, block_size=BLOCK_SIZE)
    reference = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    calls = 0

    def closure_for(net: nn.Module, opt: torch.optim.Optimizer, batch: Batch) -> Callable[[], float]:
        def closure() -> float:
            nonlocal calls
            calls += 1
            assert torch.is_grad_enabled()  # step() runs under no_grad; the closure must not
            return float(_backward(net, opt, batch))

        return closure

    for step, batch in enumerate(batches[:5], start=1):
        expected = float(_backward(model, optimizer, batch))
        loss = optimizer.step(closure_for(model, optimizer, batch))
        assert loss == expected
        assert calls == 2 * step - 1
        reference.step(closure_for(twin, reference, batch))
        _assert_params_close(model, twin, step)
    assert optimizer.step() is None  # without a closure


def test_zero_grad(batches: list[Batch]) -> None:
    model = _mlp()
    optimizer = Ranger(model.parameters(), lr=0.05, block_size=BLOCK_SIZE)
    _backward(model, optimizer, batches[0])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    _backward(model, optimizer, batches[1])
    optimizer.zero_grad(set_to_none=False)
    for p in model.parameters():
        assert p.grad is not None
        assert torch.equal(p.grad, torch.zeros_like(p))


@pytest.mark.parametrize("rule", ["sgd", "adamw"])
def test_parameter_without_grad_is_skipped_like_torch(rule: str) -> None:
    gen = torch.Generator().manual_seed(1)
    inits = [torch.randn(12, 9, generator=gen), torch.randn(7, generator=gen)]
    ours = [nn.Parameter(t.clone()) for t in inits]
    theirs = [nn.Parameter(t.clone()) for t in inits]
    optimizer: torch.optim.Optimizer
    reference: torch.optim.Optimizer
    if rule == "sgd":
        optimizer = Ranger(ours, lr=0.1, momentum=0.9, weight_decay=0.01, block_size=10)
        reference = torch.optim.SGD(theirs, lr=0.1, momentum=0.9, weight_decay=0.01)
    else:
        optimizer = Ranger(ours, lr=0.1, rule="adamw", weight_decay=0.1, block_size=10)
        reference = torch.optim.AdamW(theirs, lr=0.1, weight_decay=0.1, foreach=False)
    for step in range(1, 11):
        grads = [torch.randn(t.shape, generator=gen) for t in inits]
        # The bias has no gradient in steps 1-3 and 7 (it is skipped: no decay, no momentum, no step count).
        skip_bias = step <= 3 or step == 7
        before = ours[1].detach().clone()
        for params in (ours, theirs):
            params[0].grad = grads[0].clone()
            params[1].grad = None if skip_bias else grads[1].clone()
        optimizer.step()
        reference.step()
        if skip_bias:
            assert torch.equal(ours[1].detach(), before)
            assert ours[1].grad is None
        for p, q in zip(ours, theirs, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=0, msg=_at_step(step))
    assert optimizer.state[ours[1]]["block_steps"].tolist() == [6]


def test_parameter_without_grad_is_unchanged_with_random_blocks() -> None:
    gen = torch.Generator().manual_seed(2)
    weight, bias = nn.Parameter(torch.randn(12, 9, generator=gen)), nn.Parameter(torch.randn(7, generator=gen))
    optimizer = Ranger([weight, bias], lr=0.1, momentum=0.9, push_fraction=0.5, block_size=10)
    bias_before = bias.detach().clone()
    for _ in range(10):
        weight.grad = torch.randn(12, 9, generator=gen)
        optimizer.step()
        assert torch.equal(bias.detach(), bias_before)
        assert torch.equal(optimizer.state[bias]["ef_residual"], torch.zeros(7))
        assert optimizer.state[bias]["block_steps"].tolist() == [0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rule": "ranger", "lr": 0.01, "use_gc": True, "push_fraction": 0.5},
        {"rule": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "use_gc": True, "push_fraction": 0.3},
        {"rule": "adamw", "lr": 0.01, "weight_decay": 0.01, "error_feedback": False, "push_fraction": 0.5},
    ],
    ids=["ranger-gc-ef", "sgd-gc-ef", "adamw-no-ef"],
)
def test_step_never_modifies_the_users_grad(batches: list[Batch], kwargs: dict[str, Any]) -> None:
    model = _mlp()
    optimizer = Ranger(model.parameters(), block_size=BLOCK_SIZE, **kwargs)
    for batch in batches[:8]:
        _backward(model, optimizer, batch)
        grads = [p.grad for p in model.parameters()]
        saved = [g.clone() for g in grads if g is not None]
        optimizer.step()
        after = [p.grad for p in model.parameters()]
        assert all(a is g for a, g in zip(after, grads, strict=True))  # the very same tensors
        for g, s in zip(after, saved, strict=True):
            assert g is not None
            assert torch.equal(g, s)


def test_add_param_group_after_construction() -> None:
    gen = torch.Generator().manual_seed(3)
    inits = [torch.randn(5, 4, generator=gen), torch.randn(6, generator=gen)]
    ours = [nn.Parameter(t.clone()) for t in inits]
    theirs = [nn.Parameter(t.clone()) for t in inits]
    optimizer = Ranger([ours[0]], lr=0.1, momentum=0.9, block_size=8)
    reference = torch.optim.SGD([theirs[0]], lr=0.1, momentum=0.9)
    optimizer.add_param_group({"params": [ours[1]], "lr": 0.05})
    reference.add_param_group({"params": [theirs[1]], "lr": 0.05})
    for step in range(1, 6):
        grads = [torch.randn(t.shape, generator=gen) for t in inits]
        for params in (ours, theirs):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
        optimizer.step()
        reference.step()
        for p, q in zip(ours, theirs, strict=True):
            torch.testing.assert_close(p.detach(), q.detach(), atol=1e-6, rtol=0, msg=_at_step(step))


# --- state_dict / load_state_dict --------------------------------------------------------------

CHECKPOINT_SETTINGS: list[dict[str, Any]] = [
    {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4},
    {"lr": 0.01, "rule": "adamw", "weight_decay": 0.01},
    {"lr": 0.01, "rule": "ranger", "push_fraction": 0.3, "seed": 3},
    {"lr": 0.05, "momentum": 0.9, "push_fraction": 0.25, "warmup_steps": 15, "warmup_start": 1.0},
]
CHECKPOINT_IDS = ["sgd", "adamw", "ranger-push0.3", "sgd-warmup-across-the-checkpoint"]


def _plain(value: object) -> bool:
    """Only tensors, numbers, strings, None and containers of them: what weights_only loading accepts."""
    if isinstance(value, dict):
        return all(isinstance(k, str | int) and _plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, torch.Tensor | bool | int | float | str)


def _assert_same_state(ours: dict[str, Any], theirs: dict[str, Any]) -> None:
    assert ours.keys() == theirs.keys()
    for key in ours:
        a, b = ours[key], theirs[key]
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), key
        # Values, not dtypes: see test_load_state_dict_keeps_state_dtypes.
        assert torch.equal(a.double(), b.double()), key


@pytest.mark.parametrize("settings", CHECKPOINT_SETTINGS, ids=CHECKPOINT_IDS)
def test_checkpoint_resume_equals_uninterrupted_run(batches: list[Batch], settings: dict[str, Any]) -> None:
    # Uninterrupted: 20 steps.
    model = _mlp()
    optimizer = Ranger(model.parameters(), block_size=BLOCK_SIZE, **settings)
    for batch in batches[:20]:
        _train_step(model, optimizer, batch)

    # Interrupted after 10 steps; a fresh model (different initial weights) and optimizer resume.
    first = _mlp()
    first_optimizer = Ranger(first.parameters(), block_size=BLOCK_SIZE, **settings)
    for batch in batches[:10]:
        _train_step(first, first_optimizer, batch)
    model_state = copy.deepcopy(first.state_dict())
    optimizer_state = copy.deepcopy(first_optimizer.state_dict())
    del first, first_optimizer

    resumed = _mlp(seed=99)
    resumed_optimizer = Ranger(resumed.parameters(), block_size=BLOCK_SIZE, **settings)
    resumed.load_state_dict(model_state)
    resumed_optimizer.load_state_dict(optimizer_state)
    for index, p in enumerate(resumed.parameters()):
        _assert_same_state(resumed_optimizer.state[p], optimizer_state["state"][index])
    if settings.get("push_fraction", 1.0) < 1:
        # What must survive is really there: counters that differ per block and error-feedback memory.
        block_steps = torch.cat([s["block_steps"] for s in optimizer_state["state"].values()])
        assert len(set(block_steps.tolist())) > 1
        assert any(s["ef_residual"].abs().sum() > 0 for s in optimizer_state["state"].values())
    if settings.get("rule") == "ranger":
        assert all(s["slow_buffer"].abs().sum() > 0 for s in optimizer_state["state"].values())
    for batch in batches[10:20]:
        _train_step(resumed, resumed_optimizer, batch)

    for (name, p), q in zip(model.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p.detach(), q.detach()), name
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        _assert_same_state(optimizer.state[p], resumed_optimizer.state[q])

    # Not vacuous: resuming the weights with a fresh optimizer gives something else.
    fresh = _mlp()
    fresh.load_state_dict(model_state)
    fresh_optimizer = Ranger(fresh.parameters(), block_size=BLOCK_SIZE, **settings)
    for batch in batches[10:20]:
        _train_step(fresh, fresh_optimizer, batch)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), fresh.parameters(), strict=True))


def test_state_dict_round_trips_through_torch_save_weights_only(batches: list[Batch], tmp_path: Path) -> None:
    model = _mlp()
    optimizer = Ranger(model.parameters(), lr=0.01, rule="ranger", push_fraction=0.3, block_size=BLOCK_SIZE)
    for batch in batches[:7]:
        _train_step(model, optimizer, batch)
    state = optimizer.state_dict()
    assert _plain(state)
    path = tmp_path / "optimizer.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded["param_groups"] == state["param_groups"]
    assert loaded["state"].keys() == state["state"].keys()
    for index, saved in state["state"].items():
        assert loaded["state"][index].keys() == saved.keys()
        for key, value in saved.items():
            assert loaded["state"][index][key].dtype == value.dtype
            assert torch.equal(loaded["state"][index][key], value), key

    # The loaded file resumes the run exactly.
    twin = copy.deepcopy(model)
    resumed = Ranger(twin.parameters(), lr=0.01, rule="ranger", push_fraction=0.3, block_size=BLOCK_SIZE)
    resumed.load_state_dict(loaded)
    for batch in batches[7:12]:
        _train_step(model, optimizer, batch)
        _train_step(twin, resumed, batch)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q)


def test_load_state_dict_keeps_state_dtypes() -> None:
    param = nn.Parameter(torch.randn(10))
    optimizer = Ranger([param], lr=0.1, momentum=0.9, block_size=4)
    param.grad = torch.randn(10)
    optimizer.step()
    resumed = Ranger([param], lr=0.1, momentum=0.9, block_size=4)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for key, value in optimizer.state[param].items():
        assert resumed.state[param][key].dtype == value.dtype, key


def test_bfloat16_block_counters_survive_a_resume() -> None:
    gen = torch.Generator().manual_seed(4)
    param = nn.Parameter(torch.randn(10, generator=gen).bfloat16())
    optimizer = Ranger([param], lr=0.01, rule="ranger", block_size=4)
    param.grad = torch.randn(10, generator=gen).bfloat16()
    optimizer.step()
    resumed = Ranger([param], lr=0.01, rule="ranger", block_size=4)
    resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for _ in range(299):
        param.grad = torch.randn(10, generator=gen).bfloat16()
        resumed.step()
    state = resumed.state[param]
    assert int(state["step"]) == 300
    assert state["block_steps"].tolist() == [300, 300, 300]
    assert state["ef_residual"].dtype == torch.float32
    assert state["exp_avg"].dtype == torch.float32


# --- random block updates -------------------------------------------------------------------------------


def _blocks_of(numels: Iterable[int], block_size: int) -> list[tuple[int, int, int]]:
    """(param index, offset, numel) of every block, in block-id order; computed here, not by ranger_ps."""
    return [
        (index, offset, min(block_size, numel - offset))
        for index, numel in enumerate(numels)
        for offset in range(0, numel, block_size)
    ]


def _changed_blocks(
    before: list[torch.Tensor], after: list[torch.Tensor], blocks: list[tuple[int, int, int]]
) -> set[int]:
    changed = set()
    for block_id, (index, offset, numel) in enumerate(blocks):
        old = before[index].reshape(-1)[offset : offset + numel]
        new = after[index].reshape(-1)[offset : offset + numel]
        if not torch.equal(old, new):
            changed.add(block_id)
    return changed


def _random_grads(params: list[nn.Parameter], gen: torch.Generator, scale: float = 1.0) -> list[torch.Tensor]:
    """Random gradients (no zero block, unlike a ReLU net's), set as ``.grad``; returns copies."""
    grads = [scale * torch.randn(p.shape, generator=gen) for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    return grads


def _snapshot(params: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def test_exactly_the_chosen_blocks_change() -> None:
    seed, lr, fraction = 7, 0.1, 0.25
    params = list(_mlp().parameters())
    blocks = _blocks_of(MLP_NUMELS, BLOCK_SIZE)
    assert len(blocks) == MLP_BLOCKS
    optimizer = Ranger(
        params, lr=lr, push_fraction=fraction, error_feedback=True, block_size=BLOCK_SIZE, seed=seed, outer="rule"
    )
    memory = [torch.zeros(p.numel()) for p in params]  # an independent error-feedback memory
    gen = torch.Generator().manual_seed(5)
    for step in range(1, 21):
        grads = _random_grads(params, gen)
        before = _snapshot(params)
        optimizer.step()
        after = _snapshot(params)
        chosen = choose_blocks(MLP_BLOCKS, fraction, seed=seed, worker_id=0, step=step)
        assert len(chosen) == math.ceil(fraction * MLP_BLOCKS)
        assert _changed_blocks(before, after, blocks) == set(chosen), f"step {step}"
        # The chosen blocks moved by -lr times everything their memory held; the memory is then empty.
        for m, g in zip(memory, grads, strict=True):
            m.add_(g.reshape(-1))
        expected = [b.reshape(-1).clone() for b in before]
        for block_id in chosen:
            index, offset, numel = blocks[block_id]
            expected[index][offset : offset + numel] -= lr * memory[index][offset : offset + numel]
            memory[index][offset : offset + numel] = 0
        for index, p in enumerate(params):
            torch.testing.assert_close(p.detach().reshape(-1), expected[index], atol=1e-6, rtol=0, msg=_at_step(step))
            torch.testing.assert_close(optimizer.state[p]["ef_residual"], memory[index], atol=1e-6, rtol=0)


def test_other_seed_other_blocks() -> None:
    picks = [choose_blocks(MLP_BLOCKS, 0.25, seed=seed, worker_id=0, step=1) for seed in (0, 7)]
    assert picks[0] != picks[1]  # so the test above really checks that seed= reaches the choice
    changed = []
    for seed in (0, 7):
        params = list(_mlp().parameters())
        optimizer = Ranger(params, lr=0.1, push_fraction=0.25, block_size=BLOCK_SIZE, seed=seed, outer="rule")
        _random_grads(params, torch.Generator().manual_seed(6))
        before = _snapshot(params)
        optimizer.step()
        changed.append(_changed_blocks(before, _snapshot(params), _blocks_of(MLP_NUMELS, BLOCK_SIZE)))
    assert [sorted(c) for c in changed] == picks


def _run_conservation(error_feedback: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """lr=1, no momentum, push 1/4, 30 steps.

    Returns:
        Per parameter: the total change (with error feedback, minus lr times the memory, i.e. plus the
        update the memory still holds), the sum of all gradients, and the sum of the chosen blocks' gradients.
    """
    seed, lr, fraction = 11, 1.0, 0.25
    params = list(_mlp().parameters())
    blocks = _blocks_of(MLP_NUMELS, BLOCK_SIZE)
    optimizer = Ranger(
        params,
        lr=lr,
        push_fraction=fraction,
        error_feedback=error_feedback,
        block_size=BLOCK_SIZE,
        seed=seed,
        outer="rule",
    )
    initial = _snapshot(params)
    total = [torch.zeros_like(p) for p in params]
    total_chosen = [torch.zeros(p.numel()) for p in params]
    gen = torch.Generator().manual_seed(8)
    for step in range(1, 31):
        grads = _random_grads(params, gen, scale=0.01)
        optimizer.step()
        for t, g in zip(total, grads, strict=True):
            t.add_(g)
        for block_id in choose_blocks(MLP_BLOCKS, fraction, seed=seed, worker_id=0, step=step):
            index, offset, numel = blocks[block_id]
            total_chosen[index][offset : offset + numel] += grads[index].reshape(-1)[offset : offset + numel]
        if not error_feedback:
            for p in params:
                assert torch.equal(optimizer.state[p]["ef_residual"], torch.zeros(p.numel()))
    change = [p.detach() - p0 for p, p0 in zip(params, initial, strict=True)]
    memory = [optimizer.state[p]["ef_residual"].view_as(p) for p in params]
    if error_feedback:
        assert all(m.abs().sum() > 0 for m in memory)
        # What is still in the memory is the update still to come: -lr * memory.
        change = [c - lr * m for c, m in zip(change, memory, strict=True)]
    return change, total, [t.view_as(p) for t, p in zip(total_chosen, params, strict=True)]


def test_error_feedback_loses_no_gradient_mass() -> None:
    change, total, _ = _run_conservation(error_feedback=True)
    for c, t in zip(change, total, strict=True):
        torch.testing.assert_close(c, -t, atol=1e-5, rtol=0)


def test_without_error_feedback_the_dropped_gradient_is_gone() -> None:
    change, total, total_chosen = _run_conservation(error_feedback=False)
    for c, t in zip(change, total_chosen, strict=True):
        torch.testing.assert_close(c, -t, atol=1e-5, rtol=0)
    assert not all(torch.allclose(c, -t, atol=1e-3) for c, t in zip(change, total, strict=True))


def test_warmup_decays_the_number_of_changed_blocks() -> None:
    params = list(_mlp().parameters())
    blocks = _blocks_of(MLP_NUMELS, BLOCK_SIZE)
    optimizer = Ranger(
        params,
        lr=0.1,
        push_fraction=0.1,
        warmup_steps=10,
        warmup_start=1.0,
        block_size=BLOCK_SIZE,
        seed=1,
        outer="rule",
    )
    gen = torch.Generator().manual_seed(9)
    counts = []
    for step in range(1, 16):
        _random_grads(params, gen)
        before = _snapshot(params)
        optimizer.step()
        changed = _changed_blocks(before, _snapshot(params), blocks)
        counts.append(len(changed))
        # Geometric decay of the density from 1.0 at step 1 to 0.1 from step 11 on.
        density = 0.1 ** (min(step - 1, 10) / 10)
        assert len(changed) == min(MLP_BLOCKS, math.ceil(round(density * MLP_BLOCKS, 9))), f"step {step}"
    assert counts[0] == MLP_BLOCKS
    assert counts == sorted(counts, reverse=True)
    assert len(set(counts)) > 3  # it really decays through intermediate densities
    assert counts[10:] == [math.ceil(0.1 * MLP_BLOCKS)] * 5


# --- validation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "keyword"),
    [
        ({"lr": -1}, "lr"),
        ({"momentum": 1.5}, "momentum"),
        ({"rule": "nope"}, "rule"),
        ({"rule": "adamw", "momentum": 0.9}, "momentum"),
        ({"push_fraction": 0}, "push_fraction"),
        ({"push_fraction": 1.5}, "push_fraction"),
        ({"block_size": 0}, "block_size"),
    ],
    ids=["lr-1", "momentum1.5", "rule-nope", "adamw-momentum", "push0", "push1.5", "block0"],
)
def test_bad_keywords_raise_value_error_naming_them(kwargs: dict[str, Any], keyword: str) -> None:
    with pytest.raises(ValueError, match=keyword):
        Ranger(_mlp().parameters(), **kwargs)


def test_observer_needs_servers() -> None:
    with pytest.raises(ValueError, match="observer"):
        Ranger(_mlp().parameters(), lr=0.1, observer=True)


# --- loading torch.optim state and refusing malformed settings -------------------------------------


def test_a_torch_sgd_state_dict_loads_and_training_continues_exactly(batches: list[Batch]) -> None:
    """Switching a run from torch.optim.SGD to Ranger mid-way: the momentum buffers and settings carry over."""
    model = _mlp()
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    for batch in batches[:3]:
        _train_step(model, sgd, batch)
    twin = copy.deepcopy(model)
    reference = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    reference.load_state_dict(sgd.state_dict())
    ours = Ranger(model.parameters(), lr=0.5, block_size=BLOCK_SIZE)  # settings from the state dict win
    ours.load_state_dict(sgd.state_dict())
    assert (ours.param_groups[0]["lr"], ours.param_groups[0]["momentum"]) == (0.05, 0.9)
    for step, batch in enumerate(batches[3:8], start=4):
        _train_step(model, ours, batch)
        _train_step(twin, reference, batch)
        _assert_params_close(model, twin, step)


@pytest.mark.parametrize("betas", [(0.9,), (0.9, 0.99, 0.999), 0.9])
def test_betas_that_are_not_two_numbers_are_refused_clearly(betas: Any) -> None:
    with pytest.raises(ValueError, match=r"betas must be two numbers \(beta1, beta2\)"):
        Ranger(_mlp().parameters(), rule="adamw", betas=betas)


# --- torch.optim defaults and the optimizer's lifecycle -----------------------------------------------


def test_adamw_without_weight_decay_equals_torch_adamw_defaults(batches: list[Batch]) -> None:
    """rule="adamw" with no weight_decay takes torch.optim.AdamW's default (0.01), step by step."""
    assert torch.optim.AdamW([nn.Parameter(torch.zeros(1))]).defaults["weight_decay"] == 0.01
    optimizers: list[Ranger] = []

    def ours(params: Iterable[torch.Tensor]) -> Ranger:
        optimizers.append(Ranger(params, lr=0.01, rule="adamw", block_size=BLOCK_SIZE))
        return optimizers[-1]

    _lockstep(ours, lambda params: torch.optim.AdamW(params, lr=0.01, foreach=False), batches)
    assert optimizers[0].param_groups[0]["weight_decay"] == 0.01


def test_an_explicit_zero_weight_decay_stays_zero_for_adamw(batches: list[Batch]) -> None:
    optimizers: list[Ranger] = []

    def ours(params: Iterable[torch.Tensor]) -> Ranger:
        optimizers.append(Ranger(params, lr=0.01, rule="adamw", weight_decay=0.0, block_size=BLOCK_SIZE))
        return optimizers[-1]

    _lockstep(ours, lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.0, foreach=False), batches, 10)
    assert optimizers[0].param_groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("rule", ["sgd", "ranger"])
def test_sgd_and_ranger_keep_no_weight_decay_by_default(rule: str) -> None:
    assert Ranger(_mlp().parameters(), rule=rule).param_groups[0]["weight_decay"] == 0.0


def test_step_after_close_in_process_keeps_training_as_torch(batches: list[Batch]) -> None:
    """In process close() has no cluster to leave: later steps go on exactly as torch.optim.SGD's."""
    model = _mlp()
    twin = copy.deepcopy(model)
    optimizer = Ranger(model.parameters(), lr=0.05, momentum=0.9, block_size=BLOCK_SIZE)
    reference = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9)
    for step, batch in enumerate(batches[:6], start=1):
        if step == 3:
            optimizer.close()
        _train_step(model, optimizer, batch)
        _train_step(twin, reference, batch)
        _assert_params_close(model, twin, step)


def test_an_lr_that_changes_every_step_keeps_the_settings_cache_bounded_and_equals_torch() -> None:
    torch.manual_seed(0)
    ours, theirs = nn.Linear(4, 2), nn.Linear(4, 2)
    theirs.load_state_dict(ours.state_dict())
    optimizer = Ranger(ours.parameters(), lr=0.1, momentum=0.9)
    reference = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step)) for o in (optimizer, reference)]
    x = torch.randn(8, 4)
    for _ in range(600):
        for model, opt in ((ours, optimizer), (theirs, reference)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        for schedule in schedules:
            schedule.step()
    assert len(optimizer._configs) <= 256  # two entries (group, inner) per lr seen: started again, not grown
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
