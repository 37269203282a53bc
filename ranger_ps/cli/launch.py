"""``ranger-ps launch``: the user's own training script on a cluster, as torchrun starts one."""

from __future__ import annotations

import argparse

from ranger_ps.cli.common import ensure_folder, token
from ranger_ps.cli.flags import add_settings, compact_usage, settings_from_args
from ranger_ps.config.common import CommonSettings
from ranger_ps.config.launch import LaunchSettings
from ranger_ps.errors import UserError

EPILOG = """\
Each copy of the script gets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and RANGER_PS_SERVERS.
In the script, Ranger(model.parameters(), servers="env") trains on the cluster (and in the process
when it was not launched), and ranger_ps.rank() / ranger_ps.world_size() pick this copy's part of
the data. Flags after the script (or -m MODULE) go to the script.

examples:
  ranger-ps launch --workers 4 train.py --epochs 10
  ranger-ps launch --workers 2 --checkpoint-dir ckpt -m mypackage.train
  ranger-ps launch --workers 2 --checkpoint-dir ckpt --resume -m mypackage.train
"""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "launch",
        help="run copies of your own training script against shards it starts (or --servers), like torchrun",
        description="Start shards (or use --servers) and --workers copies of SCRIPT (or -m MODULE), supervise them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument("-m", "--module", action="store_true", help="TARGET is a module to run as python -m TARGET")
    p.add_argument("target", nargs="?", metavar="SCRIPT|MODULE", help="the training script (or, with -m, the module)")
    p.add_argument("target_args", nargs=argparse.REMAINDER, metavar="ARGS", help="arguments for the script")
    add_settings(p, LaunchSettings)
    add_settings(p, CommonSettings)
    p.usage = compact_usage(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ranger_ps.orchestration.launch import LaunchTarget, run_launch

    if args.target is None:
        raise UserError("give the training script to run (ranger-ps launch [FLAGS] SCRIPT [ARGS]), or -m MODULE")
    settings = settings_from_args(LaunchSettings, args)
    if settings.run_dir is not None:
        ensure_folder(settings.run_dir, "--run-dir")
    if settings.checkpoint_dir is not None:
        ensure_folder(settings.checkpoint_dir, "--checkpoint-dir")
    target = LaunchTarget(args.target, module=args.module, args=tuple(args.target_args))
    result = run_launch(settings, target, log_level=args.log_level, use_uvloop=args.uvloop, env_token=token(args))
    restarts = sum(result.restarts.values())
    print(
        f"{len(result.finished)} of {settings.workers} workers finished | {result.wall_seconds:.1f}s | "
        f"servers {','.join(result.servers)}" + (f" | {restarts} restarts" if restarts else "")
    )
    return 0
