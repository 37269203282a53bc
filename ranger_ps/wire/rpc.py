"""Names and limits of the gRPC service, shared by the server and the client.

Every method is served and called with identity serializers (raw ``bytes``), and each side parses
messages explicitly: a stock generated servicer would parse before our code runs and answer bad
bytes with UNKNOWN, where we answer INVALID_ARGUMENT with a message; and frames keep tensor bytes
out of protobuf parsing (see :mod:`ranger_ps.wire.frames`).
"""

from __future__ import annotations

import grpc

from ranger_ps.wire._proto import ranger_ps_pb2 as pb

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name
METHODS: tuple[str, ...] = tuple(m.name for m in pb.DESCRIPTOR.services_by_name["ParameterServer"].methods)

# Frames are about 2 MiB, but one block may be up to MAX_BLOCK_SIZE float64 elements (32 MiB).
MAX_MESSAGE_BYTES = 64 << 20

CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # Loopback and datacenter links: keep HTTP/2 flow control out of the way of bulk transfers.
    ("grpc.http2.bdp_probe", 1),
)


# Trailing metadata that marks refusals a client can act on (e.g. "not-registered": register again).
ERROR_METADATA_KEY = "ranger-ps-error"


def describe_rpc_error(exc: grpc.aio.AioRpcError) -> str:
    """``CODE: details`` of a failed call, for one-line messages."""
    return f"{exc.code().name}: {exc.details()}"


def method_path(method: str) -> str:
    """The full ``/package.Service/Method`` path of a method."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    return f"/{SERVICE_NAME}/{method}"


def parse_address(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[v6]:PORT`` too); raises ``ValueError`` with a clear message."""
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"server address {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"server address {text!r} has an invalid port {port_text!r}")
    return host, int(port_text)


def parse_servers(text: str) -> list[str]:
    """Parse a comma-separated ``HOST:PORT`` list; raises ``ValueError`` on any bad entry."""
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries:
        raise ValueError("--servers needs at least one HOST:PORT")
    for entry in entries:
        parse_address(entry)
    if len(set(entries)) != len(entries):
        raise ValueError(f"--servers lists the same address twice: {text}")
    return entries
