"""The inner rule on a worker's view: residual in weight units, the view merge, the flush, quantized pushes.

In-process (a one-shard "cluster" in this process): exact checks against the algebra, plus the
outer rules applied to the server copy. The cluster-level equalities are in test_distributed.py.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

from ranger_ps import Ranger
from ranger_ps.algorithm.quantize import Quantized, dequantize, quantize
from ranger_ps.algorithm.selection import choose_blocks
from ranger_ps.client.backend import Run
from ranger_ps.config.train import TrainConfig
from ranger_ps.errors import UserError

BLOCK_SIZE = 16


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3))


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(6, 8, generator=generator), torch.randint(0, 3, (6,), generator=generator)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
    optimizer.step()


def _server(optimizer: Ranger) -> list[torch.Tensor]:
    return [optimizer.state[p]["server_value"].view_as(p) for p in optimizer._params]


def _residual(optimizer: Ranger) -> list[torch.Tensor]:
    return [optimizer.state[p]["ef_residual"].view_as(p) for p in optimizer._params]


@pytest.mark.parametrize("rule", ["sgd", "adamw", "ranger"])
@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_one_worker_view_is_the_dense_trajectory(rule: str, fraction: float) -> None:
    """With one worker the view is what dense training computes, whatever is pushed."""
    sparse_model, dense_model = _model(), _model()
    settings: dict[str, Any] = dict(rule=rule, lr=0.05, block_size=BLOCK_SIZE)
    sparse = Ranger(sparse_model.parameters(), push_fraction=fraction, **settings)
    dense = Ranger(dense_model.parameters(), push_fraction=1.0, **settings)
    for t in range(30):
        _step(sparse_model, sparse, t)
        _step(dense_model, dense, t)
    for a, b in zip(sparse_model.parameters(), dense_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_the_view_is_the_server_copy_plus_the_residual_and_the_flush_settles_it() -> None:
    model = _model()
    optimizer = Ranger(model.parameters(), lr=0.1, momentum=0.9, push_fraction=0.2, block_size=BLOCK_SIZE)
    for t in range(12):
        _step(model, optimizer, t)
        for p, server, owed in zip(model.parameters(), _server(optimizer), _residual(optimizer), strict=True):
            torch.testing.assert_close(p.detach(), server + owed, atol=1e-6, rtol=0)
    assert any(bool(r.abs().sum() > 0) for r in _residual(optimizer))  # the unpushed part is really there
    optimizer.flush()
    for p, server, owed in zip(model.parameters(), _server(optimizer), _residual(optimizer), strict=True):
        assert torch.equal(owed, torch.zeros_like(owed))
        torch.testing.assert_close(server, p.detach(), atol=1e-6, rtol=0)


def test_the_residual_is_in_weight_units_and_exactly_the_unpushed_blocks_are_owed() -> None:
    """sgd without momentum at lr 0.5: the residual of a block is -0.5 x its gradients since its last push."""
    model = _model()
    optimizer = Ranger(model.parameters(), lr=0.5, momentum=0.0, push_fraction=0.25, block_size=BLOCK_SIZE, seed=3)
    layout = optimizer.layout
    owed = [torch.zeros(p.numel()) for p in model.parameters()]
    for t in range(1, 9):
        _step(model, optimizer, t)
        for index, p in enumerate(model.parameters()):
            assert p.grad is not None
            owed[index] -= 0.5 * p.grad.reshape(-1)
        for block_id in choose_blocks(layout.num_blocks, 0.25, seed=3, worker_id=0, step=t):
            block = layout.blocks[block_id]
            owed[block.param_index][block.offset : block.offset + block.numel] = 0
        for index, residual in enumerate(_residual(optimizer)):
            torch.testing.assert_close(residual.reshape(-1), owed[index], atol=1e-6, rtol=0)


def test_pulled_blocks_land_as_pulled_plus_residual_and_ranger_slow_weights_follow() -> None:
    model = _model()
    optimizer = Ranger(model.parameters(), rule="ranger", lr=0.05, push_fraction=0.2, block_size=BLOCK_SIZE)
    for t in range(3):
        _step(model, optimizer, t)
    block_id = 1
    block = optimizer.layout.blocks[block_id]
    param = next(p for i, p in enumerate(model.parameters()) if i == block.param_index)
    span = slice(block.offset, block.offset + block.numel)
    residual = optimizer.state[param]["ef_residual"][span].clone()
    slow_before = optimizer.state[param]["slow_buffer"][span].clone()
    view_before = param.detach().reshape(-1)[span].clone()
    pulled = torch.full((block.numel,), 0.25)  # as if the other workers had moved this block
    optimizer._land([Run(torch.tensor([block_id]), pulled)])
    view_after = param.detach().reshape(-1)[span]
    torch.testing.assert_close(view_after, pulled + residual)
    torch.testing.assert_close(optimizer.state[param]["slow_buffer"][span], slow_before + (view_after - view_before))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_quantization_round_trips_within_its_precision(dtype: str) -> None:
    values = torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 3
    block = quantize(values, dtype)
    back = dequantize(block, torch.float32)
    bound = {"float32": 0.0, "bfloat16": 2 * float(values.abs().max()) * 2**-8, "int8": float(values.abs().max()) / 127}
    assert float((back - values).abs().max()) <= bound[dtype] + 1e-7
    assert block.payload.dtype == {"float32": torch.float32, "bfloat16": torch.bfloat16, "int8": torch.int8}[dtype]
    assert quantize(torch.zeros(4), "int8").scale == 1.0  # an all-zero block still has a usable scale
    with pytest.raises(ValueError, match="scale"):
        dequantize(Quantized(torch.zeros(2, dtype=torch.int8)), torch.float32)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_quantization_error_stays_in_the_residual(dtype: str) -> None:
    """What the pushes delivered plus what is still owed is exactly what the inner rule computed."""
    model = _model()
    initial = [p.detach().clone() for p in model.parameters()]
    optimizer = Ranger(model.parameters(), lr=0.1, push_fraction=0.5, push_dtype=dtype, block_size=BLOCK_SIZE)
    for t in range(10):
        _step(model, optimizer, t)
    for p, p0, server, owed in zip(model.parameters(), initial, _server(optimizer), _residual(optimizer), strict=True):
        delivered = server - p0
        torch.testing.assert_close(delivered + owed, p.detach() - p0, atol=1e-6, rtol=0)
        assert not torch.equal(owed, torch.zeros_like(owed))


def test_mean_outer_divides_by_the_workers_and_scales_the_inner_lr() -> None:
    """A one-worker stand-in for a cluster of 4: each push adds a quarter, the inner lr is doubled."""
    model = _model()
    reference_model = copy.deepcopy(model)
    optimizer = Ranger(model.parameters(), lr=0.05, momentum=0.0, num_workers=4, block_size=BLOCK_SIZE)
    reference = torch.optim.SGD(reference_model.parameters(), lr=0.05 * math.sqrt(4))
    initial = [p.detach().clone() for p in model.parameters()]
    _step(model, optimizer, 0)
    _step(reference_model, reference, 0)
    for p0, server, expected in zip(initial, _server(optimizer), reference_model.parameters(), strict=True):
        torch.testing.assert_close(server, p0 + (expected.detach() - p0) / 4, atol=1e-7, rtol=0)


def test_outer_sgd_applies_nesterov_over_pushed_changes() -> None:
    """Step 1 with one worker: the pseudo-gradient g = -delta seeds the buffer, and Nesterov moves the
    server copy by -outer_lr (g + mu g) = 0.7 x 1.9 x delta; the view lands on it."""
    model = _model()
    reference_model = copy.deepcopy(model)
    optimizer = Ranger(
        model.parameters(), lr=0.1, momentum=0.0, outer="sgd", outer_lr=0.7, outer_momentum=0.9, block_size=BLOCK_SIZE
    )
    initial = [p.detach().clone() for p in model.parameters()]
    _step(model, optimizer, 0)
    _step(reference_model, torch.optim.SGD(reference_model.parameters(), lr=0.1), 0)
    for p0, server, view, plain in zip(
        initial, _server(optimizer), model.parameters(), reference_model.parameters(), strict=True
    ):
        delta = plain.detach() - p0
        torch.testing.assert_close(server, p0 + 0.7 * 1.9 * delta, atol=1e-6, rtol=0)
        torch.testing.assert_close(view.detach(), server, atol=1e-6, rtol=0)


def test_local_steps_push_every_h_steps_in_process() -> None:
    model = _model()
    optimizer = Ranger(model.parameters(), lr=0.1, local_steps=3, block_size=BLOCK_SIZE)
    initial = [p.detach().reshape(-1).clone() for p in model.parameters()]
    for t in range(1, 7):
        _step(model, optimizer, t)
        servers = [server.reshape(-1) for server in _server(optimizer)]
        moved = any(not torch.equal(server, p0) for server, p0 in zip(servers, initial, strict=True))
        assert moved == (t >= 3), f"step {t}"


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"outer": "sum", "outer_momentum": 0.9}, "--outer-momentum applies to the sgd outer rule"),
        ({"outer": "mean", "outer_lr": 0.5}, "--outer-lr applies to the sgd outer rule"),
        ({"local_steps": 0}, "--local-steps must be an int >= 1"),
        ({"outer": "rule", "local_steps": 4}, "--local-steps needs an inner rule"),
        ({"push_dtype": "int4"}, "--push-dtype must be one of"),
        ({"num_workers": 0}, "--num-workers must be an int >= 1"),
        ({"outer": "sgd", "outer_momentum": 1.0}, "--outer-momentum must be in [0, 1)"),
    ],
)
def test_combinations_that_make_no_sense_are_user_errors(settings: dict[str, object], needle: str) -> None:
    with pytest.raises(UserError, match=needle.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**settings)  # type: ignore[arg-type]
