"""The one error hierarchy of keyguard, shared by server and client.

The server's domain raises these; the gRPC layer turns each into its status
code (with a ``google.rpc.BadRequest`` detail for :class:`InvalidArgument`),
and :class:`keyguard.Client` turns the status back into the same class, so a
caller catches ``keyguard.NotFound`` and never ``grpc.RpcError``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class FieldViolation:
    """One reason a request was refused: the proto field path and why."""

    field: str
    description: str

    def __str__(self) -> str:
        return f"{self.field}: {self.description}"


class KeyguardError(Exception):
    """Base class; ``code`` is the gRPC status code the error travels as."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(KeyguardError):
    """The request is malformed; ``violations`` names every offending field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: Iterable[FieldViolation], message: str = "") -> None:
        self.violations = tuple(violations)
        super().__init__(message or "; ".join(map(str, self.violations)) or "invalid argument")

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(v.field for v in self.violations)


class NotFound(KeyguardError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(KeyguardError):
    code = grpc.StatusCode.ALREADY_EXISTS


class LimitExceeded(KeyguardError):
    """A per-account limit (keys, whitelist entries) would be exceeded."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class StorageFull(KeyguardError):
    """The database's disk is full: nothing was changed. Reads and Authorize go on; retry the
    change later (the status carries a ``google.rpc.RetryInfo``, which tells it apart from
    :class:`LimitExceeded`, the same code)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(KeyguardError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(KeyguardError):
    """The *caller* (not an API key) may not use this RPC."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(KeyguardError):
    """The server, or its database, cannot answer now; nothing was changed, safe to retry."""

    code = grpc.StatusCode.UNAVAILABLE


class Aborted(KeyguardError):
    """A change could not get its lock in time (another change to the same account holds it);
    nothing was changed, safe to retry."""

    code = grpc.StatusCode.ABORTED


class FailedPrecondition(KeyguardError):
    """The change is refused in the account's current state (it is frozen: unfreeze it first);
    nothing was changed. Retrying is useless until the state changes."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ServerError(KeyguardError):
    """Anything else the server answered (INTERNAL, UNKNOWN, ...)."""


ERRORS_BY_CODE: dict[grpc.StatusCode, type[KeyguardError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        AlreadyExists,
        LimitExceeded,
        Unauthenticated,
        PermissionDenied,
        Unavailable,
        Aborted,
        FailedPrecondition,
    )
}
