"""Smoke tests of ``ranger-ps bench wire | apply | train``: each runs with tiny sizes and reports sane values.

Benchmarks are not tests: nothing here asserts on speed. The subcommands are built the way the
command line builds them (:func:`ranger_ps.cli.bench.add_bench_parsers` on a ``bench`` subparser
action) and dispatched through ``args.run(args)``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ranger_ps.bench.baselines import helper_main
from ranger_ps.bench.cost_model import Costs, cost_model
from ranger_ps.bench.link import MIN_BURST_BYTES, link_ratios, seconds_to_accuracy, tbf_burst_bytes
from ranger_ps.bench.train import steady_rate
from ranger_ps.cli.bench import add_bench_parsers

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ranger-ps bench")
    bench = parser.add_subparsers(dest="bench", required=True)
    add_bench_parsers(bench)
    return parser


def _children(pid: int) -> list[int]:
    """Live (non-zombie) child processes of ``pid`` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    before = set(_children(os.getpid())) if sys.platform.startswith("linux") else set()
    args = _parser().parse_args([*argv, "--json", "--log-level", "WARNING"])
    assert args.run(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines  # one JSON object
    if sys.platform.startswith("linux"):
        assert set(_children(os.getpid())) <= before, "a benchmark left processes running"
    result: dict[str, Any] = json.loads(lines[0])
    return result


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _plot_args(tmp_path: Path, name: str) -> list[str]:
    return ["--plot", str(tmp_path / f"{name}.png")] if HAS_MATPLOTLIB else []


def _check_plot(tmp_path: Path, name: str) -> None:
    if HAS_MATPLOTLIB:
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parsers_add_the_three_benchmarks_with_json_and_run() -> None:
    parser = _parser()
    for name in ("wire", "apply", "train"):
        args = parser.parse_args([name, "--json"])
        assert args.json is True
        assert callable(args.run)
    args = parser.parse_args(["train", "--fractions", "1,0.05"])
    assert args.fractions == (1.0, 0.05)
    for bad in (["train", "--fractions", "0"], ["wire", "--model-mb", "-1"], ["apply", "--rules", "adam"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_steady_rate_uses_the_middle_of_the_run() -> None:
    samples = [(0.0, 0), (1.0, 0), (2.0, 10), (3.0, 50), (4.0, 90), (5.0, 100)]
    assert steady_rate(samples, 100) == pytest.approx(80 / 2)
    assert steady_rate([(0.0, 0), (1.0, 100)], 100) is None  # nothing in between: too short to time


def test_unknown_helper_role_is_refused() -> None:
    with pytest.raises(SystemExit):
        helper_main(["no-such-role"])


def test_cost_model_finds_the_bottleneck() -> None:
    """The bottleneck model on made-up costs: shards help until the workers' own work dominates."""
    costs = Costs(
        worker_push=1e-9,
        worker_pull=1e-9,
        worker_message=1e-4,
        shard_push=2e-9,
        shard_pull=1e-9,
        shard_message=5e-4,
        latency=2e-3,
        nic_gbps=1.25,
    )
    rows = cost_model(costs, model_bytes=100e6, compute_seconds=0.1, push_fraction=1.0, workers=(1, 8), shards=(1, 8))
    by = {(r["workers"], r["shards"]): r for r in rows}
    assert by[(8, 8)]["steps_per_second"] > by[(8, 1)]["steps_per_second"]
    assert by[(8, 1)]["bottleneck"] == "shard CPU"
    assert by[(1, 8)]["bottleneck"].startswith("worker")
    assert all(_positive(r["steps_per_second"]) for r in rows)
    # A sparse push moves less, so it is never slower.
    sparse = cost_model(
        costs, model_bytes=100e6, compute_seconds=0.1, push_fraction=0.05, workers=(1, 8), shards=(1, 8)
    )
    for a, b in zip(rows, sparse, strict=True):
        assert b["steps_per_second"] >= a["steps_per_second"]


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_wire_smoke(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    result = _run(
        capsys, "wire", "--model-mb", "1", "--repeat", "1", "--shards", "1", "--tensors", "3",
        *_plot_args(tmp_path, "wire"),
    )  # fmt: skip
    for key in ("pull_gbps", "push_gbps", "tcp_gbps", "tcp_send_gbps", "grpc_pull_gbps", "pull_apply_gbps"):
        assert _positive(result[key]), (key, result[key])
    for prefix in ("exchange", "shm"):  # the exchange path, over gRPC frames and over shared memory
        for what in ("pull", "pull_apply", "push"):
            assert _positive(result[f"{prefix}_{what}_gbps"]), (prefix, what, result)
    for prefix in ("torch_rpc", "torch_rpc_same_host"):
        for key in (f"{prefix}_pull_gbps", f"{prefix}_push_gbps"):
            # null where torch.distributed.rpc cannot run here, with the reason
            assert _positive(result[key]) or (result[key] is None and result[f"{prefix}_error"]), result
    assert result["model_bytes"] == 1_000_000
    assert result["pull_wire_bytes"] >= result["model_bytes"]
    assert _positive(result["empty_push_ms"]) and _positive(result["empty_pull_ms"])
    assert set(result["ratios"]) >= {"pull_vs_torch_rpc", "push_vs_torch_rpc", "pull_vs_tcp"}
    assert set(result["targets"]) == {
        "pull_vs_torch_rpc", "push_vs_torch_rpc", "pull_vs_tcp", "shm_pull_vs_torch_rpc_same_host",
        "shm_push_vs_torch_rpc_same_host", "exchange_pull_vs_torch_rpc", "exchange_push_vs_torch_rpc",
    }  # fmt: skip
    assert result["settings"]["shards"] == 1
    _check_plot(tmp_path, "wire")


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_apply_smoke(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    result = _run(
        capsys, "apply", "--model-mb", "1", "--repeat", "1", "--warmup", "1", "--block-size", "4096",
        *_plot_args(tmp_path, "apply"),
    )  # fmt: skip
    assert _positive(result["memcpy_gbps"]) and _positive(result["memcpy_blocks_gbps"])
    assert set(result["rules"]) == {"sgd", "adamw", "ranger", "sgd_no_momentum"}
    for row in result["rules"].values():
        assert _positive(row["gbps"])
    assert _positive(result["server_push_path"]["gbps"]), result["server_push_path"]
    assert _positive(result["ratios"]["sgd_vs_memcpy"])
    assert result["settings"]["num_blocks"] == math.ceil(250_000 / 4096)
    _check_plot(tmp_path, "apply")


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_train_smoke(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    result = _run(capsys, "train", "--epochs", "1", "--fractions", "1,0.05", *_plot_args(tmp_path, "train"))
    kinds = [row["kind"] for row in result["rows"]]
    assert kinds == ["ranger-ps", "ranger-ps", "ranger-ps-1x1", "torch-sgd", "ranger-in-process", "ddp"]
    for row in result["rows"]:
        if row["kind"] == "ddp" and "error" in row:
            continue  # torch.distributed unavailable here: reported, not fatal
        assert row["steps"] > 0 and _positive(row["steps_per_second"]), row
        assert 0.0 <= row["test_accuracy"] <= 1.0
    dense, sparse = result["rows"][:2]
    assert dense["push_ratio"] == pytest.approx(1.0)
    assert 0 < sparse["bytes_pushed_per_step"] < dense["bytes_pushed_per_step"]
    # Bytes are exact (not timings): the 6% target at push fraction 0.05 holds.
    assert result["ratios"]["push_bytes_ratio_at_0.05"] == sparse["push_ratio"] <= 0.06
    assert result["settings"]["block_size"] == 256
    _check_plot(tmp_path, "train")


# -- bench link ----------------------------------------------------------------------------------------


def test_link_helpers_time_the_first_crossing_and_compare_with_ddp() -> None:
    assert tbf_burst_bytes(100_000_000) == MIN_BURST_BYTES  # 2 ms of 100mbit is smaller than the floor
    assert tbf_burst_bytes(10_000_000_000) == 2_500_000
    timeline = [(2.0, 0.5), (4.0, 0.82), (6.0, 0.79), (8.0, 0.9)]
    assert seconds_to_accuracy(timeline, 0.8) == (2, 4.0)
    assert seconds_to_accuracy(timeline, 0.95) is None
    rows: list[dict[str, Any]] = [
        {"kind": "ranger-ps", "push_fraction": 1.0, "seconds_to_target": 30.0},
        {"kind": "ranger-ps", "push_fraction": 0.01, "seconds_to_target": 4.0},
        {"kind": "ddp", "push_fraction": None, "seconds_to_target": 16.0},
    ]
    ratios = link_ratios([{"rate": "100mbit", "rows": rows}], (1.0, 0.01))
    assert ratios == {"time_to_accuracy_100mbit_dense_vs_ddp": 16 / 30, "time_to_accuracy_100mbit_sparse_vs_ddp": 4.0}
    rows[1]["seconds_to_target"] = None  # never reached: no ratio
    assert (
        link_ratios([{"rate": "100mbit", "rows": rows}], (1.0, 0.01))["time_to_accuracy_100mbit_sparse_vs_ddp"] is None
    )
    parser = _parser()
    assert parser.parse_args(["link", "--rates", "2mbit,1gbit"]).rates == ("2mbit", "1gbit")
    for bad in (["link", "--rates", "fast"], ["link", "--rates", ""], ["link", "--target-accuracy", "1.5"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def _namespaces() -> set[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


@pytest.mark.e2e
@pytest.mark.timeout(300)
@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None, reason="needs root, ip and tc"
)
def test_link_smoke_every_byte_crosses_the_shaped_link_and_the_namespace_goes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = _namespaces()
    rate = 4_000_000  # 4mbit: slow enough that a run which bypassed the link would finish far sooner
    result = _run(
        capsys, "link", "--rates", "4mbit", "--fractions", "1,0.5", "--epochs", "1", "--dataset", "digits",
        "--block-size", "256", "--target-accuracy", "0.1", "--timeout", "200",
    )  # fmt: skip
    assert _namespaces() == before, "bench link left a network namespace behind"
    (link,) = result["links"]
    assert (link["rate"], link["bits_per_second"], link["mtu"]) == ("4mbit", rate, 1500)
    rows = {r["name"]: r for r in link["rows"]}
    assert len(rows) == 3, rows
    for row in rows.values():
        assert "error" not in row, row
        assert row["steps"] > 0 and 0.0 <= row["best_accuracy"] <= 1.0
        assert row["epochs_to_target"] == 1  # 0.1 is reached at the first evaluation
        # Physics, not speed: the bytes went through a 4 Mbit/s bucket (all but its first burst),
        # so the run cannot have been faster than that (it was, when workers used shared memory).
        # Every byte crosses loopback once: a worker's pushes and its shard's answers; what one rank
        # sends is what the other receives.
        per_step = row["bytes_sent_per_step"] if row["kind"] == "ddp" else row["bytes_per_step"]
        crossing = row["steps"] * per_step - link["burst_bytes"]
        assert row["total_seconds"] >= crossing * 8 / rate, row
    dense, sparse = (r for r in link["rows"] if r["kind"] != "ddp")
    assert (dense["push_fraction"], sparse["push_fraction"]) == (1.0, 0.5)
    assert sparse["bytes_sent_per_step"] < dense["bytes_sent_per_step"]
    assert set(result["ratios"]) == {"time_to_accuracy_4mbit_dense_vs_ddp", "time_to_accuracy_4mbit_sparse_vs_ddp"}
