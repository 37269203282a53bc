"""``ranger-ps bench``: convergence, wire, apply and train benchmarks (docs/convergence.md, docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ranger_ps.cli.flags import add_settings, settings_from_args
from ranger_ps.config.common import CommonSettings
from ranger_ps.config.train import TrainConfig
from ranger_ps.errors import UserError

log = logging.getLogger("ranger_ps")


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
    from ranger_ps.bench.suite import add_bench_parsers

    p = sub.add_parser("bench", help="benchmarks (see docs/)", allow_abbrev=False)
    bench = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    b = bench.add_parser(
        "convergence",
        help="accuracy and bytes pushed across push fractions, error feedback and rules",
        description="Train each combination in-process (one worker) and tabulate test accuracy and bytes pushed.",
        allow_abbrev=False,
    )
    b.add_argument("--datasets", type=_names, default=["digits", "synthetic"], help="comma-separated datasets")
    b.add_argument("--rules", type=_names, default=["sgd", "ranger"], help="comma-separated rules")
    b.add_argument(
        "--fractions", type=_fractions, default=[1.0, 0.25, 0.05, 0.01], help="comma-separated push fractions"
    )
    b.add_argument("--shards", type=int, default=2, help="shards the byte counts assume (default: 2)")
    b.add_argument("--json", action="store_true", help="print JSON rows instead of a Markdown table")
    b.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    add_settings(b, TrainConfig, exclude=("num_workers",), defaults={"block_size": 256})
    add_settings(b, CommonSettings)
    b.set_defaults(run=run_convergence)
    add_bench_parsers(bench)
    for name in ("wire", "apply", "train"):
        if not any("--log-level" in a.option_strings for a in bench.choices[name]._actions):
            add_settings(bench.choices[name], CommonSettings)


def run_convergence(args: argparse.Namespace) -> int:
    from ranger_ps.bench.convergence import CaseResult, markdown_table, results_json, run_grid
    from ranger_ps.observability.progress import Progress
    from ranger_ps.workloads.data import DATASETS

    for name in args.datasets:
        if name not in DATASETS:
            raise UserError(f"unknown dataset {name!r}; choose from {', '.join(sorted(DATASETS))}")
    base = settings_from_args(TrainConfig, args)
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
