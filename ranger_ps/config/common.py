"""Settings every command takes, and the ones shared by several: security, metrics."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from ranger_ps.settings import Settings, setting

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class CommonSettings(Settings):
    """Taken by every command."""

    title: ClassVar[str] = "common"

    log_level: str = setting("INFO", "logging verbosity", choices=LOG_LEVELS)
    uvloop: bool = setting(True, "run event loops on uvloop")
    config: Path | None = setting(
        None,
        "read flags from a TOML file (keys are flag names: push-fraction = 0.05); the environment and the "
        "command line win over it",
        metavar="FILE.toml",
    )


@dataclass(frozen=True)
class ClientSecuritySettings(Settings):
    """How a client proves itself to the shards and checks them."""

    title: ClassVar[str] = "security"

    token_file: Path | None = setting(
        None, "send the token in this file with every call (or set RANGER_PS_TOKEN)", metavar="FILE"
    )
    tls_ca: Path | None = setting(None, "connect with TLS, trusting this CA (PEM)", metavar="FILE")
    tls_client_cert: Path | None = setting(None, "mutual TLS: this client certificate (PEM)", metavar="FILE")
    tls_client_key: Path | None = setting(None, "mutual TLS: its private key (PEM)", metavar="FILE")


def check_port(name: str, port: int | None, *, top: int = 65535) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``port`` is None or in ``[0, top]``."""
    if port is not None and not 0 <= port <= top:
        raise ValueError(f"{name} must be in [0, {top}], got {port}")


@dataclass(frozen=True)
class MetricsSettings(Settings):
    """Where a process serves its Prometheus metrics."""

    title: ClassVar[str] = "watching the run"

    metrics_port: int | None = setting(
        None,
        "serve Prometheus metrics on http://METRICS_HOST:PORT/metrics (0: any free port)",
        metavar="PORT",
        default_text="off",
    )
    metrics_host: str = setting("127.0.0.1", "the address the metrics endpoint listens on")

    def __post_init__(self) -> None:
        check_port("metrics_port", self.metrics_port)
        if not self.metrics_host:
            raise ValueError("metrics_host must not be empty")
        super().__post_init__()
