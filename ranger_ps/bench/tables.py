"""The benchmarks' results as Markdown: one table per benchmark, its targets below it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def fmt(value: Any, digits: int = 2) -> str:
    """A figure with ``digits`` decimals, ``n/a`` for a missing one."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _target_lines(targets: dict[str, Any]) -> list[str]:
    lines = []
    for key, t in targets.items():
        verdict = "n/a" if t["met"] is None else "met" if t["met"] else "MISSED"
        lines.append(f"- {t['meaning']}: {fmt(t['value'])} (target {t['target']:g}) {verdict}  [{key}]")
    return lines


def wire_table(result: dict[str, Any]) -> str:
    """The wire result as Markdown."""
    r = result
    rows = [
        (f"ranger-ps (gRPC, {r['settings']['shards']} shards)", r["pull_gbps"], r["push_gbps"]),
        (f"torch.distributed.rpc (TensorPipe {r['settings']['torch_rpc_transport']})",
         r["torch_rpc_pull_gbps"], r["torch_rpc_push_gbps"]),
        ("bare grpc.aio streams (no frames, no tensors)", r["grpc_pull_gbps"], r["grpc_push_gbps"]),
        ("raw TCP (sendall / recv_into), median", r["tcp_gbps"], r["tcp_send_gbps"]),
        ("raw TCP, fastest repetition (the limit)", r.get("tcp_best_gbps"), r.get("tcp_send_best_gbps")),
    ]  # fmt: skip
    lines = [
        f"wire: {r['model_bytes'] / 1e6:.0f} MB model ({r['settings']['tensors']} tensors, "
        f"{r.get('num_blocks')} blocks)",
        "",
        "| stack | full pull GB/s | dense push + apply GB/s |",
        "| --- | ---: | ---: |",
        *(f"| {name} | {fmt(pull)} | {fmt(push)} |" for name, pull, push in rows),
        "",
        f"ranger-ps pull + copy into the model: {fmt(r['pull_apply_gbps'])} GB/s; empty push (headers only) "
        f"{fmt(r['empty_push_ms'])} ms, empty pull {fmt(r['empty_pull_ms'])} ms",
    ]
    lines.append(
        f"first (cold) pull, into freshly allocated memory: ranger-ps {fmt(r.get('pull_cold_gbps'))}, "
        f"torch.distributed.rpc {fmt(r.get('torch_rpc_pull_cold_gbps'))}, "
        f"bare grpc.aio {fmt(r.get('grpc_pull_cold_gbps'))} GB/s"
    )
    if r.get("torch_rpc_error"):
        lines.append(f"torch.distributed.rpc: {r['torch_rpc_error']}")
    return "\n".join([*lines, "", *_target_lines(r["targets"])])


def apply_table(result: dict[str, Any]) -> str:
    """The apply result as Markdown."""
    r = result
    lines = [
        f"apply: {r['model_bytes'] / 1e6:.0f} MB of float32 in {r['settings']['num_blocks']} blocks of "
        f"{r['settings']['block_size']}, {r['settings']['torch_threads']} torch thread(s)",
        "",
        "| update | GB/s of parameters | of memcpy |",
        "| --- | ---: | ---: |",
        f"| memcpy (dst.copy_(src), one tensor) | {fmt(r['memcpy_gbps'])} | 100% |",
        f"| memcpy per block | {fmt(r['memcpy_blocks_gbps'])} | "
        f"{100 * r['memcpy_blocks_gbps'] / r['memcpy_gbps']:.0f}% |",
    ]
    for name, row in r["rules"].items():
        lines.append(f"| {name} | {fmt(row['gbps'])} | {100 * row['gbps'] / r['memcpy_gbps']:.0f}% |")
    path = r.get("server_push_path")
    if path and path.get("gbps") is not None:
        lines.append(
            f"| shard push path (decode + finiteness check + sgd) | {fmt(path['gbps'])} | "
            f"{100 * path['gbps'] / r['memcpy_gbps']:.0f}% |"
        )
    return "\n".join([*lines, "", *_target_lines(r["targets"])])


def train_table(result: dict[str, Any]) -> str:
    """The train result as Markdown."""
    s = result["settings"]
    lines = [
        f"train: {s['dataset']} MLP, {s['epochs']} epochs, batch {s['batch_size']}, rule {s['rule']}, "
        f"{s['workers']} workers, {s['shards']} shards, block size {s['block_size']} ({s['num_blocks']} blocks)",
        "",
        "| run | steps | steps/s | steps/s with start-up | bytes pushed / step | of dense | bytes pulled / step "
        "| test accuracy |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        if "error" in row:
            lines.append(f"| {row['name']} | n/a: {row['error']} | | | | | | |")
            continue
        ratio = "" if row["push_ratio"] is None else f"{100 * row['push_ratio']:.1f}%"
        end_to_end = row.get("end_to_end_steps_per_second")
        lines.append(
            f"| {row['name']} | {row['steps']} | {row['steps_per_second']:.0f} | "
            f"{'' if end_to_end is None else f'{end_to_end:.0f}'} | "
            f"{row['bytes_pushed_per_step']:,.0f} | {ratio} | {row['bytes_pulled_per_step']:,.0f} | "
            f"{row['test_accuracy']:.4f} |"
        )
    return "\n".join([*lines, "", *_target_lines(result["targets"])])


def cost_model_table(
    costs: dict[str, float],
    check: dict[str, Any],
    scenarios: dict[str, list[dict[str, Any]]],
    workers: Sequence[int],
    shards: Sequence[int],
) -> str:
    """The cost model's inputs, its one-machine check, and steps/s (bottleneck) per workers x shards per scenario."""
    lines = [
        "costs: " + json.dumps(costs),
        f"one-machine check (dense train run): {json.dumps(check)}",
        "",
    ]
    for title, rows in scenarios.items():
        lines += [f"### {title}", "", "| workers | " + " | ".join(f"S={s}" for s in shards) + " |"]
        lines.append("| ---: | " + " | ".join("---" for _ in shards) + " |")
        for w in workers:
            cells = [r for r in rows if r["workers"] == w]
            lines.append(
                f"| {w} | " + " | ".join(f"{r['steps_per_second']:.3g} ({r['bottleneck']})" for r in cells) + " |"
            )
        lines.append("")
    return "\n".join(lines)
