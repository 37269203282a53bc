"""Per-step training metrics to CSV (and TensorBoard when it is installed), for plots after the run.

A :class:`StepLog` writes two CSV files, each with a single, fixed header:

- the **step log** (the path given), one row per training step::

      step,wall_seconds,loss,batch_accuracy,bytes_pushed,bytes_pulled,bytes_pushed_dense,steps_per_second

  ``wall_seconds`` counts from when the log was opened; the byte columns are running totals of
  this worker; ``batch_accuracy`` is empty when the loop does not measure it; ``steps_per_second``
  is averaged over the last few steps unless the loop gives it.
- the **evaluation log** (:func:`eval_log_path`: ``run.csv`` -> ``run.eval.csv``), one row per
  evaluation on held-out data, created at the first evaluation::

      step,bytes_pushed,test_loss,test_accuracy

Two files rather than one with mostly-empty evaluation columns keep each file a plain table that
any tool reads. Rows are flushed every ``flush_every`` steps or ``flush_seconds`` seconds
(whichever comes first), and evaluation rows at once, so a crash loses at most a few rows.

With ``tensorboard=True`` the same values also go to TensorBoard scalars when
``torch.utils.tensorboard`` imports (it needs the ``tensorboard`` package, the optional extra
``pip install 'ranger-ps[tensorboard]'``; imported only here, when a log opens); otherwise that is
skipped with one log line saying how to install it. :func:`read_step_log` and
:func:`read_eval_log` read the files back (:mod:`ranger_ps.observability.plot` draws them).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

log = logging.getLogger(__name__)

STEP_COLUMNS: tuple[str, ...] = (
    "step",
    "wall_seconds",
    "loss",
    "batch_accuracy",
    "bytes_pushed",
    "bytes_pulled",
    "bytes_pushed_dense",
    "steps_per_second",
)
EVAL_COLUMNS: tuple[str, ...] = ("step", "bytes_pushed", "test_loss", "test_accuracy")


@dataclasses.dataclass(frozen=True)
class StepRow:
    """One row of a step log (``batch_accuracy`` None where the loop did not measure it)."""

    step: int
    wall_seconds: float
    loss: float
    batch_accuracy: float | None
    bytes_pushed: int
    bytes_pulled: int
    bytes_pushed_dense: int
    steps_per_second: float


@dataclasses.dataclass(frozen=True)
class EvalRow:
    """One row of an evaluation log."""

    step: int
    bytes_pushed: int
    test_loss: float
    test_accuracy: float


def eval_log_path(step_log: Path) -> Path:
    """Where the evaluation rows of the step log ``step_log`` go: ``run.csv`` -> ``run.eval.csv``."""
    return step_log.with_name(step_log.stem + ".eval.csv")


class _ScalarWriter(Protocol):
    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


def _open_tensorboard(directory: Path) -> _ScalarWriter | None:
    """A TensorBoard ``SummaryWriter`` on ``directory``, or None (one log line) when it does not import.

    Imported here, not at the top of the module: ``tensorboard`` is an optional extra.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        log.info(
            "TensorBoard scalars skipped: torch.utils.tensorboard does not import (%s); "
            "install them with: pip install 'ranger-ps[tensorboard]'",
            exc,
        )
        return None
    writer: _ScalarWriter = SummaryWriter(log_dir=str(directory))
    return writer


class StepLog:
    """Write a worker's per-step metrics to CSV (and TensorBoard scalars when available).

    Use as a context manager, or call :meth:`close` (idempotent). Not thread-safe: one training
    loop writes it.

    Args:
        path: the step log (CSV); its folder is created. The evaluation log goes next to it
            (:func:`eval_log_path`).
        append: keep the rows already in the files (a restarted worker) instead of starting them
            over; the headers must match.
        flush_every: flush the step log at least every this many rows.
        flush_seconds: ... and at least this often (checked when a row is written).
        tensorboard: also write TensorBoard scalars when ``torch.utils.tensorboard`` imports.
        tensorboard_dir: where; default ``<path's folder>/tensorboard/<path's stem>``.
        window: steps over which ``steps_per_second`` is averaged when the loop does not give it.
        clock: monotonic seconds (tests inject a fake one).
    """

    def __init__(
        self,
        path: Path,
        *,
        append: bool = False,
        flush_every: int = 10,
        flush_seconds: float = 2.0,
        tensorboard: bool = True,
        tensorboard_dir: Path | None = None,
        window: int = 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if flush_every < 1 or window < 1:
            raise ValueError(f"flush_every and window must be >= 1, got {flush_every} and {window}")
        if flush_seconds < 0:
            raise ValueError(f"flush_seconds must be >= 0, got {flush_seconds}")
        self.path = Path(path)
        self.eval_path = eval_log_path(self.path)
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self._append = append
        self._clock = clock
        self._started = clock()
        self._last_flush = self._started
        self._unflushed = 0
        self._recent: deque[tuple[int, float]] = deque(maxlen=window + 1)  # (step, wall seconds)
        self._closed = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._steps, self._step_writer = self._open(self.path, STEP_COLUMNS)
        self._evals: IO[str] | None = None
        self._eval_writer: Any = None
        self._tensorboard: _ScalarWriter | None = None
        if tensorboard:
            try:
                self._tensorboard = _open_tensorboard(
                    tensorboard_dir or self.path.parent / "tensorboard" / self.path.stem
                )
            except BaseException:
                self._steps.close()
                raise

    def _open(self, path: Path, columns: Sequence[str]) -> tuple[IO[str], Any]:
        keep = self._append and path.exists() and path.stat().st_size > 0
        if keep:
            with path.open(newline="") as existing:
                header = next(csv.reader(existing), [])
            if tuple(header) != tuple(columns):
                raise ValueError(f"{path} has the columns {header}, not {list(columns)}: cannot append to it")
        handle = path.open("a" if keep else "w", newline="")
        writer = csv.writer(handle, lineterminator="\n")
        if not keep:
            writer.writerow(columns)
            handle.flush()
        return handle, writer

    def log_step(
        self,
        step: int,
        loss: float,
        *,
        bytes_pushed: int,
        bytes_pulled: int,
        bytes_pushed_dense: int,
        batch_accuracy: float | None = None,
        steps_per_second: float | None = None,
    ) -> StepRow:
        """Record one training step; returns the row written.

        Args:
            step: the step number (the worker's clock).
            loss: the step's training loss.
            bytes_pushed: bytes pushed so far (running total).
            bytes_pulled: bytes pulled so far (running total).
            bytes_pushed_dense: bytes a dense push of every step so far would have sent (running total).
            batch_accuracy: accuracy on the step's batch, if the loop measures it.
            steps_per_second: the loop's own rate; default: averaged over the last few rows.
        """
        self._check_open()
        wall = self._clock() - self._started
        self._recent.append((step, wall))
        if steps_per_second is None:
            steps_per_second = self._rate(wall)
        row = StepRow(
            step=int(step),
            wall_seconds=wall,
            loss=float(loss),
            batch_accuracy=None if batch_accuracy is None else float(batch_accuracy),
            bytes_pushed=int(bytes_pushed),
            bytes_pulled=int(bytes_pulled),
            bytes_pushed_dense=int(bytes_pushed_dense),
            steps_per_second=float(steps_per_second),
        )
        self._step_writer.writerow(_cells(row))
        self._unflushed += 1
        if self._unflushed >= self.flush_every or self._clock() - self._last_flush >= self.flush_seconds:
            self.flush()
        if self._tensorboard is not None:
            scalars = {
                "train/loss": row.loss,
                "train/steps_per_second": row.steps_per_second,
                "bytes/pushed": float(row.bytes_pushed),
                "bytes/pulled": float(row.bytes_pulled),
                "bytes/pushed_dense": float(row.bytes_pushed_dense),
            }
            if row.batch_accuracy is not None:
                scalars["train/batch_accuracy"] = row.batch_accuracy
            for tag, value in scalars.items():
                self._tensorboard.add_scalar(tag, value, row.step)
        return row

    def _rate(self, wall: float) -> float:
        """Steps per second over the rows in the window (since the log opened for the first row)."""
        (first_step, first_wall), (last_step, _) = self._recent[0], self._recent[-1]
        if len(self._recent) == 1:
            return 1.0 / wall if wall > 0 else math.nan
        elapsed = wall - first_wall
        return (last_step - first_step) / elapsed if elapsed > 0 else math.nan

    def log_evaluation(self, step: int, bytes_pushed: int, test_loss: float, test_accuracy: float) -> EvalRow:
        """Record an evaluation on held-out data (accuracy in [0, 1]); flushed at once. Returns the row."""
        self._check_open()
        row = EvalRow(int(step), int(bytes_pushed), float(test_loss), float(test_accuracy))
        if self._evals is None:
            self._evals, self._eval_writer = self._open(self.eval_path, EVAL_COLUMNS)
        self._eval_writer.writerow(_cells(row))
        self._evals.flush()
        if self._tensorboard is not None:
            self._tensorboard.add_scalar("eval/test_loss", row.test_loss, row.step)
            self._tensorboard.add_scalar("eval/test_accuracy", row.test_accuracy, row.step)
        return row

    def flush(self) -> None:
        """Hand the buffered rows to the operating system now."""
        if self._closed:
            return
        self._steps.flush()
        if self._evals is not None:
            self._evals.flush()
        if self._tensorboard is not None:
            self._tensorboard.flush()
        self._unflushed = 0
        self._last_flush = self._clock()

    def close(self) -> None:
        """Flush and close the files; idempotent."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._steps.close()
            if self._evals is not None:
                self._evals.close()
            if self._tensorboard is not None:
                self._tensorboard.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"the step log {self.path} is closed")

    def __enter__(self) -> StepLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cells(row: StepRow | EvalRow) -> list[str]:
    """A row's CSV cells: ``repr`` of floats (exact round trip), empty for None."""
    return ["" if v is None else repr(v) for v in dataclasses.astuple(row)]


def _read(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open(newline="") as handle:
        text = handle.read()
    if text and not text.endswith("\n"):
        # The writer stopped mid-row (killed, or a live file read between flushes): drop the partial row.
        text, _, partial = text.rpartition("\n")
        log.warning("%s: ignoring the incomplete last line %r", path, partial[:80])
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None:
        raise ValueError(f"{path} is empty: expected the header {','.join(columns)}")
    missing = [c for c in columns if c not in reader.fieldnames]
    if missing:
        raise ValueError(f"{path} lacks the columns {missing} (it has {reader.fieldnames})")
    return list(reader)


def _float(text: str) -> float:
    return float(text) if text else math.nan


def read_step_log(path: Path) -> list[StepRow]:
    """The rows of a step log written by :class:`StepLog`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: it is empty or lacks a column.
    """
    rows = []
    for cells in _read(path, STEP_COLUMNS):
        try:
            rows.append(_step_row(cells))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: bad row {cells}: {exc}") from None
    return rows


def _step_row(cells: dict[str, str]) -> StepRow:
    return StepRow(
        step=int(cells["step"]),
        wall_seconds=_float(cells["wall_seconds"]),
        loss=_float(cells["loss"]),
        batch_accuracy=float(cells["batch_accuracy"]) if cells["batch_accuracy"] else None,
        bytes_pushed=int(cells["bytes_pushed"]),
        bytes_pulled=int(cells["bytes_pulled"]),
        bytes_pushed_dense=int(cells["bytes_pushed_dense"]),
        steps_per_second=_float(cells["steps_per_second"]),
    )


def read_last_step(path: Path, tail_bytes: int = 4096) -> StepRow | None:
    """The last complete row of a step log that may still be growing, reading only its end.

    For polling a live run cheaply: None when the file is missing, has no complete row yet, or its
    last complete row does not parse (never raises for what a writer mid-row can leave behind).
    """
    try:
        with Path(path).open("rb") as handle:
            first = handle.readline()
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(len(first), size - tail_bytes))
            pieces = handle.read().decode(errors="replace").split("\n")
    except OSError:
        return None
    header = first.decode(errors="replace").strip().split(",")
    for line in reversed(pieces[:-1]):  # the last piece is empty or a row still being written
        cells = line.split(",")
        if len(cells) == len(header) and cells[0].isdigit():
            try:
                return _step_row(dict(zip(header, cells, strict=True)))
            except (KeyError, TypeError, ValueError):
                return None
    return None


def read_eval_log(path: Path) -> list[EvalRow]:
    """The rows of an evaluation log (see :func:`eval_log_path`); same errors as :func:`read_step_log`."""
    rows = []
    for cells in _read(path, EVAL_COLUMNS):
        try:
            rows.append(
                EvalRow(
                    step=int(cells["step"]),
                    bytes_pushed=int(cells["bytes_pushed"]),
                    test_loss=_float(cells["test_loss"]),
                    test_accuracy=_float(cells["test_accuracy"]),
                )
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: bad row {cells}: {exc}") from None
    return rows
