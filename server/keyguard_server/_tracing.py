"""OpenTelemetry spans for each RPC (config ``tracing = "otlp"``), off by default.

Imported only when tracing is on: with it off, keyguard imports no OpenTelemetry
module and its interceptors are exactly those without this file. The spans come from
the maintained gRPC instrumentation (opentelemetry-instrumentation-grpc's aio server
interceptor, outermost, so a span covers the caller check too); keyguard adds the
decision of an Authorize (``keyguard.decision``, e.g. ``ALLOW``, ``BAD_SECRET``) and the
status of calls that fail with keyguard's rich errors, which the instrumentation misses.
The instrumentation records no request or response and of the metadata only
``user-agent``, and keyguard drops the exception a failed call replaced (its message and
traceback are in the log), so no private key, token, signature or authorization header
reaches a span (tests/test_tracing.py checks it).

Not traced: health checks and reflection (noise), and AuthorizeStream: a stream lives
for hours, so its one span would say nothing per message, and the instrumentation only
wraps async-generator streams, not keyguard's reader-writer handler.

Where spans go follows OpenTelemetry's own environment variables:
``OTEL_EXPORTER_OTLP_ENDPOINT`` (default ``http://localhost:4317``, OTLP over gRPC),
``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_EXPORTER_OTLP_CERTIFICATE``, ``OTEL_SERVICE_NAME``
(default ``keyguard``), ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``.
"""

from __future__ import annotations

import os
from typing import Any

import grpc

try:
    from opentelemetry import trace
    from opentelemetry.instrumentation.grpc import aio_server_interceptor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace import Status, StatusCode
except ImportError as exc:  # the check in Config should have said so already
    raise ImportError(
        f"tracing needs OpenTelemetry ({exc.name} is missing): pip install 'keyguard-server[tracing]'"
    ) from exc

from keyguard.v1 import keyguard_pb2 as pb

AUTHORIZE = "/keyguard.v1.Authorization/Authorize"
DECISION_ATTRIBUTE = "keyguard.decision"
UNTRACED_SERVICES = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
)
UNTRACED_METHODS = frozenset({"/keyguard.v1.Authorization/AuthorizeStream"})
RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"
# What the instrumentation marks as a server-side error (semantic conventions for gRPC servers).
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class Tracing:
    """The interceptors that make the spans, and the provider that exports them.

    ``provider``: an SDK TracerProvider of the caller's (tests, embedding), left running at
    :meth:`close`; without one, spans go over OTLP as the OTEL_* variables say.
    """

    def __init__(self, provider: Any = None) -> None:
        self._owned = provider is None
        if provider is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider = TracerProvider(
                resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", "keyguard")})
            )
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.provider = provider
        self.interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (
            aio_server_interceptor(tracer_provider=provider, filter_=_traced),  # type: ignore[no-untyped-call]
            _KeyguardSpans(),
        )

    def close(self) -> None:
        """Exports the spans still buffered (a provider of our own only)."""
        if self._owned:
            self.provider.shutdown()


def _traced(details: grpc.HandlerCallDetails) -> bool:
    method = details.method or ""
    return method not in UNTRACED_METHODS and method.lstrip("/").split("/", 1)[0] not in UNTRACED_SERVICES


class _KeyguardSpans(grpc.aio.ServerInterceptor):
    """Inside the instrumentation's span: what it misses. The decision of an Authorize; the status
    of a call that failed through ``abort_with_status`` (keyguard's rich errors, which the
    instrumentation does not see); and the failure recorded without the exception it replaced,
    whose message and traceback belong in the log (where keyguard writes them), not in a span."""

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or not _traced(details):
            return handler
        behavior = handler.unary_unary
        authorize = details.method == AUTHORIZE

        async def traced(request: Any, context: Any) -> Any:
            try:
                response = await behavior(request, context)
            except Exception as exc:
                code = context.code()
                if isinstance(code, grpc.StatusCode):
                    span = trace.get_current_span()
                    span.set_attribute(RPC_GRPC_STATUS_CODE, code.value[0])
                    if code in SERVER_ERRORS:  # as the instrumentation judges it: the others are the caller's
                        span.set_status(Status(StatusCode.ERROR, code.name))
                exc.__cause__ = exc.__context__ = None
                exc.__suppress_context__ = True
                raise
            if authorize:  # answered serialized (_routing, _answers): read back, only when traced
                answer = pb.AuthorizeResponse.FromString(response)
                decision = pb.Decision.Name(answer.decision).removeprefix("DECISION_")
                trace.get_current_span().set_attribute(DECISION_ATTRIBUTE, decision)
            return response

        return grpc.unary_unary_rpc_method_handler(traced, handler.request_deserializer, handler.response_serializer)
