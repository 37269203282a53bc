"""StepLog writes CSVs that read back exactly; plot_run draws them into a PNG."""

from __future__ import annotations

import csv
import logging
import math
import sys
import types
from pathlib import Path

import pytest

from ranger_ps.observability.plot import main as plot_main
from ranger_ps.observability.plot import plot_run
from ranger_ps.observability.steplog import (
    EVAL_COLUMNS,
    STEP_COLUMNS,
    EvalRow,
    StepLog,
    StepRow,
    eval_log_path,
    read_eval_log,
    read_last_step,
    read_step_log,
)

pytestmark = pytest.mark.timeout(60)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FakeClock:
    """Monotonic seconds that advance only when told to."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _write_run(path: Path, steps: int = 40, *, evaluate_every: int = 10, accuracy: bool = True) -> list[StepRow]:
    clock = FakeClock()
    rows = []
    with StepLog(path, tensorboard=False, clock=clock) as log:
        for step in range(1, steps + 1):
            clock.now += 0.25
            rows.append(
                log.log_step(
                    step,
                    2.0 * math.exp(-step / 10) + 0.1 / 3,
                    bytes_pushed=1000 * step,
                    bytes_pulled=4000 * step,
                    bytes_pushed_dense=4000 * step,
                    batch_accuracy=min(1.0, step / steps) if accuracy else None,
                )
            )
            if step % evaluate_every == 0:
                log.log_evaluation(step, 1000 * step, 1.0 / step, 1.0 - 1.0 / step)
    return rows


def test_a_step_log_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "run" / "worker-0.csv"
    written = _write_run(path, steps=25, evaluate_every=10)
    with path.open(newline="") as handle:
        assert next(csv.reader(handle)) == list(STEP_COLUMNS)
    assert read_step_log(path) == written
    assert written[0].wall_seconds == 0.25 and written[-1].wall_seconds == 25 * 0.25
    assert written[-1].steps_per_second == pytest.approx(4.0)  # a step every 0.25 s
    assert eval_log_path(path) == tmp_path / "run" / "worker-0.eval.csv"
    with eval_log_path(path).open(newline="") as handle:
        assert next(csv.reader(handle)) == list(EVAL_COLUMNS)
    assert read_eval_log(eval_log_path(path)) == [EvalRow(10, 10_000, 0.1, 0.9), EvalRow(20, 20_000, 0.05, 0.95)]


def test_missing_accuracy_is_an_empty_cell_and_nan_survives(tmp_path: Path) -> None:
    path = tmp_path / "w.csv"
    with StepLog(path, tensorboard=False) as log:
        row = log.log_step(1, math.nan, bytes_pushed=0, bytes_pulled=0, bytes_pushed_dense=0, steps_per_second=2.5)
    assert row.batch_accuracy is None and row.steps_per_second == 2.5
    assert path.read_text().splitlines()[1].split(",")[3] == ""
    (back,) = read_step_log(path)
    assert back.batch_accuracy is None and math.isnan(back.loss)
    assert not eval_log_path(path).exists()  # created at the first evaluation only


def test_an_incomplete_last_row_is_ignored_on_reading(tmp_path: Path) -> None:
    path = tmp_path / "w.csv"
    written = _write_run(path, steps=3)
    with path.open("a") as handle:
        handle.write("4,1.0,0.5")  # the writer was killed mid-row
    assert read_step_log(path) == written
    header_only = tmp_path / "h.csv"
    header_only.write_text("step,wall")  # even the header is cut short
    with pytest.raises(ValueError, match="is empty"):
        read_step_log(header_only)


def test_rows_are_flushed_regularly_and_close_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "w.csv"
    clock = FakeClock()
    log = StepLog(path, tensorboard=False, flush_every=3, flush_seconds=60, clock=clock)

    def rows_on_disk() -> int:
        return len(path.read_text().splitlines()) - 1

    def step(n: int) -> None:
        log.log_step(n, 1.0, bytes_pushed=n, bytes_pulled=n, bytes_pushed_dense=n)

    assert rows_on_disk() == 0  # the header is on disk at once
    step(1)
    step(2)
    assert rows_on_disk() == 0
    step(3)
    assert rows_on_disk() == 3  # every 3 rows
    step(4)
    clock.now += 61
    step(5)
    assert rows_on_disk() == 5  # ... or every 60 s
    log.log_evaluation(5, 5, 0.5, 0.5)
    assert len(read_eval_log(log.eval_path)) == 1  # evaluations at once
    step(6)
    log.close()
    log.close()
    assert log.closed and rows_on_disk() == 6
    with pytest.raises(ValueError, match="closed"):
        step(7)


def test_append_keeps_rows_and_refuses_another_header(tmp_path: Path) -> None:
    path = tmp_path / "w.csv"
    first = _write_run(path, steps=5, evaluate_every=5)
    with StepLog(path, append=True, tensorboard=False) as log:
        log.log_step(6, 0.5, bytes_pushed=6, bytes_pulled=6, bytes_pushed_dense=6)
        log.log_evaluation(6, 6, 0.25, 0.75)
    rows = read_step_log(path)
    assert rows[:5] == first and rows[5].step == 6
    assert [e.step for e in read_eval_log(eval_log_path(path))] == [5, 6]
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="cannot append"):
        StepLog(other, append=True, tensorboard=False)


def test_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="flush_every"):
        StepLog(tmp_path / "w.csv", flush_every=0, tensorboard=False)
    with pytest.raises(ValueError, match="flush_seconds"):
        StepLog(tmp_path / "w.csv", flush_seconds=-1, tensorboard=False)


def test_without_tensorboard_installed_it_is_skipped_with_one_log_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails, as without the package
    with caplog.at_level(logging.INFO, logger="ranger_ps.observability.steplog"), StepLog(tmp_path / "w.csv") as log:
        log.log_step(1, 1.0, bytes_pushed=1, bytes_pulled=1, bytes_pushed_dense=1)
    lines = [r for r in caplog.records if r.name == "ranger_ps.observability.steplog"]
    assert len(lines) == 1 and "TensorBoard scalars skipped" in lines[0].getMessage()
    assert len(read_step_log(tmp_path / "w.csv")) == 1
    assert not (tmp_path / "tensorboard").exists()


def test_tensorboard_scalars_when_it_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scalars: list[tuple[str, float, int | None]] = []
    opened: list[str] = []
    closed: list[bool] = []

    class FakeWriter:
        def __init__(self, log_dir: str) -> None:
            opened.append(log_dir)

        def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> None:
            scalars.append((tag, scalar_value, global_step))

        def flush(self) -> None:
            pass

        def close(self) -> None:
            closed.append(True)

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = FakeWriter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    with StepLog(tmp_path / "w.csv") as log:
        log.log_step(1, 0.5, bytes_pushed=10, bytes_pulled=20, bytes_pushed_dense=40, batch_accuracy=0.25)
        log.log_evaluation(1, 10, 0.75, 0.5)
    assert opened == [str(tmp_path / "tensorboard" / "w")] and closed == [True]
    assert ("train/loss", 0.5, 1) in scalars and ("train/batch_accuracy", 0.25, 1) in scalars
    assert ("bytes/pushed", 10.0, 1) in scalars and ("eval/test_accuracy", 0.5, 1) in scalars


def _assert_png(path: Path, minimum: int = 10_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert minimum < len(data) < 5_000_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1200, 800)  # 12 x 8 inches at 100 dpi


def test_plot_run_writes_a_png_of_several_workers(tmp_path: Path) -> None:
    csvs = [tmp_path / "worker-0.csv", tmp_path / "worker-1.csv"]
    _write_run(csvs[0], evaluate_every=10)
    _write_run(csvs[1], evaluate_every=1000, accuracy=False)  # no evaluations, no batch accuracy
    out = plot_run(csvs, tmp_path / "plots" / "run.png", title="two workers")
    assert out == tmp_path / "plots" / "run.png"
    _assert_png(out)
    assert not list((tmp_path / "plots").glob("*.tmp"))


def test_plot_run_without_any_accuracy(tmp_path: Path) -> None:
    csv_path = tmp_path / "w.csv"
    _write_run(csv_path, steps=3, evaluate_every=1000, accuracy=False)
    _assert_png(plot_run([csv_path], tmp_path / "w.png"), minimum=5_000)


def test_plot_run_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one"):
        plot_run([], tmp_path / "x.png")
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        plot_run([tmp_path / "missing.csv"], tmp_path / "x.png")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.csv is empty"):
        plot_run([empty], tmp_path / "x.png")
    header_only = tmp_path / "header.csv"
    header_only.write_text(",".join(STEP_COLUMNS) + "\n")
    with pytest.raises(ValueError, match="no rows"):
        plot_run([header_only], tmp_path / "x.png")
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("step,loss\n1,2\n")
    with pytest.raises(ValueError, match="lacks the columns"):
        plot_run([wrong], tmp_path / "x.png")
    garbled = tmp_path / "garbled.csv"
    garbled.write_text(",".join(STEP_COLUMNS) + "\n1,x,1,,1,1,1,1\n")
    with pytest.raises(ValueError, match="bad row"):
        plot_run([garbled], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_plot_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv_path = tmp_path / "w.csv"
    _write_run(csv_path, steps=5, evaluate_every=5)
    assert plot_main([str(csv_path), "--out", str(tmp_path / "w.png"), "--title", "t"]) == 0
    _assert_png(tmp_path / "w.png", minimum=5_000)
    assert plot_main([str(tmp_path / "nope.csv"), "--out", str(tmp_path / "n.png")]) == 2
    assert "nope.csv: no such file" in capsys.readouterr().err


def test_read_last_step_returns_the_last_complete_row_of_a_growing_log(tmp_path: Path) -> None:
    path = tmp_path / "worker-0.csv"
    assert read_last_step(path) is None  # not written yet
    with StepLog(path, tensorboard=False) as log:
        assert read_last_step(path) is None  # the header only
        for step in range(1, 400):  # more than the tail that is read
            log.log_step(step, 1.0 / step, bytes_pushed=10 * step, bytes_pulled=step, bytes_pushed_dense=20 * step)
    last = read_last_step(path)
    assert last is not None and (last.step, last.bytes_pushed, last.bytes_pushed_dense) == (399, 3990, 7980)
    with path.open("a") as handle:
        handle.write("400,0.5,0.2")  # a row the writer has not finished
    again = read_last_step(path)
    assert again is not None and again.step == 399
