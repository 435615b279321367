"""keyguard: API keys for a crypto exchange's trading bots.

``keyguard.Client`` talks to a keyguard server (``Client.authorizer()`` gives a
``StreamingAuthorizer`` for high-rate Authorize calls); the dataclasses, enums and
errors here are the vocabulary shared by client and server; ``keyguard.signing`` is what an
ED25519 key signs (``sign_request`` is re-exported here).
"""

from keyguard._client import DEFAULT_TARGET, Client, StreamingAuthorizer
from keyguard._errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    KeyguardError,
    LimitExceeded,
    NotFound,
    PermissionDenied,
    ServerError,
    StorageFull,
    Unauthenticated,
    Unavailable,
)
from keyguard._models import (
    AccountSettings,
    ApiKey,
    AuditAction,
    AuditEvent,
    AuthorizeResult,
    CreatedKey,
    Decision,
    KeyType,
    Permission,
    SignedRequest,
    WithdrawalAddress,
    WithdrawalDestination,
)
from keyguard.signing import envoy_payload, sign_request

__all__ = [
    "DEFAULT_TARGET",
    "Aborted",
    "AccountSettings",
    "AlreadyExists",
    "ApiKey",
    "AuditAction",
    "AuditEvent",
    "AuthorizeResult",
    "Client",
    "CreatedKey",
    "Decision",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "KeyType",
    "KeyguardError",
    "LimitExceeded",
    "NotFound",
    "Permission",
    "PermissionDenied",
    "ServerError",
    "SignedRequest",
    "StorageFull",
    "StreamingAuthorizer",
    "Unauthenticated",
    "Unavailable",
    "WithdrawalAddress",
    "WithdrawalDestination",
    "envoy_payload",
    "sign_request",
]
