"""``bench link``: seconds to a test accuracy over an emulated slow link, ranger-ps beside torch DDP.

Each link rate gets a :func:`shaped_namespace`: a private network namespace whose loopback (the
only interface in it, MTU 1500) sends through a ``tc`` token bucket (``tbf``) at that rate. Every
measured system then runs wholly inside it: a measuring process started with ``ip netns exec``
(:func:`inner_main`) starts the system's processes (shards and workers, as ``bench train`` does, or
the DDP ranks), so they all talk over ``127.0.0.1`` in that namespace and nothing else is there to
reach. One loopback qdisc carries every flow in both directions: the emulated link is one shared
medium of that rate (not a full-duplex link per host), which is what a worker's pushes and pulls,
or a rank's all-reduce, compete for.

The systems train the same job for the same epochs and evaluate after every epoch on the same
test examples (at most :data:`~ranger_ps.workloads.evaluation.EPOCH_EVAL_EXAMPLES`). Evaluation
time is *included* in every system's clock, the same way: an epoch's time is the clock at its last
step, before its own evaluation, so the earlier epochs' evaluations are inside it. ranger-ps's
clock is each worker's step log (from when the worker opens it: then it builds the job and
registers), the slowest worker's time and the workers' mean accuracy per epoch
(:func:`ranger_ps.bench.train.epoch_timeline`); DDP's is rank 0's, from the formed process group
(then each rank builds the job). ranger-ps workers run without shared memory (as across hosts):
every byte crosses the link.

The benchmark needs root and iproute2 (``ip``, ``tc``); without them it refuses with a
:class:`~ranger_ps.errors.UserError` saying why.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from ranger_ps.bench import common
from ranger_ps.bench.settings import LinkSettings, link_rate_bits
from ranger_ps.bench.tables import fmt
from ranger_ps.errors import ClusterError, UserError
from ranger_ps.files import write_text_atomically
from ranger_ps.orchestration.launcher import child_environment, die_with_parent, stop_process
from ranger_ps.settings import from_keys, to_plain

log = logging.getLogger(__name__)

NAMESPACE_PREFIX = "ranger-ps-bench"
"""Namespaces are named ``ranger-ps-bench-<pid>-<n>``."""
LINK_MTU = 1500
"""The loopback's MTU in a shaped namespace: with loopback's own 65,536 and a small bucket, TCP connects time out."""
MIN_BURST_BYTES = 256 * 1024
"""The token bucket's smallest size (smaller ones stall TCP on loopback)."""
BURST_SECONDS = 0.002
"""A faster link's bucket holds this many seconds of its rate."""
TBF_LATENCY = "100ms"
"""How long a packet may wait in the bucket's queue before it is dropped."""
STARTUP_SECONDS = 120.0
"""What a measuring process may take beyond the ``timeout`` setting: start-up, shards' start, the final evaluation."""
TOOL_SECONDS = 30.0
"""How long one ``ip`` or ``tc`` command may take."""
NEEDS = "bench link needs root and iproute2 (ip, tc): it runs each system in a network namespace shaped with tc"

LINK_TARGETS: tuple[common.Target, ...] = (
    (
        "time_to_accuracy_100mbit_sparse_vs_ddp",
        2.0,
        "at 100mbit: torch DDP's seconds to the target accuracy / ranger-ps's at the smallest push fraction "
        ">= 2x (a wide margin is expected: at 0.01 a step moves about 1% of DDP's bytes, so the link stops "
        "being the limit even if sparse pushes need more epochs)",
    ),
)

_INNER = "import sys; from ranger_ps.bench.link import inner_main; sys.exit(inner_main(sys.argv[1:]))"
_names = itertools.count()


def tbf_burst_bytes(bits_per_second: int) -> int:
    """The token bucket's size for a rate: :data:`BURST_SECONDS` of it, at least :data:`MIN_BURST_BYTES`."""
    return max(MIN_BURST_BYTES, round(bits_per_second / 8 * BURST_SECONDS))


@dataclass(frozen=True)
class LinkTools:
    """Where ``ip`` and ``tc`` are."""

    ip: str
    tc: str


def find_link_tools() -> LinkTools:
    """``ip`` and ``tc`` (on PATH, /usr/sbin or /sbin), once this process is root.

    Raises:
        UserError: not root, or a tool is missing; the message says which and what the benchmark needs.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        uid = os.geteuid() if hasattr(os, "geteuid") else "unknown"
        raise UserError(f"{NEEDS}; this process is not root (uid {uid})")
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = {name: shutil.which(name, path=search) for name in ("ip", "tc")}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise UserError(f"{NEEDS}; {' and '.join(missing)} not found on PATH, /usr/sbin or /sbin")
    return LinkTools(ip=str(found["ip"]), tc=str(found["tc"]))


@dataclass(frozen=True)
class ShapedNamespace:
    """A network namespace whose loopback sends at ``rate`` (see :func:`shaped_namespace`)."""

    name: str
    rate: str
    bits_per_second: int
    burst_bytes: int
    tools: LinkTools

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace (``ip netns exec NAME ARGV``)."""
        return [self.tools.ip, "netns", "exec", self.name, *argv]

    def describe(self) -> dict[str, Any]:
        """The link as the result reports it."""
        return {
            "rate": self.rate,
            "bits_per_second": self.bits_per_second,
            "burst_bytes": self.burst_bytes,
            "mtu": LINK_MTU,
            "tbf_latency": TBF_LATENCY,
            "namespace": self.name,
        }


@contextlib.contextmanager
def shaped_namespace(rate: str, tools: LinkTools | None = None) -> Iterator[ShapedNamespace]:
    """A new network namespace ``ranger-ps-bench-<pid>-<n>``: loopback up, MTU 1500, a ``tbf`` qdisc at ``rate``.

    On the way out (also on an error or Ctrl-C) any process still in it is stopped and the
    namespace is deleted.

    Raises:
        UserError: not root, no iproute2, or the namespace or its qdisc cannot be made here.
        ValueError: ``rate`` is not a rate such as ``100mbit``.
    """
    tools = tools or find_link_tools()
    bits = link_rate_bits(rate)
    existing = _namespaces(tools)
    name = f"{NAMESPACE_PREFIX}-{os.getpid()}-{next(_names)}"
    while name in existing:  # left behind by an earlier process with this pid: not ours to touch
        name = f"{NAMESPACE_PREFIX}-{os.getpid()}-{next(_names)}"
    namespace = ShapedNamespace(name, rate, bits, tbf_burst_bytes(bits), tools)
    try:
        _tool([tools.ip, "netns", "add", name], f"creating the network namespace {name}")
        _tool(namespace.command([tools.ip, "link", "set", "lo", "up"]), f"bringing up loopback in {name}")
        _tool(namespace.command([tools.ip, "link", "set", "lo", "mtu", str(LINK_MTU)]), f"setting the MTU in {name}")
        qdisc = ["qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate, "burst", str(namespace.burst_bytes)]
        _tool(namespace.command([tools.tc, *qdisc, "latency", TBF_LATENCY]), f"shaping loopback in {name} to {rate}")
        log.info("link: namespace %s, loopback at %s (burst %d bytes)", name, rate, namespace.burst_bytes)
        yield namespace
    finally:
        if name in _namespaces(tools):  # it did not exist before: this process made it
            _stop_processes_in(namespace)
            subprocess.run([tools.ip, "netns", "del", name], capture_output=True, timeout=TOOL_SECONDS, check=False)
            if name in _namespaces(tools):
                log.warning("link: could not delete the network namespace %s (ip netns del %s)", name, name)


def _tool(argv: Sequence[str], what: str) -> None:
    """Run an ``ip``/``tc`` command; a failure is a :class:`UserError` with its message."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=TOOL_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise UserError(f"{what}: {argv[0]} did not finish within {TOOL_SECONDS:g}s ({NEEDS})") from None
    if done.returncode != 0:
        detail = " ".join((done.stderr or done.stdout).split()) or f"exit code {done.returncode}"
        raise UserError(f"{what} failed: {detail} ({NEEDS})")


def _namespaces(tools: LinkTools) -> set[str]:
    """The names ``ip netns list`` shows."""
    done = subprocess.run([tools.ip, "netns", "list"], capture_output=True, text=True, timeout=TOOL_SECONDS)
    return {line.split()[0] for line in done.stdout.splitlines() if line.strip()}


def _processes_in(namespace: ShapedNamespace) -> list[int]:
    done = subprocess.run(
        [namespace.tools.ip, "netns", "pids", namespace.name], capture_output=True, text=True, timeout=TOOL_SECONDS
    )
    return [int(pid) for pid in done.stdout.split() if pid.isdigit()]


def _stop_processes_in(namespace: ShapedNamespace, grace: float = 10.0) -> None:
    """SIGTERM what still runs in the namespace (this benchmark's processes), SIGKILL it after ``grace``."""
    pids = _processes_in(namespace)
    if not pids:
        return
    log.warning("link: %d processes still in %s; stopping them", len(pids), namespace.name)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        time.sleep(0.1)
        pids = _processes_in(namespace)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- the benchmark ------------------------------------------------------------------------------------


def run_link(settings: LinkSettings) -> dict[str, Any]:
    """Each system's seconds to the target accuracy over each link rate (see the module docstring)."""
    from ranger_ps.bench.train import _num_blocks

    tools = find_link_tools()
    load_before = common.load_average()
    systems: list[dict[str, Any]] = [{"kind": "ranger-ps", "push_fraction": f} for f in settings.fractions]
    if settings.ddp:
        systems.append({"kind": "ddp", "push_fraction": None})
    links = []
    for rate in settings.rates:
        with shaped_namespace(rate, tools) as namespace:
            rows = []
            for system in systems:
                log.info("link %s: %s", rate, _system_name(system, settings))
                rows.append(link_row(_measure_in(namespace, settings, system), settings.target_accuracy))
        links.append(namespace.describe() | {"rows": rows})
    ratios = link_ratios(links, settings.fractions)
    return {
        "benchmark": "link",
        "settings": to_plain(settings)
        | {
            "sparse_fraction": _sparse_fraction(settings.fractions),
            "num_blocks": _num_blocks(settings.train_settings()),
            "shared_memory": False,
            "clock": "per epoch: seconds at its last step, before its evaluation; earlier evaluations included",
        },
        "machine": common.machine_info(),
        "load_average_before": load_before,
        "load_average_after": common.load_average(),
        "links": links,
        "ratios": ratios,
        "targets": common.check_targets(ratios, LINK_TARGETS),
    }


def _system_name(system: dict[str, Any], settings: LinkSettings) -> str:
    if system["kind"] == "ddp":
        return f"torch DDP (gloo), {settings.workers} processes"
    return f"ranger-ps push fraction {system['push_fraction']:g}"


def _sparse_fraction(fractions: Sequence[float]) -> float | None:
    """The push fraction the ``sparse`` ratios use: the smallest below 1."""
    return min((f for f in fractions if f < 1), default=None)


def _measure_in(namespace: ShapedNamespace, settings: LinkSettings, system: dict[str, Any]) -> dict[str, Any]:
    """Train one system inside ``namespace`` through a measuring process; its row, or one with ``error``."""
    base = {"name": _system_name(system, settings), "kind": system["kind"], "push_fraction": system["push_fraction"]}
    spec = {"settings": to_plain(settings), "log_level": logging.getLogger().getEffectiveLevel(), **system}
    env = child_environment(os.environ)
    env["GLOO_SOCKET_IFNAME"] = "lo"  # DDP's ranks on the namespace's loopback, whatever the hostname resolves to
    limit = settings.timeout + STARTUP_SECONDS
    with tempfile.TemporaryDirectory(prefix="ranger-ps-link-") as tmp:
        row_file = Path(tmp) / "row.json"
        process = subprocess.Popen(
            namespace.command([sys.executable, "-c", _INNER, str(row_file), json.dumps(spec)]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # a Ctrl-C reaches this process, which stops it
            preexec_fn=die_with_parent,
        )
        try:
            code = process.wait(limit)
        except subprocess.TimeoutExpired:
            return base | {"error": f"did not finish within {limit:g}s over {namespace.rate}"}
        finally:
            stop_process(process, name=f"the measuring process of {base['name']}")
        if code != 0 or not row_file.exists():
            return base | {"error": f"the measuring process exited with code {code} (its log is above)"}
        row: dict[str, Any] = json.loads(row_file.read_text())
        return row


def inner_main(argv: Sequence[str]) -> int:
    """Entry of a measuring process inside a shaped namespace (``python -c``): ``ROW_FILE SPEC_JSON``.

    Trains one system (``kind`` ranger-ps at ``push_fraction``, or ddp) of the settings in the spec,
    every process of it started from here and so in this namespace, and writes its row (with
    ``timeline``) to ROW_FILE as JSON. SIGTERM stops it the way Ctrl-C would (children first).
    """
    from ranger_ps.bench.baselines import train_ddp
    from ranger_ps.bench.train import _train_cluster
    from ranger_ps.wire.allocator import tune_allocator

    row_file, spec_text = argv
    spec = json.loads(spec_text)
    logging.basicConfig(
        level=int(spec["log_level"]),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    tune_allocator()
    common.quiet_grpc_fork()
    train = from_keys(LinkSettings, spec["settings"]).train_settings()
    if spec["kind"] == "ddp":
        row = train_ddp(train, epoch_evaluations=True)
    else:
        fraction = float(spec["push_fraction"])
        try:
            row = _train_cluster(train, fraction, step_logs=True, shared_memory=False)
        except ClusterError as exc:
            name = f"ranger-ps push fraction {fraction:g}"
            row = {"name": name, "kind": "ranger-ps", "push_fraction": fraction, "error": str(exc)}
    write_text_atomically(Path(row_file), json.dumps(row))
    return 0


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


# -- results ------------------------------------------------------------------------------------------


def seconds_to_accuracy(timeline: Sequence[Sequence[float]], target: float) -> tuple[int, float] | None:
    """The first epoch (from 1) whose accuracy reaches ``target`` and its seconds; None if none does."""
    return next(((epoch, s) for epoch, (s, a) in enumerate(timeline, start=1) if a >= target), None)


def link_row(raw: dict[str, Any], target: float) -> dict[str, Any]:
    """A system's row of the result from what its run reported (a ``bench train`` row with ``timeline``).

    Bytes are per worker step, both ways: ranger-ps's pushes and pulls, DDP's ring all-reduce
    (2 (W-1)/W of the gradient sent and as much received), payload only (no gRPC or TCP headers).
    """
    base = {"name": raw["name"], "kind": raw["kind"], "push_fraction": raw.get("push_fraction")}
    if "error" in raw:
        return base | {"error": raw["error"]}
    timeline = [(float(s), float(a)) for s, a in raw["timeline"]]
    reached = seconds_to_accuracy(timeline, target)
    sent = float(raw["bytes_pushed_per_step"])
    received = sent if raw["kind"] == "ddp" else float(raw["bytes_pulled_per_step"])
    return base | {
        "seconds_to_target": reached[1] if reached else None,
        "epochs_to_target": reached[0] if reached else None,
        "best_accuracy": max((a for _, a in timeline), default=None),
        "final_test_accuracy": raw["test_accuracy"],
        "total_seconds": timeline[-1][0] if timeline else None,
        "steps": raw["steps"],
        "bytes_per_step": sent + received,
        "bytes_sent_per_step": sent,
        "bytes_received_per_step": received,
        "timeline": [{"epoch": e, "seconds": s, "test_accuracy": a} for e, (s, a) in enumerate(timeline, start=1)],
    }


def link_ratios(links: Sequence[dict[str, Any]], fractions: Sequence[float]) -> dict[str, float | None]:
    """Per rate: DDP's seconds to the target over ranger-ps's, dense (push fraction 1) and sparse
    (the smallest fraction below 1); None where a system is missing or never reached the target."""
    sparse = _sparse_fraction(fractions)
    ratios: dict[str, float | None] = {}
    for link in links:
        seconds = {
            ("ddp" if r["kind"] == "ddp" else r["push_fraction"]): r.get("seconds_to_target") for r in link["rows"]
        }
        ddp = seconds.get("ddp")
        ratios[f"time_to_accuracy_{link['rate']}_dense_vs_ddp"] = common.ratio(ddp, seconds.get(1.0))
        ratios[f"time_to_accuracy_{link['rate']}_sparse_vs_ddp"] = common.ratio(ddp, seconds.get(sparse))
    return ratios


def link_table(result: dict[str, Any]) -> str:
    """The link result as Markdown: one row per rate and system, the targets below."""
    s = result["settings"]
    target = s["target_accuracy"]
    lines = [
        f"link: {s['dataset']} {s['model']}, {s['workers']} workers, {s['shards']} shards, {s['num_blocks']} blocks "
        f"of {s['block_size']}, {s['rule']}, batch {s['batch_size']}; seconds to test accuracy {target:g} "
        f"within {s['epochs']} epochs (evaluated after each)",
        "",
        f"| link | system | seconds to {target:g} | epoch | best accuracy | total seconds | steps | bytes per step |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    errors = []
    for link in result["links"]:
        for r in link["rows"]:
            if "error" in r:
                lines.append(f"| {link['rate']} | {r['name']} | error | | | | | |")
                errors.append(f"- {link['rate']}, {r['name']}: {r['error']}")
                continue
            seconds = fmt(r["seconds_to_target"], 1) if r["seconds_to_target"] is not None else "never"
            lines.append(
                f"| {link['rate']} | {r['name']} | {seconds} | {fmt(r['epochs_to_target'])} | "
                f"{fmt(r['best_accuracy'], 3)} | {fmt(r['total_seconds'], 1)} | {r['steps']} | "
                f"{r['bytes_per_step']:,.0f} |"
            )
    lines += ["", "bytes per step: per worker step, sent and received (DDP: its ring all-reduce)", *errors, ""]
    for key, t in result["targets"].items():
        verdict = "n/a" if t["met"] is None else "met" if t["met"] else "MISSED"
        lines.append(f"- {t['meaning']}: {fmt(t['value'])} (target {t['target']:g}) {verdict}  [{key}]")
    return "\n".join(lines)
