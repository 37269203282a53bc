"""``ranger-ps local``: a whole cluster on this machine, trained end to end, with one report."""

from __future__ import annotations

import argparse

from ranger_ps.cli.common import ensure_folder, log_effective_config, megabytes, token
from ranger_ps.cli.flags import add_settings, compact_usage, settings_from_args
from ranger_ps.config.common import CommonSettings
from ranger_ps.config.local import LocalSettings
from ranger_ps.config.train import TrainConfig


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "local", help="run a whole cluster (shards and workers) on this machine and train", allow_abbrev=False
    )
    add_settings(p, LocalSettings)
    add_settings(p, TrainConfig, exclude=("num_workers",))
    add_settings(p, CommonSettings)
    p.usage = compact_usage(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ranger_ps.observability.report import write_report
    from ranger_ps.orchestration.local import RunContext, plan_local, run_local

    local = settings_from_args(LocalSettings, args)
    config = settings_from_args(TrainConfig, args, num_workers=local.workers)
    for path, flag in ((local.run_dir, "--run-dir"), (local.report.parent if local.report else None, "--report")):
        if path is not None:
            ensure_folder(path, flag if flag != "--report" else "the folder of --report")
    # an unknown model, dataset or device, or a model or schedule the cluster cannot run, is the only line printed
    planned = plan_local(config, local)
    log_effective_config("local", config.to_dict(), args.config_file)
    context = RunContext(use_uvloop=args.uvloop, log_level=args.log_level, token=token(args))
    report = run_local(config, local, context, planned=planned)
    report["config_file"] = str(args.config_file) if args.config_file is not None else None
    if local.report:
        write_report(local.report, report)
    print(
        f"test accuracy {report['test_accuracy']:.4f} | {report['steps']} steps | "
        f"pushed {megabytes(report['bytes_pushed'])} (dense {megabytes(report['bytes_pushed_dense'])}) | "
        f"pulled {megabytes(report['bytes_pulled'])} | {report['wall_seconds']:.1f}s | "
        f"{report['workers']} workers, {report['shards']} shards"
    )
    return 0
