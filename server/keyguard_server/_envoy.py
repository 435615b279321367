"""Envoy's external authorization API on the keyguard server.

A stock Envoy in front of the exchange API calls ``Check`` for every bot
request. The bot's HTTP request is mapped to an Authorize decision: access
key and private key from configurable headers, client IP from the peer address
Envoy reports (or a header a trusted proxy sets), required permission from the
longest matching (method, path prefix) route. ED25519 keys sign instead:
signature, timestamp and nonce come from headers, and the signed payload is
"METHOD PATH?QUERY" (plus a newline and the body when Envoy forwards it). A
request no route covers is refused: keyguard fails closed, and so does Envoy
when keyguard is unreachable or answers an error status (``failure_mode_allow:
false``), e.g. UNAVAILABLE when the key's row cannot be read in time; errors
go through the same mapping as every other RPC, so no exception text leaks.

On ALLOW the upstream gets x-keyguard-account-id, x-keyguard-key-name
(percent-encoded UTF-8) and x-keyguard-permission, overwriting anything the
bot sent under those names, and never sees the private-key header. A refusal
is 401 (unknown, disabled or expired key, bad secret or signature, stale or
replayed request), 429 (rate limited), 400 (malformed) or 403, with a small
JSON body naming the decision.
"""

from __future__ import annotations

import json
from urllib.parse import quote

import grpc
from google.rpc import code_pb2, status_pb2

from keyguard import AuthorizeResult, Decision, InvalidArgument, Permission, SignedRequest, WithdrawalDestination
from keyguard.envoy.config.core.v3 import base_pb2 as core
from keyguard.envoy.service.auth.v3 import external_auth_pb2 as ext
from keyguard.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from keyguard.envoy.type.v3 import http_status_pb2 as http_status
from keyguard_server._config import Config, EnvoyRoute
from keyguard_server._grpc import maps_errors
from keyguard_server._service import Authorizer

_OVERWRITE = core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
# decision -> (HTTP status, gRPC code Envoy sees)
_REFUSALS: dict[str, tuple[http_status.StatusCode.ValueType, int]] = {
    Decision.UNKNOWN_KEY.name: (http_status.Unauthorized, code_pb2.UNAUTHENTICATED),
    Decision.BAD_SECRET.name: (http_status.Unauthorized, code_pb2.UNAUTHENTICATED),
    Decision.BAD_SIGNATURE.name: (http_status.Unauthorized, code_pb2.UNAUTHENTICATED),
    Decision.STALE_REQUEST.name: (http_status.Unauthorized, code_pb2.UNAUTHENTICATED),
    Decision.REPLAYED_REQUEST.name: (http_status.Unauthorized, code_pb2.UNAUTHENTICATED),
    Decision.KEY_DISABLED.name: (http_status.Unauthorized, code_pb2.UNAUTHENTICATED),
    Decision.KEY_EXPIRED.name: (http_status.Unauthorized, code_pb2.UNAUTHENTICATED),
    "MISSING_CREDENTIALS": (http_status.Unauthorized, code_pb2.UNAUTHENTICATED),
    Decision.RATE_LIMITED.name: (http_status.TooManyRequests, code_pb2.RESOURCE_EXHAUSTED),
    "BAD_REQUEST": (http_status.BadRequest, code_pb2.INVALID_ARGUMENT),
}
_FORBIDDEN = (http_status.Forbidden, code_pb2.PERMISSION_DENIED)


class EnvoyAuthorizationServicer(ext_grpc.AuthorizationServicer):
    def __init__(self, authorizer: Authorizer, config: Config) -> None:
        self._authorizer = authorizer
        self._config = config
        # Most specific first: longest prefix, then a named method before "*".
        self._routes = sorted(config.envoy_routes, key=lambda r: (len(r.path_prefix), r.method != "*"), reverse=True)

    @maps_errors
    async def Check(
        self, request: ext.CheckRequest, context: grpc.aio.ServicerContext[ext.CheckRequest, ext.CheckResponse]
    ) -> ext.CheckResponse:
        config = self._config
        http = request.attributes.request.http
        headers = http.headers
        route = self._route(http.method, http.path.split("?", 1)[0])
        if route is None:
            return _deny("ROUTE_NOT_MAPPED", f"no permission is configured for {http.method} {http.path}")
        access_key = headers.get(config.envoy_access_key_header, "")
        private_key = headers.get(config.envoy_private_key_header, "")
        signature = headers.get(config.envoy_signature_header, "")
        if not access_key or not (private_key or signature):
            return _deny(
                "MISSING_CREDENTIALS",
                f"send the access key in {config.envoy_access_key_header} and either the private key in "
                f"{config.envoy_private_key_header} or a signature in {config.envoy_signature_header}",
            )
        signed = None
        if signature:
            try:
                timestamp_ms = int(headers.get(config.envoy_timestamp_header, ""))
            except ValueError:
                return _deny("BAD_REQUEST", f"{config.envoy_timestamp_header} must be milliseconds since the epoch")
            payload = f"{http.method} {http.path}" + (f"\n{http.body}" if http.body else "")
            signed = SignedRequest(payload, timestamp_ms, headers.get(config.envoy_nonce_header, ""), signature)
        if config.envoy_client_ip_header:
            client_ip = headers.get(config.envoy_client_ip_header, "").rsplit(",", 1)[-1].strip()
        else:
            client_ip = request.attributes.source.address.socket_address.address
        destination = None
        if route.permission is Permission.WITHDRAW:
            destination = WithdrawalDestination(
                headers.get(config.envoy_withdraw_asset_header, ""),
                headers.get(config.envoy_withdraw_address_header, ""),
                headers.get(config.envoy_withdraw_memo_header, ""),
            )
        try:
            result = await self._authorizer.authorize(
                access_key, private_key, client_ip, route.permission, destination, signed, context.time_remaining()
            )
        except InvalidArgument as exc:
            return _deny("BAD_REQUEST", exc.message)
        if not result.allowed:
            return _deny(result.decision.name, _REASONS.get(result.decision, result.decision.name))
        return _allow(result, config.envoy_private_key_header)

    def _route(self, method: str, path: str) -> EnvoyRoute | None:
        return next((r for r in self._routes if r.matches(method, path)), None)


_REASONS = {
    Decision.UNKNOWN_KEY: "unknown API key",
    Decision.BAD_SECRET: "invalid API key secret",
    Decision.IP_NOT_ALLOWED: "this API key may not be used from your IP address",
    Decision.RATE_LIMITED: "too many failed attempts; try again later",
    Decision.PERMISSION_DENIED: "this API key lacks the permission for this request",
    Decision.ADDRESS_NOT_WHITELISTED: "withdrawal address is not on the account's whitelist",
}


def _header(name: str, value: str) -> core.HeaderValueOption:
    return core.HeaderValueOption(header=core.HeaderValue(key=name, value=value), append_action=_OVERWRITE)


def _allow(result: AuthorizeResult, private_key_header: str) -> ext.CheckResponse:
    assert result.permission is not None
    return ext.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=ext.OkHttpResponse(
            headers=[
                _header("x-keyguard-account-id", result.account_id),
                _header("x-keyguard-key-name", quote(result.key_name, safe=" !#$&'()*+,/:;=?@[]~")),
                _header("x-keyguard-permission", result.permission.name),
            ],
            headers_to_remove=[private_key_header],
        ),
    )


def _deny(decision: str, message: str) -> ext.CheckResponse:
    status, code = _REFUSALS.get(decision, _FORBIDDEN)
    return ext.CheckResponse(
        status=status_pb2.Status(code=code, message=f"{decision}: {message}"),
        denied_response=ext.DeniedHttpResponse(
            status=http_status.HttpStatus(code=status),
            headers=[_header("content-type", "application/json")],
            body=json.dumps({"error": decision, "message": message}),
        ),
    )
