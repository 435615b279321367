"""How a call reaches its method: one table (:class:`Routes`) of every method served, each handler
built once, when it is added, behind the drain, the refusal of requests that do not parse and,
unless open to all, the caller policy (``_callers``), which judges each call by its own metadata.
Authorization and Envoy's Check answer bytes (see _answers), so they are registered here without
a response serializer; the table is held to the proto contract (:meth:`Routes.sealed`).
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, cast

import grpc
from grpc_health.v1 import health_pb2_grpc

from keyguard.v1 import keyguard_pb2 as pb
from keyguard.v1 import keyguard_pb2_grpc as pb_grpc
from keyguard_server._callers import CALLER, Admit, Callers
from keyguard_server._drain import Drain
from keyguard_server._envoy import EnvoyAuthorizationServicer
from keyguard_server._grpc import AuthorizationServicer, KeyManagementServicer
from keyguard_server._metrics import RPC_SECONDS
from keyguard_server._reflection import enable_server_reflection
from keyguard_server._services import AUTHORIZATION, ENVOY_AUTHORIZATION, HEALTH, KEYGUARD_SERVICES
from keyguard_server.envoy.service.auth.v3 import external_auth_pb2 as ext

Metadata = Iterable[tuple[str, str | bytes]]
# A guarded method's handler for one call, made from the call's metadata (see Routes.service).
ForCall = Callable[[Metadata], "grpc.RpcMethodHandler[Any, Any]"]
# The services of the contract (keyguard.v1, Envoy's ext_authz), by name: each of their methods is served.
CONTRACT = {s.full_name: s for f in (pb.DESCRIPTOR, ext.DESCRIPTOR) for s in f.services_by_name.values()}


def routes(
    callers: Callers,
    drain: Drain,
    keys: KeyManagementServicer,
    authorization: AuthorizationServicer,
    envoy: EnvoyAuthorizationServicer,
    health_servicer: health_pb2_grpc.HealthServicer,
) -> Routes:
    """Every service keyguard serves, health and reflection included, in one sealed table."""
    table = Routes(callers, drain)
    registrar: Any = table  # stands in for the server in the generated add_*_to_server functions
    pb_grpc.add_KeyManagementServicer_to_server(keys, registrar)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, registrar)
    # Answering bytes: no response serializer. The stream reads and writes on its context.
    unary, stream = grpc.unary_unary_rpc_method_handler, grpc.stream_stream_rpc_method_handler
    for service, name, handler in (
        (AUTHORIZATION, "Authorize", unary(authorization.Authorize, pb.AuthorizeRequest.FromString)),
        (AUTHORIZATION, "AuthorizeStream", stream(authorization.AuthorizeStream, pb.AuthorizeStreamRequest.FromString)),
        (ENVOY_AUTHORIZATION, "Check", unary(envoy.Check, ext.CheckRequest.FromString)),
    ):
        table.add_registered_method_handlers(service, {name: handler})
    enable_server_reflection((*KEYGUARD_SERVICES, ENVOY_AUTHORIZATION, HEALTH), table)
    return table.sealed()


class Routes(grpc.GenericRpcHandler):
    """Every method the server serves, in one table, each handler built once (see the module docstring).

    The generated ``add_*_to_server`` functions register each service twice, as grpc "generic"
    handlers and as registered methods; they are given this table in place of the server and
    it keeps the registered form. The server then sees one generic handler and no registered
    method: grpc.aio keeps a pending call request per registered method and after every call
    waits again on all of them (``asyncio.wait``, O(methods): ~1,400 bytecodes a call with 20
    methods, a no-op's cost included), where generic methods share one. The policy is applied
    here once per method instead of by an interceptor on every call.
    """

    def __init__(self, callers: Callers, drain: Drain) -> None:
        self._callers = callers
        self._drain = drain
        self._open: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}  # methods open to all
        self._checked: dict[str, ForCall] = {}  # methods behind the caller check: each call's handler
        self._generic_services: set[str] = set()

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        """``handlers`` by method name; a contract service's must be its methods, of their kind."""
        for name, given in handlers.items():
            method = f"/{service}/{name}"
            if service in CONTRACT:
                described = CONTRACT[service].methods_by_name.get(name)
                streaming = (given.request_streaming, given.response_streaming)
                if described is None or streaming != (described.client_streaming, described.server_streaming):
                    raise TypeError(f"{method}: not a method of the contract, or not of its kind")
            # Health is answered while the server drains: it is how load balancers learn to stop.
            handler = refusing_unparseable(self._drain.tracking(given, lingers=service == HEALTH))
            if (admit := self._callers.admission(method)) is None:
                self._open[method] = handler
            else:
                self._checked[method] = _guarded(method, handler, admit)

    def add_generic_rpc_handlers(self, handlers: tuple[grpc.GenericRpcHandler, ...]) -> None:
        """The same services' other form: only their names are kept, for ``sealed``'s check."""
        for handler in handlers:
            if not isinstance(handler, grpc.ServiceRpcHandler):
                raise TypeError(f"{handler!r} names no service: its methods could not be routed")
            self._generic_services.add(handler.service_name())

    def sealed(self) -> Routes:
        """The table, once every service that registered a generic handler has its methods in it
        (else one of them would be unserved, or served unguarded), and every method of the
        contract is routed."""
        routed = {*self._open, *self._checked}
        if unrouted := self._generic_services - {method.split("/")[1] for method in routed}:
            raise TypeError(f"services registered without their methods: {sorted(unrouted)}")
        contract = {f"/{s.full_name}/{m}" for s in CONTRACT.values() for m in s.methods_by_name}
        if unserved := contract - routed:
            raise TypeError(f"methods of the contract left unserved: {sorted(unserved)}")
        return self

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        if (for_call := self._checked.get(method)) is not None:
            return for_call(handler_call_details.invocation_metadata)
        return self._open.get(method)


def _guarded(method: str, handler: grpc.RpcMethodHandler[Any, Any], admit: Admit) -> ForCall:
    """The same handler, refusing unadmitted callers first, made for each call with the call's
    metadata bound to it: by construction, a call is judged by its own metadata only (grpc has
    just built it for the handler lookup; ``context.invocation_metadata()`` would build it
    again, as Python-level namedtuples, ~14k instructions).

    Unary calls are timed here; a stream's caller is checked once, when it starts, and its
    messages are timed one by one where they are answered (_stream), not the stream as a whole.
    """
    field = "unary_unary" if handler.unary_unary is not None else "stream_stream"
    inner: Any = getattr(handler, field)  # typeshed types behaviours as sync
    if not inspect.iscoroutinefunction(inner):
        raise TypeError(
            "only unary keyguard methods and reader-writer (coroutine) bidi streams sit behind caller checks"
        )
    observe = RPC_SECONDS.labels(method).observe if field == "unary_unary" else (lambda seconds: None)
    perf_counter = time.perf_counter

    async def guarded(metadata: Metadata, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started = perf_counter()
        try:
            for key, value in metadata:  # the first authorization header, else the client certificate
                if key == "authorization":
                    verdict = admit(value, None)
                    break
            else:
                verdict = admit(None, next(iter(context.auth_context().get("x509_pem_cert", ())), None))
            if isinstance(verdict, tuple):
                await context.abort(*verdict)  # a stream's before any message is read
            CALLER.set(verdict)
            return await inner(request, context)
        finally:
            observe(perf_counter() - started)

    kind: Any = type(handler)
    fields = list(cast(tuple[Any, ...], handler))
    slot = kind._fields.index(field)

    def for_call(metadata: Metadata) -> grpc.RpcMethodHandler[Any, Any]:
        """The handler for one call: a list copy and a tuple, not namedtuple's Python-level ``_replace``."""
        values = fields.copy()
        values[slot] = functools.partial(guarded, metadata)
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
    (:class:`Routes`), beneath the caller check: a caller without credentials is refused
    for that first.

    The deserializer does not raise out of grpc (:func:`_unparseable`): a unary request reaches
    the behaviour, raised there; a stream's message raises out of its read (``context.read()`` or
    the iterator), so a stream answers what it read before (see _stream). Either way the
    behaviour's wrapper refuses the call.
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

        @functools.wraps(behaviour)
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
        "request_deserializer": None if deserialize is None else _unparseable(deserialize, handler.request_streaming),
    }
    refused: grpc.RpcMethodHandler[Any, Any] = kind(**values)
    return refused


def _unparseable(deserializer: Callable[[bytes], Any], streaming: bool) -> Callable[[bytes], Any]:
    """``deserializer``, bytes that do not parse an :class:`_Unparseable`: raised out of a stream's
    read, returned as a unary request (grpc deserializes it first, where raising is UNKNOWN)."""

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or whatever else a deserializer raises on bytes it cannot take
            if streaming:
                raise _Unparseable(str(exc)) from None
            return _Unparseable(str(exc))

    return deserialize
