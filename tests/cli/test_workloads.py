"""Workloads end to end through the command line: a user's own model and dataset, a language model on
a text file, a CNN on MNIST-format files, and the one-line errors for bad ones.

Every run is a real ``ranger-ps`` process (its cluster, for ``local``, is real processes too), started
from the repository root so ``tests.byo_workload`` imports the way a user's ``my_code.py`` would. Data is
kept tiny so the whole file takes well under two minutes on two busy cores.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ranger_ps.observability.steplog import eval_log_path
from tests.conftest import ROOT, ServerFactory, ranger_ps_cmd, stop_process

pytestmark = pytest.mark.e2e

MODEL = "tests.byo_workload:model"
DATASET = "tests.byo_workload:dataset"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _environment() -> dict[str, str]:
    """This process's environment without ``RANGER_PS_*`` settings (they would change the flags under test)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANGER_PS_")}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(*args: str, timeout: float = 170) -> subprocess.CompletedProcess[str]:
    """Run ``ranger-ps ARGS`` from the repository root to completion (killed if it outlives ``timeout``)."""
    return subprocess.run(
        ranger_ps_cmd(*args), cwd=ROOT, env=_environment(), capture_output=True, text=True, timeout=timeout
    )


def _succeeded(result: subprocess.CompletedProcess[str]) -> None:
    """Assert that a run exited 0, showing its output if not."""
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def _report(path: Path) -> dict[str, Any]:
    """The JSON report at ``path`` (it must exist and hold an object)."""
    assert path.is_file(), f"no report at {path}"
    report = json.loads(path.read_text())
    assert isinstance(report, dict)
    return report


def _csv_rows(path: Path) -> list[dict[str, str]]:
    """The data rows of a CSV file with a header line."""
    assert path.is_file(), f"no CSV at {path}"
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def _one_line_error(stderr: str, command: str) -> str:
    """The single ``ranger-ps COMMAND: error: ...`` line of a failed run (and no traceback)."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith(f"ranger-ps {command}: error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def _write_text_corpus(path: Path, characters: int = 6000) -> None:
    """A deterministic English-like text: sentences drawn from a small grammar, about ``characters`` long."""
    rng = random.Random(7)
    subjects = ["the cat", "a dog", "my neighbour", "the old sailor", "every child", "the baker"]
    verbs = ["sees", "likes", "follows", "paints", "remembers", "carries"]
    objects = ["the red ball", "a quiet river", "the morning bread", "a small boat", "the garden gate"]
    endings = [".", ".", "!", " again.", " every day."]
    sentences: list[str] = []
    while sum(len(s) + 1 for s in sentences) < characters:
        sentence = f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}{rng.choice(endings)}"
        sentences.append(sentence[0].upper() + sentence[1:])
    path.write_text("\n".join(" ".join(sentences[i : i + 4]) for i in range(0, len(sentences), 4)) + "\n")


def _idx(array: np.ndarray[Any, Any]) -> bytes:
    """``array`` (uint8) in the IDX format MNIST ships in: magic, shape as big-endian uint32, data."""
    assert array.dtype == np.uint8
    return bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes() + array.tobytes()


def _write_mnist(directory: Path, train: int = 256, test: int = 64) -> None:
    """Small MNIST-format files: noisy 28x28 images whose label (0..3) is the quadrant holding a bright square."""
    rng = np.random.default_rng(3)
    directory.mkdir(parents=True, exist_ok=True)
    for images_name, labels_name, n in (
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", train),
        ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", test),
    ):
        labels = rng.integers(0, 4, n, dtype=np.uint8)
        images = rng.integers(0, 64, (n, 28, 28), dtype=np.uint8)
        for image, label in zip(images, labels, strict=True):
            top, left = 14 * (int(label) // 2), 14 * (int(label) % 2)
            image[top + 3 : top + 11, left + 3 : left + 11] = 255
        (directory / images_name).write_bytes(_idx(images))
        (directory / labels_name).write_bytes(_idx(labels))


@pytest.mark.timeout(180)
def test_local_trains_vgg_with_batch_norm_and_evaluates_the_clusters_statistics(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    result = _run(
        "local", "--model", "vgg-bn", "--dataset", "synthetic:features=1024,classes=4,train=96,test=32",
        "--epochs", "1", "--batch-size", "16", "--block-size", "16384", "--report", str(report_path),
    )  # fmt: skip
    _succeeded(result)
    report = _report(report_path)
    assert report["config"]["model"] == "vgg-bn" and report["steps"] == 6
    assert 0.0 <= report["test_accuracy"] <= 1.0


@pytest.mark.timeout(180)
def test_local_trains_a_bring_your_own_workload_with_step_logs_and_plot(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    stale = tmp_path / "report-steps"  # an earlier run's step logs in the same place: never read as this run's
    stale.mkdir()
    (stale / "worker-0.csv").write_text(
        "step,wall_seconds,loss,batch_accuracy,bytes_pushed,bytes_pulled,bytes_pushed_dense,steps_per_second\n"
        + "".join(f"{i},1.0,123.456,0.5,1,1,1,1.0\n" for i in range(1, 5000))
    )
    (stale / "worker-0.eval.csv").write_text("step,bytes_pushed,test_loss,test_accuracy\n4999,1,123.456,0.5\n")
    result = _run(
        "local", "--model", MODEL, "--dataset", DATASET, "--epochs", "2", "--shards", "1",
        "--report", str(report_path),
    )  # fmt: skip
    _succeeded(result)
    assert "123.456" not in result.stderr  # the progress never showed the stale loss
    assert "123.456" not in (stale / "worker-0.eval.csv").read_text()
    report = _report(report_path)
    assert report["test_accuracy"] >= 0.9, report
    assert report["config"]["model"] == MODEL and report["config"]["dataset"] == DATASET
    assert report["workers"] == 2 and report["steps"] > 0

    png = report_path.with_suffix(".png")
    assert report["plot"] == str(png)
    image = png.read_bytes()
    assert len(image) > len(PNG_MAGIC) and image.startswith(PNG_MAGIC)

    step_logs = [Path(p) for p in report["step_logs"]]
    assert len(step_logs) == 2 and all(p.parent == tmp_path / "report-steps" for p in step_logs)
    rows = [_csv_rows(p) for p in step_logs]
    assert [len(r) for r in rows] == [w["steps"] for w in report["per_worker"]]  # both in worker order
    assert sum(len(r) for r in rows) == report["steps"]
    for worker_rows in rows:
        assert [int(r["step"]) for r in worker_rows] == list(range(1, len(worker_rows) + 1))
        assert all(math.isfinite(float(r["loss"])) for r in worker_rows)


@pytest.mark.timeout(180)
def test_worker_trains_a_bring_your_own_workload_and_logs_steps_and_evaluations(
    start_servers: ServerFactory, tmp_path: Path
) -> None:
    servers = ",".join(start_servers(1))
    report_path = tmp_path / "worker.json"
    steps_csv = tmp_path / "metrics" / "worker.csv"
    result = _run(
        "worker", "--servers", servers, "--model", MODEL, "--dataset", DATASET, "--epochs", "2",
        "--batch-size", "64", "--metrics-csv", str(steps_csv), "--report", str(report_path),
    )  # fmt: skip
    _succeeded(result)
    report = _report(report_path)
    assert report["test_accuracy"] >= 0.9 and report["config"]["model"] == MODEL
    assert report["steps"] == 2 * math.ceil(2000 / 64)
    steps = _csv_rows(steps_csv)
    assert len(steps) == report["steps"]
    evaluations = _csv_rows(eval_log_path(steps_csv))
    assert [int(r["step"]) for r in evaluations] == [report["steps"] // 2, report["steps"]]  # one per epoch
    assert all(0 <= float(r["test_accuracy"]) <= 1 for r in evaluations)


@pytest.mark.timeout(180)
def test_local_trains_a_character_language_model_on_a_text_file(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    _write_text_corpus(corpus)
    report_path = tmp_path / "report.json"
    result = _run(
        "local", "--model", "charlm", "--dataset", f"text:{corpus}", "--epochs", "1", "--rule", "adamw",
        "--workers", "1", "--shards", "1", "--report", str(report_path),
    )  # fmt: skip
    _succeeded(result)
    report = _report(report_path)
    assert math.isfinite(report["test_loss"]) and report["test_loss"] > 0
    assert 0 <= report["test_accuracy"] <= 1  # per predicted token
    assert report["config"]["rule"] == "adamw" and report["steps"] > 0


@pytest.mark.timeout(180)
def test_local_trains_a_cnn_on_mnist_format_files(tmp_path: Path) -> None:
    mnist = tmp_path / "mnist"
    _write_mnist(mnist)
    report_path = tmp_path / "report.json"
    result = _run(
        "local", "--model", "cnn", "--dataset", f"mnist:{mnist}", "--epochs", "1", "--workers", "1",
        "--shards", "1", "--report", str(report_path),
    )  # fmt: skip
    _succeeded(result)
    report = _report(report_path)
    assert 0 <= report["test_accuracy"] <= 1 and math.isfinite(report["test_loss"])
    assert report["steps"] == math.ceil(256 / 32)


def _bad_inputs() -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """(flags, words the error line must contain) for each bad input this machine can reject."""
    cases: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
        (("--model", "tests.byo_workload:nope"), ("--model", "tests.byo_workload:nope", "no attribute 'nope'")),
        (("--dataset", "mnist:/nonexistent"), ("mnist:/nonexistent", "is not a directory")),
        (
            ("--model", "vgg-bn", "--dataset", "synthetic:features=1024,train=64,test=16", "--outer", "sum"),
            ("the model has buffers (BatchNorm's running statistics)", "outer='mean'"),
        ),
    ]
    if not torch.cuda.is_available():  # on a CUDA machine --device cuda is valid
        cases.append((("--device", "cuda"), ("--device cuda", "CUDA is not available")))
    return cases


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["local", "worker"])
def test_bad_workloads_exit_2_with_one_line_naming_the_problem(command: str) -> None:
    # A worker checks its model, data and device before contacting any server; the bounded
    # connect timeout only matters if that check were missing.
    prefix = ["worker", "--servers", "127.0.0.1:9", "--connect-timeout", "2"] if command == "worker" else ["local"]
    cases = _bad_inputs()
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for flags, _ in cases:  # independent runs: start them together, collect them in turn
            processes.append(
                subprocess.Popen(
                    ranger_ps_cmd(*prefix, *flags),
                    cwd=ROOT,
                    env=_environment(),
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                )
            )
        for process, (flags, needles) in zip(processes, cases, strict=True):
            stderr = process.communicate(timeout=90)[1].decode(errors="replace")
            assert process.returncode == 2, f"{flags}: exit {process.returncode}\n{stderr}"
            line = _one_line_error(stderr, command)
            for needle in needles:
                assert needle in line, f"{needle!r} not in {line!r}"
    finally:
        for process in processes:
            stop_process(process)
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()
