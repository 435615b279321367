"""Who is calling, and may they: the caller policy, as a function of a call's credentials.

Every RPC except health checking and reflection (the schema, public in protos/ anyway) needs a
known caller, by bearer token (``authorization: Bearer <token>`` metadata) or by mTLS client
certificate. No credential, or an unknown one, is UNAUTHENTICATED; a known caller outside its role
is PERMISSION_DENIED. The caller's name is then available to the handler through
:func:`current_caller`, for the audit log.

Nothing here reads a call: :meth:`Callers.admission` judges the credentials it is given, so it is
tested without a server; reading them off each call is the routing's (``_routing``).
"""

from __future__ import annotations

import contextvars
import errno
import functools
import hashlib
import logging
import os
import secrets
import stat
import string
import tempfile
from collections.abc import Callable
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyguard_server._config import Caller, Config, Role
from keyguard_server._services import AUTHORIZATION, ENVOY_AUTHORIZATION, KEY_MANAGEMENT, OPEN_SERVICES

log = logging.getLogger("keyguard.auth")

_AUTHORIZATION = frozenset({AUTHORIZATION, ENVOY_AUTHORIZATION})
ROLE_SERVICES: dict[Role, frozenset[str]] = {
    Role.AUTHORIZER: _AUTHORIZATION,
    Role.MANAGER: frozenset({KEY_MANAGEMENT}),
    Role.ADMIN: _AUTHORIZATION | {KEY_MANAGEMENT},
}
# Methods narrower than their service: only these roles may call them, on top of ROLE_SERVICES.
# Freezing stops every bot of an account at once: an operator's decision, not the website's.
METHOD_ROLES: dict[str, frozenset[Role]] = {
    f"/{KEY_MANAGEMENT}/FreezeAccount": frozenset({Role.ADMIN}),
    f"/{KEY_MANAGEMENT}/UnfreezeAccount": frozenset({Role.ADMIN}),
}


def may_call(role: Role, service: str, method: str) -> bool:
    """The one rule of who may call what: the role's services, and for some methods a narrower set of roles."""
    return service in ROLE_SERVICES[role] and role in METHOD_ROLES.get(method, (role,))


# Set by the routing for each call it admits (the call's own task, so its own context).
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("keyguard_caller", default="")


def current_caller() -> str:
    """The name of the authenticated caller of the RPC being handled."""
    return CALLER.get()


Refusal = tuple[grpc.StatusCode, str]  # the status code and message a refused call ends with
# One method's policy (Callers.admission): (authorization header, client certificate) to a caller's name or a refusal.
Admit = Callable[[str | bytes | None, bytes | None], str | Refusal]


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# Generated tokens have 44 characters (40 random letters and digits, ~238 bits).
MIN_TOKEN_LENGTH = 32


def new_token() -> str:
    alphabet = string.ascii_letters + string.digits
    return "kgt_" + "".join(secrets.choice(alphabet) for _ in range(40))


def ensure_admin_token(config: Config) -> Caller:
    """The zero-configuration caller: a token in <data_dir>/admin.token, mode 0600
    (the server has made the data dir, mode 0700).

    Written to a private temporary file and hard-linked into place, so the
    token file is never readable by others, never seen half-written, and two
    servers starting on one data dir agree on one token. Reused on later
    starts so the CLI keeps working.
    """
    path = config.admin_token_file
    if not os.path.lexists(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".admin.token.")  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(new_token() + "\n")
            os.link(tmp, path)
            log.info("generated admin token in %s", path)
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return Caller("admin", Role.ADMIN, token_sha256=token_sha256(read_private_token(path)))


def read_private_token(path: Path) -> str:
    """The token in ``path``: a regular file of this user's that nobody else can read, not a link.

    Whoever can put a token there is admin, so one planted by another user
    (or a link to a file of theirs) is refused; the checks are made on the
    opened file, so the file checked is the file read. An empty or short
    token is refused too: it would be guessable, and an empty one would
    match any request whose bearer token is blank.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PermissionError(f"{path} must be a file, not a symbolic link") from None
        raise
    with os.fdopen(fd) as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise PermissionError(f"{path} must be a regular file owned by the user keyguard runs as")
        if info.st_mode & 0o077:
            raise PermissionError(f"{path} must be readable by its owner only (chmod 600)")
        token = f.read().strip()
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"{path} holds a token of {len(token)} characters, fewer than {MIN_TOKEN_LENGTH}; "
            "delete the file to have a new one generated"
        )
    return token


# Per method: admitted authorization headers remembered (a caller has one token; spellings of
# it, "bearer" or padded, are each one more, up to the bound).
MAX_ADMITTED_HEADERS = 64


class Callers:
    """The configured callers, by token digest and by client certificate name."""

    def __init__(self, callers: tuple[Caller, ...]) -> None:
        self._by_token = {c.token_sha256: c for c in callers if c.token_sha256}
        self._by_cert = {c.cert_common_name: c for c in callers if c.cert_common_name}

    def admission(self, method: str) -> Admit | None:
        """For ``method`` ("/service/Method"), ``admit(header, certificate)``: the caller's name, or
        the refusal to end the call with; None if the service is open to all. ``header``: the
        call's first ``authorization`` value, or None; ``certificate``: the client certificate TLS
        verified (PEM), or None. A header decides alone, even a bad one, so the TLS peer need only
        be read without one.

        ``admit`` remembers the headers it admitted, with their caller's name, so a caller's next
        call costs a dict lookup, not a SHA-256 and the role rules. Only admitted headers are kept,
        at most MAX_ADMITTED_HEADERS; str hashes are keyed per process (SipHash), so the lookup's
        timing tells nothing of the headers held."""
        service = method.split("/")[1] if "/" in method else ""
        if service in OPEN_SERVICES:
            return None
        admitted: dict[str | bytes, str] = {}

        def admit(header: str | bytes | None, certificate: bytes | None) -> str | Refusal:
            if header is not None and (name := admitted.get(header)) is not None:
                return name
            caller = self.identify(header, certificate)
            if caller is None:
                return grpc.StatusCode.UNAUTHENTICATED, "a valid caller token or client certificate is required"
            if not may_call(caller.role, service, method):
                return (
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"caller {caller.name!r} ({caller.role}) may not call {method or service}",
                )
            if header is not None and len(admitted) < MAX_ADMITTED_HEADERS:
                admitted[header] = caller.name
            return caller.name

        return admit

    def identify(self, header: str | bytes | None, certificate: bytes | None) -> Caller | None:
        """The caller a call's first ``authorization`` header names, or without one its client certificate."""
        if header is not None:
            if not isinstance(header, str):
                return None
            scheme, _, token = header.partition(" ")
            token = token.strip()  # "Bearer  " is no token, not the empty token
            if scheme.lower() == "bearer" and token:
                # A dict lookup by digest: timing can only reveal digests, not tokens.
                return self._by_token.get(token_sha256(token))
            return None
        name = client_certificate_name(certificate) if certificate else None
        return self._by_cert.get(name) if name else None


@functools.lru_cache(maxsize=256)
def client_certificate_name(pem: bytes) -> str | None:
    """The caller name a verified client certificate stands for: its one CN, or None.

    gRPC reports only the first of several CNs, which need not be the one the
    CA checked or a reader sees, so a certificate with several is refused as
    ambiguous. TLS has refused one whose extended key usage leaves out
    clientAuth; one without the extension (good for any purpose, such as a
    server's) is refused here: a caller's certificate must say it is a
    client's. Cached: one parse per certificate, not per call.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ValueError, x509.ExtensionNotFound) as exc:
        log.warning("refusing a client certificate: %s", exc)
        return None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usages or len(names) != 1:
        log.warning(
            "refusing a client certificate without clientAuth usage or one CN: %s", cert.subject.rfc4514_string()
        )
        return None
    return str(names[0].value)
