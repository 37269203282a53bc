"""Buffers (BatchNorm's running statistics) kept consistent across workers through real shards.

torch optimizers never see buffers; ``Ranger(..., buffers=model.named_buffers())`` with servers
pushes what the forward passes changed and averages it like the updates, so every worker, an
evaluator and the checkpoints share one set of statistics.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from ranger_ps import Ranger, running_statistics
from ranger_ps.errors import LayoutMismatchError, UserError
from ranger_ps.workloads.models import check_cluster_buffers
from tests.conftest import ServerFactory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120), pytest.mark.usefixtures("one_thread")]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _batch(seed: int, shift: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=generator) + shift, torch.randint(0, 3, (16,), generator=generator)


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    optimizer.zero_grad()
    F.cross_entropy(model(batch[0]), batch[1]).backward()  # type: ignore[no-untyped-call]
    optimizer.step()


def _stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in model.named_buffers() if b.is_floating_point()}


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"outer": "sum"}, "buffers are averaged through the shards, which needs outer='mean'"),
        ({"clip_value": 1.0}, "truncation or clipping would change them too"),
    ],
)
def test_buffers_with_servers_need_settings_that_average_them(kwargs: dict[str, Any], message: str) -> None:
    model = _model()
    with pytest.raises(ValueError, match=message):
        Ranger(model.parameters(), servers=["127.0.0.1:1"], buffers=model.named_buffers(), **kwargs)


@pytest.mark.unit
def test_bad_buffers_are_refused_with_a_message() -> None:
    model = _model()
    with pytest.raises(ValueError, match="buffer 'w' requires grad: a trainable tensor is a parameter"):
        Ranger(model.parameters(), buffers=[("w", torch.zeros(2, requires_grad=True))])
    with pytest.raises(ValueError, match="item 0 is str"):
        Ranger(model.parameters(), buffers=["running_mean"])  # type: ignore[arg-type]


@pytest.mark.unit
def test_in_process_buffers_are_left_alone_and_training_equals_torch_sgd() -> None:
    ours, theirs = _model(), _model()
    optimizer = Ranger(ours.parameters(), lr=0.1, momentum=0.9, buffers=ours.named_buffers())
    reference = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    for step in range(5):
        _train(ours, optimizer, _batch(step))
        _train(theirs, reference, _batch(step))
    for name, value in _stats(theirs).items():
        torch.testing.assert_close(_stats(ours)[name], value, atol=0, rtol=0)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_one_worker_on_shards_equals_in_process_parameters_and_statistics(start_servers: ServerFactory) -> None:
    servers = start_servers(2)
    local, remote = _model(), _model()
    in_process = Ranger(local.parameters(), lr=0.1, momentum=0.9, block_size=16)
    cluster = Ranger(
        remote.parameters(), lr=0.1, momentum=0.9, block_size=16, servers=servers, buffers=remote.named_buffers()
    )
    for step in range(8):
        _train(local, in_process, _batch(step))
        _train(remote, cluster, _batch(step))
    cluster.close()
    for name, value in _stats(local).items():
        torch.testing.assert_close(_stats(remote)[name], value, atol=1e-6, rtol=0, msg=name)
    for (name, a), b in zip(local.named_parameters(), remote.parameters(), strict=True):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)


def test_two_workers_share_the_average_of_their_statistics(start_servers: ServerFactory) -> None:
    servers = start_servers(1)
    models = [_model(), _model()]
    start = _stats(models[0])
    optimizers = [
        Ranger(m.parameters(), lr=0.0, servers=servers, num_workers=2, buffers=m.named_buffers()) for m in models
    ]
    # Each worker sees data of its own distribution: its running mean moves towards its own batch mean.
    for index, (model, optimizer) in enumerate(zip(models, optimizers, strict=True)):
        _train(model, optimizer, _batch(index, shift=3.0 * index))
    observer_model = _model()
    observer = Ranger(
        observer_model.parameters(), servers=servers, observer=True, buffers=observer_model.named_buffers()
    )
    for optimizer in optimizers:
        optimizer.refresh()
    observer.refresh()
    # Every copy holds the same statistics: the start plus the mean of what each worker's batches did.
    expected = {}
    for name in start:
        alone = []
        for index in (0, 1):
            solo = _model()
            solo.train()
            solo(_batch(index, shift=3.0 * index)[0])
            alone.append(_stats(solo)[name] - start[name])
        expected[name] = start[name] + (alone[0] + alone[1]) / 2
    for model in (*models, observer_model):
        for name, value in expected.items():
            torch.testing.assert_close(_stats(model)[name], value, atol=1e-5, rtol=0, msg=name)
    assert not torch.allclose(expected["1.running_mean"], start["1.running_mean"])
    for optimizer in (*optimizers, observer):
        optimizer.close()


def test_a_worker_without_the_buffers_is_refused_naming_the_first_one(start_servers: ServerFactory) -> None:
    servers = start_servers(1)
    first = _model()
    with Ranger(first.named_parameters(), servers=servers, buffers=first.named_buffers()):
        other = _model()
        with pytest.raises(LayoutMismatchError, match="1.running_mean"):
            Ranger(other.named_parameters(), servers=servers, connect_timeout=5.0)


class _Masked(nn.Module):
    """A model with a constant mask buffer beside BatchNorm's statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _model()
        self.register_buffer("mask", torch.full((3,), float("-inf")))


@pytest.mark.unit
def test_running_statistics_are_the_normalization_layers_and_nothing_else() -> None:
    model = _Masked()
    assert [name for name, _ in running_statistics(model)] == ["net.1.running_mean", "net.1.running_var"]
    with pytest.raises(ValueError, match="buffer 'mask' holds non-finite values"):
        Ranger(model.parameters(), servers=["127.0.0.1:1"], buffers=model.named_buffers())
    check_cluster_buffers(nn.Sequential(_Constant()), "sgd", truncates=True)  # no statistics: nothing to refuse
    with pytest.raises(UserError, match="the model has buffers"):
        check_cluster_buffers(model, "sgd", truncates=False)


class _Constant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))
        self.register_buffer("table", torch.arange(4.0))


def test_only_statistics_that_moved_are_pushed(start_servers: ServerFactory) -> None:
    model = _model()
    optimizer = Ranger(
        model.parameters(), lr=0.1, servers=start_servers(1), block_size=4, buffers=running_statistics(model)
    )
    buffer_blocks = {b.block_id for b in optimizer.layout.blocks if b.param_index >= len(list(model.parameters()))}
    assert len(buffer_blocks) == 4  # running mean and variance of 8 features, in blocks of 4
    _train(model, optimizer, _batch(0))
    assert buffer_blocks <= set(optimizer.last_chosen)  # a training forward pass moved them
    model.eval()  # statistics frozen: the next push carries parameters only
    _train(model, optimizer, _batch(1))
    assert not buffer_blocks & set(optimizer.last_chosen) and optimizer.last_chosen
    optimizer.close()
