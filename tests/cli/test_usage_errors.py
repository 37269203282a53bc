"""Every usage error of the command line, run as a user runs it: a real ``python -m ranger_ps`` process.

A usage error found by ranger-ps is exactly one line on stderr, ``ranger-ps COMMAND: error: ...``,
and exit code 2: no effective-config line, no gRPC core log line, no traceback before it, nothing
on stdout, and no temporary run folder left behind. Errors argparse finds itself (an unknown flag,
a value its type refuses) keep argparse's form: one usage line, then the one error line.
Each case fails before any process or server starts, so the table stays cheap.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ranger_ps_cmd

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

SERVERS = "127.0.0.1:1"  # never contacted: every case fails first


def _run(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``ranger-ps ARGS`` with a private temporary folder (so leftovers are this run's alone)."""
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir(exist_ok=True)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RANGER_PS_")}
    environ.update(TMPDIR=str(private_tmp), **(env or {}))
    return subprocess.run(ranger_ps_cmd(*args), capture_output=True, text=True, timeout=50, env=environ)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port another socket listens on for the test's duration."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


def _one_line(result: subprocess.CompletedProcess[str], tmp_path: Path) -> str:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert list((tmp_path / "tmp").iterdir()) == []  # no temporary run folder left
    return lines[0]


ONE_LINE: list[tuple[tuple[str, ...], str]] = [
    (
        ("local", "--consistency", "ssp"),
        "ranger-ps local: error: --consistency must be async, ssp:K (K >= 0) or bsp, got 'ssp'",
    ),
    (("local", "--run-dir", "{file}"), "ranger-ps local: error: --run-dir {file} is not a folder"),
    (
        ("local", "--report", "/proc/x/r.json"),
        "ranger-ps local: error: the folder of --report /proc/x cannot be created",
    ),
    (
        ("local", "--report", "{file}/r.json"),
        "ranger-ps local: error: the folder of --report {file} is not a folder",
    ),
    (
        ("worker", "--servers", SERVERS, "--report", "/proc/x/r.json"),
        "ranger-ps worker: error: the folder of --report /proc/x cannot be created",
    ),
    (("local", "--epochs", "0"), "ranger-ps local: error: --epochs must be >= 1"),
    (("launch",), "ranger-ps launch: error: give the training script to run"),
    (("launch", "--resume", "x.py"), "ranger-ps launch: error: --resume needs --checkpoint-dir"),
    (("local", "--model", "nope"), "ranger-ps local: error: unknown model 'nope'"),
    (("local", "--dataset", "nope"), "ranger-ps local: error: unknown dataset 'nope'"),
    (("local", "--device", "cuda:7"), "ranger-ps local: error: --device cuda:7"),
    (("worker", "--servers", SERVERS, "--model", "nope"), "ranger-ps worker: error: unknown model 'nope'"),
    (("worker", "--servers", SERVERS, "--dataset", "nope"), "ranger-ps worker: error: unknown dataset 'nope'"),
    (("worker", "--servers", SERVERS, "--device", "cuda:7"), "ranger-ps worker: error: --device cuda:7"),
    (
        ("worker", "--servers", SERVERS, "--model", "tests.no_such_module:model"),
        "ranger-ps worker: error: --model 'tests.no_such_module:model': cannot import module",
    ),
    (
        ("server", "--shard-id", "2", "--num-shards", "2"),
        "ranger-ps server: error: --shard-id must be in [0, 1], got 2",
    ),
    (
        ("local", "--lr-schedule", "cosine:warmup=10,every=3"),
        "ranger-ps local: error: --lr-schedule 'cosine:warmup=10,every=3': cosine does not take 'every=3' "
        "(constant, cosine[:warmup=STEPS][,min=FACTOR] or step:every=EPOCHS[,gamma=G])",
    ),
    (
        ("worker", "--servers", SERVERS, "--lr-schedule", "linear"),
        "ranger-ps worker: error: --lr-schedule must be constant, cosine[:warmup=STEPS][,min=FACTOR] or "
        "step:every=EPOCHS[,gamma=G], got 'linear'",
    ),
    (
        ("local", "--lr-schedule", "step:every=2", "--outer", "rule"),
        "ranger-ps local: error: --lr-schedule 'step:every=2' needs an inner rule (--outer mean, sum or sgd)",
    ),
]
"""(arguments, the start of the one error line) of every usage error ranger-ps finds itself."""

ARGPARSE: list[tuple[tuple[str, ...], str]] = [
    (("local", "--worker", "3"), "ranger-ps local: error: unrecognized arguments: --worker 3"),  # no abbreviation
    (("bench", "wire", "--nope", "1"), "ranger-ps bench wire: error: unrecognized arguments: --nope 1"),
    (("status", "--servers", ""), "ranger-ps status: error: argument --servers: --servers needs at least one"),
    (("checkpoint", "export", "d"), "ranger-ps checkpoint export: error: the following arguments are required"),
    (("worker", "--servers", "no-port-here"), "error: argument --servers: server address 'no-port-here' is not"),
    (("worker", "--servers", "localhost:99999"), "error: argument --servers: "),
    (("worker", "--lr", "x"), "error: argument --lr: expected a number, got 'x'"),
    (("server", "--port", "x"), "ranger-ps server: error: argument --port: expected an integer, got 'x'"),
]
"""(arguments, what the error line holds) of usage errors argparse finds itself."""


Results = dict[tuple[str, ...], tuple[subprocess.CompletedProcess[str], Path]]


@pytest.fixture(scope="module")
def shared_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("files") / "a-file"
    path.write_text("")
    return path


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory, shared_file: Path) -> Results:
    """Every case of both tables run as its own process, four at a time (each process spends most of its
    second importing torch), with a private temporary folder each; keyed by the case's arguments."""
    cases = [args for args, _ in ONE_LINE + ARGPARSE]

    def run(args: tuple[str, ...]) -> tuple[subprocess.CompletedProcess[str], Path]:
        folder = tmp_path_factory.mktemp("case")
        return _run(folder, *(a.format(file=shared_file) for a in args)), folder

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(cases, pool.map(run, cases), strict=True))


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("args", "line"), ONE_LINE)
def test_a_usage_error_is_one_line_and_exit_code_2(
    args: tuple[str, ...], line: str, results: Results, shared_file: Path
) -> None:
    result, folder = results[args]
    assert _one_line(result, folder).startswith(line.format(file=shared_file))


def test_a_bad_environment_value_of_the_schedule_is_one_line(tmp_path: Path) -> None:
    result = _run(tmp_path, "local", env={"RANGER_PS_LR_SCHEDULE": "cosine:min=2"})
    assert _one_line(result, tmp_path) == (
        "ranger-ps local: error: --lr-schedule 'cosine:min=2': min must be in [0, 1] (a fraction of --lr)"
    )


def test_a_port_in_use_is_one_line_without_the_grpc_core_log(tmp_path: Path, taken_port: int) -> None:
    result = _run(tmp_path, "server", "--port", str(taken_port))
    assert (
        _one_line(result, tmp_path)
        == f"ranger-ps server: error: cannot listen on 127.0.0.1:{taken_port}: the port is in use"
    )


def test_an_address_not_of_this_machine_is_one_line(tmp_path: Path) -> None:
    result = _run(tmp_path, "server", "--host", "192.0.2.1", "--port", "0")  # TEST-NET-1: never local
    line = _one_line(result, tmp_path)
    assert line == "ranger-ps server: error: cannot listen on 192.0.2.1:0: the address is not one of this machine's"


def test_an_unknown_variable_is_a_warning_line_not_an_error(tmp_path: Path) -> None:
    """The misspelt variable is reported (and ignored); the run fails only on its real usage error."""
    result = _run(tmp_path, "local", "--epochs", "0", env={"RANGER_PS_PUSH_FRACTON": "0.1"})
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        "ranger-ps: warning: RANGER_PS_PUSH_FRACTON is not a setting of any command; it is ignored",
        "ranger-ps local: error: --epochs must be >= 1, got 0",
    ]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("args", "needle"), ARGPARSE)
def test_an_error_argparse_finds_is_its_usage_line_and_one_error_line(
    args: tuple[str, ...], needle: str, results: Results
) -> None:
    result, _ = results[args]
    assert result.returncode == 2 and result.stdout == ""
    usage, error = result.stderr.splitlines()  # exactly two lines: the usage, then the error
    assert usage.startswith("usage: ranger-ps")
    assert error.startswith("ranger-ps") and needle in error, error
