"""Who may talk to a shard, and over what: bearer tokens and TLS (optionally mutual).

Every RPC except the standard health check must carry the gRPC metadata
``authorization: Bearer <token>`` when the server has a token; the comparison is constant-time and
a call without it, or with a wrong one, is answered UNAUTHENTICATED before any shard code runs.
Tokens come from a file (``--token-file``) or the ``RANGER_PS_TOKEN`` environment variable, never
from argv, and are never logged or written to reports (``repr`` hides them).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from ranger_ps.errors import UserError

HEALTH_PREFIX = "/grpc.health.v1.Health/"


def read_secret(path: Path, what: str) -> bytes:
    """Read a token or PEM file; a missing, unreadable or empty file is a :class:`UserError`."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not data.strip():
        raise UserError(f"{what} {path} is empty")
    return data


def read_token(path: Path) -> str:
    """The token in a file (surrounding whitespace removed)."""
    token = read_secret(path, "token file").decode("utf-8", errors="strict").strip()
    if any(c.isspace() for c in token):
        raise UserError(f"token file {path} holds whitespace inside the token")
    return token


@dataclass(frozen=True)
class ClientSecurity:
    """How a worker reaches the shards: token, and TLS trust (plus a client certificate for mTLS)."""

    token: str | None = field(default=None, repr=False)
    tls_ca: bytes | None = field(default=None, repr=False)
    tls_cert: bytes | None = field(default=None, repr=False)
    tls_key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UserError("a client certificate needs both --tls-client-cert and --tls-client-key")
        if self.tls_cert is not None and self.tls_ca is None:
            raise UserError("a client certificate (mutual TLS) needs --tls-ca too")

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata carrying the token (empty without one)."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def channel(self, address: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
        """A channel to ``address``: TLS when a CA is configured, plaintext otherwise."""
        if self.tls_ca is None:
            return grpc.aio.insecure_channel(address, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.tls_ca, private_key=self.tls_key, certificate_chain=self.tls_cert
        )
        return grpc.aio.secure_channel(address, credentials, options=options)


@dataclass(frozen=True)
class ServerSecurity:
    """What a shard demands: a token, TLS, and optionally client certificates from a CA."""

    token: str | None = field(default=None, repr=False)
    tls_cert: bytes | None = field(default=None, repr=False)
    tls_key: bytes | None = field(default=None, repr=False)
    tls_client_ca: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise UserError("TLS needs both --tls-cert and --tls-key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise UserError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        """Listen on ``address`` with TLS when configured; returns the bound port."""
        if self.tls_cert is None or self.tls_key is None:
            return int(server.add_insecure_port(address))
        credentials = grpc.ssl_server_credentials(
            [(self.tls_key, self.tls_cert)],
            root_certificates=self.tls_client_ca,
            require_client_auth=self.tls_client_ca is not None,
        )
        return int(server.add_secure_port(address, credentials))

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenInterceptor(self.token)] if self.token else []

    def describe(self) -> str:
        parts = ["token" if self.token else "no token"]
        parts.append("mutual TLS" if self.tls_client_ca else "TLS" if self.tls_cert else "plaintext")
        return ", ".join(parts)


class TokenInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses every call but the health check unless it carries ``authorization: Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if details.method.startswith(HEALTH_PREFIX) or handler is None:
            return handler
        given = next((v for k, v in details.invocation_metadata or () if k == "authorization"), "")
        given_bytes = given.encode() if isinstance(given, str) else bytes(given)
        if hmac.compare_digest(given_bytes, self._expected):
            return handler
        return _refusal(handler, "missing or wrong token" if given else "this server requires a token")


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED and touches nothing."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield b""  # pragma: no cover - never reached; makes this an async generator

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(deny_stream, **kwargs)
    return grpc.stream_stream_rpc_method_handler(deny_stream, **kwargs)
