"""A wheel built from the repository installs into a fresh virtual environment and runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_wheel_installs_in_a_fresh_venv_and_runs_a_cluster(tmp_path: Path) -> None:
    # Build from a copy of the tracked tree, so the checkout stays clean and nothing untracked leaks in.
    tracked = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    )
    tracked_paths = {(ROOT / name).as_posix() for name in tracked if name}
    src = tmp_path / "src"
    for name in filter(None, tracked):
        target = src / name
        target.parent.mkdir(parents=True, exist_ok=True)
        origin = ROOT / name
        if origin.is_symlink():
            target.symlink_to(os.readlink(origin))
        elif origin.exists():
            shutil.copy2(origin, target)
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("ranger_ps-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    # Every module of the tree is in the wheel, under its installed name (server/ and worker/ as
    # ranger_ps.server and ranger_ps.worker), and every package has its __init__.py.
    sources = {
        "ranger_ps": ROOT / "ranger_ps",
        "ranger_ps/server": ROOT / "server",
        "ranger_ps/worker": ROOT / "worker",
    }
    for prefix, folder in sources.items():
        for path in folder.rglob("*.py"):
            if "__pycache__" not in path.parts and (ROOT / path.relative_to(ROOT)).as_posix() in tracked_paths:
                assert f"{prefix}/{path.relative_to(folder).as_posix()}" in names, path
    assert "ranger_ps/wire/_proto/ranger_ps_pb2.pyi" in names and "ranger_ps/py.typed" in names
    assert not [n for n in names if n.startswith(("server/", "worker/", "tests/"))]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    # The heavy dependencies (torch, grpc, ...) come from this test's environment through a path
    # entry; `pip check` then proves the wheel's declared requirements are all satisfied.
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    check = subprocess.run([python, "-m", "pip", "check"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "ranger-ps" not in check.stdout, check.stdout

    where = subprocess.run(
        [python, "-c", "import ranger_ps.server.main, ranger_ps.worker.train; print(ranger_ps.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    ).stdout.strip()
    assert where.startswith(purelib), where
    bare = subprocess.run([python, "-c", "import server"], capture_output=True, env=env, cwd=tmp_path)
    assert bare.returncode != 0  # nothing installed as a bare top-level module

    run = subprocess.run(
        [venv / "bin" / "ranger-ps", "local", "--epochs", "2", "--log-level", "WARNING"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr
    assert "test accuracy" in run.stdout
