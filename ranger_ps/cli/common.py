"""What several commands share: exit codes, security from flags and the environment, output helpers."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from ranger_ps.config.common import CommonSettings
from ranger_ps.errors import UserError
from ranger_ps.files import folder_problem
from ranger_ps.wire.security import ClientSecurity, ServerSecurity, read_secret, read_token

log = logging.getLogger("ranger_ps")

EXIT_USER_ERROR = 2
EXIT_CLUSTER_ERROR = 1
EXIT_INTERRUPTED = 130


def token(args: argparse.Namespace) -> str | None:
    """The token a command uses: ``--token-file``, else the ``RANGER_PS_TOKEN`` variable, else none."""
    if getattr(args, "token_file", None) is not None:
        return read_token(args.token_file)
    value = getattr(args, "env_token", None)
    return value.strip() if value and value.strip() else None


def _pem(path: Path | None, what: str) -> bytes | None:
    return read_secret(path, what) if path is not None else None


def client_security(args: argparse.Namespace) -> ClientSecurity:
    """The :class:`ClientSecurity` that a command's flags (and the environment's token) ask for."""
    return ClientSecurity(
        token=token(args),
        tls_ca=_pem(getattr(args, "tls_ca", None), "--tls-ca"),
        tls_cert=_pem(getattr(args, "tls_client_cert", None), "--tls-client-cert"),
        tls_key=_pem(getattr(args, "tls_client_key", None), "--tls-client-key"),
    )


def server_security(args: argparse.Namespace) -> ServerSecurity:
    """The :class:`ServerSecurity` that ``server``'s flags (and the environment's token) ask for."""
    return ServerSecurity(
        token=token(args),
        tls_cert=_pem(args.tls_cert, "--tls-cert"),
        tls_key=_pem(args.tls_key, "--tls-key"),
        tls_client_ca=_pem(args.tls_client_ca, "--tls-client-ca"),
    )


def common_settings(args: argparse.Namespace) -> CommonSettings:
    """The flags every command takes."""
    return CommonSettings(log_level=args.log_level, uvloop=args.uvloop, config=args.config)


def log_effective_config(command: str, config: dict[str, Any], config_file: Path | None) -> None:
    """Log the settings a run uses (after the config file, the environment and the flags)."""
    source = f" (config file {config_file})" if config_file is not None else ""
    log.info("%s: effective config%s: %s", command, source, json.dumps(config, sort_keys=True, default=str))


def megabytes(n: int) -> str:
    """``12.34 MB`` (decimal megabytes, as the reports' byte counts)."""
    return f"{n / 1e6:.2f} MB"


def ensure_folder(path: Path, flag: str) -> None:
    """Create the folder ``path`` (given as ``flag``) if needed, before any work starts.

    Raises:
        UserError: the path is a file, or the folder cannot be created (one line naming the flag).
    """
    problem = folder_problem(path)
    if problem is not None:
        raise UserError(f"{flag} {path} {problem}")
