"""Exported weights keyed as the model names its parameters, and layouts that differ named in words.

``Ranger(model.parameters(), servers=...)`` has no names to give the shards, so a checkpoint holds
``0.0, 0.1, ...``: :func:`ranger_ps.storage.checkpoint.named_state_dict` and ``checkpoint export
--model`` map them onto the model's ``named_parameters()``, checking count, shapes and dtypes; a
plain export of positional keys warns how to get names. The checkpoints here are written by real
shards (stopped cleanly) after real training over gRPC on loopback.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from ranger_ps import Ranger
from ranger_ps.algorithm.layout import Layout, running_statistics
from ranger_ps.cli import build_parser
from ranger_ps.cli.flags import settings_from_args
from ranger_ps.config.server import ServerConfig
from ranger_ps.server.app import BackgroundShards
from ranger_ps.storage import checkpoint
from ranger_ps.storage.checkpoint import CheckpointError, ShardCheckpoint
from ranger_ps.workloads.models import build_model
from tests.conftest import ROOT, one_line_error, ranger_ps_cmd

DIGITS = ((64,), 10)  # the digits dataset's input shape and classes, which size the built-in mlp


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return build_model("mlp", *DIGITS)


def digits_mlp() -> nn.Module:
    """The built-in mlp as a bring-your-own model (``--model tests.storage.test_named_export:digits_mlp``)."""
    return build_model("mlp", *DIGITS)


def _positional(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"0.{i}": p.detach().clone() for i, p in enumerate(model.parameters())}


# --- named_state_dict (unit) ------------------------------------------------------------------------


def test_positional_weights_take_the_models_names_in_order() -> None:
    model = _mlp()
    weights = _positional(model)
    assert checkpoint.positional_names(weights)
    named = checkpoint.named_state_dict(weights, model)
    assert list(named) == [name for name, _ in model.named_parameters()] == ["1.weight", "1.bias", "3.weight", "3.bias"]
    fresh = build_model("mlp", *DIGITS)
    fresh.load_state_dict(named)  # strict: every parameter, no extra key
    for (_, p), q in zip(fresh.named_parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)


class _NormedAndMasked(nn.Module):
    """BatchNorm's statistics beside a constant buffer and a non-persistent one."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2))
        self.register_buffer("table", torch.arange(3.0))
        self.register_buffer("scratch", torch.zeros(2), persistent=False)


def test_statistics_a_cluster_kept_load_strictly_with_the_models_other_buffers() -> None:
    torch.manual_seed(0)
    model = _NormedAndMasked()
    model.net.forward(torch.randn(8, 4) + 2.0)  # type: ignore[no-untyped-call]  # statistics move from their start
    # what the shards hold after Ranger(model.parameters(), buffers=running_statistics(model)): the
    # parameters positionally, then the statistics by name
    tensors = [(f"0.{i}", p) for i, p in enumerate(model.parameters())] + running_statistics(model)
    weights = {name: t.detach().clone() for name, t in tensors}
    assert checkpoint.positional_names(weights)
    named = checkpoint.named_state_dict(weights, model)
    fresh = _NormedAndMasked()
    fresh.load_state_dict(named)  # strict: parameters, statistics, counters and the constant table
    stats = dict(model.named_buffers())
    assert torch.equal(dict(fresh.named_buffers())["net.1.running_mean"], stats["net.1.running_mean"])
    assert "scratch" not in named and "table" in named and "net.1.num_batches_tracked" in named
    as_tensors = {**{k: v for k, v in weights.items() if "running" not in k}}
    as_tensors.update({f"buffers.{i}": t.detach().clone() for i, (_, t) in enumerate(running_statistics(model))})
    assert list(checkpoint.named_state_dict(as_tensors, model)) == list(named)  # bare tensors: in order
    without = dict(list(weights.items())[:6])  # a run that did not keep the statistics: a strict load says so
    assert "net.1.running_mean" not in checkpoint.named_state_dict(without, model)
    with pytest.raises(ValueError, match="'0.6'.*no running statistic"):
        checkpoint.named_state_dict({**without, "0.6": torch.zeros(6)}, model)


def test_named_weights_must_carry_the_models_names() -> None:
    model = _mlp()
    weights = {name: p.detach() for name, p in model.named_parameters()}
    assert not checkpoint.positional_names(weights)
    assert list(checkpoint.named_state_dict(weights, model)) == list(weights)
    renamed = {("fc." + k if k == "3.bias" else k): v for k, v in weights.items()}
    with pytest.raises(ValueError, match=r"by name\): parameter 3: the checkpoint has 'fc.3.bias' \(10,\) float32, "):
        checkpoint.named_state_dict(renamed, model)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda w: {**w, "0.2": torch.zeros(10, 64)},
            r"parameter 2 '0.2'/'3.weight': the checkpoint has shape \(10, 64\) float32, the model has \(10, 128\) "
            r"float32",
        ),
        (
            lambda w: {**w, "0.1": torch.zeros(128, dtype=torch.float64)},
            r"parameter 1 '0.1'/'1.bias': the checkpoint has shape \(128,\) float64, the model has \(128,\) float32",
        ),
        (
            lambda w: {k: v for k, v in w.items() if k != "0.3"},
            r"parameter count: the checkpoint has 3, the model has 4 \(from parameter 3 '3.bias' \(10,\) float32 on, "
            r"only the model has them\)",
        ),
    ],
    ids=["shape", "dtype", "count"],
)
def test_weights_that_do_not_fit_name_the_first_differing_parameter(
    change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]], message: str
) -> None:
    weights = change(_positional(_mlp()))
    with pytest.raises(ValueError, match=r"the weights do not fit the model \(in order, by position\): " + message):
        checkpoint.named_state_dict(weights, _mlp())


def _saved(layout: Layout, shard_id: int) -> ShardCheckpoint:
    return ShardCheckpoint(shard_id, 2, layout, {}, "async", 0, {}, {}, 0.0, [])


def test_assembling_shards_of_two_models_names_the_difference() -> None:
    ours = Layout.from_named_tensors(_mlp().named_parameters())
    theirs = Layout.from_named_tensors(build_model("mlp", (32,), 10).named_parameters())
    with pytest.raises(
        CheckpointError,
        match=r"different models: parameter 0 '1.weight': shard 0's file has shape \(128, 64\) float32, "
        r"shard 1's has \(128, 32\) float32",
    ):
        checkpoint.assemble_weights([_saved(ours, 0), _saved(theirs, 1)])


# --- checkpoint export of what real shards wrote (e2e) -------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """Two shards with a checkpoint folder; one worker trains the mlp with ``Ranger(model.parameters())``;
    the shards stop cleanly (final checkpoints). The folder and the weights the worker ended with."""
    folder = tmp_path_factory.mktemp("export") / "checkpoints"
    model = _mlp()
    args = build_parser().parse_args(["server", "--port", "0", "--checkpoint-dir", str(folder)])
    base = settings_from_args(ServerConfig, args)
    generator = torch.Generator().manual_seed(1)
    with BackgroundShards() as shards:
        servers = [shards.start(dataclasses.replace(base, shard_id=i, num_shards=2)).address for i in range(2)]
        with Ranger(model.parameters(), lr=0.05, servers=servers, outer="rule") as optimizer:
            for _ in range(5):
                optimizer.zero_grad()
                x, y = torch.randn(16, 64, generator=generator), torch.randint(0, 10, (16,), generator=generator)
                nn.functional.cross_entropy(model(x), y).backward()  # type: ignore[no-untyped-call]
                optimizer.step()
            assert optimizer.layout.positional
    return folder, {name: p.detach().clone() for name, p in model.named_parameters()}


def _export(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ranger_ps_cmd("checkpoint", "export", *args), capture_output=True, text=True, timeout=120, cwd=ROOT
    )


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_export_of_positional_keys_warns_how_to_get_names(
    trained: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    folder, _ = trained
    out = tmp_path / "model.pt"
    result = _export(str(folder), "--out", str(out))
    assert result.returncode == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warning) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "keys 0.0, 0.1, ..." in warning[0] and "--model" in warning[0]
    assert "model.named_parameters()" in warning[0]
    weights = torch.load(out, weights_only=True)
    assert list(weights) == ["0.0", "0.1", "0.2", "0.3"]
    with pytest.raises(RuntimeError, match="Missing key"):  # what the warning is about
        _mlp().load_state_dict(weights)


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_export_with_model_writes_weights_the_model_loads(
    trained: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    folder, final = trained
    out = tmp_path / "model.pt"
    result = _export(str(folder), "--out", str(out), "--model", "mlp", "--dataset", "digits")
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr
    fresh = build_model("mlp", *DIGITS)
    fresh.load_state_dict(torch.load(out, weights_only=True))  # strict
    for name, p in fresh.named_parameters():
        assert torch.equal(p.detach(), final[name]), name  # the weights the worker ended with, exactly
    byo = tmp_path / "byo.pt"
    result = _export(str(folder), "--out", str(byo), "--model", "tests.storage.test_named_export:digits_mlp")
    assert result.returncode == 0, result.stderr
    assert list(torch.load(byo, weights_only=True)) == list(final)


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_export_with_another_model_is_one_line_naming_the_parameter(
    trained: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    folder, _ = trained
    out = tmp_path / "model.pt"
    line = one_line_error(_export(str(folder), "--out", str(out), "--model", "cnn"))
    assert "--model cnn: the weights do not fit the model (in order, by position): parameter 0 '0.0'/" in line
    assert "the checkpoint has shape (128, 64) float32, the model has" in line
    assert not out.exists()
    line = one_line_error(_export(str(folder), "--out", str(out), "--model", "nope"))
    assert "unknown model 'nope'" in line
