"""Who is calling: one caller guard, on every method's handler, for authentication and roles.

Every RPC except health checking and reflection (the schema, public in
protos/ anyway) needs a known caller, by bearer token
(``authorization: Bearer <token>`` metadata) or by mTLS client certificate.
No credential, or an unknown one, is UNAUTHENTICATED; a known caller outside
its role is PERMISSION_DENIED. The caller's name is then available to the
handler through :func:`current_caller`, for the audit log.

The check needs the ServicerContext (the TLS peer is only there), so it wraps
each method's handler, once, when the server registers it (``_server._Routes``),
rather than deciding from the call details in an interceptor on every call.
"""

from __future__ import annotations

import contextvars
import errno
import functools
import hashlib
import inspect
import logging
import os
import secrets
import stat
import string
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from keyguard_server._config import Caller, Config, Role
from keyguard_server._metrics import RPC_SECONDS
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


_caller: contextvars.ContextVar[str] = contextvars.ContextVar("keyguard_caller", default="")


def current_caller() -> str:
    """The name of the authenticated caller of the RPC being handled."""
    return _caller.get()


Metadata = Iterable[tuple[str, str | bytes]]
# A guarded method's handler for one call, made from the call's metadata (see CallerGuard.guard).
ForCall = Callable[[Metadata], "grpc.RpcMethodHandler[Any, Any]"]


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


class CallerGuard:
    def __init__(self, callers: tuple[Caller, ...]) -> None:
        self._by_token = {c.token_sha256: c for c in callers if c.token_sha256}
        self._by_cert = {c.cert_common_name: c for c in callers if c.cert_common_name}

    def guard(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> ForCall | None:
        """For ``method`` ("/service/Method"), what makes each call's handler: ``handler`` behind
        the caller check, judging the metadata the call's handler is made from (grpc has just
        built it for the handler lookup; ``context.invocation_metadata()`` would build it again,
        as Python-level namedtuples, ~14k instructions). None if the service is open to all."""
        service = method.split("/")[1] if "/" in method else ""
        if service in OPEN_SERVICES:
            return None
        return _guarded(method, handler, functools.partial(self._admit, service, method, {}))

    def _admit(
        self,
        service: str,
        method: str,
        admitted: dict[str | bytes, str],
        metadata: Metadata,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> tuple[grpc.StatusCode, str] | str:
        """The caller's name, or the status to refuse the call with.

        ``admitted``: this method's ``authorization`` headers that were admitted, with their
        caller's name, so a caller's next call costs a dict lookup, not a SHA-256 and the role
        rules. Only admitted headers are kept, at most MAX_ADMITTED_HEADERS; str hashes are keyed
        per process (SipHash), so the lookup's timing tells nothing of the headers held.
        """
        header = None
        for key, value in metadata:
            if key == "authorization":
                header = value
                break
        if header is not None and (name := admitted.get(header)) is not None:
            return name
        caller = self._identify(header, context)
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

    def _identify(self, header: str | bytes | None, context: grpc.aio.ServicerContext[Any, Any]) -> Caller | None:
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
        pem = next(iter(context.auth_context().get("x509_pem_cert", ())), None)  # the client's, verified by TLS
        name = client_certificate_name(pem) if pem else None
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


F = TypeVar("F", bound=Callable[..., Any])


def serialized(method: F) -> F:
    """Marks a unary servicer method that answers with its response already serialized (bytes,
    e.g. built once and kept): its guarded handler has no response serializer, so grpc sends
    the bytes as they are instead of serializing the same message again on every call."""
    method.serialized = True  # type: ignore[attr-defined]
    return method


Admit = Callable[[Metadata, grpc.aio.ServicerContext[Any, Any]], "tuple[grpc.StatusCode, str] | str"]


def _guarded(method: str, handler: grpc.RpcMethodHandler[Any, Any], admit: Admit) -> ForCall:
    """The same handler, refusing unadmitted callers first, made for each call with the call's
    metadata bound to it: by construction, a call is judged by its own metadata only.

    Unary calls are timed here; a stream's caller is checked once, when it starts, and its
    messages are timed one by one where they are answered (_stream), not the stream as a whole.
    """
    if handler.unary_unary is not None:
        inner_uu: Any = handler.unary_unary  # typeshed types behaviours as sync
        observe = RPC_SECONDS.labels(method).observe
        perf_counter = time.perf_counter

        async def unary_unary(metadata: Metadata, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            started = perf_counter()
            try:
                verdict = admit(metadata, context)
                if isinstance(verdict, tuple):
                    await context.abort(*verdict)
                _caller.set(verdict)
                return await inner_uu(request, context)
            finally:
                observe(perf_counter() - started)

        serializer = None if getattr(inner_uu, "serialized", False) else handler.response_serializer
        template = grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer, serializer)
        return _for_each_call(template, "unary_unary", unary_unary)
    if handler.stream_stream is not None and inspect.iscoroutinefunction(handler.stream_stream):
        inner_ss: Any = handler.stream_stream

        async def stream_stream(
            metadata: Metadata, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> None:
            # The caller once per stream, before any message is read: a refusal ends it at once.
            verdict = admit(metadata, context)
            if isinstance(verdict, tuple):
                await context.abort(*verdict)
            _caller.set(verdict)
            await inner_ss(request_iterator, context)

        # No response serializer: such a stream writes its answers serialized (bytes), once per result.
        template = grpc.stream_stream_rpc_method_handler(stream_stream, handler.request_deserializer)
        return _for_each_call(template, "stream_stream", stream_stream)
    raise TypeError(
        "only unary keyguard methods and reader-writer (coroutine) bidi streams writing bytes sit behind caller checks"
    )


def _for_each_call(template: grpc.RpcMethodHandler[Any, Any], field: str, behaviour: Callable[..., Any]) -> ForCall:
    """Handlers like ``template`` (grpc's RpcMethodHandler, a namedtuple) whose ``field`` is
    ``behaviour`` with a call's metadata bound first: built per call from its fields (a list
    copy and a tuple, not namedtuple's Python-level ``_replace``)."""
    kind: Any = type(template)
    fields = list(cast(tuple[Any, ...], template))
    slot = kind._fields.index(field)

    def for_call(metadata: Metadata) -> grpc.RpcMethodHandler[Any, Any]:
        values = fields.copy()
        values[slot] = functools.partial(behaviour, metadata)
        handler: grpc.RpcMethodHandler[Any, Any] = tuple.__new__(kind, values)
        return handler

    return for_call


class _Unparseable(Exception):
    """A request, or a stream's message, that did not parse (see :func:`refusing_unparseable`)."""


UNPARSEABLE = "request does not parse"


def refusing_unparseable(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler``, answering a request (or a stream's message) that does not parse with
    INVALID_ARGUMENT. Left to grpc, the deserializer's exception would answer UNKNOWN, naming
    the exception's class, and log a traceback for every such request, from anyone: health
    and reflection are open to all. So every method the server serves gets this, in one place
    (``_server._Routes``), beneath the caller check: a caller without credentials is refused
    for that first.

    The deserializer does not raise out of grpc: a unary request that does not parse arrives
    at the behaviour as an :class:`_Unparseable`, raised there; a stream's message raises it
    out of the read (``context.read()`` or the request iterator), in the behaviour, so a
    stream answers what it read before (see _stream). Either way the behaviour's wrapper
    refuses the call.
    """
    field = "_".join(
        "stream" if streaming else "unary" for streaming in (handler.request_streaming, handler.response_streaming)
    )
    behaviour: Any = getattr(handler, field)  # typeshed types behaviours as sync
    if inspect.isasyncgenfunction(behaviour):

        @functools.wraps(behaviour)
        async def each(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            try:
                if isinstance(request, _Unparseable):
                    raise request
                async for response in behaviour(request, context):
                    yield response
            except _Unparseable as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{UNPARSEABLE}: {exc}")

        refusing: Callable[..., Any] = each
    elif inspect.iscoroutinefunction(behaviour):

        @functools.wraps(behaviour)  # keeps its marks (serialized)
        async def whole(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            try:
                if isinstance(request, _Unparseable):
                    raise request
                return await behaviour(request, context)
            except _Unparseable as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{UNPARSEABLE}: {exc}")

        refusing = whole
    else:
        raise TypeError(f"{behaviour!r}: only async methods (coroutines, async generators) are served")
    deserialize = handler.request_deserializer
    kind: Any = type(handler)
    values = {
        **cast(Any, handler)._asdict(),
        field: refusing,
        "request_deserializer": None
        if deserialize is None
        else (_unparseable_raises if handler.request_streaming else _unparseable_returned)(deserialize),
    }
    refused: grpc.RpcMethodHandler[Any, Any] = kind(**values)
    return refused


def _unparseable_raises(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A stream's deserializer: a message that does not parse raises :class:`_Unparseable` out of
    the read."""

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or whatever else a deserializer raises on bytes it cannot take
            raise _Unparseable(str(exc)) from None

    return deserialize


def _unparseable_returned(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    """A unary request's deserializer: a request that does not parse is an :class:`_Unparseable`
    (grpc calls it before the behaviour, where raising would be grpc's UNKNOWN)."""

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # as in _unparseable_raises
            return _Unparseable(str(exc))

    return deserialize
