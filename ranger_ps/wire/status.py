"""Request failures, each tied to the gRPC status the servicer answers with."""

from __future__ import annotations


class RequestError(Exception):
    """A request the shard refuses; ``status`` names a ``grpc.StatusCode`` member."""

    status = "INTERNAL"


class InvalidRequest(RequestError):
    """Malformed or inconsistent request content."""

    status = "INVALID_ARGUMENT"


class PreconditionFailed(RequestError):
    """A well-formed request the shard cannot accept in its current state."""

    status = "FAILED_PRECONDITION"


class NotReady(RequestError):
    """The shard cannot serve this yet (e.g. it is still being initialized); retry later."""

    status = "UNAVAILABLE"


class NotRegistered(PreconditionFailed):
    """The worker is unknown here or its lease lapsed (e.g. the shard restarted): register again.

    Marked for clients with the trailing metadata ``ranger-ps-error: not-registered``, so they can
    re-register and retry without parsing messages.
    """

    marker = "not-registered"


class NonFinite(InvalidRequest):
    """A gradient holds NaN or Inf (refused, or skipped under ``--nan-policy skip``)."""


class Exhausted(RequestError):
    """A configured limit is reached (registered workers, message size)."""

    status = "RESOURCE_EXHAUSTED"


class IdInUse(RequestError):
    """A worker id that is live under another registration (another process uses it)."""

    status = "ALREADY_EXISTS"


class WrongSecret(RequestError):
    """A call of a worker that does not carry its registration's secret."""

    status = "PERMISSION_DENIED"
