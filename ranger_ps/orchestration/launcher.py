"""Process orchestration for ``ranger-ps local`` and the benchmarks: shards, workers and helper
processes as real subprocesses.

Shards listen on port 0 and announce the port they got through a ready file, so there is no
race for free ports. Every child runs in its own session (a Ctrl-C reaches only this process,
which then stops the children in order) and, on Linux, dies with its parent. Any child that fails
stops the whole cluster with a message naming it and the end of its log.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from ranger_ps.config.server import MembershipSettings, ServerConfig
from ranger_ps.errors import ClusterError
from ranger_ps.files import write_text_atomically
from ranger_ps.settings import TOKEN_VARIABLE, to_argv

log = logging.getLogger(__name__)


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM this (child) process when its parent dies: no orphans."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def stop_process(
    process: subprocess.Popen[bytes], timeout: float = 15.0, *, name: str = "process", group: bool = False
) -> int | None:
    """SIGTERM ``process``, SIGKILL it if it has not exited after ``timeout``; returns its exit code.

    With ``group`` (a child started in its own session, whose process group it leads) the signals go
    to the whole group, and whatever the group still holds once the process is gone (a script's data
    loader workers, anything it started) is killed: no orphans.
    """

    def send(sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(process.pid, sig)
            else:
                process.send_signal(sig)

    if process.poll() is None:
        send(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %gs; killing it", name, timeout)
            send(signal.SIGKILL)
            process.wait()
    if group:
        send(signal.SIGKILL)  # what outlived the process in its group
    return process.returncode


class NotReady(ClusterError):
    """A process exited, or ran out of time, before announcing it was ready."""


def wait_for_file(path: Path, process: subprocess.Popen[bytes], timeout: float, *, poll: float = 0.02) -> None:
    """Wait until ``path`` exists (a ready file), failing fast if ``process`` exits first.

    Raises:
        NotReady: the process exited, or ``timeout`` seconds passed, before the file appeared.
    """
    deadline = time.monotonic() + timeout
    while not path.exists():
        code = process.poll()
        if code is not None:
            raise NotReady(f"exited with code {code} before it was ready")
        if time.monotonic() > deadline:
            raise NotReady(f"was not ready within {timeout:g}s")
        time.sleep(poll)


@dataclass
class Child:
    """A subprocess of the cluster with its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    _log_file: IO[bytes] = field(repr=False)
    _echo: threading.Thread | None = field(default=None, repr=False)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def start_echo(self, out: IO[str]) -> None:
        """Copy the child's output (its stdout pipe) line by line to its log and to ``out``, prefixed."""
        source = self.process.stdout
        assert source is not None

        def copy() -> None:
            prefix = f"[{self.name}] "
            try:
                for line in iter(source.readline, b""):
                    with contextlib.suppress(OSError, ValueError):
                        self._log_file.write(line)
                        self._log_file.flush()
                    text = line.decode(errors="replace")
                    with contextlib.suppress(OSError, ValueError):
                        out.write(prefix + text if text.endswith("\n") else prefix + text + "\n")
                        out.flush()
            finally:  # the echo owns the pipe and the log: it closes them once the child's output ends
                for stream in (source, self._log_file):
                    with contextlib.suppress(OSError):
                        stream.close()

        self._echo = threading.Thread(target=copy, name=f"echo-{self.name}", daemon=True)
        self._echo.start()

    def close_log(self) -> None:
        """Close the log file and, for a child started with a stdout pipe, the pipe. With an echo, wait
        until it has copied everything the child wrote (it closes both itself; a pipe that something
        still holds open is never closed under its reader)."""
        if self._echo is not None:
            self._echo.join(timeout=5.0)
            if self._echo.is_alive():
                log.warning("the output of %s is still open after it stopped; its log may miss lines", self.name)
            return
        for stream in (self._log_file, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def child_environment(environ: Mapping[str, str], *, keep: Iterable[str] = ()) -> dict[str, str]:
    """The environment for a cluster's processes: ``environ`` without ``RANGER_PS_*`` settings (but
    the names in ``keep``), and one torch thread each.

    Children get their settings as explicit flags; a variable meant for one command
    (``RANGER_PS_CONFIG``, ``RANGER_PS_CHECKPOINT_DIR``, ...) must not reach the others.
    """
    kept = set(keep)
    env = {k: v for k, v in environ.items() if not k.startswith("RANGER_PS_") or k in kept}
    env["OMP_NUM_THREADS"] = "1"
    return env


class Cluster:
    """Starts, watches and stops a set of child processes (use as a context manager).

    Args:
        run_dir: where each child's log goes.
        env: the children's whole environment (default: this process's).
    """

    def __init__(self, run_dir: Path, *, env: Mapping[str, str] | None = None) -> None:
        self.run_dir = run_dir
        self.env = dict(os.environ if env is None else env)
        self.children: list[Child] = []

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def spawn(self, name: str, argv: Sequence[str]) -> Child:
        """Start ``python -m ranger_ps ARGV`` with output to ``RUN_DIR/NAME.log``."""
        return self.spawn_command(name, [sys.executable, "-m", "ranger_ps", *argv])

    def spawn_command(
        self,
        name: str,
        command: Sequence[str],
        *,
        stdout_pipe: bool = False,
        echo: IO[str] | None = None,
        env: Mapping[str, str] | None = None,
        append: bool = False,
    ) -> Child:
        """Start any ``command`` (a whole argv: ``python -c ...``) as a child of the cluster.

        Its output goes to ``RUN_DIR/NAME.log`` (a new file, or appended to with ``append``);
        with ``stdout_pipe`` only its stderr does, and its stdout is a pipe the caller reads
        (``child.process.stdout``, closed by :meth:`stop`); with ``echo`` every line also goes there,
        prefixed with ``[NAME]``. ``env`` is added to the cluster's environment for this child.
        """
        log_path = self.run_dir / f"{name}.log"
        log_file = open(log_path, "ab" if append else "wb")
        piped = stdout_pipe or echo is not None
        process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if piped else log_file,
            stderr=log_file if stdout_pipe else subprocess.STDOUT,
            env={**self.env, **(env or {})},
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        child = Child(name, process, log_path, log_file)
        if echo is not None:
            child.start_echo(echo)
        self.children.append(child)
        self._write_process_table()
        log.debug("started %s (pid %d): %s", name, process.pid, " ".join(command))
        return child

    def _write_process_table(self) -> None:
        """Record ``name -> pid`` in ``RUN_DIR/processes.json`` (for operators and fault tests)."""
        table = {c.name: c.process.pid for c in self.children}
        write_text_atomically(self.run_dir / "processes.json", json.dumps(table, indent=1))

    def check(self, children: Sequence[Child] | None = None) -> None:
        """Raise :class:`ClusterError` if any child exited with a failure (or at all, for servers)."""
        for child in children if children is not None else self.children:
            code = child.process.poll()
            if code not in (None, 0):
                raise self.failure(child, f"exited with code {code}")

    def failure(self, child: Child, what: str) -> ClusterError:
        tail = child.log_tail()
        detail = f"\n--- last lines of {child.log_path} ---\n{tail}" if tail else ""
        return ClusterError(f"{child.name} {what}{detail}")

    def wait_ready(self, child: Child, ready_file: Path, timeout: float) -> tuple[str, int]:
        """Wait until a server wrote its ready file; returns its host and port."""
        try:
            wait_for_file(ready_file, child.process, timeout)
        except NotReady as exc:
            raise self.failure(child, str(exc)) from None
        info = json.loads(ready_file.read_text())
        return str(info["host"]), int(info["port"])

    def stop(self, child: Child, timeout: float = 15.0) -> int | None:
        """SIGTERM a child, SIGKILL it if it has not exited after ``timeout``; returns its exit code."""
        code = stop_process(child.process, timeout, name=child.name, group=True)
        child.close_log()
        return code

    def stop_all(self) -> None:
        """Stop every child still running, newest first (workers before servers)."""
        for child in reversed(self.children):
            self.stop(child)


def wait_all(
    cluster: Cluster,
    workers: Sequence[Child],
    servers: Sequence[Child],
    *,
    poll: Callable[[], None] | None = None,
    interval: float = 0.25,
) -> None:
    """Wait for every worker to exit 0, calling ``poll`` between checks.

    Raises:
        ClusterError: a worker failed, or a server exited while workers were running.
    """
    while True:
        cluster.check(workers)
        for server in servers:
            if server.process.poll() is not None:
                raise cluster.failure(server, f"exited with code {server.process.returncode} during training")
        if all(w.process.poll() == 0 for w in workers):
            return
        if poll is not None:
            poll()
        time.sleep(interval)


def terminate_on_sigterm(signum: int, frame: FrameType | None) -> None:
    """A SIGTERM handler for a supervisor: stop the way Ctrl-C does (children are stopped in order)."""
    raise KeyboardInterrupt


def start_shards(
    cluster: Cluster,
    count: int,
    membership: MembershipSettings,
    *,
    host: str,
    timeout: float,
    argv: Sequence[str] = (),
    metrics: Callable[[int], Mapping[str, Any]] = lambda shard: {},
    checkpoint_dir: Path | None = None,
) -> tuple[list[Child], list[str]]:
    """Start ``count`` shards on free ports of ``host`` and wait until each serves.

    Args:
        membership: the consistency and membership settings every shard gets.
        argv: flags every shard gets besides its own (log level, event loop, token file).
        metrics: each shard's metrics settings, by shard index.
        checkpoint_dir: where the shards checkpoint (and resume from at start).

    Returns:
        The shard processes and their ``HOST:PORT`` addresses, in shard order.

    Raises:
        ClusterError: a shard exited, or was not serving within ``timeout`` seconds.
    """
    servers: list[Child] = []
    for shard in range(count):
        ready = cluster.run_dir / f"shard-{shard}.ready.json"
        ready.unlink(missing_ok=True)
        config = ServerConfig(
            shard_id=shard,
            num_shards=count,
            host=host,
            port=0,
            ready_file=ready,
            checkpoint_dir=checkpoint_dir,
            **{f.name: getattr(membership, f.name) for f in dataclasses.fields(MembershipSettings)},
            **metrics(shard),
        )
        servers.append(cluster.spawn(f"shard-{shard}", ["server", *to_argv(config), *argv]))
    addresses = []
    for shard, child in enumerate(servers):
        found_host, port = cluster.wait_ready(child, cluster.run_dir / f"shard-{shard}.ready.json", timeout)
        addresses.append(f"{found_host}:{port}")
    return servers, addresses


INHERITED_VARIABLES = (TOKEN_VARIABLE, "RANGER_PS_TUNE_MALLOC")
"""``RANGER_PS_*`` variables a cluster's processes keep: the token (never put in argv) and the
allocator switch (not a flag). Every other setting reaches them as explicit flags."""


def common_argv(log_level: str, *, use_uvloop: bool, token_file: Path | None) -> list[str]:
    """The flags every ``ranger-ps`` process of a cluster gets: log level, event loop, token file."""
    argv = ["--log-level", log_level, "--uvloop" if use_uvloop else "--no-uvloop"]
    if token_file is not None:
        argv += ["--token-file", str(token_file)]
    return argv


def metrics_settings(port: int | None, host: str, index: int) -> dict[str, Any]:
    """The metrics settings of a cluster's ``index``-th process: port ``port + index`` (any free
    port when ``port`` is 0), none when ``port`` is None."""
    if port is None:
        return {}
    return {"metrics_port": port + index if port else 0, "metrics_host": host}


@contextlib.contextmanager
def run_folder(run_dir: Path | None, prefix: str) -> Iterator[Path]:
    """The folder a run's processes log to, with SIGTERM handled as Ctrl-C while the run lasts.

    ``run_dir`` is created if needed; None makes a temporary folder, removed when the run ends
    well. When the block raises, the folder is kept and named in an error log line.
    """
    folder = Path(tempfile.mkdtemp(prefix=prefix)) if run_dir is None else run_dir
    folder.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, terminate_on_sigterm)
    ok = False
    try:
        yield folder
        ok = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        if not ok:
            log.error("process logs kept in %s", folder)
        elif run_dir is None:
            shutil.rmtree(folder, ignore_errors=True)
