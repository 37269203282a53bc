"""``ranger-ps worker``: train against running shards, and ``ranger-ps evaluate``: score what they hold."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from ranger_ps.cli.common import client_security, ensure_folder, log_effective_config, megabytes
from ranger_ps.cli.flags import add_settings, compact_usage, settings_from_args
from ranger_ps.config.client import ClusterSettings
from ranger_ps.config.common import ClientSecuritySettings, CommonSettings
from ranger_ps.config.train import TrainConfig
from ranger_ps.config.worker import WorkerSettings
from ranger_ps.errors import UserError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("worker", help="train against running servers", allow_abbrev=False)
    add_settings(p, WorkerSettings, required=("servers",))
    add_settings(p, TrainConfig)
    add_settings(p, ClientSecuritySettings)
    add_settings(p, CommonSettings)
    p.usage = compact_usage(p)
    p.set_defaults(run=run_worker)

    p = sub.add_parser("evaluate", help="evaluate the model currently held by running servers", allow_abbrev=False)
    add_settings(p, ClusterSettings, exclude=("worker_id",), required=("servers",))
    p.add_argument("--json", action="store_true", help="print JSON")
    add_settings(p, TrainConfig, exclude=("num_workers",))
    add_settings(p, ClientSecuritySettings)
    add_settings(p, CommonSettings)
    p.usage = compact_usage(p)
    p.set_defaults(run=run_evaluate)


def run_worker(args: argparse.Namespace) -> int:
    from ranger_ps.files import write_text_atomically
    from ranger_ps.observability.report import write_report
    from ranger_ps.observability.watch import RunWatcher
    from ranger_ps.worker.train import result_report, train
    from ranger_ps.workloads.job import check_job

    config = settings_from_args(TrainConfig, args)
    worker = settings_from_args(WorkerSettings, args)
    assert worker.servers is not None  # a required flag
    if worker.report is not None:
        ensure_folder(worker.report.parent, "the folder of --report")
    check_job(config)
    try:
        watcher = RunWatcher(
            "worker", step_log=worker.metrics_csv, metrics_port=worker.metrics_port, metrics_host=worker.metrics_host
        )
    except OSError as exc:
        raise UserError(f"cannot open the metrics outputs: {exc}") from None
    log_effective_config("worker", config.to_dict(), args.config_file)  # after every usage error
    if watcher.metrics_port is not None and worker.ready_file is not None:
        write_text_atomically(worker.ready_file, json.dumps({"metrics_port": watcher.metrics_port, "pid": os.getpid()}))
    with watcher:
        result = train(
            config,
            worker.servers,
            worker_id=worker.worker_id,
            on_step=watcher.on_step,
            on_eval=watcher.on_eval,
            use_uvloop=args.uvloop,
            security=client_security(args),
        )
    report = result_report(result, config, worker.servers)
    report["config_file"] = str(args.config_file) if args.config_file is not None else None
    if worker.report:
        write_report(worker.report, report)
    print(
        f"worker {result.worker_id}: test accuracy {result.evaluation.test_accuracy:.4f}, "
        f"{result.steps} steps, pushed {megabytes(result.bytes_pushed)}, pulled {megabytes(result.bytes_pulled)}, "
        f"{result.wall_seconds:.1f}s"
    )
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    from ranger_ps.workloads.evaluation import evaluate_cluster

    config = settings_from_args(TrainConfig, args)
    evaluation, _ = evaluate_cluster(config, args.servers, use_uvloop=args.uvloop, security=client_security(args))
    if args.json:
        print(json.dumps(dataclasses.asdict(evaluation)))
    else:
        print(f"test accuracy {evaluation.test_accuracy:.4f}, test loss {evaluation.test_loss:.4f}")
    return 0
