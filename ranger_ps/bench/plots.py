"""The benchmarks' results as PNG bar charts and curves (matplotlib, imported only when a plot is drawn)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ranger_ps.bench.tables import fmt
from ranger_ps.errors import UserError


def plot_wire(result: dict[str, Any], path: Path) -> None:
    """Grouped bars: pull and push + apply GB/s per stack."""
    plt = _pyplot()
    stacks = ["ranger-ps", "torch rpc\n(TensorPipe)", "bare grpc.aio\n(no frames)", "raw TCP\n(fastest)"]
    pulls = [result["pull_gbps"], result["torch_rpc_pull_gbps"], result["grpc_pull_gbps"], result.get("tcp_best_gbps")]
    pushes = [
        result["push_gbps"],
        result["torch_rpc_push_gbps"],
        result["grpc_push_gbps"],
        result.get("tcp_send_best_gbps"),
    ]
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(stacks))
    for offset, values, label in ((-0.2, pulls, "full pull"), (0.2, pushes, "dense push (+ apply)")):
        heights = [v or 0.0 for v in values]
        bars = ax.bar([x + offset for x in xs], heights, width=0.4, label=label)
        ax.bar_label(bars, labels=[fmt(v) for v in values], fontsize=8)
    ax.set_xticks(list(xs), stacks)
    ax.set_ylabel("GB/s of parameters")
    ax.set_title(
        f"wire: {result['model_bytes'] / 1e6:.0f} MB model, {result['settings']['shards']} shards, loopback "
        f"({result['machine']['cpus']} cores)"
    )
    ax.legend()
    _save(fig, path)


def plot_apply(result: dict[str, Any], path: Path) -> None:
    """Bars: GB/s per update rule beside memcpy."""
    plt = _pyplot()
    names = ["memcpy", "memcpy per block", *result["rules"]]
    values = [result["memcpy_gbps"], result["memcpy_blocks_gbps"], *(r["gbps"] for r in result["rules"].values())]
    path_result = result.get("server_push_path") or {}
    if path_result.get("gbps") is not None:
        names.append("shard push path (sgd)")
        values.append(path_result["gbps"])
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(names, values, color=["grey", "grey"] + ["C0"] * (len(names) - 2))
    ax.bar_label(bars, labels=[fmt(v) for v in values], fontsize=8)
    ax.set_ylabel("GB/s of parameters")
    ax.set_title(
        f"server-side update: {result['model_bytes'] / 1e6:.0f} MB in blocks of {result['settings']['block_size']}, "
        f"{result['settings']['torch_threads']} thread(s)"
    )
    ax.tick_params(axis="x", labelrotation=20)
    _save(fig, path)


def plot_train(result: dict[str, Any], path: Path) -> None:
    """Two panels: steps per second and bytes pushed per step (log), accuracy on the bars."""
    plt = _pyplot()
    rows = [r for r in result["rows"] if "error" not in r]
    names = [
        f"f={r['push_fraction']:g}" if r["kind"] == "ranger-ps" else {"torch-sgd": "SGD 1 proc",
        "ranger-in-process": "Ranger 1 proc", "ddp": "DDP gloo"}.get(r["kind"], r["kind"])
        for r in rows
    ]  # fmt: skip
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    bars = left.bar(names, [r["steps_per_second"] for r in rows])
    left.bar_label(bars, labels=[f"acc {r['test_accuracy']:.3f}" for r in rows], fontsize=7)
    left.set_ylabel("steps per second (all workers)")
    left.set_title("throughput and final test accuracy")
    pushed = [max(r["bytes_pushed_per_step"], 1.0) for r in rows]
    bars = right.bar(names, pushed, color="C1")
    right.bar_label(bars, labels=[f"{r['bytes_pushed_per_step']:,.0f}" for r in rows], fontsize=7)
    right.set_yscale("log")
    right.set_ylabel("bytes sent per worker step (log)")
    right.set_title("bytes per step (ranger-ps: pushes; DDP: all-reduce)")
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=30)
    s = result["settings"]
    fig.suptitle(
        f"train: {s['dataset']} MLP, {s['workers']} workers, {s['shards']} shards, block size {s['block_size']}"
    )
    _save(fig, path)


def plot_cost_model(scenarios: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Steps/s against workers, one line per shard count, one panel per scenario (log-log)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5 * len(scenarios), 4), squeeze=False)
    for ax, (title, rows) in zip(axes[0], scenarios.items(), strict=True):
        for s in sorted({r["shards"] for r in rows}):
            line = [r for r in rows if r["shards"] == s]
            ax.plot(
                [r["workers"] for r in line], [r["steps_per_second"] for r in line], marker="o", label=f"{s} shards"
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("workers")
        ax.set_ylabel("steps per second (all workers)")
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib (pip install matplotlib, or the dev extras)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
