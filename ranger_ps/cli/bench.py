"""``ranger-ps bench``: convergence, wire, apply, train and link benchmarks (docs/convergence.md,
docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from ranger_ps.bench.settings import ApplySettings, ConvergenceSettings, LinkSettings, TrainSettings, WireSettings
from ranger_ps.cli.flags import add_settings, compact_usage, settings_from_args
from ranger_ps.config.common import CommonSettings
from ranger_ps.config.train import TrainConfig
from ranger_ps.errors import UserError
from ranger_ps.settings import message_with_flag

log = logging.getLogger("ranger_ps")

S = TypeVar("S")


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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", help="benchmarks (see docs/)", allow_abbrev=False)
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    b = bench.add_parser(
        "convergence",
        help="accuracy and bytes pushed across push fractions, workers, local steps, push dtypes and rules",
        description="Train every combination of the axes (one worker in this process, more as a real local "
        "cluster), each seed, and tabulate the mean test accuracy against dense and against dense at equal bytes.",
        allow_abbrev=False,
    )
    add_settings(b, ConvergenceSettings)
    b.add_argument("--json", action="store_true", help="print JSON rows instead of a Markdown table")
    b.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    add_settings(
        b, TrainConfig, exclude=("num_workers", "local_steps", "push_dtype", "seed"), defaults={"block_size": 64}
    )
    add_settings(b, CommonSettings)
    b.usage = compact_usage(b)
    b.set_defaults(run=run_convergence)
    add_bench_parsers(bench)


def run_convergence(args: argparse.Namespace) -> int:
    from ranger_ps.bench.convergence import CaseResult, markdown_table, results_json, run_grid
    from ranger_ps.observability.progress import Progress
    from ranger_ps.workloads.data import DATASETS

    settings = _settings(ConvergenceSettings, args)
    for name in settings.datasets:
        if name not in DATASETS:
            raise UserError(f"unknown dataset {name!r}; choose from {', '.join(sorted(DATASETS))}")
    base = settings_from_args(TrainConfig, args)
    axes = (
        settings.datasets, settings.rules, settings.workers, settings.local_steps_axis, settings.push_dtypes,
        settings.fractions, settings.seeds,
    )  # fmt: skip
    bar = Progress(math.prod(len(axis) for axis in axes), "convergence")
    done = 0

    def on_case(result: CaseResult) -> None:
        nonlocal done
        done += 1
        bar.update(done, last=f"{result.dataset}/{result.rule}/W{result.workers}/{result.push_fraction:g}")
        log.info(
            "%s %s W=%d H=%d %s push_fraction=%g seed=%d: accuracy %.4f, %.2f MB pushed (%.1f%% of dense), %.1fs",
            result.dataset, result.rule, result.workers, result.local_steps, result.push_dtype, result.push_fraction,
            result.seed, result.test_accuracy, result.bytes_pushed / 1e6, 100 * result.push_ratio, result.seconds,
        )  # fmt: skip

    try:
        results = run_grid(base, settings, on_case=on_case)
    finally:
        bar.close()
    table = markdown_table(results)
    if args.out:
        args.out.write_text(table + "\n")
    print(json.dumps(results_json(results), indent=2) if args.json else table)
    return 0


# -- wire, apply, train, link ------------------------------------------------------------------------


def _settings(cls: type[S], args: argparse.Namespace, **overrides: Any) -> S:
    """A benchmark's settings from its flags; a value they refuse is a user error naming the flag."""
    try:
        return settings_from_args(cls, args, **overrides)
    except ValueError as exc:
        raise UserError(message_with_flag(cls, str(exc))) from None


def _emit(
    args: argparse.Namespace,
    result: dict[str, Any],
    table: Callable[[dict[str, Any]], str],
    plot: Callable[[dict[str, Any], Path], None] | None,
) -> int:
    """Print the result (JSON with ``--json``, else Markdown); write it to ``--out`` and draw ``--plot``
    (a benchmark without a plot has no ``--plot``)."""
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if plot is not None and args.plot:
        plot(result, args.plot)
    print(json.dumps(result) if args.json else table(result), flush=True)
    return 0


def run_wire(args: argparse.Namespace) -> int:
    from ranger_ps.bench.plots import plot_wire
    from ranger_ps.bench.tables import wire_table
    from ranger_ps.bench.wire import run_wire as measure

    return _emit(args, measure(_settings(WireSettings, args, use_uvloop=args.uvloop)), wire_table, plot_wire)


def run_apply(args: argparse.Namespace) -> int:
    """``bench apply``, with the shard's push path timed through the server's own store."""
    from ranger_ps.bench.apply import run_apply as measure
    from ranger_ps.bench.plots import plot_apply
    from ranger_ps.bench.tables import apply_table
    from ranger_ps.server.store import ShardStore

    return _emit(args, measure(_settings(ApplySettings, args), server_store=ShardStore), apply_table, plot_apply)


def run_train(args: argparse.Namespace) -> int:
    from ranger_ps.bench.plots import plot_train
    from ranger_ps.bench.tables import train_table
    from ranger_ps.bench.train import run_train as measure

    return _emit(
        args,
        measure(_settings(TrainSettings, args, in_process=args.single, use_uvloop=args.uvloop)),
        train_table,
        plot_train,
    )


def run_link(args: argparse.Namespace) -> int:
    """``bench link``: needs root and iproute2 (a user error without them)."""
    from ranger_ps.bench.link import link_table
    from ranger_ps.bench.link import run_link as measure

    return _emit(args, measure(_settings(LinkSettings, args, use_uvloop=args.uvloop)), link_table, None)


_BENCHMARKS = (
    (
        "wire",
        WireSettings,
        run_wire,
        "full-model pull and dense push + apply beside raw TCP and torch.distributed.rpc",
        "Measure full-model pull and dense push + apply over real shard processes on loopback, beside the same "
        "bytes over raw TCP sockets and the torch.distributed.rpc parameter server, in one run.",
    ),
    (
        "apply",
        ApplySettings,
        run_apply,
        "server-side update throughput per rule beside memcpy",
        "Apply each update rule (ranger_ps.algorithm.rules) to a model's blocks and compare the throughput with a "
        "plain torch copy of the same bytes (the memory-bandwidth limit).",
    ),
    (
        "train",
        TrainSettings,
        run_train,
        "steps/s and bytes per step of the default job per push fraction, beside torch SGD and DDP",
        "Train the default job (a local cluster) at each push fraction, then the same model in one process with "
        "torch.optim.SGD and with torch DistributedDataParallel (gloo).",
    ),
    (
        "link",
        LinkSettings,
        run_link,
        "seconds to a test accuracy over an emulated slow link (tc), per push fraction and for DDP (needs root)",
        "Shape loopback in a private network namespace per link rate (tc tbf) and time how long ranger-ps at each "
        "push fraction and torch DistributedDataParallel (gloo) take to reach a test accuracy over it, every "
        "process of a system inside the namespace. Needs root and iproute2 (ip, tc).",
    ),
)
"""(name, settings, runner, help, description) of the benchmarks measured against the machine and baselines."""

_PLOTTED = ("wire", "apply", "train")
"""The benchmarks that draw ``--plot``."""


def add_bench_parsers(bench: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``wire``, ``apply``, ``train`` and ``link`` subparsers to ``ranger-ps bench``.

    Their flags come from the benchmarks' settings (:mod:`ranger_ps.bench.settings`), the output
    flags and the common ``--log-level`` and ``--uvloop``. Each sets ``run`` (a callable taking the
    parsed arguments and returning the exit code), so the command line dispatches with ``args.run(args)``.
    """
    for name, settings, run, help_text, description in _BENCHMARKS:
        parser = bench.add_parser(name, help=help_text, description=description, allow_abbrev=False)
        add_settings(parser, settings)
        parser.add_argument("--json", action="store_true", help="print one JSON object instead of a Markdown table")
        parser.add_argument("--out", type=Path, help="also write the JSON object to this file")
        if name in _PLOTTED:
            parser.add_argument("--plot", type=Path, help="draw a PNG bar chart here (needs matplotlib)")
        add_settings(parser, CommonSettings, exclude=("config",))
        parser.usage = compact_usage(parser)
        parser.set_defaults(run=run)
