"""Integration: tokens, TLS and mutual TLS, and hostile pushes, against real shard processes.

Every server here is a real ``ranger-ps server`` process on loopback, its output captured in a log
file (so the tests can prove what it never logs). Requests are sent over raw gRPC channels with
identity serializers, exactly as an attacker who does not use the client library would send them.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import json
import math
import os
import re
import resource
import secrets
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ranger_ps.algorithm.layout import Layout
from ranger_ps.algorithm.placement import Placement
from ranger_ps.algorithm.rules import RuleConfig
from ranger_ps.client.admin import check_health, fetch_stats
from ranger_ps.client.sharded import ShardedClient
from ranger_ps.errors import UserError
from ranger_ps.orchestration import launcher
from ranger_ps.wire._proto import ranger_ps_pb2 as pb
from ranger_ps.wire.codec import codec_for_name, tensor_bytes
from ranger_ps.wire.frames import WireBlock, chunk_frames, decode_frame, encode_frame, split_blocks
from ranger_ps.wire.messages import layout_to_proto
from ranger_ps.wire.rpc import ERROR_METADATA_KEY, METHODS, SERVICE_NAME, method_path
from ranger_ps.wire.runs import WireRun, encode_exchange
from ranger_ps.wire.security import ClientSecurity
from tests.conftest import one_line_error, pid_alive, ranger_ps_cmd, stop_process

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

# -- servers ---------------------------------------------------------------------------------------


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any RANGER_PS_* variable (a stray token must not leak in), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RANGER_PS_")}
    env["OMP_NUM_THREADS"] = "1"
    return {**env, **extra}


@dataclass
class Server:
    """A running ``ranger-ps server`` process and its captured output."""

    address: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None and pid_alive(self.process.pid)


@contextmanager
def serve(
    directory: Path,
    *flags: str,
    env: Mapping[str, str] | None = None,
    log_level: str = "DEBUG",
    memory_limit: int | None = None,
) -> Iterator[Server]:
    """Run one shard (``--port 0``) until the block exits; its output goes to ``directory/server.log``.

    ``memory_limit`` caps the process's address space (bytes), for servers a test expects to misbehave.
    """

    def limit_memory() -> None:  # pragma: no cover - runs in the child between fork and exec
        if memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    directory.mkdir(parents=True, exist_ok=True)
    ready = directory / "ready.json"
    log_path = directory / "server.log"
    argv = ranger_ps_cmd("server", "--port", "0", "--ready-file", str(ready), "--log-level", log_level, *flags)
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env or clean_env()),
            preexec_fn=limit_memory if memory_limit is not None else None,
        )
    try:
        try:
            launcher.wait_for_file(ready, process, 90)
        except launcher.NotReady as exc:
            raise AssertionError(f"server {exc}:\n{log_path.read_text()}") from None
        info = json.loads(ready.read_text())
        yield Server(f"{info['host']}:{info['port']}", process, log_path)
    finally:
        stop_process(process)


def kill_now(server: Server) -> None:
    """SIGKILL a server (for one whose event loop is stuck and would not honour SIGTERM)."""
    if server.process.poll() is None:
        server.process.kill()
        server.process.wait()


# -- raw calls -------------------------------------------------------------------------------------

_SERVICE = pb.DESCRIPTOR.services_by_name["ParameterServer"]
CLIENT_STREAMING = {m.name for m in _SERVICE.methods if m.client_streaming}
SERVER_STREAMING = {m.name for m in _SERVICE.methods if m.server_streaming}

Metadata = Sequence[tuple[str, str]]


class RawShard:
    """A raw gRPC channel to one shard: identity serializers, explicit messages, short deadlines."""

    def __init__(
        self,
        address: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Metadata = (),
        timeout: float = 15.0,
    ) -> None:
        self.address = address
        self.metadata = tuple(metadata)
        self.timeout = timeout
        self.channel = (
            grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
        )

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> RawShard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(
        self, method: str, request: bytes | Sequence[bytes], *, metadata: Metadata | None = None, timeout: float = 0
    ) -> Any:
        """Call any method: a stream method gets ``request`` as its messages; Pull returns its frames."""
        path = method_path(method)
        md = self.metadata if metadata is None else tuple(metadata)
        deadline = timeout or self.timeout
        if method in CLIENT_STREAMING:
            messages = [request] if isinstance(request, bytes) else list(request)
            if method in SERVER_STREAMING:
                return list(self.channel.stream_stream(path)(iter(messages), timeout=deadline, metadata=md))
            return self.channel.stream_unary(path)(iter(messages), timeout=deadline, metadata=md)
        payload = request if isinstance(request, bytes) else b"".join(request)
        if method in SERVER_STREAMING:
            return list(self.channel.unary_stream(path)(payload, timeout=deadline, metadata=md))
        return self.channel.unary_unary(path)(payload, timeout=deadline, metadata=md)

    def health(self, timeout: float = 10.0) -> int:
        reply = health_pb2_grpc.HealthStub(self.channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        return int(reply.status)

    def stats(self) -> pb.StatsReply:
        return pb.StatsReply.FromString(self.call("Stats", pb.StatsRequest().SerializeToString()))

    def register(
        self,
        layout: Layout,
        rule: RuleConfig,
        worker_id: int = -1,
        *,
        shard: tuple[int, int] = (0, 1),
        identity: bool = False,
        secret: bytes = b"",
        observer: bool = False,
    ) -> pb.RegisterReply:
        request = register_request(layout, rule, worker_id, shard, identity=identity, secret=secret, observer=observer)
        return pb.RegisterReply.FromString(self.call("Register", request))

    def initialize(self, worker_id: int, block_ids: Iterable[int], secret: bytes = b"") -> int:
        frames = init_frames(worker_id, block_ids, secret)
        return int(pb.InitReply.FromString(self.call("Init", frames)).blocks_initialized)

    def push(self, frames: Sequence[bytes]) -> pb.PushReply:
        return pb.PushReply.FromString(self.call("Push", frames))

    def weights(self, worker_id: int, secret: bytes = b"") -> dict[int, tuple[int, int, bytes]]:
        """Every block this shard holds: block id -> (version, wire dtype, bytes)."""
        request = pb.PullRequest(worker_id=worker_id, secret=secret).SerializeToString()
        out = {}
        for frame in self.call("Pull", request):
            header, payload = decode_frame(frame)
            for block in split_blocks(header, payload):
                out[block.block_id] = (block.version, int(block.dtype), bytes(block.data))
        return out


def refusal(call: Callable[[], object]) -> grpc.RpcError:
    """The error a call fails with (the test fails if it succeeds)."""
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def register_request(
    layout: Layout,
    rule: RuleConfig,
    worker_id: int = -1,
    shard: tuple[int, int] = (0, 1),
    *,
    identity: bool = False,
    secret: bytes = b"",
    observer: bool = False,
) -> bytes:
    """A Register request (``identity``: ask for a secret; ``secret``: renew the registration that has it)."""
    return pb.RegisterRequest(
        worker_id=worker_id,
        identity=identity,
        secret=secret,
        observer=observer,
        layout=layout_to_proto(layout),
        rule=pb.RuleSpec(msgpack=rule.to_msgpack()),
        expected_shard_id=shard[0],
        expected_num_shards=shard[1],
    ).SerializeToString()


# -- the model -------------------------------------------------------------------------------------

RULE = RuleConfig(lr=0.5, momentum=0.0, outer="rule")


def model_params(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    """A small model with every kind of block: float32, float16 and float64, full and partial."""
    g = torch.Generator().manual_seed(seed)
    return [
        ("w", torch.randn(5, 8, generator=g)),
        ("b", torch.randn(7, generator=g)),
        ("h", torch.randn(20, generator=g).to(torch.float16)),
        ("d", torch.randn(10, generator=g, dtype=torch.float64)),
    ]


LAYOUT = Layout.from_named_tensors(model_params(), block_size=16)
INITIAL = [t for _, t in model_params()]


def block_values(block_id: int, fill: float | Sequence[float]) -> torch.Tensor:
    """A block's worth of values in the block's dtype (a constant, or given per element)."""
    block = LAYOUT.blocks[block_id]
    dtype = codec_for_name(block.dtype).torch_dtype
    if isinstance(fill, int | float):
        return torch.full((block.numel,), float(fill), dtype=dtype)
    return torch.tensor(list(fill), dtype=dtype)


def wire(block_id: int, fill: float | Sequence[float] = 1.0, *, dtype: int | None = None) -> WireBlock:
    """A gradient block as it travels (dtype overridable to forge a wrong one)."""
    block = LAYOUT.blocks[block_id]
    codec = codec_for_name(block.dtype)
    data = tensor_bytes(block_values(block_id, fill))
    return WireBlock(block_id, 0, codec.wire if dtype is None else dtype, data)  # type: ignore[arg-type]


def initial_blocks(block_ids: Sequence[int]) -> list[WireBlock]:
    flats = LAYOUT.flat_views(INITIAL)
    out = []
    for block_id in block_ids:
        block = LAYOUT.blocks[block_id]
        values = flats[block.param_index][block.offset : block.offset + block.numel]
        out.append(WireBlock(block_id, 0, codec_for_name(block.dtype).wire, tensor_bytes(values)))
    return out


def init_frames(worker_id: int, block_ids: Iterable[int], secret: bytes = b"") -> list[bytes]:
    header = pb.FrameHeader(init=pb.InitHeader(worker_id=worker_id, secret=secret))
    return list(chunk_frames(initial_blocks(list(block_ids)), first_header=header, always_one=True))


def push_frames(
    worker_id: int, clock: int, blocks: Sequence[WireBlock], *, chunk_bytes: int = 1 << 20, secret: bytes = b""
) -> list[bytes]:
    """A v1 push of these blocks (``secret``: the one the worker's registration was given)."""
    header = pb.FrameHeader(push=pb.PushHeader(worker_id=worker_id, clock=clock, secret=secret))
    return list(chunk_frames(blocks, chunk_bytes=chunk_bytes, first_header=header, always_one=True))


def exchange_frames(
    worker_id: int,
    clock: int,
    block_ids: Sequence[int],
    fills: Sequence[float | Sequence[float]] | None = None,
    *,
    chunk_bytes: int = 1 << 20,
    secret: bytes = b"",
) -> list[bytes]:
    """An exchange pushing these blocks (a run per block, in its own type; ``fills`` as for
    :func:`block_values`, 1.0 by default) and pulling."""
    runs = []
    for index, block_id in enumerate(block_ids):
        codec = codec_for_name(LAYOUT.blocks[block_id].dtype)
        values = block_values(block_id, 1.0 if fills is None else fills[index]).reshape(-1)
        runs.append(WireRun(codec.wire, torch.tensor([block_id]), values))
    lengths = [torch.tensor([LAYOUT.blocks[b].numel]) for b in block_ids]
    header = pb.ExchangeHeader(worker_id=worker_id, clock=clock, secret=secret)
    return encode_exchange(header, runs, lengths, chunk_bytes=chunk_bytes)


def pull_into(client: ShardedClient) -> list[torch.Tensor]:
    """Pull every block through the client into fresh tensors."""
    assert client.layout is not None
    tensors = [torch.zeros_like(t) for t in INITIAL]
    views = client.layout.block_views([t.view(-1) for t in tensors])
    client.apply_pulled(client.pull().result(timeout=30), views)
    return tensors


def assert_trained_once(client: ShardedClient) -> None:
    """Register, push ones to every block, pull: the weights moved by exactly -lr (the client works)."""
    client.register(LAYOUT, RULE, INITIAL)
    assert client.push([torch.ones_like(t) for t in INITIAL], None, clock=1).result(timeout=30).blocks_applied == (
        LAYOUT.num_blocks
    )
    for got, start in zip(pull_into(client), INITIAL, strict=True):
        torch.testing.assert_close(got, start - RULE.lr, atol=2e-3, rtol=0)


# -- certificates ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """Throwaway PEM files: a CA, a server and a client certificate, and an unrelated CA."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    rogue_client_cert: Path  # signed by the unrelated CA
    rogue_client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    server: bool = False,
    client: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(subject) if issuer is None else issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is None:  # a CA
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()), critical=False
        )
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        usages += [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        if server:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(key if issuer is None else issuer[1], hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    out = tmp_path_factory.mktemp("pki")
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("ranger-ps test CA", ca_key, None)
    other = _certificate("ranger-ps unrelated CA", other_key, None)
    keys = {name: ec.generate_private_key(ec.SECP256R1()) for name in ("server", "client", "rogue")}
    _write(out / "server.pem", _certificate("localhost", keys["server"], (ca, ca_key), server=True), keys["server"])
    _write(out / "client.pem", _certificate("worker", keys["client"], (ca, ca_key), client=True), keys["client"])
    _write(out / "rogue.pem", _certificate("worker", keys["rogue"], (other, other_key), client=True), keys["rogue"])
    return Pki(
        ca=_write(out / "ca.pem", ca),
        server_cert=out / "server.pem",
        server_key=out / "server.key",
        client_cert=out / "client.pem",
        client_key=out / "client.key",
        other_ca=_write(out / "other-ca.pem", other),
        rogue_client_cert=out / "rogue.pem",
        rogue_client_key=out / "rogue.key",
    )


def _run_cli(*args: str, env: Mapping[str, str] | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ranger_ps_cmd(*args), capture_output=True, text=True, timeout=timeout, env=dict(env or clean_env())
    )


# == 1. tokens ======================================================================================


def _requests_that_would_change_state() -> dict[str, bytes | list[bytes]]:
    """One well-formed request per method; accepted, each would change or reveal something."""
    return {
        "Register": register_request(LAYOUT, RULE, worker_id=0),
        "Init": init_frames(0, range(LAYOUT.num_blocks)),
        "Push": push_frames(0, 1, [wire(0), wire(4)]),
        "Exchange": exchange_frames(0, 1, [0, 4]),
        "Pull": pb.PullRequest(worker_id=0).SerializeToString(),
        "Stats": pb.StatsRequest().SerializeToString(),
        "Heartbeat": pb.HeartbeatRequest(worker_id=0).SerializeToString(),
        "Leave": pb.LeaveRequest(worker_id=0).SerializeToString(),
    }  # fmt: skip


def _reflection_services(channel: grpc.Channel, metadata: Metadata) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10, metadata=metadata
    )
    return [s.name for reply in replies for s in reply.list_services_response.service]


def test_token_guards_every_method_and_a_refused_call_changes_nothing(tmp_path: Path) -> None:
    token, wrong = f"tok-{secrets.token_hex(16)}", f"tok-{secrets.token_hex(16)}"
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    good = (("authorization", f"Bearer {token}"),)
    attempts: list[tuple[str, Metadata]] = [
        ("no metadata", ()),
        ("wrong token", (("authorization", f"Bearer {wrong}"),)),
        ("token without the Bearer scheme", (("authorization", token),)),
        ("token under another key", (("x-token", f"Bearer {token}"),)),
        ("a prefix of the token", (("authorization", f"Bearer {token[:-1]}"),)),
    ]
    requests = _requests_that_would_change_state()
    assert set(requests) == set(METHODS), "a method was added: give it a request here"
    with serve(tmp_path / "server", "--token-file", str(token_file)) as server:
        with RawShard(server.address) as raw:
            for method, request in requests.items():
                for what, metadata in attempts:
                    error = refusal(lambda m=method, r=request, md=metadata: raw.call(m, r, metadata=md))  # type: ignore[misc]
                    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, (method, what, error)
                    assert error.details(), (method, what)
                    assert token not in (error.details() or ""), (method, what)
            # the standard health check needs no token (probes carry no data)...
            assert raw.health() == health_pb2.HealthCheckResponse.SERVING
            # ...but reflection does
            error = refusal(lambda: _reflection_services(raw.channel, ()))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            error = refusal(lambda: _reflection_services(raw.channel, attempts[1][1]))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert SERVICE_NAME in _reflection_services(raw.channel, good)
            # nothing the refused calls carried reached the shard
            stats = pb.StatsReply.FromString(raw.call("Stats", requests["Stats"], metadata=good))
            assert not stats.initialized and stats.layout_fingerprint == "" and stats.num_blocks == 0
            assert list(stats.workers) == []
            counters = (stats.pushes_applied, stats.blocks_applied, stats.pulls_served, stats.bytes_received)
            assert counters == (0, 0, 0, 0)
        # the library's clients: without the token refused, with it everything works
        with ShardedClient([server.address], connect_timeout=5) as anonymous:
            with pytest.raises(UserError, match="UNAUTHENTICATED"):
                anonymous.register(LAYOUT, RULE, INITIAL)
        assert isinstance(fetch_stats([server.address])[0], str)
        with ShardedClient([server.address], security=ClientSecurity(token=token)) as client:
            assert_trained_once(client)
        (stats_reply,) = fetch_stats([server.address], security=ClientSecurity(token=token))
        assert not isinstance(stats_reply, str) and stats_reply.blocks_applied == LAYOUT.num_blocks
        cmdline = Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
        assert token.encode() not in cmdline and str(token_file).encode() in cmdline
    log = server.log()
    assert "serving on" in log and "joined shard 0" in log  # the log is real (DEBUG level)...
    assert token not in log and wrong not in log  # ...and holds neither token
    assert token[4:] not in log and "Bearer" not in log


@pytest.mark.timeout(300)
def test_local_cluster_keeps_the_token_out_of_argv_logs_and_reports(tmp_path: Path) -> None:
    token = f"tok-{secrets.token_hex(16)}"
    token_file = tmp_path / "token"
    token_file.write_text(token)
    run_dir, report = tmp_path / "run", tmp_path / "report.json"
    argv = ranger_ps_cmd(
        "local", "--token-file", str(token_file), "--epochs", "1", "--run-dir", str(run_dir), "--report", str(report),
        "--workers", "2", "--shards", "1",
    )  # fmt: skip
    out_path = tmp_path / "local.out"
    with open(out_path, "wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=clean_env())
    try:
        cmdlines: dict[str, bytes] = {}
        environs: dict[str, bytes] = {}
        deadline = time.monotonic() + 180
        while not {"local", "worker-0", "worker-1"} <= set(cmdlines):
            assert process.poll() is None, out_path.read_text()
            assert time.monotonic() < deadline, f"the workers did not start: {sorted(cmdlines)}"
            try:
                table: dict[str, int] = json.loads((run_dir / "processes.json").read_text())
            except (OSError, ValueError):
                table = {}
            for name, pid in [("local", process.pid), *table.items()]:
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    environ = Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:
                    continue
                if b"ranger_ps" in cmdline:  # exec'd (not the instant between fork and exec)
                    cmdlines.setdefault(name, cmdline)
                    environs.setdefault(name, environ)
            time.sleep(0.05)
        assert process.wait(timeout=240) == 0, out_path.read_text()
    finally:
        stop_process(process)
    assert set(cmdlines) == {"local", "shard-0", "worker-0", "worker-1"}
    for name, cmdline in cmdlines.items():
        assert token.encode() not in cmdline, name
        assert str(token_file).encode() in cmdline, name  # the path travels, never the token
    for name, environ in environs.items():
        assert token.encode() not in environ, name
    assert json.loads(report.read_text())["steps"] > 0
    files = [report, out_path, *sorted(p for p in run_dir.rglob("*") if p.is_file())]
    assert {"shard-0.log", "worker-0.log", "worker-1.log", "worker-0.json", "processes.json"} <= {p.name for p in files}
    for path in files:
        assert token.encode() not in path.read_bytes(), path


def test_worker_takes_the_token_from_RANGER_PS_TOKEN(tmp_path: Path) -> None:
    token = f"tok-{secrets.token_hex(16)}"
    # the server takes it from the environment too (containers)
    with serve(tmp_path / "server", env=clean_env(RANGER_PS_TOKEN=token), log_level="INFO") as server:
        report = tmp_path / "worker.json"
        common = ("--servers", server.address, "--epochs", "1", "--connect-timeout", "10", "--no-uvloop")
        wrong = _run_cli("worker", *common, env=clean_env(RANGER_PS_TOKEN=token + "x"))
        assert "UNAUTHENTICATED" in one_line_error(wrong)
        result = _run_cli("worker", *common, "--report", str(report), env=clean_env(RANGER_PS_TOKEN=token))
        assert result.returncode == 0, result.stderr
        steps = json.loads(report.read_text())["steps"]
        (stats,) = fetch_stats([server.address], security=ClientSecurity(token=token))
        assert not isinstance(stats, str) and stats.pushes_applied == steps > 0
    for text in (report.read_text(), result.stdout, result.stderr, wrong.stderr, server.log()):
        assert token not in text


@pytest.mark.timeout(240)
def test_local_cluster_takes_the_token_from_RANGER_PS_TOKEN(tmp_path: Path) -> None:
    token = f"tok-{secrets.token_hex(16)}"
    report = tmp_path / "report.json"
    result = _run_cli(
        "local", "--epochs", "1", "--workers", "1", "--shards", "1", "--run-dir", str(tmp_path / "run"),
        "--report", str(report), env=clean_env(RANGER_PS_TOKEN=token), timeout=220,
    )  # fmt: skip
    assert token not in result.stdout + result.stderr
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(report.read_text())["steps"] > 0


# == 2. TLS ========================================================================================


def _tls(pki: Pki, ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> ClientSecurity:
    return ClientSecurity(
        tls_ca=(ca or pki.ca).read_bytes(),
        tls_cert=cert.read_bytes() if cert else None,
        tls_key=key.read_bytes() if key else None,
    )


HANDSHAKE = r"(?i)handshake failed.*CERTIFICATE_VERIFY_FAILED"  # what BoringSSL reports, via gRPC


def test_tls_server_serves_trusting_clients_only(tmp_path: Path, pki: Pki) -> None:
    flags = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--log-level", "INFO")
    with serve(tmp_path / "server", *flags) as server:
        # a plaintext client is refused: no reply, no data
        with RawShard(server.address) as plain:
            error = refusal(lambda: plain.call("Stats", pb.StatsRequest().SerializeToString(), timeout=5))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            error = refusal(lambda: plain.call("Pull", pb.PullRequest().SerializeToString(), timeout=5))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert check_health(server.address, timeout=5) == "UNAVAILABLE"
        # a client trusting another CA fails its handshake, and says so
        (reply,) = fetch_stats([server.address], timeout=5, security=_tls(pki, pki.other_ca))
        assert isinstance(reply, str) and reply.startswith("UNAVAILABLE"), reply
        assert re.search(HANDSHAKE, reply), reply
        wrong_ca = _run_cli(
            "worker", "--servers", server.address, "--tls-ca", str(pki.other_ca), "--connect-timeout", "2",
            "--epochs", "1",
        )  # fmt: skip
        line = one_line_error(wrong_ca)
        assert server.address in line and re.search(HANDSHAKE, line), line
        # the CA that signed the server's certificate works, raw and through the library
        credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())
        with RawShard(server.address, credentials=credentials) as secure:
            assert secure.health() == health_pb2.HealthCheckResponse.SERVING
            assert not secure.stats().initialized
        with ShardedClient([server.address], security=_tls(pki)) as client:
            assert_trained_once(client)
        health = _run_cli("health", "--server", server.address, "--tls-ca", str(pki.ca), "--no-uvloop")
        assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr
        assert server.alive()
    assert "TLS" in server.log()


def test_mutual_tls_requires_a_client_certificate_from_the_ca(tmp_path: Path, pki: Pki) -> None:
    flags = ("--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca))
    with serve(tmp_path / "server", *flags, log_level="INFO") as server:
        for security in (
            _tls(pki),  # trusts the server, but shows no certificate
            _tls(pki, cert=pki.rogue_client_cert, key=pki.rogue_client_key),  # a certificate from another CA
        ):
            (reply,) = fetch_stats([server.address], timeout=5, security=security)
            assert isinstance(reply, str) and reply.startswith("UNAVAILABLE"), reply
        with RawShard(server.address) as plain:
            error = refusal(lambda: plain.call("Stats", pb.StatsRequest().SerializeToString(), timeout=5))
            assert error.code() == grpc.StatusCode.UNAVAILABLE
        with ShardedClient([server.address], security=_tls(pki, cert=pki.client_cert, key=pki.client_key)) as client:
            assert_trained_once(client)
        health = _run_cli(
            "health", "--server", server.address, "--tls-ca", str(pki.ca), "--tls-client-cert", str(pki.client_cert),
            "--tls-client-key", str(pki.client_key), "--no-uvloop",
        )  # fmt: skip
        assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr
        assert server.alive()
    assert "mutual TLS" in server.log()


# == 3. validation before anything is applied =========================================================


@dataclass
class Target:
    """A shard registered and initialized by ``worker_id``, with the blocks it holds and does not."""

    server: Server
    raw: RawShard
    worker_id: int
    own: tuple[int, ...]
    foreign: tuple[int, ...]
    clocks: Iterator[int]
    secret: bytes = b""  # the registration's, when it registered with identity

    def block(self, dtype: str) -> int:
        """A block of this shard with this dtype."""
        return next(b for b in self.own if LAYOUT.blocks[b].dtype == dtype)

    @property
    def f32(self) -> int:
        return self.block("float32")

    @property
    def f16(self) -> int:
        return self.block("float16")

    @property
    def f64(self) -> int:
        return self.block("float64")

    def state(self) -> tuple[dict[int, tuple[int, int, bytes]], tuple[int, int, int, list[tuple[int, int, int]]]]:
        """Weights and the counters a push would move (applied pushes and blocks, versions, worker clocks)."""
        stats = self.raw.stats()
        counters = (
            stats.pushes_applied,
            stats.blocks_applied,
            stats.version_sum,
            [(w.worker_id, w.clock, w.pushes) for w in stats.workers],
        )
        return self.raw.weights(self.worker_id, self.secret), counters


@contextmanager
def registered_shard(directory: Path, *flags: str, num_shards: int = 1) -> Iterator[Target]:
    """Shard 0 of ``num_shards``, registered and initialized over raw calls by one worker."""
    all_flags = ("--num-shards", str(num_shards), "--lease-seconds", "3600", *flags)
    with serve(directory, *all_flags, log_level="INFO") as server, RawShard(server.address) as raw:
        reply = raw.register(LAYOUT, RULE, shard=(0, num_shards))
        assert reply.must_initialize
        placement = Placement.compute(LAYOUT, num_shards)
        own = placement.blocks_by_shard[0]
        assert tuple(reply.block_ids) == own
        assert raw.initialize(reply.worker_id, own) == len(own)
        foreign = tuple(b for b in range(LAYOUT.num_blocks) if b not in own)
        yield Target(server, raw, reply.worker_id, own, foreign, itertools.count(1))


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with registered_shard(tmp_path_factory.mktemp("validation"), num_shards=2) as shard:
        assert {LAYOUT.blocks[b].dtype for b in shard.own} == {"float32", "float16", "float64"}
        assert shard.foreign
        yield shard
    # after every hostile case, the server still stops cleanly on SIGTERM
    assert shard.server.process.returncode == 0, shard.server.log()[-3000:]


def _with(block_id: int, position: int, value: float) -> WireBlock:
    """A block of 0.5s with ``value`` at ``position`` (a NaN, an Inf)."""
    values = [0.5] * LAYOUT.blocks[block_id].numel
    values[position] = value
    return wire(block_id, values)


def _push(t: Target, *blocks: WireBlock, chunk_bytes: int = 1 << 20, worker_id: int | None = None) -> list[bytes]:
    """A push of ``blocks`` from the registered worker, at a clock never used before."""
    return push_frames(t.worker_id if worker_id is None else worker_id, next(t.clocks), blocks, chunk_bytes=chunk_bytes)


def _misdeclared(t: Target, declared: int, carried: int) -> list[bytes]:
    """A frame whose header gives a block ``declared`` bytes while its payload holds ``carried``."""
    data = bytes(wire(t.f32).data) * 2
    header = pb.FrameHeader(push=pb.PushHeader(worker_id=t.worker_id, clock=next(t.clocks)))
    header.blocks.add(block_id=t.f32, version=0, dtype=pb.FLOAT32, nbytes=declared)
    return [encode_frame(header, [data[:carried]])]


def _good_frame_then(t: Target, second: bytes) -> list[bytes]:
    """A valid first frame (a good block) followed by ``second``: the push must fail as a whole."""
    return [*_push(t, wire(t.f64)), second]


def _frame(*blocks: WireBlock) -> bytes:
    """A follow-up frame (no push header) carrying ``blocks``."""
    (frame,) = chunk_frames(blocks)
    return frame


def _forged(block_id: int, data: bytes, wire_dtype: int = pb.FLOAT32) -> WireBlock:
    return WireBlock(block_id, 0, wire_dtype, memoryview(data))  # type: ignore[arg-type]


Case = tuple[str, Callable[[Target], list[bytes]], grpc.StatusCode, str]
BAD, UNKNOWN_WORKER = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
NAN = "NaN or Inf"
PAST_END = "runs past the end"
CASES: list[Case] = [
    ("unknown block id", lambda t: _push(t, _forged(9999, b"\0" * 32)), BAD, "block 9999 is not held"),
    ("block of another shard", lambda t: _push(t, wire(t.foreign[0])), BAD, "is not held by this shard"),
    ("wrong dtype, same length", lambda t: _push(t, wire(t.f16, dtype=pb.BFLOAT16)), BAD, "wire dtype"),
    ("float64 block sent as float32", lambda t: _push(t, wire(t.f64, dtype=pb.FLOAT32)), BAD, "expected float64"),
    ("unknown wire dtype", lambda t: _push(t, wire(t.f32, dtype=77)), BAD, "wire dtype 77"),
    ("wrong byte length", lambda t: _push(t, wire(t.f32, [1.0] * 7)), BAD, "has 28 bytes, expected 32"),
    ("odd byte length", lambda t: _push(t, _forged(t.f16, b"\0" * 31, pb.FLOAT16)), BAD, "has 31 bytes"),
    ("duplicate block", lambda t: _push(t, wire(t.f32), wire(t.f32, 2.0)), BAD, "appears twice"),
    ("duplicate across frames", lambda t: _push(t, wire(t.f64), wire(t.f64), chunk_bytes=1), BAD, "appears twice"),
    ("NaN", lambda t: _push(t, _with(t.f32, 3, math.nan)), BAD, NAN),
    ("+Inf in float16", lambda t: _push(t, _with(t.f16, 0, math.inf)), BAD, NAN),
    ("-Inf in float64", lambda t: _push(t, _with(t.f64, 9, -math.inf)), BAD, NAN),
    ("good block + NaN block", lambda t: _push(t, wire(t.f32), _with(t.f64, 1, math.nan)), BAD, NAN),
    ("good block + unknown block", lambda t: _push(t, wire(t.f32), _forged(4242, b"\0" * 32)), BAD, "block 4242"),
    ("header declares more than payload", lambda t: _misdeclared(t, 32, 28), BAD, "but the frame ends after 28"),
    ("payload longer than declared", lambda t: _misdeclared(t, 28, 32), BAD, "4 bytes beyond its declared blocks"),
    ("not a Frame", lambda t: [b"\xff\xff\xff\xff\x0f not a frame"], BAD, "frame"),
    ("good frame + not a Frame", lambda t: _good_frame_then(t, b"\x0a\xff\xff\xff\x7f"), BAD, PAST_END),
    ("good frame + frame cut mid-block", lambda t: _good_frame_then(t, _frame(wire(t.f32))[:-3]), BAD, PAST_END),
    ("good frame + NaN frame", lambda t: _good_frame_then(t, _frame(_with(t.f16, 5, math.nan))), BAD, NAN),
    ("good frame + foreign block", lambda t: _good_frame_then(t, _frame(wire(t.foreign[0]))), BAD, "not held"),
    ("no push header", lambda t: [encode_frame(pb.FrameHeader(init=pb.InitHeader()), [])], BAD, "push header"),
    ("empty stream", lambda t: [], BAD, "empty stream: expected at least one frame"),
    ("unregistered worker", lambda t: _push(t, wire(t.f32), worker_id=4242), UNKNOWN_WORKER, "4242 is not registered"),
]  # fmt: skip


@pytest.mark.parametrize(("frames", "status", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_bad_push_is_refused_precisely_and_applies_nothing(
    target: Target, frames: Callable[[Target], list[bytes]], status: grpc.StatusCode, needle: str
) -> None:
    before = target.state()
    error = refusal(lambda: target.raw.push(frames(target)))
    assert error.code() == status, error
    assert error.details() and needle in error.details(), error.details()
    if status == grpc.StatusCode.FAILED_PRECONDITION:  # a client re-registers on this marker
        assert (ERROR_METADATA_KEY, "not-registered") in tuple(error.trailing_metadata() or ())
    assert target.state() == before, "a refused push changed the shard"
    assert target.server.alive()


def test_a_good_push_built_the_same_way_is_applied(target: Target) -> None:
    """The control: the frames the refused cases forge are accepted when nothing is wrong with them."""
    weights, _ = target.state()
    f32, f16, f64 = (target.block(d) for d in ("float32", "float16", "float64"))
    reply = target.raw.push(push_frames(target.worker_id, next(target.clocks), [wire(f32), wire(f16), wire(f64, 2.0)]))
    assert reply.blocks_applied == 3
    after, counters = target.state()
    for block_id, (version, _, data) in weights.items():
        new_version, _, new_data = after[block_id]
        if block_id in (f32, f16, f64):
            assert new_version == version + 1
            step = 2.0 if block_id == f64 else 1.0
            torch_dtype = codec_for_name(LAYOUT.blocks[block_id].dtype).torch_dtype
            old = torch.frombuffer(bytearray(data), dtype=torch_dtype).double()
            new = torch.frombuffer(bytearray(new_data), dtype=torch_dtype).double()
            torch.testing.assert_close(new, old - RULE.lr * step, atol=2e-3, rtol=0)
        else:
            assert (new_version, new_data) == (version, data)
    # a push whose clock goes backwards is refused, and applies nothing
    stale = push_frames(target.worker_id, 0, [wire(f32)])
    error = refusal(lambda: target.raw.push(stale))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "before its clock" in (error.details() or "")
    assert target.state() == (after, counters)


def test_a_push_from_a_worker_that_left_is_refused(target: Target) -> None:
    """A worker that left (or whose lease lapsed: the same state) must register again before it pushes."""
    other = target.raw.register(LAYOUT, RULE, worker_id=77, shard=(0, 2))
    assert other.worker_id == 77 and not other.must_initialize
    target.raw.call("Leave", pb.LeaveRequest(worker_id=77).SerializeToString())
    before = target.state()
    error = refusal(lambda: target.raw.push(push_frames(77, 1, [wire(target.f32)])))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "worker 77's lease on shard 0 lapsed (or it left)" in (error.details() or "")
    assert (ERROR_METADATA_KEY, "not-registered") in tuple(error.trailing_metadata() or ())
    assert target.state() == before


def test_the_default_message_limit_refuses_a_larger_message(target: Target) -> None:
    before = target.state()
    huge = b"\x07" * ((64 << 20) + 1024)
    for method in ("Stats", "Push"):
        error = refusal(lambda m=method: target.raw.call(m, huge, timeout=30))  # type: ignore[misc]
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (method, error)
        assert "larger than max" in (error.details() or ""), error.details()
    assert target.state() == before
    assert target.raw.health() == health_pb2.HealthCheckResponse.SERVING


# -- limits and --nan-policy skip --------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    flags = ("--nan-policy", "skip", "--max-workers", "2", "--max-message-mb", "1")
    with registered_shard(tmp_path_factory.mktemp("limited"), *flags) as shard:
        yield shard


def test_nan_policy_skip_acknowledges_and_applies_nothing(limited: Target) -> None:
    t = limited
    weights, before = t.state()
    for blocks in (
        [_with(t.f32, 0, math.nan)],
        [wire(t.f64), _with(t.f32, 2, math.inf)],  # a good block with a bad one: nothing applied
    ):
        reply = t.raw.push(push_frames(t.worker_id, next(t.clocks), blocks))
        assert reply.blocks_applied == 0 and reply.version_sum == 0
        after_weights, after = t.state()
        assert after_weights == weights
        assert after[1:3] == before[1:3]  # blocks applied, versions
    # skip is about NaN and Inf only: any other bad block is still refused
    error = refusal(lambda: t.raw.push(_push(t, _forged(t.f32, b""))))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert t.state()[0] == weights


def test_a_message_larger_than_max_message_mb_is_refused(limited: Target) -> None:
    before = limited.state()
    # under the limit: read and parsed (garbage: INVALID_ARGUMENT)
    error = refusal(lambda: limited.raw.call("Stats", b"\x07" * (900 << 10)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    for method in ("Stats", "Push", "Register"):
        error = refusal(lambda m=method: limited.raw.call(m, b"\x07" * (2 << 20)))  # type: ignore[misc]
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (method, error.code(), error.details())
        assert "larger than max" in (error.details() or "")
    assert limited.state() == before


def test_max_workers_refuses_the_next_registration(limited: Target) -> None:
    t = limited
    second = t.raw.register(LAYOUT, RULE)
    assert second.worker_id != t.worker_id and not second.must_initialize
    error = refusal(lambda: t.raw.register(LAYOUT, RULE))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "2 registered workers, its limit" in (error.details() or "")
    # a worker already registered may register again (a restart, a retry): it takes no new place
    assert t.raw.register(LAYOUT, RULE, worker_id=t.worker_id).worker_id == t.worker_id
    assert t.raw.register(LAYOUT, RULE, worker_id=second.worker_id).worker_id == second.worker_id
    assert [w.worker_id for w in t.raw.stats().workers] == sorted([t.worker_id, second.worker_id])


def test_a_worker_that_left_frees_its_place(tmp_path: Path) -> None:
    with registered_shard(tmp_path / "server", "--max-workers", "1") as t:
        t.raw.call("Leave", pb.LeaveRequest(worker_id=t.worker_id).SerializeToString())
        assert [w.live for w in t.raw.stats().workers] == [False]
        reply = t.raw.register(LAYOUT, RULE)  # a new worker, while none is registered
        assert reply.worker_id != t.worker_id


def test_unregistered_calls_are_refused_with_the_marker(target: Target) -> None:
    for method, request in (
        ("Pull", pb.PullRequest(worker_id=31337)),
        ("Heartbeat", pb.HeartbeatRequest(worker_id=31337)),
    ):
        error = refusal(lambda m=method, r=request: target.raw.call(m, r.SerializeToString()))  # type: ignore[misc]
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, method
        assert "worker 31337 is not registered" in (error.details() or "")
        assert (ERROR_METADATA_KEY, "not-registered") in tuple(error.trailing_metadata() or ())
    error = refusal(lambda: target.raw.call("Init", init_frames(31337, target.own)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "already initialized" in (error.details() or "")


def test_a_huge_layout_in_the_first_registration_is_refused_at_once(tmp_path: Path) -> None:
    # the address-space cap keeps a runaway enumeration (a regression) from eating the machine's memory;
    # 3 GiB was too tight for the server's own start on a busy machine (gRPC aborted on it once)
    with serve(tmp_path / "server", log_level="INFO", memory_limit=8 << 30) as server, RawShard(server.address) as raw:
        try:
            request = pb.RegisterRequest(
                worker_id=-1,
                layout=pb.LayoutSpec(params=[pb.ParamSpec(name="x", shape=[1 << 40], dtype=pb.FLOAT32)], block_size=1),
                rule=pb.RuleSpec(msgpack=b"\x80"),  # {}: the default rule
                expected_shard_id=0,
                expected_num_shards=1,
            ).SerializeToString()
            assert len(request) < 40
            error = refusal(lambda: raw.call("Register", request, timeout=4))
            try:
                health: object = raw.health(timeout=2)
            except grpc.RpcError as exc:
                health = exc.code()
            assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (
                f"Register answered {error.code()}; a health check then got {health}"
            )
            assert health == health_pb2.HealthCheckResponse.SERVING
        finally:
            kill_now(server)  # a frozen server would not honour SIGTERM; its memory keeps growing
