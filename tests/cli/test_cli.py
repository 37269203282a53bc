"""The ``ranger-ps`` command line as a user runs it: real subprocesses, real reports, real signals."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from ranger_ps.cli import apply_environment, build_parser, env_var, train_config_from_args
from ranger_ps.config.train import TrainConfig
from ranger_ps.observability.report import REQUIRED_KEYS
from ranger_ps.settings import specs, to_argv
from tests.conftest import ServerFactory, one_line_error, pid_alive, ranger_ps_cmd, stop_process, wait_for_file

pytestmark = pytest.mark.e2e


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ranger_ps_cmd(*args), capture_output=True, text=True, timeout=timeout)


def test_train_flags_round_trip() -> None:
    config = TrainConfig(epochs=3, lr=0.125, overlap=False, block_size=1000, num_workers=3, connect_timeout=2.5)
    args = build_parser().parse_args(["worker", "--servers", "h:1", *to_argv(config)])
    assert train_config_from_args(args) == config


@pytest.mark.timeout(180)
def test_local_trains_digits_and_writes_the_report(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = _run("local", "--report", str(report_path), timeout=170)
    assert result.returncode == 0, result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert "test accuracy" in summary and "steps" in summary and "pushed" in summary
    report = json.loads(report_path.read_text())
    assert set(REQUIRED_KEYS) <= set(report)
    assert report["test_accuracy"] >= 0.95
    assert 0 <= report["test_loss"] < 0.5
    assert report["workers"] == 2 and report["shards"] == 2
    assert report["steps"] == sum(w["steps"] for w in report["per_worker"]) > 0
    assert report["bytes_pushed"] == report["bytes_pushed_dense"] > 0  # every block, every step
    assert report["bytes_pulled"] > 0
    assert report["config"]["model"] == "mlp" and report["config"]["dataset"] == "digits"


@pytest.mark.timeout(60)
def test_worker_fails_clearly_when_no_server_comes_up() -> None:
    result = _run("worker", "--servers", "127.0.0.1:9", "--connect-timeout", "1.5")
    line = one_line_error(result)
    assert "could not reach parameter server 127.0.0.1:9" in line
    assert "retrying" in result.stderr  # the bounded retry is logged


@pytest.mark.timeout(120)
def test_worker_against_running_servers_and_status(start_servers: ServerFactory, tmp_path: Path) -> None:
    servers = ",".join(start_servers(2))
    health = _run("health", "--server", servers.split(",")[1])
    assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr
    down = _run("health", "--server", "127.0.0.1:9", "--timeout", "1")
    assert down.returncode == 1 and "UNAVAILABLE" in down.stdout
    status = _run("status", "--servers", servers)
    assert status.returncode == 0, status.stderr
    assert "waiting for a worker" in status.stdout
    report_path = tmp_path / "worker.json"
    result = _run("worker", "--servers", servers, "--epochs", "2", "--report", str(report_path))
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert set(REQUIRED_KEYS) <= set(report)
    assert report["worker_id"] == 0 and report["shards"] == 2 and report["steps"] > 0
    status = _run("status", "--servers", servers, "--json")
    assert status.returncode == 0, status.stderr
    shards = json.loads(status.stdout)
    assert [s["shard_id"] for s in shards] == [0, 1]
    assert all(s["initialized"] and s["pushes_applied"] == report["steps"] for s in shards)
    mismatch = _run("worker", "--servers", servers, "--block-size", "100", "--connect-timeout", "5")
    assert "layout mismatch" in one_line_error(mismatch)


def _start_local(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], dict[str, int]]:
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        ranger_ps_cmd("local", "--run-dir", str(run_dir), "--epochs", "200", *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    # processes.json is rewritten as each child starts; wait until the workers are in it
    deadline = time.monotonic() + 90
    while True:
        wait_for_file(run_dir / "processes.json", process, timeout=90)
        table: dict[str, int] = json.loads((run_dir / "processes.json").read_text())
        if "worker-1" in table and (run_dir / "worker-1.log").stat().st_size > 0:
            return process, table
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.1)


@pytest.mark.timeout(150)
def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    process, table = _start_local(tmp_path)
    try:
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=60)
    finally:
        stop_process(process)
    assert process.returncode == 130, out
    assert b"interrupted" in out
    assert not [name for name, pid in table.items() if pid_alive(pid)]


@pytest.mark.timeout(150)
def test_a_failing_worker_stops_the_cluster_with_a_clear_message(tmp_path: Path) -> None:
    process, table = _start_local(tmp_path)
    try:
        import os

        os.kill(table["worker-1"], signal.SIGKILL)
        out, _ = process.communicate(timeout=60)
    finally:
        stop_process(process)
    assert process.returncode == 1, out
    assert b"worker-1 exited with code -9" in out
    assert not [name for name, pid in table.items() if pid_alive(pid)]


@pytest.mark.timeout(240)
def test_two_workers_pushing_one_percent_of_the_blocks_train_digits_well(tmp_path: Path) -> None:
    """The headline promise, as behaviour: at push fraction 0.01 two workers reach a dense-like accuracy
    with the defaults (inner rule on the workers, the shards average), pushing a few percent of the bytes."""
    report_path = tmp_path / "report.json"
    result = _run(
        "local", "--workers", "2", "--push-fraction", "0.01", "--block-size", "64", "--report", str(report_path),
        "--log-level", "WARNING", timeout=230,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report["config"]["outer"] == "mean" and report["config"]["num_workers"] == 2
    assert report["test_accuracy"] >= 0.93, report["test_accuracy"]
    assert 0 < report["bytes_flushed"] < report["bytes_pushed"] < 0.05 * report["bytes_pushed_dense"]


@pytest.mark.timeout(180)
def test_local_with_an_lr_schedule_finishes_and_reports_it(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = _run(
        "local", "--workers", "1", "--shards", "1", "--epochs", "2", "--lr-schedule", "cosine:warmup=5,min=0.1",
        "--report", str(report_path), "--log-level", "WARNING", timeout=170,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report["config"]["lr_schedule"] == "cosine:warmup=5,min=0.1"
    assert report["steps"] > 5 and report["test_accuracy"] >= 0.8, report["test_accuracy"]


@pytest.mark.timeout(180)
def test_local_with_sparse_pushes_records_every_knob(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = _run(
        "local", "--rule", "ranger", "--push-fraction", "0.5", "--block-size", "1024", "--epochs", "2",
        "--no-error-feedback", "--truncate-below", "1e-7", "--clip-norm", "10", "--subsample", "0.75",
        "--report", str(report_path), "--log-level", "WARNING", timeout=170,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    config = report["config"]
    expected = {
        "rule": "ranger", "push_fraction": 0.5, "block_size": 1024, "error_feedback": False, "truncate_below": 1e-7,
        "clip_norm": 10.0, "subsample": 0.75, "use_gc": True, "betas": [0.95, 0.999], "eps": 1e-5, "lr": 0.02,
        "outer": "mean", "num_workers": 2, "local_steps": 1, "push_dtype": None,
    }  # fmt: skip
    assert {k: config[k] for k in expected} == expected
    knobs = ("warmup_steps", "warmup_start", "truncation_residual", "clip_value", "alpha", "k", "n_sma_threshold")
    for knob in (*knobs, "outer_lr", "outer_momentum"):
        assert knob in config
    assert 0.45 < report["bytes_pushed"] / report["bytes_pushed_dense"] < 0.65


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("flags", "transport"),
    [((), "shared-memory"), (("--no-shared-memory",), "exchange"), (("--no-exchange",), "push-pull")],
)
def test_local_workers_and_evaluator_talk_to_the_shards_as_the_flags_say(
    flags: tuple[str, ...], transport: str, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    result = _run("local", "--epochs", "1", "--log-level", "INFO", "--run-dir", str(run), *flags, timeout=110)
    assert result.returncode == 0, result.stderr
    said = [line for line in (result.stderr + "".join(p.read_text() for p in run.glob("*.log"))).splitlines()]
    lines = sorted(line.split(" ranger_ps.client.sharded: ")[1] for line in said if "traffic per shard" in line)
    assert lines == [f"worker {w} registered; traffic per shard: {transport}, {transport}" for w in (-2, 0, 1)], (
        lines
    )  # the evaluator (an observer, id -2) and both workers


@pytest.mark.timeout(120)
def test_bench_convergence_smoke() -> None:
    result = _run(
        "bench", "convergence", "--datasets", "digits", "--rules", "sgd,ranger", "--fractions", "1,0.5",
        "--push-dtype", "native,int8", "--seeds", "0", "--epochs", "1", "--json", "--log-level", "WARNING",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["rule"], r["push_dtype"], r["push_fraction"], r["workers"]) for r in rows] == [
        ("sgd", "native", 1.0, 1), ("sgd", "native", 0.5, 1), ("sgd", "int8", 1.0, 1), ("sgd", "int8", 0.5, 1),
        ("ranger", "native", 1.0, 1), ("ranger", "native", 0.5, 1), ("ranger", "int8", 1.0, 1),
        ("ranger", "int8", 0.5, 1),
    ]  # fmt: skip
    for row in rows:
        assert 0 <= row["test_accuracy"] <= 1 and row["steps"] > 0
        assert (row["dense_at_equal_bytes"] is None) == (row["push_fraction"] == 1.0)
    # One worker: the view is the dense trajectory, whatever is pushed and however it is rounded.
    assert len({row["test_accuracy"] for row in rows if row["rule"] == "sgd"}) == 1
    assert rows[1]["bytes_pushed"] < 0.7 * rows[0]["bytes_pushed"]
    assert rows[2]["bytes_pushed"] < 0.4 * rows[0]["bytes_pushed"]  # int8: a quarter of float32, plus headers
    assert "unknown dataset 'nope'" in one_line_error(_run("bench", "convergence", "--datasets", "nope"))


def _parse_with_env(argv: list[str], environ: dict[str, str]) -> Any:
    parser = build_parser()
    apply_environment(parser, environ, argv)
    return parser.parse_args(argv)


def test_every_flag_can_come_from_the_environment_and_argv_wins() -> None:
    env = {
        "RANGER_PS_SERVERS": "ps-0:50051,ps-1:50051",
        "RANGER_PS_PUSH_FRACTION": "0.05",
        "RANGER_PS_ERROR_FEEDBACK": "off",
        "RANGER_PS_BETAS": "0.9,0.99",
        "RANGER_PS_WORKER_ID": "3",
        "RANGER_PS_LOG_LEVEL": "WARNING",
        "RANGER_PS_LR": "0.5",
    }
    args = _parse_with_env(["worker", "--lr", "0.25"], env)
    assert args.servers == ["ps-0:50051", "ps-1:50051"]
    assert (args.push_fraction, args.error_feedback, args.betas, args.worker_id) == (0.05, False, (0.9, 0.99), 3)
    assert args.log_level == "WARNING" and args.lr == 0.25
    server = _parse_with_env(
        ["server"], {"RANGER_PS_HOST": "0.0.0.0", "RANGER_PS_SHARD_ID": "1", "RANGER_PS_UVLOOP": "0"}
    )
    assert (server.host, server.shard_id, server.uvloop) == ("0.0.0.0", 1, False)
    # every training flag has its variable
    for spec in specs(TrainConfig):
        assert env_var(spec.flag) == spec.env_var == "RANGER_PS_" + spec.key.upper()


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"RANGER_PS_EPOCHS": "abc"}, "RANGER_PS_EPOCHS='abc'"),
        ({"RANGER_PS_OVERLAP": "maybe"}, "RANGER_PS_OVERLAP='maybe'"),
        ({"RANGER_PS_LOG_LEVEL": "LOUD"}, "RANGER_PS_LOG_LEVEL='LOUD'"),
    ],
)
def test_a_bad_environment_value_is_a_usage_error_naming_the_variable(
    env: dict[str, str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        _parse_with_env(["local"], env)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.timeout(60)
@pytest.mark.parametrize("argv", [["--version"], ["health", "--server", "127.0.0.1:1", "--timeout", "1"]])
def test_version_and_health_import_no_torch(argv: list[str]) -> None:
    """A container health check runs every few seconds: it must not pay torch's import (about 1 s, 250 MB)."""
    command = [*ranger_ps_cmd(*argv)]
    command.insert(1, "-X")
    command.insert(2, "importtime")  # python -X importtime -m ranger_ps ...: every import, on stderr
    result = subprocess.run(command, capture_output=True, text=True, timeout=50)
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time")
    }
    assert "ranger_ps.cli" in imported  # the listing is real
    assert "torch" not in imported, sorted(m for m in imported if m.startswith("torch"))[:5]
    if argv == ["--version"]:
        assert result.returncode == 0 and result.stdout.startswith("ranger-ps ")
    else:
        assert result.returncode == 1 and "127.0.0.1:1: UNAVAILABLE" in result.stdout
