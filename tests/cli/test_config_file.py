"""``--config FILE.toml``: flags from a file, under the environment and the command line.

Most checks parse only, in this process, the way :func:`ranger_ps.cli.main` does (the file, then
``RANGER_PS_*`` variables, then the command line); one real ``ranger-ps local`` run shows the file's
values reach the cluster, the report and the logged effective config.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

from ranger_ps.cli import apply_config_file, apply_environment, build_parser, train_config_from_args
from tests.conftest import ROOT, ranger_ps_cmd


def _parse(argv: list[str], environ: Mapping[str, str] | None = None) -> tuple[argparse.Namespace, Path | None]:
    """Parse ``argv`` as ``ranger-ps`` does: config file, then environment, then command line.

    Returns the parsed flags and the config file read (if any).
    """
    env = dict(environ or {})
    parser = build_parser()
    config_file = apply_config_file(parser, argv, env)
    apply_environment(parser, env, argv)
    return parser.parse_args(argv), config_file


def _toml(tmp_path: Path, text: str, name: str = "run.toml") -> Path:
    """Write ``text`` to ``tmp_path/name`` and return the path."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _run_local(argv: list[str], environ: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``ranger-ps local ARGV`` from the repository root with ``environ`` added to a clean environment.

    ``RANGER_PS_*`` variables of this process are dropped so that only the test's settings apply.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANGER_PS_")}
    env |= {"OMP_NUM_THREADS": "1", **(environ or {})}
    return subprocess.run(ranger_ps_cmd("local", *argv), cwd=ROOT, env=env, capture_output=True, text=True, timeout=170)


def _usage_error(capsys: pytest.CaptureFixture[str], argv: list[str], environ: Mapping[str, str] | None = None) -> str:
    """Parse ``argv`` expecting a usage error; returns its message (stderr) after checking exit code 2."""
    with pytest.raises(SystemExit) as info:
        _parse(argv, environ)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_a_config_file_sets_flags_spelled_with_dashes_or_underscores(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
        push-fraction = 0.25
        batch_size = 64
        model = "cnn"
        lr = 1                   # an integer where a float is expected
        error_feedback = false
        nesterov = true
        betas = [0.8, 0.99]
        log-level = "WARNING"
        uvloop = false
        workers = 3
        consistency = "ssp:2"
        """,
    )
    args, config_file = _parse(["local", "--config", str(path)])
    assert config_file == path and args.config == path
    assert (args.push_fraction, args.batch_size, args.model, args.lr) == (0.25, 64, "cnn", 1.0)
    assert isinstance(args.lr, float) and isinstance(args.batch_size, int)
    assert args.error_feedback is False and args.nesterov is True and args.uvloop is False
    assert args.betas == (0.8, 0.99)
    assert (args.log_level, args.workers, args.consistency) == ("WARNING", 3, "ssp:2")
    assert args.epochs == 10 and args.dataset == "digits"  # not in the file: the defaults
    config = train_config_from_args(args, num_workers=args.workers)
    assert (config.betas, config.push_fraction, config.error_feedback) == ((0.8, 0.99), 0.25, False)


def test_the_environment_beats_the_file_and_the_command_line_beats_both(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
        lr = 0.1
        epochs = 3
        error-feedback = false
        push_fraction = 0.5
        betas = [0.8, 0.99]
        dataset = "synthetic"
        """,
    )
    environ = {
        "RANGER_PS_LR": "0.2",
        "RANGER_PS_EPOCHS": "4",
        "RANGER_PS_ERROR_FEEDBACK": "yes",
        "RANGER_PS_BETAS": "0.7,0.9",
    }
    argv = ["worker", "--servers", "h:1", "--config", str(path), "--lr", "0.3", "--no-error-feedback"]
    args, _ = _parse(argv, environ)
    assert args.lr == 0.3 and args.error_feedback is False  # command line
    assert args.epochs == 4 and args.betas == (0.7, 0.9)  # environment
    assert args.push_fraction == 0.5 and args.dataset == "synthetic"  # file
    args, _ = _parse(["worker", "--servers", "h:1", "--config", str(path)], environ)
    assert args.error_feedback is True and args.lr == 0.2  # the environment over the file's false and 0.1


def test_config_equals_form_and_the_config_environment_variable(tmp_path: Path) -> None:
    first = _toml(tmp_path, 'servers = ["ps-0:1", "ps-1:2"]\nepochs = 2\n', "first.toml")
    second = _toml(tmp_path, 'servers = "ps-9:9"\nepochs = 7\n', "second.toml")
    # The file can supply a required flag (--servers), in the --config=FILE form too.
    args, config_file = _parse(["worker", f"--config={first}"])
    assert config_file == first and args.servers == ["ps-0:1", "ps-1:2"] and args.epochs == 2
    # RANGER_PS_CONFIG names a file when the command line does not ...
    args, config_file = _parse(["worker"], {"RANGER_PS_CONFIG": str(second)})
    assert config_file == second and args.servers == ["ps-9:9"] and args.epochs == 7
    # ... and the command line's --config wins over it.
    args, config_file = _parse(["worker", "--config", str(first)], {"RANGER_PS_CONFIG": str(second)})
    assert config_file == first and args.epochs == 2
    # No file at all: nothing read, defaults untouched.
    args, config_file = _parse(["worker", "--servers", "h:1"], {"RANGER_PS_CONFIG": "  "})
    assert config_file is None and args.config is None and args.epochs == 10


def test_booleans_and_store_true_flags(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'servers = "h:1"\njson = true\ntimeout = 2\nuvloop = false\n')
    args, _ = _parse(["status", "--config", str(path)])
    assert args.json is True and args.timeout == 2.0 and args.uvloop is False
    path = _toml(tmp_path, "overlap = false\nuse-gc = true\ntruncation_residual = true\n", "train.toml")
    args, _ = _parse(["local", "--config", str(path)])
    assert (args.overlap, args.use_gc, args.truncation_residual) == (False, True, True)
    args, _ = _parse(["local", "--config", str(path), "--overlap", "--no-use-gc"])
    assert (args.overlap, args.use_gc) == (True, False)


def test_the_lr_schedule_from_a_file_and_the_environment(tmp_path: Path) -> None:
    path = _toml(tmp_path, 'lr-schedule = "cosine:warmup=5,min=0.1"\n')
    args, _ = _parse(["worker", "--servers", "h:1", "--config", str(path)])
    assert train_config_from_args(args).lr_schedule == "cosine:warmup=5,min=0.1"
    args, _ = _parse(["worker", "--servers", "h:1", "--config", str(path)], {"RANGER_PS_LR_SCHEDULE": "step:every=2"})
    assert train_config_from_args(args).lr_schedule == "step:every=2"


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("pushfraction = 0.1\n", ("'pushfraction' is not a flag of this command", "push-fraction")),
        ('servers = "h:1"\n', ("'servers' is not a flag of this command",)),  # a worker flag, not local's
        ("no-overlap = true\n", ("'no-overlap' is not a flag",)),
        ("[epochs]\nvalue = 3\n", ("'epochs' must be a value, not a table",)),
        ("[training]\nepochs = 3\n", ("'training' is not a flag",)),
        ('epochs = "many"\n', ("epochs = 'many'", "expected an integer, got 'many'")),
        ("epochs = 2.5\n", ("epochs = 2.5",)),
        ('overlap = "maybe"\n', ("overlap = 'maybe'", "expected one of")),
        ('log-level = "LOUD"\n', ("log-level = 'LOUD'", "choose from")),
        ("betas = [0.9]\n", ("betas = [0.9]", "expected two numbers")),
        ("epochs = \n", ("not valid TOML",)),
        ('model = "mlp"\nmodel = "cnn"\n', ("not valid TOML",)),
    ],
)
def test_a_bad_config_file_is_a_usage_error_naming_the_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, needles: tuple[str, ...]
) -> None:
    path = _toml(tmp_path, text)
    err = _usage_error(capsys, ["local", "--config", str(path)])
    assert f"--config {path}: " in err, err
    for needle in needles:
        assert needle in err, err
    assert err.strip().splitlines()[-1].startswith("ranger-ps local: error: --config ")


def test_an_unreadable_config_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.toml"
    err = _usage_error(capsys, ["local", "--config", str(missing)])
    assert f"--config {missing}: cannot read it" in err and "No such file" in err
    err = _usage_error(capsys, ["worker", "--servers", "h:1"], {"RANGER_PS_CONFIG": str(missing)})
    assert f"--config {missing}: cannot read it" in err and err.startswith("usage: ranger-ps worker")
    not_utf8 = tmp_path / "latin1.toml"
    not_utf8.write_bytes('model = "caf\xe9"\n'.encode("latin-1"))
    err = _usage_error(capsys, ["local", "--config", str(not_utf8)])
    assert f"--config {not_utf8}: not valid TOML" in err


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_local_run_reads_the_config_file_and_logs_the_effective_config(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
        model = "tests.byo_workload:model"
        dataset = "tests.byo_workload:dataset"
        push_fraction = 0.5
        block-size = 64
        workers = 1
        shards = 1
        epochs = 5  # the command line's --epochs 1 wins
        """,
    )
    report_path = tmp_path / "report.json"
    result = _run_local(["--config", str(path), "--epochs", "1", "--report", str(report_path)])
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report["config_file"] == str(path)
    config = report["config"]
    assert (config["push_fraction"], config["block_size"], config["epochs"]) == (0.5, 64, 1)
    assert (config["model"], config["workers"], config["shards"]) == ("tests.byo_workload:model", 1, 1)
    assert 0 < report["bytes_pushed"] < report["bytes_pushed_dense"]  # half the blocks each step
    logged = [line for line in result.stderr.splitlines() if f"local: effective config (config file {path}): " in line]
    assert len(logged) == 1, result.stderr
    effective = json.loads(logged[0].split("): ", 1)[1])
    assert (effective["push_fraction"], effective["block_size"], effective["epochs"]) == (0.5, 64, 1)


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_local_run_with_the_config_file_named_by_the_environment(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        'model = "tests.byo_workload:model"\ndataset = "tests.byo_workload:dataset"\n'
        "epochs = 1\nworkers = 1\nshards = 1\n",
    )
    report_path = tmp_path / "report.json"
    result = _run_local(["--report", str(report_path)], {"RANGER_PS_CONFIG": str(path)})
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert report["config_file"] == str(path) and report["config"]["workers"] == 1
