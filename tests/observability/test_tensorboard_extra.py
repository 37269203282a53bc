"""TensorBoard is an optional extra: declared in pyproject.toml, imported only when a step log opens,
and its absence named with the command that installs it."""

from __future__ import annotations

import logging
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ranger_ps.observability.steplog import StepLog, read_step_log

ROOT = Path(__file__).resolve().parents[2]


def test_tensorboard_is_an_optional_extra_outside_dev_and_the_ci_constraints() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert [r.split(">")[0] for r in extras["tensorboard"]] == ["tensorboard"]
    everything_else = [*project["dependencies"], *extras["dev"]]
    assert not [r for r in everything_else if r.lower().startswith("tensorboard")]
    pinned = (ROOT / "constraints.txt").read_text().lower().splitlines()
    assert not [line for line in pinned if line.startswith("tensorboard")]


@pytest.mark.e2e
@pytest.mark.timeout(60)
def test_importing_the_observability_modules_does_not_import_tensorboard() -> None:
    code = (
        "import sys, ranger_ps.observability.steplog, ranger_ps.observability.watch, ranger_ps.observability.metrics\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorboard' or m == 'torch.utils.tensorboard'))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_without_tensorboard_the_log_line_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails, as without the package
    with caplog.at_level(logging.INFO, logger="ranger_ps.observability.steplog"):
        with StepLog(tmp_path / "w.csv") as steps:
            steps.log_step(1, 0.5, bytes_pushed=1, bytes_pulled=2, bytes_pushed_dense=3)
    (line,) = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert "pip install 'ranger-ps[tensorboard]'" in line
    assert [row.step for row in read_step_log(tmp_path / "w.csv")] == [1]  # the CSV is written as usual
    assert not (tmp_path / "tensorboard").exists()
