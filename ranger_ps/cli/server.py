"""``ranger-ps server``: serve one shard until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse

from ranger_ps.cli.common import server_security
from ranger_ps.cli.flags import add_settings, compact_usage, settings_from_args
from ranger_ps.config.common import CommonSettings
from ranger_ps.config.server import ServerConfig


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("server", help="run one parameter-server shard", allow_abbrev=False)
    add_settings(p, ServerConfig)
    add_settings(p, CommonSettings)
    p.usage = compact_usage(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ranger_ps.server.main import main

    config = settings_from_args(ServerConfig, args)
    return main(config, server_security(args), use_uvloop=args.uvloop)
