"""``ranger-ps worker``: which cluster, and what the worker writes while and after it trains."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ranger_ps.config.client import ClusterSettings
from ranger_ps.config.common import MetricsSettings
from ranger_ps.errors import UserError
from ranger_ps.settings import message_with_flag, setting


@dataclass(frozen=True)
class WorkerSettings(MetricsSettings, ClusterSettings):
    """Everything ``ranger-ps worker`` takes besides the training settings."""

    title: ClassVar[str] = "the worker's outputs"

    report: Path | None = setting(None, "write a JSON report here at the end", metavar="FILE")
    metrics_csv: Path | None = setting(
        None,
        "write per-step metrics here, evaluations beside it (and TensorBoard scalars when installed)",
        metavar="FILE.csv",
    )
    ready_file: Path | None = setting(
        None, "with --metrics-port: write the bound metrics port here as JSON once it listens", metavar="FILE"
    )

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ValueError as exc:
            raise UserError(message_with_flag(WorkerSettings, str(exc))) from None
