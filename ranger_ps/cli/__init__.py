"""The ``ranger-ps`` command line: server, worker, local, evaluate, status.

User errors (bad flags, unreachable servers, mismatched models) print one line and exit with
code 2; a cluster that fails while training exits with 1; Ctrl-C exits with 130. Logging
handlers are configured here and nowhere else.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ranger_ps import __version__
from ranger_ps.config.train import TrainConfig
from ranger_ps.errors import ClusterError, UserError
from ranger_ps.wire.allocator import tune_allocator
from ranger_ps.wire.rpc import parse_servers

log = logging.getLogger("ranger_ps")

EXIT_USER_ERROR = 2
EXIT_CLUSTER_ERROR = 1
EXIT_INTERRUPTED = 130


def _servers(text: str) -> list[str]:
    try:
        return parse_servers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return names


def _fractions(text: str) -> list[float]:
    try:
        values = [float(v) for v in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"push fractions must be in (0, 1], got {text!r}")
    return values


def _add_server_security(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security and limits")
    group.add_argument(
        "--token-file",
        type=Path,
        help="require 'authorization: Bearer <token>' on every call but the health check (or set RANGER_PS_TOKEN)",
    )
    group.add_argument("--tls-cert", type=Path, help="serve TLS with this certificate chain (PEM)")
    group.add_argument("--tls-key", type=Path, help="the TLS private key (PEM)")
    group.add_argument("--tls-client-ca", type=Path, help="mutual TLS: require client certificates signed by this CA")
    group.add_argument(
        "--nan-policy",
        choices=["reject", "skip"],
        default="reject",
        help="a push with NaN or Inf: reject it (INVALID_ARGUMENT) or skip it; never partly applied (default: reject)",
    )
    group.add_argument("--max-workers", type=int, default=1024, help="registered workers allowed (default: 1024)")
    group.add_argument("--max-streams", type=int, default=64, help="concurrent calls per connection (default: 64)")
    group.add_argument("--max-message-mb", type=int, default=64, help="largest message accepted, MiB (default: 64)")


def _add_client_security(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security")
    group.add_argument(
        "--token-file", type=Path, help="send the token in this file with every call (or set RANGER_PS_TOKEN)"
    )
    group.add_argument("--tls-ca", type=Path, help="connect with TLS, trusting this CA (PEM)")
    group.add_argument("--tls-client-cert", type=Path, help="mutual TLS: this client certificate (PEM)")
    group.add_argument("--tls-client-key", type=Path, help="mutual TLS: its private key (PEM)")


def _token(args: argparse.Namespace) -> str | None:
    from ranger_ps.wire.security import read_token

    if args.token_file is not None:
        return read_token(args.token_file)
    token = getattr(args, "env_token", None)
    return token.strip() if token and token.strip() else None


def _pem(path: Path | None, what: str) -> bytes | None:
    from ranger_ps.wire.security import read_secret

    return read_secret(path, what) if path is not None else None


def client_security(args: argparse.Namespace) -> Any:
    """The :class:`~ranger_ps.wire.security.ClientSecurity` that a command's flags ask for."""
    from ranger_ps.wire.security import ClientSecurity

    return ClientSecurity(
        token=_token(args),
        tls_ca=_pem(getattr(args, "tls_ca", None), "--tls-ca"),
        tls_cert=_pem(getattr(args, "tls_client_cert", None), "--tls-client-cert"),
        tls_key=_pem(getattr(args, "tls_client_key", None), "--tls-client-key"),
    )


def _add_checkpointing(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("durability")
    group.add_argument(
        "--checkpoint-dir",
        type=Path,
        help="save checkpoints here and resume from the newest good one at start (default: none)",
    )
    group.add_argument(
        "--checkpoint-every",
        type=float,
        default=60.0,
        help="seconds between checkpoints; 0: only on stop (default: 60)",
    )
    group.add_argument(
        "--checkpoint-every-pushes", type=int, default=0, help="also checkpoint every N applied pushes (default: off)"
    )
    group.add_argument("--keep", type=int, default=3, help="checkpoint files kept per shard (default: 3)")


def _add_cluster(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("consistency and membership")
    group.add_argument(
        "--consistency",
        default="async",
        help="async (apply every push at once), ssp:K (a worker waits while more than K clocks ahead of the "
        "slowest live worker) or bsp (one combined update per clock) (default: async)",
    )
    group.add_argument(
        "--lease-seconds",
        type=float,
        default=5.0,
        help="a worker not heard from for this long leaves the ssp/bsp barriers (default: 5)",
    )
    group.add_argument(
        "--wait-timeout",
        type=float,
        default=120.0,
        help="the longest a pull waits at an ssp/bsp barrier before failing (default: 120)",
    )


def _add_worker_watching(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("watching the run")
    group.add_argument(
        "--metrics-csv",
        type=Path,
        metavar="FILE.csv",
        help="write per-step metrics here, evaluations beside it (and TensorBoard scalars when installed)",
    )
    group.add_argument(
        "--metrics-port", type=int, help="serve Prometheus metrics on this port (0: any free port; default: off)"
    )
    group.add_argument(
        "--metrics-host", default="127.0.0.1", help="the address the metrics endpoint listens on (default: 127.0.0.1)"
    )
    group.add_argument(
        "--ready-file", type=Path, help="with --metrics-port: write the bound metrics port here as JSON once it listens"
    )


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging verbosity"
    )
    parser.add_argument(
        "--uvloop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run event loops on uvloop (default: on)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE.toml",
        help="read flags from a TOML file (keys are flag names: push-fraction = 0.05); "
        "the environment and the command line win over it",
    )


def _betas(text: str) -> tuple[float, float]:
    try:
        first, second = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two numbers B1,B2, got {text!r}") from None
    return first, second


# (field, type, help) for every training flag; the flag is the field with dashes. Booleans become
# --x/--no-x. Defaults come from TrainConfig, so the help and the code cannot disagree.
_TRAIN_FLAGS: tuple[tuple[str, Any, str], ...] = (
    ("model", str, "mlp, cnn, vgg, charlm, or package.module:function returning an nn.Module"),
    (
        "dataset",
        str,
        "digits, synthetic[:k=v,...], cifar10:DIR, mnist:DIR, text:FILE, or package.module:function "
        "returning (train, test) datasets",
    ),
    ("epochs", int, "passes over the training set"),
    ("batch_size", int, "examples per step and worker"),
    ("rule", str, "server-side update rule: sgd, adamw or ranger (RAdam + Lookahead)"),
    ("lr", float, "learning rate (default per rule: sgd 0.05, adamw 0.003, ranger 0.01)"),
    ("momentum", float, "sgd momentum (default 0.9 for sgd; adamw and ranger take --betas)"),
    ("nesterov", bool, "sgd Nesterov momentum"),
    ("dampening", float, "sgd momentum dampening"),
    ("weight_decay", float, "L2 (sgd) or decoupled (adamw, ranger) weight decay"),
    ("betas", _betas, "B1,B2 moment decay rates of adamw/ranger (default 0.9,0.999 / 0.95,0.999)"),
    ("eps", float, "adamw/ranger denominator term (default 1e-8 / 1e-5)"),
    ("alpha", float, "ranger Lookahead step towards the slow weights"),
    ("k", int, "ranger Lookahead period, in updates"),
    ("n_sma_threshold", float, "ranger: RAdam rectifies once the SMA length exceeds this"),
    ("use_gc", bool, "gradient centralization on the worker (default: on for ranger only)"),
    ("push_fraction", float, "fraction of blocks pushed per step (1.0 = dense)"),
    ("error_feedback", bool, "keep the gradient of unpushed blocks for later steps"),
    ("subsample", float, "fraction of each minibatch the gradient is computed on"),
    ("warmup_steps", int, "steps over which the push density decays to --push-fraction"),
    ("warmup_start", float, "push density at the first warm-up step"),
    ("truncate_below", float, "server side: zero gradient entries with |g| below this (0 = off)"),
    ("truncation_residual", bool, "server side: keep what truncation removed and apply it later"),
    ("clip_value", float, "server side: clamp gradient entries to this magnitude"),
    ("clip_norm", float, "server side: cap each block's gradient L2 norm"),
    ("seed", int, "seeds model initialization, data order and block choice"),
    ("device", str, "cpu, cuda or cuda:N"),
    ("block_size", int, "elements per parameter block"),
    ("num_workers", int, "how many workers share the training set; each trains on every n-th example"),
    ("overlap", bool, "pull the next weights while the next step computes"),
    ("connect_timeout", float, "seconds to keep retrying servers that are not up yet"),
    ("retry_timeout", float, "seconds a push or pull keeps retrying a server that went away (restart, network)"),
)
_TRAIN_DEFAULTS = TrainConfig()


def _add_train(parser: argparse.ArgumentParser, *, with_num_workers: bool = True) -> None:
    group = parser.add_argument_group("training")
    for name, kind, text in _TRAIN_FLAGS:
        if name == "num_workers" and not with_num_workers:
            continue
        flag = "--" + name.replace("_", "-")
        field = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
        default = field.default
        shown = (
            "rule default"
            if default is None
            else ",".join(map(str, default))
            if isinstance(default, tuple)
            else default
        )
        if kind is bool:
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=f"{text} (default: {shown})"
            )
        else:
            group.add_argument(flag, type=kind, default=default, help=f"{text} (default: {shown})")


def train_config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """Build a :class:`TrainConfig` from parsed flags (fields missing from ``args`` keep defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    values.update(overrides)
    return TrainConfig(**values)


def train_config_to_argv(config: TrainConfig, *, skip: Sequence[str] = ()) -> list[str]:
    """The flags that make a worker use ``config`` (the inverse of :func:`train_config_from_args`)."""
    argv: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in skip or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, tuple):
            argv += [flag, ",".join(repr(v) for v in value)]
        else:
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv


def build_parser() -> argparse.ArgumentParser:
    """The full ``ranger-ps`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="ranger-ps",
        description="A sharded parameter server for PyTorch training.",
    )
    parser.add_argument("--version", action="version", version=f"ranger-ps {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("server", help="run one parameter-server shard")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 in containers)"
    )
    p.add_argument("--port", type=int, default=50051, help="port to listen on; 0 picks a free one (default: 50051)")
    p.add_argument("--shard-id", type=int, default=0, help="this shard's index (default: 0)")
    p.add_argument("--num-shards", type=int, default=1, help="number of shards (default: 1)")
    p.add_argument("--ready-file", type=Path, help="write {host, port, pid} as JSON here once serving")
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get on shutdown (default: 10)")
    p.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics on http://METRICS_HOST:PORT/metrics; 0 picks a free port (default: off)",
    )
    p.add_argument(
        "--metrics-host", default="127.0.0.1", help="address the metrics endpoint listens on (default: 127.0.0.1)"
    )
    _add_checkpointing(p)
    _add_server_security(p)
    _add_cluster(p)
    _add_common(p)

    p = sub.add_parser("worker", help="train against running servers")
    p.add_argument("--servers", type=_servers, required=True, help="HOST:PORT of every shard, in shard order")
    p.add_argument("--worker-id", type=int, help="this worker's id (default: assigned by the servers)")
    p.add_argument("--report", type=Path, help="write a JSON report here at the end")
    _add_train(p)
    _add_client_security(p)
    _add_worker_watching(p)
    _add_common(p)

    p = sub.add_parser("local", help="run a whole cluster (shards and workers) on this machine and train")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default: 2)")
    p.add_argument("--shards", type=int, default=2, help="server shards (default: 2)")
    p.add_argument("--report", type=Path, help="write a JSON report here at the end")
    p.add_argument("--run-dir", type=Path, help="keep the processes' logs here (default: a temporary folder)")
    p.add_argument(
        "--startup-timeout", type=float, default=60.0, help="seconds for the servers to come up (default: 60)"
    )
    _add_cluster(p)
    _add_train(p, with_num_workers=False)
    p.add_argument(
        "--token-file", type=Path, help="run the cluster with this token (servers require it, workers send it)"
    )
    group = p.add_argument_group("watching the run")
    group.add_argument(
        "--metrics-port",
        type=int,
        help="Prometheus endpoints: shard i on PORT+i, worker j on PORT+shards+j; 0: any free ports (default: off)",
    )
    group.add_argument(
        "--metrics-host", default="127.0.0.1", help="the address the metrics endpoints listen on (default: 127.0.0.1)"
    )
    group.add_argument(
        "--metrics-dir",
        type=Path,
        help="keep the workers' per-step CSVs here (default: REPORT-steps/ beside --report, else not kept)",
    )
    group.add_argument(
        "--plot",
        type=Path,
        metavar="FILE.png",
        help="draw loss and accuracy against steps and bytes pushed here (default: REPORT.png beside --report)",
    )
    _add_common(p)

    p = sub.add_parser("evaluate", help="evaluate the model currently held by running servers")
    p.add_argument("--servers", type=_servers, required=True, help="HOST:PORT of every shard, in shard order")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_train(p, with_num_workers=False)
    _add_client_security(p)
    _add_common(p)

    p = sub.add_parser("bench", help="benchmarks (see docs/)")
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    b = bench.add_parser(
        "convergence",
        help="accuracy and bytes pushed across push fractions, error feedback and rules",
        description="Train each combination in-process (one worker) and tabulate test accuracy and bytes pushed.",
    )
    b.add_argument("--datasets", type=_names, default=["digits", "synthetic"], help="comma-separated datasets")
    b.add_argument("--rules", type=_names, default=["sgd", "ranger"], help="comma-separated rules")
    b.add_argument(
        "--fractions", type=_fractions, default=[1.0, 0.25, 0.05, 0.01], help="comma-separated push fractions"
    )
    b.add_argument("--shards", type=int, default=2, help="shards the byte counts assume (default: 2)")
    b.add_argument("--json", action="store_true", help="print JSON rows instead of a Markdown table")
    b.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    _add_train(b, with_num_workers=False)
    b.set_defaults(block_size=256)
    _add_common(b)
    from ranger_ps.bench.suite import add_bench_parsers

    add_bench_parsers(bench)
    for name in ("wire", "apply", "train"):
        if not any("--log-level" in a.option_strings for a in bench.choices[name]._actions):
            _add_common(bench.choices[name])

    p = sub.add_parser("checkpoint", help="look into and export checkpoints")
    checkpoint = p.add_subparsers(dest="checkpoint_command", required=True, metavar="ACTION")
    c = checkpoint.add_parser("inspect", help="what a checkpoint folder holds")
    c.add_argument("directory", type=Path, help="the --checkpoint-dir of the servers")
    c.add_argument("--json", action="store_true", help="print JSON")
    _add_common(c)
    c = checkpoint.add_parser(
        "export",
        help="write plain weights a model loads with load_state_dict",
        description="Assemble every parameter from the newest good checkpoint of each shard and save them "
        "with torch.save as {name: tensor} (load with torch.load(path, weights_only=True)).",
    )
    c.add_argument("directory", type=Path, help="the --checkpoint-dir of the servers")
    c.add_argument("--out", type=Path, required=True, help="output file, e.g. model.pt")
    _add_common(c)

    p = sub.add_parser(
        "health",
        help="check a server with the standard gRPC health service (exit 0 when SERVING)",
        description="For container health checks: asks grpc.health.v1.Health/Check and exits 0 only when SERVING.",
    )
    p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT to check (default: 127.0.0.1:50051)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default: 3)")
    _add_client_security(p)
    _add_common(p)

    p = sub.add_parser("status", help="show what running servers hold")
    p.add_argument("--servers", type=_servers, required=True, help="HOST:PORT of every shard")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each server (default: 5)")
    _add_client_security(p)
    _add_common(p)
    return parser


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _cmd_server(args: argparse.Namespace) -> int:
    from ranger_ps.server.main import ServerOptions
    from ranger_ps.server.main import main as server_main
    from ranger_ps.wire.security import ServerSecurity

    options = ServerOptions(
        shard_id=args.shard_id,
        num_shards=args.num_shards,
        host=args.host,
        port=args.port,
        ready_file=args.ready_file,
        grace_seconds=args.grace,
        consistency=args.consistency,
        lease_seconds=args.lease_seconds,
        wait_seconds=args.wait_timeout,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        checkpoint_every_pushes=args.checkpoint_every_pushes,
        keep=args.keep,
        security=ServerSecurity(
            token=_token(args),
            tls_cert=_pem(args.tls_cert, "--tls-cert"),
            tls_key=_pem(args.tls_key, "--tls-key"),
            tls_client_ca=_pem(args.tls_client_ca, "--tls-client-ca"),
        ),
        nan_policy=args.nan_policy,
        max_workers=args.max_workers,
        max_streams=args.max_streams,
        max_message_mb=args.max_message_mb,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )
    return server_main(options, use_uvloop=args.uvloop)


def _print_effective_config(command: str, config: dict[str, Any], config_file: Path | None) -> None:
    """Log the settings a run uses (after the config file, the environment and the flags)."""
    source = f" (config file {config_file})" if config_file is not None else ""
    log.info("%s: effective config%s: %s", command, source, json.dumps(config, sort_keys=True))


def _cmd_worker(args: argparse.Namespace) -> int:
    from ranger_ps.observability.report import write_report
    from ranger_ps.observability.watch import RunWatcher
    from ranger_ps.worker.train import result_report, train

    config = train_config_from_args(args)
    _print_effective_config("worker", config.to_dict(), args.config_file)
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise UserError(f"--metrics-port must be in [0, 65535], got {args.metrics_port}")
    try:
        watcher = RunWatcher(
            "worker", step_log=args.metrics_csv, metrics_port=args.metrics_port, metrics_host=args.metrics_host
        )
    except OSError as exc:
        raise UserError(f"cannot open the metrics outputs: {exc}") from None
    if watcher.metrics_port is not None and args.ready_file is not None:
        from ranger_ps.files import write_text_atomically

        write_text_atomically(args.ready_file, json.dumps({"metrics_port": watcher.metrics_port, "pid": os.getpid()}))
    with watcher:
        result = train(
            config,
            args.servers,
            worker_id=args.worker_id,
            on_step=watcher.on_step,
            on_eval=watcher.on_eval,
            use_uvloop=args.uvloop,
            security=client_security(args),
        )
    report = result_report(result, config, args.servers)
    report["config_file"] = str(args.config_file) if args.config_file is not None else None
    if args.report:
        write_report(args.report, report)
    print(
        f"worker {result.worker_id}: test accuracy {result.evaluation.test_accuracy:.4f}, "
        f"{result.steps} steps, pushed {_mb(result.bytes_pushed)}, pulled {_mb(result.bytes_pulled)}, "
        f"{result.wall_seconds:.1f}s"
    )
    return 0


def _cmd_local(args: argparse.Namespace) -> int:
    from ranger_ps.orchestration.local import LocalOptions, run_local

    config = train_config_from_args(args, num_workers=args.workers)
    _print_effective_config("local", config.to_dict(), args.config_file)
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535 - args.shards - args.workers:
        raise UserError(f"--metrics-port must be in [0, {65535 - args.shards - args.workers}], got {args.metrics_port}")
    plot = args.plot if args.plot is not None else (args.report.with_suffix(".png") if args.report else None)
    options = LocalOptions(
        workers=args.workers,
        shards=args.shards,
        run_dir=args.run_dir,
        startup_timeout=args.startup_timeout,
        use_uvloop=args.uvloop,
        log_level=args.log_level,
        consistency=args.consistency,
        lease_seconds=args.lease_seconds,
        wait_seconds=args.wait_timeout,
        token_file=args.token_file,
        token=_token(args),
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        step_log_dir=args.metrics_dir or (args.report.parent / f"{args.report.stem}-steps" if args.report else None),
        plot=plot,
    )
    report = run_local(config, options)
    report["config_file"] = str(args.config_file) if args.config_file is not None else None
    if args.report:
        from ranger_ps.observability.report import write_report

        write_report(args.report, report)
    print(
        f"test accuracy {report['test_accuracy']:.4f} | {report['steps']} steps | "
        f"pushed {_mb(report['bytes_pushed'])} (dense {_mb(report['bytes_pushed_dense'])}) | "
        f"pulled {_mb(report['bytes_pulled'])} | {report['wall_seconds']:.1f}s | "
        f"{report['workers']} workers, {report['shards']} shards"
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ranger_ps.workloads.evaluation import evaluate_cluster

    config = train_config_from_args(args)
    evaluation, _ = evaluate_cluster(config, args.servers, use_uvloop=args.uvloop, security=client_security(args))
    if args.json:
        print(json.dumps(dataclasses.asdict(evaluation)))
    else:
        print(f"test accuracy {evaluation.test_accuracy:.4f}, test loss {evaluation.test_loss:.4f}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.bench != "convergence":
        code: int = args.run(args)
        return code
    from ranger_ps.bench.convergence import CaseResult, markdown_table, results_json, run_grid
    from ranger_ps.observability.progress import Progress
    from ranger_ps.workloads.data import DATASETS

    for name in args.datasets:
        if name not in DATASETS:
            raise UserError(f"unknown dataset {name!r}; choose from {', '.join(sorted(DATASETS))}")
    base = train_config_from_args(args)
    cases = len(args.datasets) * len(args.rules) * sum(1 if f >= 1 else 2 for f in args.fractions)
    bar = Progress(cases, "convergence")
    done = 0

    def on_case(result: CaseResult) -> None:
        nonlocal done
        done += 1
        bar.update(done, last=f"{result.dataset}/{result.rule}/{result.push_fraction:g}")
        log.info(
            "%s %s push_fraction=%g error_feedback=%s: accuracy %.4f, %.2f MB pushed (%.1f%% of dense), %.1fs",
            result.dataset, result.rule, result.push_fraction, result.error_feedback, result.test_accuracy,
            result.bytes_pushed / 1e6, 100 * result.push_ratio, result.seconds,
        )  # fmt: skip

    try:
        results = run_grid(
            base,
            datasets=args.datasets,
            rules=args.rules,
            fractions=args.fractions,
            shards=args.shards,
            on_case=on_case,
        )
    finally:
        bar.close()
    table = markdown_table(results)
    if args.out:
        args.out.write_text(table + "\n")
    print(json.dumps(results_json(results), indent=2) if args.json else table)
    return 0


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    from ranger_ps.storage import checkpoint

    if not args.directory.is_dir():
        raise UserError(f"{args.directory} is not a folder")
    files = checkpoint.list_checkpoints(args.directory)
    saved = checkpoint.load_cluster(args.directory)
    if not saved:
        raise UserError(f"{args.directory} holds no readable checkpoint (files: {sum(map(len, files.values()))})")
    if args.checkpoint_command == "export":
        import torch

        try:
            weights = checkpoint.assemble_weights(saved)
        except checkpoint.CheckpointError as exc:
            raise UserError(str(exc)) from None
        torch.save(weights, args.out)
        print(f"wrote {len(weights)} parameters ({sum(t.numel() for t in weights.values())} elements) to {args.out}")
        return 0
    summary = checkpoint.describe(saved, files)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    head = [f"layout {summary['layout_fingerprint']}", f"block size {summary['block_size']}"]
    print(", ".join([*head, f"rule {summary['rule']['name']}", str(summary["consistency"])]))
    for name, shape, dtype in summary["parameters"]:
        print(f"  {name}: {tuple(shape)} {dtype}")
    for shard in summary["shards"]:
        print(
            f"shard {shard['shard_id']}/{shard['num_shards']}: {shard['blocks']} blocks, {shard['elements']} elements, "
            f"versions {shard['version_sum']}, pushes applied {shard['counters'].get('pushes_applied', 0)}, "
            f"files {', '.join(shard['files'])}"
        )
    return 0


def _cmd_health(args: argparse.Namespace) -> int:
    from ranger_ps.client.admin import check_health

    try:
        parse_servers(args.server)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    status = check_health(args.server, timeout=args.timeout, security=client_security(args))
    print(f"{args.server}: {status}")
    return 0 if status == "SERVING" else EXIT_CLUSTER_ERROR


def _cmd_status(args: argparse.Namespace) -> int:
    from ranger_ps.client.admin import fetch_stats

    replies = fetch_stats(args.servers, timeout=args.timeout, use_uvloop=args.uvloop, security=client_security(args))
    if args.json:
        out = [
            {"address": a, "ok": not isinstance(r, str)} | ({"error": r} if isinstance(r, str) else r.to_plain())
            for a, r in zip(args.servers, replies, strict=True)
        ]
        print(json.dumps(out, indent=2))
    else:
        print(format_status_table(args.servers, replies))
    return 0 if all(not isinstance(r, str) for r in replies) else EXIT_CLUSTER_ERROR


def format_status_table(servers: Sequence[str], replies: Sequence[Any]) -> str:
    """A human-readable table of shard stats (one row per server)."""
    head = ("address", "shard", "state", "blocks", "MB", "versions", "pushes", "pulls", "live workers", "uptime")
    rows = [head]
    for address, r in zip(servers, replies, strict=True):
        if isinstance(r, str):
            rows.append((address, "-", "DOWN: " + r, "", "", "", "", "", "", ""))
            continue
        rows.append(
            (
                address,
                f"{r.shard_id}/{r.num_shards}",
                "ready" if r.initialized else "waiting for a worker",
                str(r.num_blocks),
                f"{r.nbytes / 1e6:.2f}",
                str(r.version_sum),
                str(r.pushes_applied),
                str(r.pulls_served),
                str(len(r.trainers)),
                f"{r.uptime_seconds:.0f}s",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


COMMANDS = {
    "server": _cmd_server,
    "worker": _cmd_worker,
    "local": _cmd_local,
    "evaluate": _cmd_evaluate,
    "status": _cmd_status,
    "health": _cmd_health,
    "checkpoint": _cmd_checkpoint,
    "bench": _cmd_bench,
}


ENV_PREFIX = "RANGER_PS_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_var(flag: str) -> str:
    """The environment variable that sets a flag: ``--push-fraction`` -> ``RANGER_PS_PUSH_FRACTION``."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def _selected_parsers(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[argparse.ArgumentParser]:
    """The parser and the (nested) subcommand parsers that ``argv`` selects."""
    chain = [parser]
    tokens = list(argv)
    while True:
        actions = [a for a in chain[-1]._actions if isinstance(a, argparse._SubParsersAction)]
        if not actions:
            return chain
        choice = next((t for t in tokens if t in actions[0].choices), None)
        if choice is None:
            return chain
        tokens = tokens[tokens.index(choice) + 1 :]
        chain.append(actions[0].choices[choice])


def apply_environment(parser: argparse.ArgumentParser, environ: Mapping[str, str], argv: Sequence[str]) -> None:
    """Let ``RANGER_PS_<FLAG>`` variables set the flags of the command ``argv`` runs.

    Containers set environment, not argv: every flag has a variable (``--push-fraction`` is
    ``RANGER_PS_PUSH_FRACTION``; booleans take 1/0, true/false, yes/no, on/off). Flags given on
    the command line still win. A value that does not parse is a usage error naming the variable
    (exit code 2).
    """
    for sub, action, flag in _flag_actions(parser, argv):
        name = env_var(flag)
        if name in environ:
            _set_default(sub, action, environ[name], f"{name}={environ[name]!r}")


def _flag_actions(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> Iterator[tuple[argparse.ArgumentParser, argparse.Action, str]]:
    """(parser, action, ``--long-flag``) of every settable flag of the command ``argv`` runs."""
    for sub in _selected_parsers(parser, argv):
        for action in sub._actions:
            long = [o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-")]
            if long and action.dest not in ("help", "version", "config"):
                yield sub, action, long[0]


def _set_default(sub: argparse.ArgumentParser, action: argparse.Action, raw: str, where: str) -> None:
    """Make ``raw`` (text as a user wrote it) the flag's default; a bad value is a usage error (exit 2)."""
    if isinstance(action, argparse.BooleanOptionalAction) or action.const is True:
        if raw.strip().lower() not in _TRUE | _FALSE:
            sub.error(f"{where}: expected one of {', '.join(sorted(_TRUE | _FALSE))}")
        value: Any = raw.strip().lower() in _TRUE
    else:
        try:
            value = action.type(raw) if callable(action.type) else raw
        except (argparse.ArgumentTypeError, ValueError) as exc:
            sub.error(f"{where}: {exc}")
        if action.choices is not None and value not in action.choices:
            sub.error(f"{where}: choose from {', '.join(map(str, action.choices))}")
    action.default = value
    action.required = False


def _config_path(argv: Sequence[str], environ: Mapping[str, str]) -> Path | None:
    """The ``--config FILE`` (or ``--config=FILE``, or ``RANGER_PS_CONFIG``) the command line asks for."""
    for i, token in enumerate(argv):
        if token == "--":
            break
        if token == "--config" and i + 1 < len(argv):
            return Path(argv[i + 1])
        if token.startswith("--config="):
            return Path(token.partition("=")[2])
    value = environ.get(ENV_PREFIX + "CONFIG", "").strip()
    return Path(value) if value else None


def _toml_text(value: Any) -> str:
    """A TOML value as the text a user would type on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(_toml_text(v) for v in value)
    return str(value)


def apply_config_file(parser: argparse.ArgumentParser, argv: Sequence[str], environ: Mapping[str, str]) -> Path | None:
    """Let a TOML file (``--config FILE``) set the flags of the command ``argv`` runs.

    Keys are flag names without the dashes (``push-fraction`` or ``push_fraction``); lists become
    comma-separated values (``betas = [0.9, 0.999]``). The environment and the command line win over
    the file. An unreadable file, a key that is not a flag of this command, or a bad value is a usage
    error naming the file and key (exit code 2). Returns the file read, if any.
    """
    path = _config_path(argv, environ)
    if path is None:
        return None
    chain = _selected_parsers(parser, argv)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        chain[-1].error(f"--config {path}: cannot read it ({exc.strerror or exc})")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        chain[-1].error(f"--config {path}: not valid TOML ({exc})")
    flags = {flag.lstrip("-"): (sub, action) for sub, action, flag in _flag_actions(parser, argv)}
    for key, value in table.items():
        flag = key.replace("_", "-")
        if flag not in flags:
            known = ", ".join(sorted(flags))
            chain[-1].error(f"--config {path}: {key!r} is not a flag of this command (known: {known})")
        if isinstance(value, dict):
            chain[-1].error(f"--config {path}: {key!r} must be a value, not a table")
        sub, action = flags[flag]
        _set_default(sub, action, _toml_text(value), f"--config {path}: {key} = {value!r}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ranger-ps`` console script; returns the exit code."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    config_file = apply_config_file(parser, argv, os.environ)
    apply_environment(parser, os.environ, argv)  # the one place the environment is read (after the file: it wins)
    args = parser.parse_args(argv)
    args.config_file = config_file
    # The token itself never travels in argv (process listings): only as a file or this variable.
    args.env_token = os.environ.get(ENV_PREFIX + "TOKEN")
    _configure_logging(args.log_level)
    tune_allocator()
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"ranger-ps {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except ClusterError as exc:
        print(f"ranger-ps {args.command}: failed: {exc}", file=sys.stderr)
        return EXIT_CLUSTER_ERROR
    except KeyboardInterrupt:
        print(f"ranger-ps {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
