"""``ranger-ps local``: how to lay out a whole cluster on this machine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ranger_ps.config.common import check_port
from ranger_ps.config.launch import ProcessSettings
from ranger_ps.errors import UserError
from ranger_ps.settings import message_with_flag, setting


@dataclass(frozen=True)
class LocalSettings(ProcessSettings):
    """The local cluster: processes, outputs, and the servers' consistency settings."""

    title: ClassVar[str] = "the local cluster"

    report: Path | None = setting(None, "write a JSON report here at the end", metavar="FILE")
    metrics_port: int | None = setting(
        None,
        "Prometheus endpoints: shard i on PORT+i, worker j on PORT+shards+j; 0: any free ports",
        metavar="PORT",
        default_text="off",
    )
    metrics_host: str = setting("127.0.0.1", "the address the metrics endpoints listen on")
    metrics_dir: Path | None = setting(
        None, "keep the workers' per-step CSVs here", metavar="DIR", default_text="REPORT-steps/ beside --report"
    )
    plot: Path | None = setting(
        None,
        "draw loss and accuracy against steps and bytes pushed here",
        metavar="FILE.png",
        default_text="REPORT.png beside --report",
    )

    def __post_init__(self) -> None:
        try:
            check_port("metrics_port", self.metrics_port, top=65535 - self.shards - self.workers)
            super().__post_init__()
        except ValueError as exc:
            raise UserError(message_with_flag(LocalSettings, str(exc))) from None

    @property
    def step_log_dir(self) -> Path | None:
        """Where the workers' per-step CSVs are kept (None: in the run folder, not kept)."""
        if self.metrics_dir is not None:
            return self.metrics_dir
        return self.report.parent / f"{self.report.stem}-steps" if self.report is not None else None

    @property
    def plot_path(self) -> Path | None:
        """Where the plot of the run goes (None: no plot)."""
        if self.plot is not None:
            return self.plot
        return self.report.with_suffix(".png") if self.report is not None else None
