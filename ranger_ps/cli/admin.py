"""Looking at a cluster and its files: ``status``, ``health`` and ``checkpoint inspect|export``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ranger_ps.cli.common import EXIT_CLUSTER_ERROR, client_security
from ranger_ps.cli.flags import add_settings, compact_usage
from ranger_ps.config.client import ClusterSettings
from ranger_ps.config.common import ClientSecuritySettings, CommonSettings
from ranger_ps.errors import UserError
from ranger_ps.wire.rpc import parse_servers
from ranger_ps.wire.stats import ShardStats

if TYPE_CHECKING:
    import torch


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("checkpoint", help="look into and export checkpoints", allow_abbrev=False)
    actions = p.add_subparsers(dest="checkpoint_command", required=True, metavar="ACTION")
    c = actions.add_parser("inspect", help="what a checkpoint folder holds", allow_abbrev=False)
    c.add_argument("directory", type=Path, help="the --checkpoint-dir of the servers")
    c.add_argument("--json", action="store_true", help="print JSON")
    add_settings(c, CommonSettings)
    c.usage = compact_usage(c)
    c = actions.add_parser(
        "export",
        help="write plain weights a model loads with load_state_dict",
        description="Assemble every parameter from the newest complete generation (the files of one shard "
        "count, every shard present; the newest good file of each shard) and save them with torch.save as "
        "{name: tensor} (load with torch.load(path, weights_only=True)). Refuses when no generation is complete. "
        "Parameters are named as the workers' optimizer named them: with Ranger(model.named_parameters()) (and "
        "every ranger-ps worker) as the model names them; with Ranger(model.parameters()) 0.0, 0.1, ... in order, "
        "which --model turns into the model's names.",
        allow_abbrev=False,
    )
    c.add_argument("directory", type=Path, help="the --checkpoint-dir of the servers")
    c.add_argument("--out", type=Path, required=True, help="output file, e.g. model.pt")
    c.add_argument(
        "--model",
        help="the model the weights are for, as the worker's --model (mlp, cnn, vgg, vgg-bn, charlm, or "
        "package.module:function returning an nn.Module): keys are its named_parameters() names (positional "
        "keys 0.0, 0.1, ... are mapped in order), and the count, shapes and dtypes must match it",
    )
    c.add_argument(
        "--dataset",
        default="digits",
        help="with a built-in --model, the worker's --dataset, which sizes the model (default: digits)",
    )
    add_settings(c, CommonSettings)
    c.usage = compact_usage(c)
    p.set_defaults(run=run_checkpoint)

    p = sub.add_parser(
        "health",
        help="check a server with the standard gRPC health service (exit 0 when SERVING)",
        description="For container health checks: asks grpc.health.v1.Health/Check and exits 0 only when SERVING.",
        allow_abbrev=False,
    )
    p.add_argument("--server", default="127.0.0.1:50051", help="HOST:PORT to check (default: 127.0.0.1:50051)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer (default: 3)")
    add_settings(p, ClientSecuritySettings)
    add_settings(p, CommonSettings)
    p.usage = compact_usage(p)
    p.set_defaults(run=run_health)

    p = sub.add_parser("status", help="show what running servers hold", allow_abbrev=False)
    add_settings(p, ClusterSettings, exclude=("worker_id",), required=("servers",))
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for each server (default: 5)")
    add_settings(p, ClientSecuritySettings)
    add_settings(p, CommonSettings)
    p.usage = compact_usage(p)
    p.set_defaults(run=run_status)


def run_checkpoint(args: argparse.Namespace) -> int:
    """``checkpoint inspect|export``: always on one generation, the newest complete one.

    A generation is the files one shard count wrote. ``export`` assembles the newest complete one
    (every shard has a good file) and names it; blocks of other generations never mix in. With no
    complete generation it refuses (exit 2). Both print one warning line on stderr when the newest
    generation is incomplete or several are present.
    """
    from ranger_ps.storage import checkpoint

    if not args.directory.is_dir():
        raise UserError(f"{args.directory} is not a folder")
    files = checkpoint.list_checkpoints(args.directory)
    generations = checkpoint.load_generations(args.directory)
    if not any(g.checkpoints() for g in generations):
        raise UserError(f"{args.directory} holds no readable checkpoint (files: {sum(map(len, files.values()))})")
    chosen = checkpoint.newest_complete(generations)
    if args.checkpoint_command == "export":
        import torch

        if chosen is None:
            listed = "; ".join(g.describe() for g in generations)
            raise UserError(f"{args.directory} holds no complete generation ({listed}): nothing consistent to export")
        _warn(checkpoint.generations_warning(generations))
        try:
            weights = checkpoint.assemble_weights(chosen.checkpoints())
        except checkpoint.CheckpointError as exc:
            raise UserError(str(exc)) from None
        if args.model is not None:
            try:
                weights = checkpoint.named_state_dict(weights, _export_model(args.model, args.dataset))
            except ValueError as exc:
                raise UserError(f"--model {args.model}: {exc}") from None
        elif checkpoint.positional_names(weights):
            _warn(
                f"the parameters have no names (keys {', '.join(list(weights)[:2])}, ...: the workers' optimizer was "
                "given model.parameters()), so model.load_state_dict refuses them; export again with --model NAME "
                "to take the names from the model, or train with Ranger(model.named_parameters(), ...)"
            )
        used = ", ".join(p.name for s in range(chosen.num_shards) if (p := chosen.path(s)) is not None)
        torch.save(weights, args.out)
        print(
            f"wrote {len(weights)} parameters ({sum(t.numel() for t in weights.values())} elements) to {args.out} "
            f"from the {chosen.num_shards}-shard generation ({used})"
        )
        return 0
    summary = checkpoint.describe_folder(generations)
    _warn(summary["warning"])
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    head = [f"layout {summary['layout_fingerprint']}", f"block size {summary['block_size']}"]
    print(", ".join([*head, f"rule {summary['rule']['name']}", str(summary["consistency"])]))
    for name, shape, dtype in summary["parameters"]:
        print(f"  {name}: {tuple(shape)} {dtype}")
    for generation, entry in zip(generations, summary["generations"], strict=True):
        used = " (used by export)" if generation is chosen else ""
        print(f"generation of {generation.describe()}{used}")
        for shard in entry["shards"]:
            pushes = shard["counters"].get("pushes_applied", 0)
            print(
                f"  shard {shard['shard_id']}/{shard['num_shards']}: {shard['blocks']} blocks, {shard['elements']} "
                f"elements, versions {shard['version_sum']}, pushes applied {pushes}, files {', '.join(shard['files'])}"
            )
    return 0


def _export_model(spec: str, dataset: str) -> torch.nn.Module:
    """The model ``checkpoint export --model`` names the weights after (a built-in one sized by ``dataset``)."""
    from ranger_ps.workloads.models import MODELS, build_model

    if spec in MODELS:
        from ranger_ps.workloads.data import load_dataset

        data = load_dataset(dataset)
        return build_model(spec, data.input_shape, data.num_classes)
    return build_model(spec, (), 0)  # a bring-your-own model takes no shape


def _warn(warning: str | None) -> None:
    if warning is not None:
        print(f"ranger-ps checkpoint: warning: {warning}", file=sys.stderr)


def run_health(args: argparse.Namespace) -> int:
    from ranger_ps.client.admin import check_health

    try:
        parse_servers(args.server)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    status = check_health(args.server, timeout=args.timeout, security=client_security(args))
    print(f"{args.server}: {status}")
    return 0 if status == "SERVING" else EXIT_CLUSTER_ERROR


def run_status(args: argparse.Namespace) -> int:
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


def format_status_table(servers: Sequence[str], replies: Sequence[ShardStats | str]) -> str:
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
