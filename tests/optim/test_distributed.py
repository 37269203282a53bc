"""Integration: "distributed equals local" for ``ranger_ps.Ranger`` against real shard processes.

One worker, the same seed and settings: training against two real shards gives the same weights as
the in-process optimizer (to 1e-6) at every one of 50 steps, for every rule under every outer rule
(the classic rule mode, and an inner rule with mean, sum or sgd on the shards), for partial pushes
with and without error feedback, quantized pushes, local steps, server-side truncation and clipping,
and with ``overlap=True``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ranger_ps.algorithm.selection import choose_blocks
from ranger_ps.errors import LayoutMismatchError
from ranger_ps.optim import Ranger
from tests.conftest import ServerFactory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]

STEPS = 50
BATCH = 32
BLOCK_SIZE = 200
NUM_BLOCKS = 21  # 64*48 + 48 + 48*10 + 10 elements -> 16 + 1 + 3 + 1 blocks of at most 200, over 2 shards
SEED = 7

Batch = tuple[torch.Tensor, torch.Tensor]


@functools.cache
def _batches() -> tuple[Batch, ...]:
    """A fixed sequence of ``STEPS`` minibatches from scikit-learn's digits (pixels / 16)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    assert len(order) >= STEPS * BATCH
    return tuple((x[idx], y[idx]) for idx in (order[t * BATCH : (t + 1) * BATCH] for t in range(STEPS)))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))


def _assert_same(local: nn.Module, remote: nn.Module, when: str) -> None:
    for (name, want), (_, got) in zip(local.named_parameters(), remote.named_parameters(), strict=True):
        try:
            torch.testing.assert_close(got.detach(), want.detach(), atol=1e-6, rtol=0)
        except AssertionError as exc:
            raise AssertionError(f"{name} {when}: {exc}") from None


@dataclass(frozen=True)
class RemoteRun:
    """What the remote side of a run reports at the end."""

    worker_id: int
    shard_of: tuple[int, ...]  # block id -> shard index (the client's placement)
    blocks_applied: tuple[int, ...]  # per shard, from the shards' stats
    pushes_applied: tuple[int, ...]  # per shard


Schedule = Callable[[torch.optim.Optimizer], Any]  # builds an lr scheduler for an optimizer
Groups = Callable[[nn.Module], Any]  # what the optimizer gets for a model: parameters or param groups


def _parameters(model: nn.Module) -> Any:
    return model.parameters()


def _run_and_compare(
    servers: list[str],
    settings: dict[str, Any],
    *,
    overlap: bool = False,
    schedule: Schedule | None = None,
    groups: Groups = _parameters,
) -> RemoteRun:
    """Train a local and a remote copy in lockstep, comparing the weights at every step.

    The weights are compared right after each ``step()`` (without overlap), right before each
    forward pass (which is what matters with ``overlap=True``, where the new weights land at
    ``zero_grad()``), and after the remote optimizer is synchronized and closed.

    Each side runs the standard loop (``zero_grad``; loss; ``backward``; ``step``), interleaved.

    Returns:
        The remote optimizer's worker id, placement and its shards' stats after the run.
    """
    local_model, remote_model = _model(), _model()
    _assert_same(local_model, remote_model, "at initialization")
    local = Ranger(groups(local_model), block_size=BLOCK_SIZE, seed=SEED, **settings)
    with Ranger(
        groups(remote_model), block_size=BLOCK_SIZE, seed=SEED, servers=servers, overlap=overlap, **settings
    ) as remote:
        schedulers = [] if schedule is None else [schedule(local), schedule(remote)]
        assert remote.worker_id == 0  # the same worker id as in-process, so the same blocks are chosen
        expected = "shared-memory" if settings.get("shared_memory", True) else "exchange"
        assert remote.client is not None
        assert remote.client.transports == ["push-pull" if not settings.get("exchange", True) else expected] * 2
        assert remote.layout.num_blocks == NUM_BLOCKS
        for t, batch in enumerate(_batches(), start=1):
            # Before the forward pass: zero_grad has swapped in any pull in flight.
            local.zero_grad()
            remote.zero_grad()
            _assert_same(local_model, remote_model, f"before the forward pass of step {t}")
            before = [p.detach().clone() for p in remote_model.parameters()]
            x, y = batch
            losses = []
            for model, optimizer in ((local_model, local), (remote_model, remote)):
                loss = F.cross_entropy(model(x), y)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                losses.append(float(loss.detach()))
            for scheduler in schedulers:
                if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    scheduler.step(round(losses[0], 1))  # the same metric for both (the losses agree to 1e-6)
                else:
                    scheduler.step()
            if not overlap or settings.get("outer", "mean") != "rule":
                # An inner rule updates the view in step(); what lands later changes it by rounding only.
                _assert_same(local_model, remote_model, f"after step {t}")
            else:  # the new weights are still in flight: step() left the parameters alone
                assert all(torch.equal(b, p) for b, p in zip(before, remote_model.parameters(), strict=True))
        remote.synchronize()
        _assert_same(local_model, remote_model, f"after step {STEPS} (synchronized)")
        client = remote.client
        assert client is not None and client.placement is not None
        stats = client.stats()
        run = RemoteRun(
            worker_id=remote.worker_id,
            shard_of=tuple(client.placement.shard_of),
            blocks_applied=tuple(s.blocks_applied for s in stats),
            pushes_applied=tuple(s.pushes_applied for s in stats),
        )
    local.flush()  # close() flushed the remote worker's residual: the same here
    _assert_same(local_model, remote_model, "after close")
    return run


def _assert_blocks_applied_equal_blocks_chosen(run: RemoteRun, push_fraction: float) -> None:
    """The shards applied exactly the blocks ``choose_blocks`` picks at steps 1..50, shard by shard."""
    expected = [0] * len(run.blocks_applied)
    for t in range(1, STEPS + 1):
        chosen = choose_blocks(NUM_BLOCKS, push_fraction, seed=SEED, worker_id=run.worker_id, step=t)
        assert len(chosen) == (NUM_BLOCKS if push_fraction >= 1 else math.ceil(push_fraction * NUM_BLOCKS))
        for block_id in chosen:
            expected[run.shard_of[block_id]] += 1
    assert all(e > 0 for e in expected)  # both shards hold chosen blocks, so the check is not vacuous
    assert list(run.blocks_applied) == expected
    assert sum(run.blocks_applied) == sum(expected)
    assert list(run.pushes_applied) == [STEPS] * len(expected)  # every shard sees every step's push


SGD = dict(rule="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4)
ADAMW = dict(rule="adamw", lr=0.01, weight_decay=0.01)
RANGER_GC = dict(rule="ranger", lr=0.01, use_gc=True)
RANGER_NO_GC = dict(rule="ranger", lr=0.01, use_gc=False)
RULES = (("sgd", SGD), ("adamw", ADAMW), ("ranger-gc", RANGER_GC), ("ranger-nogc", RANGER_NO_GC))

CASES = [
    # The classic mode: gradients pushed, the rule on the shards.
    *(
        pytest.param({**rule, "outer": "rule", "push_fraction": fraction}, id=f"rule-{name}-push{fraction}")
        for name, rule in RULES
        for fraction in (1.0, 0.3)
    ),
    pytest.param({**SGD, "outer": "rule", "push_fraction": 0.3, "error_feedback": False}, id="rule-sgd-no-feedback"),
    pytest.param(
        {**SGD, "outer": "rule", "truncate_below": 1e-3, "truncation_residual": True, "clip_norm": 1.0},
        id="rule-sgd-truncation-residual-clip-norm",
    ),
    # An inner rule on the worker, every outer rule on the shards.
    *(
        pytest.param({**rule, "outer": outer, "push_fraction": 0.3}, id=f"{outer}-{name}-push0.3")
        for name, rule in RULES
        for outer in ("mean", "sum", "sgd")
    ),
    pytest.param({**SGD, "outer": "mean", "push_fraction": 1.0}, id="mean-sgd-push1.0"),
    pytest.param({**ADAMW, "outer": "mean", "num_workers": 3, "push_fraction": 0.3}, id="mean-adamw-3-workers"),
    pytest.param({**RANGER_GC, "outer": "mean", "num_workers": 2}, id="mean-ranger-cluster-clock"),
    pytest.param({**SGD, "push_fraction": 0.3, "push_dtype": "int8"}, id="mean-sgd-int8"),
    pytest.param({**ADAMW, "push_fraction": 0.3, "push_dtype": "bfloat16"}, id="mean-adamw-bfloat16"),
    pytest.param({**SGD, "push_fraction": 0.3, "error_feedback": False}, id="mean-sgd-no-feedback"),
    pytest.param(
        {**SGD, "truncate_below": 1e-4, "truncation_residual": True, "clip_value": 0.01}, id="mean-sgd-truncation"
    ),
]


@pytest.mark.parametrize("settings", CASES)
def test_distributed_equals_local_and_shards_apply_exactly_the_chosen_blocks(
    start_servers: ServerFactory, settings: dict[str, Any]
) -> None:
    # One run per case proves both properties: starting servers is most of a case's cost.
    run = _run_and_compare(start_servers(2), settings)
    _assert_blocks_applied_equal_blocks_chosen(run, settings.get("push_fraction", 1.0))


def test_local_steps_push_every_h_steps(start_servers: ServerFactory) -> None:
    settings = {**SGD, "push_fraction": 0.5, "local_steps": 5}
    run = _run_and_compare(start_servers(2), settings)
    assert list(run.pushes_applied) == [STEPS // 5] * 2


TRANSPORTS = [
    pytest.param({"exchange": False}, id="v1-push-and-pull-calls"),
    pytest.param({"shared_memory": False}, id="exchange-over-grpc-frames"),
]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({**SGD, "outer": "rule", "push_fraction": 0.3}, id="rule-sgd"),
        pytest.param({**RANGER_GC, "push_fraction": 0.3, "push_dtype": "int8"}, id="mean-ranger-int8"),
    ],
)
def test_every_transport_equals_local(
    start_servers: ServerFactory, settings: dict[str, Any], transport: dict[str, Any]
) -> None:
    """The default (one exchange per step, bytes through shared memory on this host) is what the cases
    above run; the same trajectory over exchange frames and over a v1 worker's Push and Pull calls."""
    run = _run_and_compare(start_servers(2), {**settings, **transport})
    _assert_blocks_applied_equal_blocks_chosen(run, 0.3)


def test_overlap_equals_local(start_servers: ServerFactory) -> None:
    for outer in ("rule", "mean"):
        settings = {**SGD, "outer": outer, "push_fraction": 0.3}
        run = _run_and_compare(start_servers(2), settings, overlap=True)
        _assert_blocks_applied_equal_blocks_chosen(run, 0.3)


lr_scheduler = torch.optim.lr_scheduler
SCHEDULES: dict[str, Schedule] = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=10, gamma=0.5),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=STEPS),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=STEPS),  # cycles momentum too
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=10),
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=2),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step)),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_lr_schedulers_work_on_a_cluster_exactly_as_in_process(start_servers: ServerFactory, name: str) -> None:
    """Under an inner rule (the default) the rule's hyper-parameters are the worker's own: a schedule
    changes them between steps on a cluster too, and the weights stay those of the in-process run."""
    _run_and_compare(start_servers(2), {**SGD, "push_fraction": 0.3}, schedule=SCHEDULES[name])


def test_param_groups_with_their_own_lr_work_on_a_cluster(start_servers: ServerFactory) -> None:
    def groups(model: nn.Module) -> Any:
        first, second = model[0], model[2]  # type: ignore[index]
        return [{"params": first.parameters(), "lr": 0.1}, {"params": second.parameters(), "momentum": 0.5}]

    _run_and_compare(start_servers(2), {**SGD, "push_fraction": 0.3}, groups=groups, schedule=SCHEDULES["StepLR"])


def test_a_schedule_under_the_classic_rule_mode_is_refused_clearly(start_servers: ServerFactory) -> None:
    """With ``outer="rule"`` the shards run the rule: its settings are the cluster's, fixed at registration."""
    model = _model()
    rule_mode: dict[str, Any] = {**SGD, "outer": "rule"}
    with Ranger(model.parameters(), block_size=BLOCK_SIZE, servers=start_servers(2), **rule_mode) as remote:
        scheduler = lr_scheduler.StepLR(remote, step_size=1, gamma=0.5)
        x, y = _batches()[0]
        F.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
        remote.step()
        scheduler.step()
        with pytest.raises(RuntimeError, match=r"the rule settings changed after registration .* lr: 0\.05 != 0\.025"):
            remote.step()
    with pytest.raises(ValueError, match="with servers and outer='rule', every param group must use the same rule"):
        Ranger(
            [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters()}],  # type: ignore[index]
            block_size=BLOCK_SIZE, servers=["127.0.0.1:1"], **rule_mode,
        )  # fmt: skip


def test_second_optimizer_with_another_lr_is_refused(start_servers: ServerFactory) -> None:
    servers = start_servers(2)
    with Ranger(_model().parameters(), lr=0.01, block_size=BLOCK_SIZE, servers=servers):
        with pytest.raises(LayoutMismatchError, match=r"lr: 0\.01 != 0\.02"):
            Ranger(_model().parameters(), lr=0.02, block_size=BLOCK_SIZE, servers=servers)


def test_step_after_close_with_servers_is_a_clear_error_and_changes_nothing(start_servers: ServerFactory) -> None:
    servers = start_servers(1)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    optimizer = Ranger(model.parameters(), lr=0.1, servers=servers, local_steps=4)
    x = torch.randn(16, 8)
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()
    optimizer.close()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.zero_grad()  # nothing in flight: a no-op, as a training loop calls it first
    model(x).square().mean().backward()
    with pytest.raises(RuntimeError, match=r"step\(\) after close\(\): this optimizer left the cluster"):
        optimizer.step()
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)
    optimizer.close()  # closing twice is harmless
