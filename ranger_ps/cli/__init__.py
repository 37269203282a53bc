"""The ``ranger-ps`` command line: the edge of the library, and the only code that starts the
server and worker applications.

One module per command (:mod:`.server`, :mod:`.worker` (also ``evaluate``), :mod:`.local`, :mod:`.launch`,
:mod:`.admin` (``status``, ``health``, ``checkpoint``), :mod:`.bench`); their flags are generated
from the settings dataclasses (:mod:`.flags`), and may also come from ``RANGER_PS_*`` variables or
a ``--config`` file (:mod:`.environment`). User errors (bad flags, unreachable servers, mismatched
models) print one line and exit with code 2; a cluster that fails while training exits with 1;
Ctrl-C exits with 130. Logging handlers are configured here and nowhere else.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

from ranger_ps.cli import admin
from ranger_ps.cli.common import EXIT_CLUSTER_ERROR, EXIT_INTERRUPTED, EXIT_USER_ERROR
from ranger_ps.cli.environment import (
    apply_config_file,
    apply_environment,
    env_var,
    own_arguments,
    selected_parsers,
    unknown_variables,
)
from ranger_ps.cli.flags import settings_from_args
from ranger_ps.errors import ClusterError, UserError
from ranger_ps.settings import TOKEN_VARIABLE
from ranger_ps.version import __version__

if TYPE_CHECKING:
    from ranger_ps.config.train import TrainConfig

#: Commands whose parser and run import no torch (a container health check runs every few seconds).
LIGHT_COMMANDS = ("health",)

__all__ = ["apply_config_file", "apply_environment", "build_parser", "env_var", "main", "train_config_from_args"]


def build_parser(*, light: bool = False) -> argparse.ArgumentParser:
    """The ``ranger-ps`` argument parser; ``light``: only the commands that import no torch (the
    admin ones: ``health``, ``status``, ``checkpoint``), enough for ``--version`` and ``health``."""
    parser = argparse.ArgumentParser(
        prog="ranger-ps", description="A sharded parameter server for PyTorch training.", allow_abbrev=False
    )
    parser.add_argument("--version", action="version", version=f"ranger-ps {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (admin,) if light else _command_modules():
        module.register(sub)
    return parser


def _command_modules() -> tuple[ModuleType, ...]:
    from ranger_ps.cli import bench, launch, local, server, worker

    return (server, worker, local, launch, admin, bench)


def _light(argv: Sequence[str]) -> bool:
    """Whether ``argv`` needs only the light parser: ``--version``, or a light command."""
    first = next((token for token in argv if token != "--"), None)
    return first == "--version" or first in LIGHT_COMMANDS


def train_config_from_args(args: argparse.Namespace, **overrides: object) -> TrainConfig:
    """The :class:`TrainConfig` parsed flags describe (settings without a flag keep their defaults)."""
    from ranger_ps.config.train import TrainConfig

    return settings_from_args(TrainConfig, args, **overrides)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ranger-ps`` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    light = _light(argv)
    parser = build_parser(light=light)
    if not light:
        for name in unknown_variables(parser, os.environ):
            print(f"ranger-ps: warning: {name} is not a setting of any command; it is ignored", file=sys.stderr)
    own = own_arguments(parser, argv)  # not the arguments of a script that launch runs
    config_file = apply_config_file(parser, own, os.environ)
    apply_environment(parser, os.environ, own)  # the one place the environment is read (after the file: it wins)
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command's own parser: "ranger-ps local: error: unrecognized arguments: ..."
        selected_parsers(parser, argv)[-1].error(f"unrecognized arguments: {' '.join(unknown)}")
    args.config_file = config_file
    args.env_token = os.environ.get(TOKEN_VARIABLE)
    _configure_logging(args.log_level)
    from ranger_ps.wire.allocator import tune_allocator

    tune_allocator()
    try:
        code: int = args.run(args)
        return code
    except UserError as exc:
        print(f"ranger-ps {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ClusterError as exc:
        print(f"ranger-ps {args.command}: failed: {exc}", file=sys.stderr)
        return EXIT_CLUSTER_ERROR
    except KeyboardInterrupt:
        print(f"ranger-ps {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # whoever read the output went away (``| head``): nothing left to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_CLUSTER_ERROR
