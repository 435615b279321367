"""Envoy's external authorization API on the keyguard server.

A stock Envoy in front of the exchange API calls ``Check`` for every bot
request. The bot's HTTP request is mapped to an Authorize decision: access
key and private key from configurable headers, client IP from the peer address
Envoy reports (or, behind trusted proxies, a header they append to), required
permission from the longest matching (method, path prefix) route. ED25519 keys
sign instead: signature, timestamp and nonce come from headers, and the signed
payload is :func:`keyguard.signing.envoy_payload` of the request (method,
path and query, the body's SHA-256 and a withdrawal's destination), so Envoy
must forward the whole body (``with_request_body``).

Routing is only as strong as the path it sees, so keyguard refuses (403) what
an upstream could read as another path or method: a path that is not
canonical (see ``CANONICAL_PATH``) and method-override headers or parameters.
The documented Envoy config normalises paths first; this check is for proxies
that do not. A request no route covers is refused: keyguard fails closed, and
so does Envoy when keyguard is unreachable or answers an error status
(``failure_mode_allow: false``), e.g. UNAVAILABLE when the key's row cannot
be read in time; errors go through the same mapping as every other RPC, so no
exception text leaks.

On ALLOW the upstream gets x-keyguard-account-id, x-keyguard-key-name,
x-keyguard-permission and, for a withdrawal, the checked destination in
x-keyguard-withdraw-asset, -address and -memo (strings percent-encoded UTF-8),
for a trade naming a symbol (``envoy_symbol_header``) the checked symbol in
x-keyguard-symbol,
overwriting anything the bot sent under those names; any other x-keyguard-*
header is removed, and so is the private-key header. A refusal is a small
JSON body: 401 with one generic answer for every decision reached before the
credential is proven (so a caller without the secret learns nothing about
the key), 403 for what the proven key may not do, 429 (rate limited), 400
(malformed).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import json
import re
from collections.abc import Mapping
from urllib.parse import parse_qsl, quote

import grpc
from google.rpc import code_pb2, status_pb2

from keyguard import AuthorizeResult, Decision, InvalidArgument, Permission, SignedRequest, WithdrawalDestination
from keyguard.signing import envoy_payload
from keyguard_server._answers import SerializedOnce
from keyguard_server._config import (
    CANONICAL_PATH,
    CANONICAL_PATH_RULE,
    Config,
    EnvoyRoute,
    route_key,
    trusted_networks,
)
from keyguard_server._grpc import maps_errors
from keyguard_server.authorize._authorizer import Authorizer
from keyguard_server.authorize._domain import Query
from keyguard_server.envoy.config.core.v3 import base_pb2 as core
from keyguard_server.envoy.service.auth.v3 import external_auth_pb2 as ext
from keyguard_server.envoy.service.auth.v3.attribute_context_pb2 import AttributeContext
from keyguard_server.envoy.type.v3 import http_status_pb2 as http_status

_OVERWRITE = core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# Headers and query parameters that make some frameworks (Rails, Laravel,
# Express, Symfony, IIS...) act on another method or path than the one routed.
_OVERRIDE_HEADERS = frozenset(
    {
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-forwarded-method",
        "x-original-method",
        "x-original-url",
        "x-original-uri",
        "x-rewrite-url",
    }
)
# Any parameter whose name starts so, in any case and with any suffix ("_method[]",
# "_Method", "_method\0"): frameworks disagree on how they read such names. Form
# bodies count too, when Envoy forwards the body.
_OVERRIDE_PARAMETER = "_method"
_FORM = re.compile(rb'name\s*=\s*"?\s*_method', re.IGNORECASE)
_UNAUTHENTICATED = (http_status.Unauthorized, code_pb2.UNAUTHENTICATED)
_FORBIDDEN = (http_status.Forbidden, code_pb2.PERMISSION_DENIED)
# Decisions that may be told as they are, with their HTTP status, gRPC code and the message the
# client reads: one table, keyed by the Decision itself. Any other refusal reached Authorize
# before the credential was proven (unknown, disabled or expired key, client IP, secret,
# signature, timestamp, nonce) and gets the one generic 401.
_TOLD_DECISIONS: dict[Decision, tuple[http_status.StatusCode.ValueType, int, str]] = {
    Decision.PERMISSION_DENIED: (*_FORBIDDEN, "this API key lacks the permission for this request"),
    Decision.ADDRESS_NOT_WHITELISTED: (*_FORBIDDEN, "withdrawal address is not on the account's whitelist"),
    Decision.IP_RESTRICTION_REQUIRED: (
        *_FORBIDDEN,
        "this API key has no IP restriction; restrict it to IP addresses to trade",
    ),
    Decision.SYMBOL_NOT_ALLOWED: (*_FORBIDDEN, "this API key may not trade this symbol (send it in the symbol header)"),
    Decision.ADDRESS_ON_HOLD: (*_FORBIDDEN, "withdrawal address was whitelisted too recently; it is on hold"),
    # Not ACCOUNT_FROZEN: it is decided before the credential is proven, so it gets the generic
    # 401 like KEY_DISABLED (whoever holds only an access key must not learn the account is frozen).
    Decision.RATE_LIMITED: (
        http_status.TooManyRequests,
        code_pb2.RESOURCE_EXHAUSTED,
        "too many failed attempts; try again later",
    ),
    # Says nothing of the key either: argon2's budget is spent for now, and a verification
    # under way goes on, so the client's retry is usually answered from memory.
    Decision.VERIFICATION_BUSY: (
        http_status.ServiceUnavailable,
        code_pb2.UNAVAILABLE,
        "the secret could not be verified in time (verification is busy); retry shortly",
    ),
}
# Refusals of Check itself, before Authorize (their messages are made where they are decided).
_CHECK_REFUSALS: dict[str, tuple[http_status.StatusCode.ValueType, int]] = {
    "MISSING_CREDENTIALS": _UNAUTHENTICATED,
    "BAD_REQUEST": (http_status.BadRequest, code_pb2.INVALID_ARGUMENT),
    "PATH_NOT_CANONICAL": _FORBIDDEN,
    "METHOD_OVERRIDE": _FORBIDDEN,
    "ROUTE_NOT_MAPPED": _FORBIDDEN,
}
# What _deny looks up, by the name in the answer: both of the above.
_TOLD: dict[str, tuple[http_status.StatusCode.ValueType, int]] = {
    **{decision.name: (status, code) for decision, (status, code, _) in _TOLD_DECISIONS.items()},
    **_CHECK_REFUSALS,
}
_REASONS = {decision: reason for decision, (_, _, reason) in _TOLD_DECISIONS.items()}
_NOT_AUTHENTICATED = ("UNAUTHENTICATED", "invalid API key, secret or signature, or not allowed from this IP")
_PERMISSION_NAMES = {level: level.name for level in Permission}
MAX_ROUTED_PATHS = 4096  # (method, path) pairs whose route Check remembers


class _NotCanonical(enum.Enum):
    """What a path that is not canonical routes to: Check refuses it before anything else."""

    PATH = "not canonical"


NOT_CANONICAL = _NotCanonical.PATH


class EnvoyAuthorizationServicer:
    """Answers bytes (see _answers), not the generated base class's messages: registered by _routing."""

    def __init__(self, authorizer: Authorizer, config: Config) -> None:
        self._authorizer = authorizer
        self._config = config
        self._trusted_proxies = trusted_networks(config.envoy_trusted_proxies)
        # Most specific first: longest prefix as matched (route_key), then a named method before "*".
        self._routes = sorted(config.envoy_routes, key=lambda r: (len(r.key), r.method != "*"), reverse=True)
        self._routed: dict[tuple[str, str], EnvoyRoute | _NotCanonical | None] = {}
        # ALLOW answers of the common shape (no destination, no x-keyguard-* header to strip), by
        # result and symbol, serialized once (_answers).
        header = config.envoy_private_key_header
        self._allowed: SerializedOnce[str] = SerializedOnce(
            lambda result, symbol: _allow(result, None, [], header, symbol.upper()).SerializeToString()
        )

    @maps_errors
    async def Check(
        self, request: ext.CheckRequest, context: grpc.aio.ServicerContext[ext.CheckRequest, bytes]
    ) -> bytes:
        config = self._config
        attributes = request.attributes
        http = attributes.request.http
        headers = http.headers
        method = http.method
        path, _, query = http.path.partition("?")
        route = self._route(method, path)
        if route is NOT_CANONICAL:
            return _deny("PATH_NOT_CANONICAL", f"the request path must be {CANONICAL_PATH_RULE}")
        # The header names as one text, one per line, "_" read as "-" (as some servers read it):
        # searched in C rather than name by name, for an override or a forged x-keyguard-*.
        names = "\n".join(headers)
        read_as = names.replace("_", "-")
        if _overrides(http, query, read_as):
            return _deny("METHOD_OVERRIDE", "method or URL override headers and parameters are not accepted")
        if route is None:
            return _deny("ROUTE_NOT_MAPPED", f"no permission is configured for {method} {http.path}")
        access_key = headers.get(config.envoy_access_key_header, "")
        private_key = headers.get(config.envoy_private_key_header, "")
        signature = headers.get(config.envoy_signature_header, "")
        if not access_key or not (private_key or signature):
            return _deny(
                "MISSING_CREDENTIALS",
                f"send the access key in {config.envoy_access_key_header} and either the private key in "
                f"{config.envoy_private_key_header} or a signature in {config.envoy_signature_header}",
            )
        symbol = headers.get(config.envoy_symbol_header, "") if route.permission is Permission.TRADE else ""
        destination = None
        if route.permission is Permission.WITHDRAW:
            destination = WithdrawalDestination(
                headers.get(config.envoy_withdraw_asset_header, ""),
                headers.get(config.envoy_withdraw_address_header, ""),
                headers.get(config.envoy_withdraw_memo_header, ""),
            )
        signed = None
        if signature:
            try:
                timestamp_ms = int(headers.get(config.envoy_timestamp_header, ""))
            except ValueError:
                return _deny("BAD_REQUEST", f"{config.envoy_timestamp_header} must be milliseconds since the epoch")
            body = _whole_body(http)
            if body is None:
                return _deny("BAD_REQUEST", "keyguard did not get the whole body (Envoy: with_request_body)")
            payload = envoy_payload(method, http.path, body, destination, symbol)
            signed = SignedRequest(payload, timestamp_ms, headers.get(config.envoy_nonce_header, ""), signature)
        client_ip = self._client_ip(attributes.source.address.socket_address.address, headers)
        required = route.permission  # a Permission already: EnvoyRoute holds the domain enum
        asked = Query(
            access_key, private_key, client_ip, required, destination, signed, symbol, context.time_remaining()
        )
        try:
            decided = self._authorizer.decide(asked)
            result = decided if isinstance(decided, AuthorizeResult) else await decided
        except InvalidArgument as exc:
            return _deny("BAD_REQUEST", exc.message)
        if not result.allowed:
            return _deny(result.decision.name, _REASONS.get(result.decision, result.decision.name))
        if destination is not None or "x-keyguard-" in read_as:
            forged = [name for name in headers if name.replace("_", "-").startswith("x-keyguard-")]
            allow = _allow(result, destination, forged, config.envoy_private_key_header, symbol.upper())
            return allow.SerializeToString()
        return self._allowed(result, symbol)

    def _route(self, method: str, path: str) -> EnvoyRoute | _NotCanonical | None:
        """The route of (method, path), NOT_CANONICAL for a path that is not canonical (refused
        before anything else about the request), remembered for the next requests (bounded)."""
        try:
            return self._routed[method, path]
        except KeyError:
            pass
        route: EnvoyRoute | _NotCanonical | None = NOT_CANONICAL
        if CANONICAL_PATH.fullmatch(path):
            upper, key = method.upper(), route_key(path)
            route = next((r for r in self._routes if r.covers(upper, key)), None)
        if len(self._routed) >= MAX_ROUTED_PATHS:
            self._routed.clear()
        self._routed[method, path] = route
        return route

    def _client_ip(self, peer: str, headers: Mapping[str, str]) -> str:
        """``peer``, Envoy's downstream connection's, or behind trusted proxies the right-most
        address, of the configured header's list and then that peer, that is not one of them:
        anything left of it was written by the client and proves nothing."""
        if not self._config.envoy_client_ip_header:
            return peer
        listed = headers.get(self._config.envoy_client_ip_header, "")
        hops = [hop.strip() for hop in listed.split(",") if hop.strip()] + [peer]
        for hop in reversed(hops):
            if not self._trusted(hop):
                return hop
        return hops[0]

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False  # becomes the client IP, which Authorize refuses as malformed
        return any(ip in network for network in self._trusted_proxies)


def _overrides(http: AttributeContext.HttpRequest, query: str, names: str) -> bool:
    """Whether the request asks, in a header, a query or a form body, to be taken for another
    method or path than the one routed (``names``: its header names, one per line, "_" read as "-")."""
    if not _OVERRIDE_HEADERS.isdisjoint(names.split("\n")):
        return True
    body = http.raw_body or http.body.encode()
    if not query and not body:
        return False
    form = http.headers.get("content-type", "").lower()
    fields = [name for name, _ in parse_qsl(query, keep_blank_values=True)]
    if form.startswith("application/x-www-form-urlencoded"):
        fields += [name for name, _ in parse_qsl(body.decode(errors="replace"), keep_blank_values=True)]
    elif form.startswith("multipart/") and _FORM.search(body):
        return True
    return any(name.strip().lower().startswith(_OVERRIDE_PARAMETER) for name in fields)


def _whole_body(http: AttributeContext.HttpRequest) -> bytes | None:
    """The body Envoy forwarded, or None when it is evidently not all of it: cut at
    max_request_bytes (allow_partial_message), or not sent (no with_request_body) while
    content-length says there is one. A body Envoy does not forward and no content-length
    announces (chunked, HTTP/2) cannot be noticed here: configure with_request_body."""
    body = http.raw_body or http.body.encode()
    length = http.headers.get("content-length", "")
    if http.headers.get("x-envoy-auth-partial-body") == "true" or (length and length != str(len(body))):
        return None
    return body


@functools.lru_cache(maxsize=4096)
def _encoded(value: str) -> str:
    """Percent-encoded UTF-8, so a header value never carries a ',' (a list separator to
    many HTTP stacks), ';', a non-ASCII byte or a control character."""
    return quote(value, safe=" !#$&'()*+/:=?@[]~")


def _header(name: str, value: str) -> core.HeaderValueOption:
    return core.HeaderValueOption(header=core.HeaderValue(key=name, value=value), append_action=_OVERWRITE)


def _allow(
    result: AuthorizeResult,
    destination: WithdrawalDestination | None,
    keyguard_names: list[str],
    private_key_header: str,
    symbol: str = "",
) -> ext.CheckResponse:
    """``keyguard_names``: the request's header names that read as x-keyguard-* (a client's
    forgeries, removed unless the answer sets them)."""
    assert result.permission is not None
    answer = {
        "x-keyguard-account-id": _encoded(result.account_id),
        "x-keyguard-key-name": _encoded(result.key_name),
        "x-keyguard-permission": _PERMISSION_NAMES[result.permission],
    }
    if destination is not None:
        # What was checked is what the upstream must execute (not the query or body).
        answer["x-keyguard-withdraw-asset"] = _encoded(destination.asset)
        answer["x-keyguard-withdraw-address"] = _encoded(destination.address)
        answer["x-keyguard-withdraw-memo"] = _encoded(destination.memo)
    if symbol:
        # What was checked is what the upstream must trade (not the query or body's symbol).
        answer["x-keyguard-symbol"] = symbol
    forged = [name for name in keyguard_names if name not in answer]
    if forged:  # the client's own header names: never a cache key (a client could fill the cache with them)
        return _ok.__wrapped__(tuple(answer.items()), (private_key_header, *forged))
    return _ok(tuple(answer.items()), (private_key_header,))


@functools.lru_cache(maxsize=4096)
def _ok(answer: tuple[tuple[str, str], ...], headers_to_remove: tuple[str, ...]) -> ext.CheckResponse:
    """The ALLOW message, built once per distinct answer (a key's requests share one): its
    headers come from the key's row and checked values, each bounded in length. Never mutated:
    gRPC only serializes it."""
    return ext.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=ext.OkHttpResponse(
            headers=[_header(name, value) for name, value in answer],
            headers_to_remove=headers_to_remove,
        ),
    )


def _deny(decision: str, message: str) -> bytes:
    """The refusal, serialized. The decision stays in the status message (Envoy's logs, for
    operators); the HTTP body names it only when it is in ``_TOLD``."""
    status, code = _TOLD.get(decision, _UNAUTHENTICATED)
    error, shown = (decision, message) if decision in _TOLD else _NOT_AUTHENTICATED
    return ext.CheckResponse(
        status=status_pb2.Status(code=code, message=f"{decision}: {message}"),
        denied_response=ext.DeniedHttpResponse(
            status=http_status.HttpStatus(code=status),
            headers=[_header("content-type", "application/json")],
            body=json.dumps({"error": error, "message": shown}),
        ),
    ).SerializeToString()
