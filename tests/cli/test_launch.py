"""``ranger-ps launch``: the user's own script on a cluster, with real shards and real worker processes.

The unit tests cover the launcher's environment contract (:class:`LaunchedProcess`) and its
settings; the end-to-end tests run the VGG example and a small test script (tests/launch_script.py)
under the real command and check what a user sees: output prefixed per rank, each rank on its
part of the data, a lost worker that does not end the run, restarts, ``--fail-fast``, Ctrl-C with
no orphans, and a fresh run that refuses earlier state without ``--resume``.
"""

from __future__ import annotations

import json
import pickle
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ranger_ps
from ranger_ps import Ranger
from ranger_ps.cli import build_parser
from ranger_ps.cli.environment import own_arguments
from ranger_ps.config.launch import LaunchedProcess, LaunchSettings
from ranger_ps.errors import UserError
from tests.conftest import ROOT, ServerFactory, one_line_error, pid_alive, ranger_ps_cmd

SCRIPT = str(ROOT / "tests" / "launch_script.py")


def _launch(*args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run(ranger_ps_cmd("launch", *args), capture_output=True, text=True, timeout=timeout)


def _lines(output: str, prefix: str) -> list[str]:
    return [line[len(prefix) :].strip() for line in output.splitlines() if line.startswith(prefix)]


# -- the environment contract ----------------------------------------------------------------------


def test_launched_process_reads_the_launchers_variables() -> None:
    place = LaunchedProcess(2, 4, 0, 2, ["h1:1", "h2:2"])
    assert LaunchedProcess.from_environ(place.environ()) == place
    assert LaunchedProcess.from_environ({"RANK": "1", "WORLD_SIZE": "3"}) == LaunchedProcess(1, 3, 1, 3, None)
    alone = LaunchedProcess.from_environ({})
    assert (alone.rank, alone.world_size, alone.servers, alone.launched) == (0, 1, None, False)
    assert LaunchedProcess.from_environ({"RANGER_PS_SERVERS": "a:1", "RANGER_PS_TOKEN": " t \n"}).token == "t"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RANK": "one"}, "RANK='one' is not a whole number"),
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK must be in [0, WORLD_SIZE=2), got 2"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE must be >= 1"),
        ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "1"}, "LOCAL_RANK must be in"),
        ({"RANGER_PS_SERVERS": "host-without-port"}, "RANGER_PS_SERVERS:"),
    ],
)
def test_malformed_launch_variables_are_named(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        LaunchedProcess.from_environ(environ)


def test_rank_and_world_size_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "RANGER_PS_SERVERS"):
        monkeypatch.delenv(name, raising=False)
    assert (ranger_ps.rank(), ranger_ps.world_size(), ranger_ps.local_rank()) == (0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert (ranger_ps.rank(), ranger_ps.world_size(), ranger_ps.local_rank()) == (3, 4, 3)
    assert ranger_ps.init().servers is None


def test_servers_env_without_a_launcher_trains_in_process_as_sgd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANGER_PS_SERVERS", raising=False)
    torch.manual_seed(0)
    ours, theirs = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    theirs.load_state_dict(ours.state_dict())
    optimizer = Ranger(ours.parameters(), lr=0.1, momentum=0.9, servers="env")
    reference = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    assert optimizer.config.servers is None
    x = torch.randn(16, 4)
    for _ in range(3):
        for model, opt in ((ours, optimizer), (theirs, reference)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_servers_env_with_a_malformed_variable_is_a_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANGER_PS_SERVERS", "nohost")
    with pytest.raises(ValueError, match="RANGER_PS_SERVERS"):
        Ranger(torch.nn.Linear(2, 2).parameters(), servers="env")


@pytest.mark.parametrize(
    ("argv", "own"),
    [
        (["launch", "--workers", "2", "t.py", "--config", "x.yaml"], ["launch", "--workers", "2"]),
        (["launch", "--config", "c.toml", "-m", "pkg.mod", "--config", "y"], ["launch", "--config", "c.toml", "-m"]),
        (["launch", "--workers=3", "--no-tee", "t.py", "--workers", "9"], ["launch", "--workers=3", "--no-tee"]),
        (["local", "--config", "a.toml"], ["local", "--config", "a.toml"]),
    ],
)
def test_the_arguments_of_a_launched_script_are_not_ranger_ps_flags(argv: list[str], own: list[str]) -> None:
    assert own_arguments(build_parser(), argv) == own


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resume": True}, "--resume needs --checkpoint-dir"),
        ({"servers": ["a:1"], "checkpoint_dir": Path("c")}, "--checkpoint-dir is for the shards"),
        ({"max_restarts": -1}, "--max-restarts must be >= 0"),
        ({"workers": 0}, "--workers must be >= 1"),
    ],
)
def test_launch_settings_refuse_what_cannot_work(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UserError, match=message):
        LaunchSettings(**kwargs)  # type: ignore[arg-type]


# -- real launches ---------------------------------------------------------------------------------


def _write_cifar(folder: Path, per_batch: int = 16, test: int = 20) -> Path:
    """CIFAR-10 python batches (the format is pickle; only the test writes them, the reader refuses code)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else per_batch
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        with (folder / name).open("wb") as file:
            pickle.dump(batch, file, protocol=2)
    return folder


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_the_vgg_example_with_batch_norm_trains_under_the_launcher_with_two_workers(tmp_path: Path) -> None:
    data = _write_cifar(tmp_path / "cifar")
    result = _launch(
        "--workers", "2", "--shards", "2", "--run-dir", str(tmp_path / "run"),
        "-m", "ranger_ps.examples.cifar_vgg", "--data", str(data),
        "--epochs", "2", "--width", "8", "--batch-size", "8", "--batch-norm",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    for rank in (0, 1):
        said = _lines(result.stdout, f"[worker-{rank}]")
        # 80 training images, each rank takes its half (DistributedSampler with the launcher's rank)
        assert f"rank {rank}/2 epoch 2: 40 examples" in " ".join(said), said
        assert any(line.startswith(f"rank {rank}/2: test accuracy") for line in said), said
    assert result.stdout.splitlines()[-1].startswith("2 of 2 workers finished")
    logs = tmp_path / "run"
    assert {"shard-0.log", "shard-1.log", "worker-0.log", "worker-1.log"} <= {p.name for p in logs.iterdir()}
    assert "test accuracy" in (logs / "worker-1.log").read_text()


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_failed_workers_are_restarted_and_a_lost_one_does_not_end_the_run(tmp_path: Path) -> None:
    script_config = tmp_path / "script.yaml"  # the script's --config: not ranger-ps's (it is no TOML)
    script_config.write_text("schedule: [warm, cosine")
    result = _launch(
        "--workers", "3", "--shards", "1", "--max-restarts", "1",
        SCRIPT, "--fail-once", "1", "--fail-rank", "2", "--markers", str(tmp_path), "--config", str(script_config),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "script config 'schedule: [warm, cosine'" in result.stdout
    assert "rank 0 done after 20 steps" in result.stdout
    restarted = _lines(result.stdout, "[worker-1]")
    assert sum(line.startswith("rank 1 of 3 local 1 servers") for line in restarted) == 2  # started twice, same rank
    assert "rank 1 done after 20 steps, pushes 20" in restarted
    lost = _lines(result.stdout, "[worker-2]")
    assert lost.count("rank 2 fails on purpose") == 2  # its one restart failed too: it is lost for good
    failed = [line for line in result.stderr.splitlines() if line.startswith("ranger-ps launch: failed:")]
    assert len(failed) == 1 and "1 of 3 workers failed: rank 2 (exit code 3); 2 finished" in failed[0], result.stderr


def _processes(run_dir: Path) -> dict[str, int]:
    return {name: int(pid) for name, pid in json.loads((run_dir / "processes.json").read_text()).items()}


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_fail_fast_stops_everything_at_the_first_failure(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _launch(
        "--workers", "2", "--shards", "1", "--fail-fast", "--run-dir", str(run_dir),
        SCRIPT, "--fail-rank", "1", "--hold", "120", "--grandchild", str(tmp_path / "helper"),
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    failed = [line for line in result.stderr.splitlines() if line.startswith("ranger-ps launch: failed:")]
    assert len(failed) == 1 and "worker-1 exited with code 3 (--fail-fast)" in failed[0], result.stderr
    assert "rank 0 done" not in result.stdout  # rank 0 was holding for two minutes: it was stopped
    for name, pid in _processes(run_dir).items():
        assert not pid_alive(pid), f"{name} (pid {pid}) outlived the launcher"
    for rank in (0, 1):  # the processes the script itself started went with it
        pid = int((tmp_path / f"helper.{rank}").read_text())
        assert not pid_alive(pid), f"the process rank {rank} started (pid {pid}) outlived the launcher"


@pytest.mark.e2e
@pytest.mark.timeout(150)
def test_ctrl_c_stops_every_process_and_exits_130(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        ranger_ps_cmd("launch", "--workers", "2", "--shards", "1", "--run-dir", str(run_dir), SCRIPT, "--hold", "120"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        training: set[str] = set()
        deadline = time.monotonic() + 120
        while len(training) < 2 and time.monotonic() < deadline:
            line = process.stdout.readline()
            assert line, "the launcher ended before its workers trained"
            if "trains on" in line:
                training.add(line.split("]")[0])
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err
    assert "ranger-ps launch: interrupted" in err
    for name, pid in _processes(run_dir).items():
        assert not pid_alive(pid), f"{name} (pid {pid}) outlived the launcher"


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_resume_without_checkpoints_and_a_missing_script_are_usage_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    line = one_line_error(_launch("--checkpoint-dir", str(empty), "--resume", SCRIPT))
    assert "--resume: --checkpoint-dir" in line and "holds no checkpoint" in line
    line = one_line_error(_launch(str(tmp_path / "missing.py")))
    assert "missing.py: no such script" in line


@pytest.mark.e2e
@pytest.mark.timeout(200)
def test_running_servers_with_trained_weights_are_refused_without_resume(
    tmp_path: Path, start_servers: ServerFactory
) -> None:
    servers = ",".join(start_servers(1))
    first = _launch("--workers", "1", "--servers", servers, SCRIPT, "--steps", "5")
    assert first.returncode == 0, first.stderr
    refused = one_line_error(_launch("--workers", "1", "--servers", servers, SCRIPT))
    assert "the servers already hold trained weights" in refused and "pass --resume" in refused


@pytest.mark.e2e
@pytest.mark.timeout(200)
def test_the_checkpoints_of_a_launch_are_resumed_only_when_asked(tmp_path: Path) -> None:
    checkpoints = tmp_path / "ckpt"
    first = _launch("--workers", "1", "--shards", "1", "--checkpoint-dir", str(checkpoints), SCRIPT, "--steps", "5")
    assert first.returncode == 0, first.stderr
    written = list(checkpoints.glob("shard-0-*.ckpt"))
    assert written, "the shard wrote no final checkpoint"
    refused = one_line_error(_launch("--checkpoint-dir", str(checkpoints), SCRIPT))
    assert f"already holds {len(written)} checkpoint files of an earlier run: pass --resume" in refused
    run_dir = tmp_path / "run"
    again = _launch(
        "--workers", "1", "--shards", "1", "--checkpoint-dir", str(checkpoints), "--resume", "--run-dir", str(run_dir),
        SCRIPT, "--steps", "5",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "restored" in (run_dir / "shard-0.log").read_text().lower()
