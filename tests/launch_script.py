"""A small user script for the ``ranger-ps launch`` tests: trains a linear model on its part of a
fixed dataset with ``Ranger(servers="env")`` and prints what it saw.

Behaviour for the fault tests comes from its arguments: ``--fail-rank R`` (repeatable) makes rank
R exit with code 3 at every start, ``--fail-once R --markers DIR`` only at its first start (a
marker file in DIR remembers it), ``--hold S`` keeps the ranks that train busy for S more seconds,
and ``--grandchild FILE`` starts a process of the script's own and writes its pid to FILE.RANK.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import ranger_ps
from ranger_ps import Ranger


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--fail-rank", type=int, action="append", default=[])
    parser.add_argument("--fail-once", type=int, action="append", default=[])
    parser.add_argument("--markers", type=Path, default=None)
    parser.add_argument("--hold", type=float, default=0.0)
    parser.add_argument("--config", type=Path, default=None, help="the script's own config file (read, not used)")
    parser.add_argument("--grandchild", type=Path, default=None, help="start a process of its own; its pid here")
    args = parser.parse_args()
    if args.config is not None:
        print(f"script config {args.config.read_text().strip()!r}")
    place = ranger_ps.init()
    if args.grandchild is not None:  # a process of the script's own (a data loader worker, say)
        helper = subprocess.Popen(["sleep", "300"])
        args.grandchild.with_suffix(f".{place.rank}").write_text(str(helper.pid))
    print(f"rank {ranger_ps.rank()} of {ranger_ps.world_size()} local {ranger_ps.local_rank()} servers {place.servers}")
    once = place.rank in args.fail_once and args.markers is not None
    if once:
        marker = args.markers / f"failed-{place.rank}"
        once = not marker.exists()
        marker.touch()
    if place.rank in args.fail_rank or once:
        print(f"rank {place.rank} fails on purpose", flush=True)
        return 3
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    y = (x[:, 0] > 0).long()
    mine = torch.arange(place.rank, len(y), place.world_size)
    model = torch.nn.Linear(8, 2)
    optimizer = Ranger(model.parameters(), lr=0.1, momentum=0.9, servers="env")
    print(f"rank {place.rank} trains on {len(mine)} examples: {mine.tolist()[:4]}", flush=True)
    deadline = time.monotonic() + args.hold
    step = 0
    while step < args.steps or time.monotonic() < deadline:
        batch = mine[torch.randint(len(mine), (8,))]
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        step += 1
    optimizer.close()
    print(f"rank {place.rank} done after {step} steps, pushes {optimizer.pushes}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
