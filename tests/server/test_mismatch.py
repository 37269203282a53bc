"""A worker whose model differs from the one the shards hold is refused naming the first difference.

Real shards over gRPC on loopback; the worker is ``Ranger(..., servers=...)`` as a user writes it,
and what is checked is the exception that user sees.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from ranger_ps import Ranger
from ranger_ps.errors import LayoutMismatchError
from tests.conftest import ServerFactory

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _model(hidden: int = 16, *, head: bool = True, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, hidden), nn.ReLU()]
    if head:
        layers.append(nn.Linear(hidden, 3))
    return nn.Sequential(*layers).to(dtype)


def _first_worker(servers: list[str], **settings: object) -> None:
    with Ranger(_model().named_parameters(), lr=0.1, servers=servers, **settings):  # type: ignore[arg-type]
        pass


@pytest.mark.parametrize(
    ("second", "message"),
    [
        (
            lambda s: Ranger(_model(hidden=12).named_parameters(), lr=0.1, servers=s),
            "parameter 0 '0.weight': the shard holds shape (16, 8) float32, this worker has (12, 8) float32",
        ),
        (
            lambda s: Ranger(_model(dtype=torch.float64).named_parameters(), lr=0.1, servers=s),
            "parameter 0 '0.weight': the shard holds shape (16, 8) float32, this worker has (16, 8) float64",
        ),
        (
            lambda s: Ranger(_model(head=False).named_parameters(), lr=0.1, servers=s),
            "parameter count: the shard holds 4, this worker has 2 (from parameter 2 '2.weight' (3, 16) float32 on, "
            "only the shard holds them)",
        ),
        (
            lambda s: Ranger(_model().parameters(), lr=0.1, servers=s),
            "parameter 0: the shard holds '0.weight' (16, 8) float32, this worker has '0.0' (16, 8) float32 (the "
            "same shapes and dtypes: one side gave the optimizer model.named_parameters(), the other "
            "model.parameters()",
        ),
        (
            lambda s: Ranger(_model().named_parameters(), lr=0.1, servers=s, block_size=32),
            "block size: the shard holds 65536, this worker has 32",
        ),
    ],
    ids=["shape", "dtype", "count", "unnamed", "block-size"],
)
def test_a_worker_with_another_model_is_told_the_first_difference(
    start_servers: ServerFactory, second: Callable[[list[str]], Ranger], message: str
) -> None:
    servers = start_servers(2)
    _first_worker(servers)
    with pytest.raises(LayoutMismatchError) as refused:
        second(servers)
    text = str(refused.value)
    assert "refused registration: layout mismatch on shard 0: " + message in text, text
    assert "\n" not in text and len(text) < 500, text


def test_the_cluster_keeps_training_the_first_model_after_a_refusal(start_servers: ServerFactory) -> None:
    servers = start_servers(1)
    _first_worker(servers)
    with pytest.raises(LayoutMismatchError):
        Ranger(_model(hidden=12).named_parameters(), lr=0.1, servers=servers)
    model = _model()
    with Ranger(model.named_parameters(), lr=0.1, servers=servers) as optimizer:
        model(torch.ones(2, 8)).sum().backward()
        optimizer.step()
        assert optimizer.stats()[0].pushes_applied >= 1
