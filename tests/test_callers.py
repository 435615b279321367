"""Caller authentication and roles: who may call what, over plaintext and mTLS."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keyguard import Client, PermissionDenied, Unauthenticated
from keyguard.v1 import keyguard_pb2 as pb
from keyguard.v1 import keyguard_pb2_grpc as pb_grpc
from keyguard_server import Config
from keyguard_server._callers import Callers, current_caller, token_sha256
from keyguard_server._config import Caller, Role
from keyguard_server._drain import Drain
from keyguard_server._routing import Routes
from keyguard_server.envoy.service.auth.v3 import external_auth_pb2 as ext
from tests.certs import CertificateAuthority
from tests.conftest import RunningServer, StartServer

GATEWAY_TOKEN = "kgt_gateway-token-for-tests-only"
WEBSITE_TOKEN = "kgt_website-token-for-tests-only"
OPS_TOKEN = "kgt_ops-token-for-tests-only"
CALLERS = (
    Caller("gateway", Role.AUTHORIZER, token_sha256=token_sha256(GATEWAY_TOKEN), cert_common_name="gateway"),
    Caller("website", Role.MANAGER, token_sha256=token_sha256(WEBSITE_TOKEN), cert_common_name="website"),
    Caller("ops", Role.ADMIN, token_sha256=token_sha256(OPS_TOKEN)),
)

SERVICES = {s.full_name: s for f in (pb.DESCRIPTOR, ext.DESCRIPTOR) for s in f.services_by_name.values()}
METHODS = [(name, method) for name, service in SERVICES.items() for method in service.methods_by_name]
DENIED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
AUTHORIZATION = {"keyguard.v1.Authorization", "envoy.service.auth.v3.Authorization"}
MANAGEMENT = {"keyguard.v1.KeyManagement"}
# Narrower than their service: admins only (freezing stops every bot of an account).
ADMIN_ONLY = {("keyguard.v1.KeyManagement", "FreezeAccount"), ("keyguard.v1.KeyManagement", "UnfreezeAccount")}


def status_of(channel: grpc.Channel, service: str, method: str, metadata: tuple[tuple[str, str], ...]) -> Any:
    """Calls the RPC with an empty request; the status code it ends with."""
    descriptor = SERVICES[service].methods_by_name[method]
    request = message_factory.GetMessageClass(descriptor.input_type)()
    rpc: grpc.UnaryUnaryMultiCallable[Any, bytes] = channel.unary_unary(
        f"/{service}/{method}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda b: b,
    )
    try:
        rpc(request, metadata=metadata, timeout=10)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def guarded(launch: StartServer) -> Iterator[RunningServer]:
    running = launch(callers=CALLERS)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(guarded: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(guarded.target) as ch:
        yield ch


CREDENTIALS = {
    "no credential": ((), None),
    "wrong token": (bearer("kgt_not-a-configured-token"), None),
    "not bearer": ((("authorization", f"Basic {GATEWAY_TOKEN}"),), None),
    "empty bearer": ((("authorization", "Bearer "),), None),
    "authorizer": (bearer(GATEWAY_TOKEN), AUTHORIZATION),
    "manager": (bearer(WEBSITE_TOKEN), MANAGEMENT),
    "admin": (bearer(OPS_TOKEN), AUTHORIZATION | MANAGEMENT),
}


@pytest.mark.parametrize(("service", "method"), METHODS)
@pytest.mark.parametrize("who", list(CREDENTIALS))
def test_role_matrix_plaintext(channel: grpc.Channel, who: str, service: str, method: str) -> None:
    metadata, allowed = CREDENTIALS[who]
    assert_admitted_as(status_of(channel, service, method, metadata), service, method, allowed, admin=who == "admin")


def assert_admitted_as(
    code: grpc.StatusCode, service: str, method: str, allowed: set[str] | None, *, admin: bool = False
) -> None:
    """Unknown caller: UNAUTHENTICATED; known: through to the RPC only for its role's services,
    and to the admin-only methods only as an admin."""
    if allowed is None:
        assert code is grpc.StatusCode.UNAUTHENTICATED
    elif service in allowed and (admin or (service, method) not in ADMIN_ONLY):
        assert code not in DENIED
    else:
        assert code is grpc.StatusCode.PERMISSION_DENIED


def test_an_admitted_header_is_admitted_for_its_own_method_only(channel: grpc.Channel) -> None:
    """Admissions are remembered per method: the gateway's header, admitted for Authorize a
    moment ago, still gets no further than its role."""
    gateway = bearer(GATEWAY_TOKEN)
    for _ in range(2):
        assert status_of(channel, "keyguard.v1.Authorization", "Authorize", gateway) not in DENIED
        assert (
            status_of(channel, "keyguard.v1.KeyManagement", "CreateKey", gateway) is grpc.StatusCode.PERMISSION_DENIED
        )


def test_any_number_of_spellings_of_a_token_is_admitted(channel: grpc.Channel) -> None:
    """Past the bound of remembered headers, a caller is still checked, and admitted, every time."""
    for pad in range(1, 80):
        spelling = (("authorization", f"{'bearer' if pad % 2 else 'Bearer'}{' ' * pad}{GATEWAY_TOKEN}{' ' * pad}"),)
        assert status_of(channel, "keyguard.v1.Authorization", "Authorize", spelling) not in DENIED
    refused = (("authorization", f"Bearer {GATEWAY_TOKEN}x"),)
    assert status_of(channel, "keyguard.v1.Authorization", "Authorize", refused) is grpc.StatusCode.UNAUTHENTICATED


def test_concurrent_calls_are_each_judged_by_their_own_metadata(guarded: RunningServer) -> None:
    """The caller check reads the metadata grpc handed the handler lookup: interleaved calls on
    one method and one connection, each with another credential, each get their own verdict."""
    credentials = [bearer(GATEWAY_TOKEN), bearer("kgt_not-a-configured-token"), (), bearer(WEBSITE_TOKEN)]
    unauthenticated, denied = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED
    expected = [None, unauthenticated, unauthenticated, denied]

    async def calls() -> list[grpc.StatusCode]:
        async with grpc.aio.insecure_channel(guarded.target) as aio_channel:
            stub = pb_grpc.AuthorizationStub(aio_channel)

            async def code(metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
                try:
                    await stub.Authorize(pb.AuthorizeRequest(), metadata=metadata, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            return await asyncio.gather(*(code(credentials[i % 4]) for i in range(400)))

    for i, code in enumerate(asyncio.run(calls())):
        if expected[i % 4] is None:
            assert code not in DENIED, i
        else:
            assert code is expected[i % 4], i


class _Context:
    """grpc's side of a call, as far as the caller check goes: an abort ends the call."""

    def __init__(self) -> None:
        self.aborted: grpc.StatusCode | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = code
        raise asyncio.CancelledError(details)

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}


def test_each_call_is_judged_by_the_metadata_its_handler_was_made_from() -> None:
    """Handlers for two calls, both looked up before either runs: each admits or refuses by its
    own call's metadata, whatever order they run in."""
    routes = Routes(Callers(CALLERS), Drain())
    answered: list[str] = []

    async def authorize(request: Any, context: Any) -> bytes:
        answered.append(current_caller())
        return b""

    method = "/keyguard.v1.Authorization/Authorize"
    routes.add_registered_method_handlers(
        "keyguard.v1.Authorization", {"Authorize": grpc.unary_unary_rpc_method_handler(authorize)}
    )
    admitted = routes.service(types.SimpleNamespace(method=method, invocation_metadata=bearer(GATEWAY_TOKEN)))
    refused = routes.service(types.SimpleNamespace(method=method, invocation_metadata=()))
    assert admitted is not None and refused is not None

    async def run(handler: Any) -> grpc.StatusCode | None:
        context = _Context()
        with contextlib.suppress(asyncio.CancelledError):
            await handler.unary_unary(pb.AuthorizeRequest(), context)
        return context.aborted

    assert asyncio.run(run(refused)) is grpc.StatusCode.UNAUTHENTICATED
    assert asyncio.run(run(admitted)) is None
    assert answered == ["gateway"]


def test_health_and_reflection_need_no_credential(channel: grpc.Channel) -> None:
    health: Any = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def test_client_raises_unauthenticated(guarded: RunningServer) -> None:
    with Client(guarded.target, token="kgt_wrong") as client, pytest.raises(Unauthenticated):
        client.list_keys("acct")


def test_only_admins_freeze_accounts(guarded: RunningServer) -> None:
    """KeyManagement is the manager's, but freezing stops every bot of an account: admins only."""
    with guarded.client(token=WEBSITE_TOKEN) as website, guarded.client(token=OPS_TOKEN) as ops:
        with pytest.raises(PermissionDenied):
            website.freeze_account("acct-freeze-roles")
        assert not website.get_account_settings("acct-freeze-roles").frozen
        assert ops.freeze_account("acct-freeze-roles").frozen
        with pytest.raises(PermissionDenied):
            website.unfreeze_account("acct-freeze-roles")
        assert website.get_account_settings("acct-freeze-roles").frozen  # managers still read settings
        assert not ops.unfreeze_account("acct-freeze-roles").frozen


def test_callers_name_goes_into_the_audit_log(guarded: RunningServer) -> None:
    with guarded.client(token=WEBSITE_TOKEN) as website:
        key = website.create_key("acct-audited", "bot", "read").key
    with guarded.client(token=OPS_TOKEN) as ops:
        events, _ = ops.list_audit_events("acct-audited")
    assert [(e.caller, e.access_key) for e in events] == [("website", key.access_key)]


# -- mTLS ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture(scope="module")
def mtls(
    launch: StartServer, ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = ca.issue("keyguard.internal", server=True).write(directory, "server")
    (directory / "ca.crt").write_bytes(ca.pem)
    running = launch(
        callers=CALLERS, tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=str(directory / "ca.crt")
    )
    yield running
    running.stop()


def mtls_channel(server: RunningServer, ca: CertificateAuthority, common_name: str | None) -> grpc.Channel:
    client = ca.issue(common_name) if common_name else None
    credentials = grpc.ssl_channel_credentials(ca.pem, client.key if client else None, client.cert if client else None)
    return grpc.secure_channel(server.target, credentials)


CERTS = {
    "authorizer cert": ("gateway", AUTHORIZATION),
    "manager cert": ("website", MANAGEMENT),
    "unknown cert": ("stranger", None),
}


@pytest.mark.parametrize(("service", "method"), METHODS)
@pytest.mark.parametrize("who", list(CERTS))
def test_role_matrix_mtls(mtls: RunningServer, ca: CertificateAuthority, who: str, service: str, method: str) -> None:
    common_name, allowed = CERTS[who]
    with mtls_channel(mtls, ca, common_name) as ch:
        assert_admitted_as(status_of(ch, service, method, ()), service, method, allowed)


def test_mtls_refuses_a_client_without_certificate(mtls: RunningServer, ca: CertificateAuthority) -> None:
    with mtls_channel(mtls, ca, None) as ch:
        assert status_of(ch, "keyguard.v1.KeyManagement", "ListKeys", bearer(OPS_TOKEN)) is grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_a_certificate_from_another_ca(mtls: RunningServer, ca: CertificateAuthority) -> None:
    rogue = CertificateAuthority("rogue CA").issue("website")
    credentials = grpc.ssl_channel_credentials(ca.pem, rogue.key, rogue.cert)
    with grpc.secure_channel(mtls.target, credentials) as ch:
        assert status_of(ch, "keyguard.v1.KeyManagement", "ListKeys", ()) is grpc.StatusCode.UNAVAILABLE


def test_typed_client_over_mtls(mtls: RunningServer, ca: CertificateAuthority) -> None:
    pem = ca.issue("website")
    with Client(mtls.target, root_certificates=ca.pem, private_key=pem.key, certificate_chain=pem.cert) as client:
        created = client.create_key("acct-mtls", "bot", "read")
    assert created.key.account_id == "acct-mtls"


# -- secure by default --------------------------------------------------------


def test_zero_config_generates_a_private_admin_token(start_server: StartServer) -> None:
    server = start_server()
    path = server.config.admin_token_file
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert server.admin_token.startswith("kgt_")
    with server.client() as client:
        assert client.list_keys("acct") == []
    with Client(server.target) as anonymous, pytest.raises(Unauthenticated):
        anonymous.list_keys("acct")


def test_admin_token_is_reused_across_restarts(start_server: StartServer) -> None:
    first = start_server()
    token = first.admin_token
    first.stop()
    assert start_server(data_dir=first.config.data_dir).admin_token == token


def test_a_readable_admin_token_is_refused(start_server: StartServer, tmp_path: Path) -> None:
    token_file = tmp_path / "admin.token"
    token_file.write_text("kgt_leaky\n")
    os.chmod(token_file, 0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        start_server(data_dir=str(tmp_path))


def test_no_admin_token_when_callers_are_configured(guarded: RunningServer) -> None:
    assert not guarded.config.admin_token_file.exists()


@pytest.mark.parametrize("listen", ["0.0.0.0:50051", "[::]:50051", "192.0.2.10:50051", "example.com:1"])
def test_zero_config_refuses_to_leave_loopback(listen: str) -> None:
    with pytest.raises(ValueError, match="no callers configured"):
        Config(listen=listen)
    Config(listen=listen, callers=CALLERS, allow_plaintext=True)  # fine once callers are configured


@pytest.mark.parametrize("listen", ["127.0.0.1:50051", "[::1]:50051", "localhost:50051", "127.0.0.2:1"])
def test_loopback_needs_no_callers(listen: str) -> None:
    Config(listen=listen)


def test_callers_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "keyguard.toml"
    path.write_text(
        'listen = "0.0.0.0:50051"\n'
        "allow_plaintext = true\n"
        "[[callers]]\n"
        'name = "gateway"\nrole = "authorizer"\n'
        f'token_sha256 = "{token_sha256(GATEWAY_TOKEN)}"\n'
        "[[callers]]\n"
        'name = "website"\nrole = "manager"\ncert_common_name = "website"\n'
    )
    config = Config.load(path, env={})
    assert [(c.name, c.role) for c in config.callers] == [("gateway", Role.AUTHORIZER), ("website", Role.MANAGER)]


@pytest.mark.parametrize(
    ("caller", "message"),
    [
        ('name = "x"\nrole = "root"\ntoken_sha256 = "' + "a" * 64 + '"', "not a valid Role"),
        ('name = "x"\nrole = "manager"', "needs token_sha256 or cert_common_name"),
        ('name = "x"\nrole = "manager"\ntoken_sha256 = "plaintext-token"', "64 lower-case hex"),
        ('name = "x"\nrole = "manager"\ncert_cn = "x"', "unknown caller setting"),
    ],
)
def test_bad_callers_are_config_errors(tmp_path: Path, caller: str, message: str) -> None:
    path = tmp_path / "keyguard.toml"
    path.write_text(f"[[callers]]\n{caller}\n")
    with pytest.raises(ValueError, match=message):
        Config.load(path, env={})


def test_a_service_given_only_as_a_generic_handler_stops_the_start() -> None:
    """The server routes methods from one guarded table; a service whose generated code gave only
    a generic handler would be missing from it, so the start fails instead of serving less."""
    routes = Routes(Callers(()), Drain())
    routes.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("example.v1.Unrouted", {}),))
    with pytest.raises(TypeError, match=r"example\.v1\.Unrouted"):
        routes.sealed()
