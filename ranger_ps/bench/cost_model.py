"""The cost model: steps per second of W workers and S shards on their own machines, from measured costs.

A bottleneck model (:func:`cost_model`) fed with the CPU seconds per byte and per message that
``bench wire`` measures (:func:`measured_costs`), checked against the one-machine ``bench train``
run (:func:`one_machine_check`). Its tables and curves come from the command

    python -m ranger_ps.bench.cost_model --wire wire.json --train train.json [--plot P.png] [--out J.json]

given the JSON objects that ``ranger-ps bench wire --out`` and ``bench train --out`` wrote
(docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ranger_ps.bench.common import GB
from ranger_ps.bench.plots import plot_cost_model
from ranger_ps.bench.tables import cost_model_table

WORKERS = (1, 2, 4, 8, 16, 32, 64)
SHARDS = (1, 2, 4, 8, 16)
"""The grid the command tabulates."""


@dataclass(frozen=True)
class Costs:
    """Measured costs the cost model runs on (CPU seconds unless said otherwise).

    Attributes:
        worker_push: a worker's CPU per byte pushed (encode, gRPC send).
        worker_pull: a worker's CPU per byte pulled (gRPC receive, decode).
        worker_message: a worker's CPU per shard per step for the message pair (empty push + pull).
        shard_push: a shard's CPU per byte pushed to it (receive, check, apply).
        shard_pull: a shard's CPU per byte pulled from it (encode, gRPC send).
        shard_message: a shard's CPU per worker step for the message pair.
        latency: wall seconds of an empty push followed by an empty pull (the round trips).
        nic_gbps: network bandwidth per machine and direction, GB/s.
    """

    worker_push: float
    worker_pull: float
    worker_message: float
    shard_push: float
    shard_pull: float
    shard_message: float
    latency: float
    nic_gbps: float = 1.25


def cost_model(
    costs: Costs,
    *,
    model_bytes: float,
    compute_seconds: float,
    push_fraction: float,
    workers: Sequence[int],
    shards: Sequence[int],
    overlap: bool = True,
    header_bytes: int = 64,
) -> list[dict[str, Any]]:
    """Steps per second of W workers and S shards, each process on its own machine: a bottleneck model.

    Per worker step a worker pushes ``P = f M`` bytes and (async, every worker pushing random
    blocks) pulls what anyone changed since its last pull, ``Q = (1 - (1 - f)^W) M``; every shard
    gets a message pair from every worker step, whatever it holds. Per worker step:

    - worker CPU ``S c_wm + P c_wp + Q c_wq``; its wire path ``latency + (P + Q) / N``; its compute
      ``t_c``. With overlap the step lasts the largest of the three, without it ``t_c`` plus the
      larger of the other two;
    - each shard, per step of every worker (one event loop: one core), CPU ``W (c_sm + (P c_sp + Q c_sq) / S)``
      and NIC ``W max(P, Q) / S / N``.

    The slowest resource sets the pace: steps/s of all workers together ``= W / max(...)``, and
    that resource is the bottleneck.
    """
    rows = []
    for w in workers:
        for s in shards:
            pushed = push_fraction * model_bytes + header_bytes * s
            pulled = (1 - (1 - push_fraction) ** w) * model_bytes + header_bytes * s
            worker_cpu = s * costs.worker_message + pushed * costs.worker_push + pulled * costs.worker_pull
            worker_wire = costs.latency + (pushed + pulled) / (costs.nic_gbps * GB)
            shard_cpu = w * (costs.shard_message + (pushed * costs.shard_push + pulled * costs.shard_pull) / s)
            shard_nic = w * max(pushed, pulled) / s / (costs.nic_gbps * GB)
            if overlap:
                worker_step = max(compute_seconds, worker_cpu, worker_wire)
            else:
                worker_step = compute_seconds + max(worker_cpu, worker_wire)
            terms = {
                "worker compute": compute_seconds if overlap else worker_step,
                "worker CPU (wire)": worker_cpu,
                "worker round trips + NIC": worker_wire,
                "shard CPU": shard_cpu,
                "shard NIC": shard_nic,
            }
            period = max(worker_step, shard_cpu, shard_nic)
            rows.append(
                {
                    "workers": w,
                    "shards": s,
                    "push_fraction": push_fraction,
                    "steps_per_second": w / period,
                    "bottleneck": max(terms, key=lambda k: terms[k]),
                    "seconds": terms,
                }
            )
    return rows


def measured_costs(wire: dict[str, Any], nic_gbps: float = 1.25) -> Costs:
    """The cost model's inputs from a ``bench wire`` result (its CPU accounting)."""
    cpu = wire["cpu"]
    shards = wire["settings"]["shards"]
    return Costs(
        worker_push=cpu["push_client_per_gb"] / GB,
        worker_pull=cpu["pull_client_per_gb"] / GB,
        worker_message=(cpu["empty_push_client_ms_per_message"] + cpu["empty_pull_client_ms_per_message"])
        / 1e3
        / shards,
        shard_push=cpu["push_shards_per_gb"] / GB,
        shard_pull=cpu["pull_shards_per_gb"] / GB,
        shard_message=(cpu["empty_push_shards_ms_per_message"] + cpu["empty_pull_shards_ms_per_message"])
        / 1e3
        / shards,
        latency=(wire["empty_push_ms"] + wire["empty_pull_ms"]) / 1e3,
        nic_gbps=nic_gbps,
    )


def one_machine_check(costs: Costs, train: dict[str, Any]) -> dict[str, Any]:
    """Predict the measured dense ``train`` run, where every process shares this machine's cores.

    The CPU of one worker step (its compute, taken as the in-process Ranger step, plus the wire
    work of the worker and of every shard), spread over the cores; never faster than one worker's
    own step allows.
    """
    s = train["settings"]
    workers, shards, cores = s["workers"], s["shards"], train["machine"]["cpus"] or 1
    dense = next(r for r in train["rows"] if r["kind"] == "ranger-ps" and r["push_fraction"] == 1.0)
    compute = next((1 / r["steps_per_second"] for r in train["rows"] if r["kind"] == "ranger-in-process"), 0.0)
    pushed, pulled = dense["bytes_pushed_per_step"], dense["bytes_pulled_per_step"]
    worker = shards * costs.worker_message + pushed * costs.worker_push + pulled * costs.worker_pull
    shard = shards * costs.shard_message + pushed * costs.shard_push + pulled * costs.shard_pull
    cpu_per_step = compute + worker + shard
    own_step = max(compute + worker, costs.latency)
    predicted = min(cores / cpu_per_step, workers / own_step)
    return {
        "predicted_steps_per_second": predicted,
        "measured_steps_per_second": dense["steps_per_second"],
        "cpu_seconds_per_step": {"compute": compute, "worker_wire": worker, "shards": shard},
    }


def scenarios(
    costs: Costs, wire: dict[str, Any], train: dict[str, Any], compute_ms: float
) -> dict[str, list[dict[str, Any]]]:
    """The command's three scenarios over :data:`WORKERS` x :data:`SHARDS`: the ``wire`` run's model with
    ``compute_ms`` of compute per step, dense and at push fraction 0.05, and the default job (``train``), dense."""
    digits_bytes = train["rows"][0]["bytes_dense_per_step"]
    digits_compute = next(1 / r["steps_per_second"] for r in train["rows"] if r["kind"] == "ranger-in-process")
    big = f"{wire['model_bytes'] / 1e6:.0f} MB model, {compute_ms:g} ms compute"
    return {
        f"{big}, dense": cost_model(
            costs, model_bytes=wire["model_bytes"], compute_seconds=compute_ms / 1e3, push_fraction=1.0,
            workers=WORKERS, shards=SHARDS,
        ),
        f"{big}, push fraction 0.05": cost_model(
            costs, model_bytes=wire["model_bytes"], compute_seconds=compute_ms / 1e3, push_fraction=0.05,
            workers=WORKERS, shards=SHARDS,
        ),
        "digits MLP (the default job), dense": cost_model(
            costs, model_bytes=digits_bytes, compute_seconds=digits_compute, push_fraction=1.0,
            workers=WORKERS, shards=SHARDS,
        ),
    }  # fmt: skip


def main(argv: Sequence[str]) -> int:
    """``python -m ranger_ps.bench.cost_model --wire W.json --train T.json [--plot P] [--out J]``."""
    parser = argparse.ArgumentParser(prog="python -m ranger_ps.bench.cost_model", description=__doc__.splitlines()[0])
    parser.add_argument("--wire", type=Path, required=True, help="JSON written by bench wire --out")
    parser.add_argument("--train", type=Path, required=True, help="JSON written by bench train --out")
    parser.add_argument("--nic-gbps", type=float, default=1.25, help="network GB/s per machine (default: 10 GbE)")
    parser.add_argument("--compute-ms", type=float, default=100.0, help="compute per step of the large model")
    parser.add_argument("--plot", type=Path, help="draw the scaling curves here (PNG)")
    parser.add_argument("--out", type=Path, help="write the tables as JSON here")
    args = parser.parse_args(argv)
    wire, train = (json.loads(p.read_text()) for p in (args.wire, args.train))
    costs = measured_costs(wire, args.nic_gbps)
    tables = scenarios(costs, wire, train, args.compute_ms)
    check = one_machine_check(costs, train)
    print(cost_model_table(dataclasses.asdict(costs), check, tables, WORKERS, SHARDS))
    if args.out:
        report = {"costs": dataclasses.asdict(costs), "one_machine_check": check, "scenarios": tables}
        args.out.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot_cost_model(tables, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
