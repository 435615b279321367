"""The method table holds the contract: every method of keyguard.v1 and of Envoy's ext_authz is
served, by a handler of its kind; the methods answering serialized bytes are sent as they are."""

from __future__ import annotations

import types
from typing import Any

import grpc
import pytest

from keyguard_server._callers import Callers
from keyguard_server._config import Config
from keyguard_server._drain import Drain
from keyguard_server._envoy import EnvoyAuthorizationServicer
from keyguard_server._grpc import AuthorizationServicer, KeyManagementServicer
from keyguard_server._routing import CONTRACT, Routes, routes
from keyguard_server._server import BoundedHealthServicer

CONTRACT_METHODS = [
    (service, method) for service, described in CONTRACT.items() for method in described.methods_by_name
]
# Registered without a response serializer: their behaviours answer bytes.
SERIALIZED = {
    "/keyguard.v1.Authorization/Authorize",
    "/keyguard.v1.Authorization/AuthorizeStream",
    "/envoy.service.auth.v3.Authorization/Check",
}


def handler_of_kind(service: str, method: str) -> grpc.RpcMethodHandler[Any, Any]:
    """A do-nothing handler of the kind the contract gives ``method``."""
    described = CONTRACT[service].methods_by_name[method]

    async def behaviour(request: Any, context: Any) -> None:
        return None

    if described.client_streaming:
        return grpc.stream_stream_rpc_method_handler(behaviour)
    return grpc.unary_unary_rpc_method_handler(behaviour)


def test_the_server_table_serves_every_method_of_the_contract() -> None:
    unused: Any = None  # the servicers' domain objects: no call is made
    table = routes(
        Callers(()),
        Drain(),
        KeyManagementServicer(unused),
        AuthorizationServicer(unused),
        EnvoyAuthorizationServicer(unused, Config()),
        BoundedHealthServicer(),
    )
    for service, method in CONTRACT_METHODS:
        name = f"/{service}/{method}"
        handler = table.service(types.SimpleNamespace(method=name, invocation_metadata=()))
        assert handler is not None, name
        described = CONTRACT[service].methods_by_name[method]
        assert (handler.request_streaming, handler.response_streaming) == (
            described.client_streaming,
            described.server_streaming,
        )
        assert (handler.response_serializer is None) == (name in SERIALIZED), name


def test_a_method_of_the_contract_left_unserved_stops_the_start() -> None:
    table = Routes(Callers(()), Drain())
    for service, method in CONTRACT_METHODS:
        if method != "AuthorizeStream":
            table.add_registered_method_handlers(service, {method: handler_of_kind(service, method)})
    with pytest.raises(TypeError, match=r"unserved: \['/keyguard\.v1\.Authorization/AuthorizeStream'\]"):
        table.sealed()


def test_a_method_outside_the_contract_or_of_another_kind_is_refused() -> None:
    table = Routes(Callers(()), Drain())
    with pytest.raises(TypeError, match="Authorization/Authorise"):
        table.add_registered_method_handlers(
            "keyguard.v1.Authorization", {"Authorise": handler_of_kind("keyguard.v1.Authorization", "Authorize")}
        )
    with pytest.raises(TypeError, match="Authorization/AuthorizeStream"):
        table.add_registered_method_handlers(
            "keyguard.v1.Authorization", {"AuthorizeStream": handler_of_kind("keyguard.v1.Authorization", "Authorize")}
        )
