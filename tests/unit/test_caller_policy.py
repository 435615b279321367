"""The caller policy as a function of credentials, without a server: who a header or a client
certificate names, what each role may call, and the admitted headers each method remembers."""

from __future__ import annotations

import grpc
import pytest

from keyguard.v1 import keyguard_pb2 as pb
from keyguard_server import _callers
from keyguard_server._callers import MAX_ADMITTED_HEADERS, Callers, token_sha256
from keyguard_server._config import Caller, Role
from keyguard_server.envoy.service.auth.v3 import external_auth_pb2 as ext
from tests.certs import CertificateAuthority

GATEWAY, WEBSITE, OPS = (
    "kgt_gateway-token-for-tests-only",
    "kgt_website-token-for-tests-only",
    "kgt_ops-token-tests-only",
)
CALLERS = Callers(
    (
        Caller("gateway", Role.AUTHORIZER, token_sha256=token_sha256(GATEWAY), cert_common_name="gateway"),
        Caller("website", Role.MANAGER, token_sha256=token_sha256(WEBSITE), cert_common_name="website"),
        Caller("ops", Role.ADMIN, token_sha256=token_sha256(OPS)),
    )
)
METHODS = [
    f"/{s.full_name}/{m}"
    for f in (pb.DESCRIPTOR, ext.DESCRIPTOR)
    for s in f.services_by_name.values()
    for m in s.methods_by_name
]
AUTHORIZE, LIST_KEYS, FREEZE = (
    "/keyguard.v1.Authorization/Authorize",
    "/keyguard.v1.KeyManagement/ListKeys",
    "/keyguard.v1.KeyManagement/FreezeAccount",
)
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


def verdict(method: str, header: str | bytes | None, certificate: bytes | None = None) -> object:
    """The verdict of a fresh admission for ``method``: the caller's name, or the refusal's code."""
    admit = CALLERS.admission(method)
    assert admit is not None
    judged = admit(header, certificate)
    return judged[0] if isinstance(judged, tuple) else judged


def allowed(role: str, method: str) -> bool:
    service = method.split("/")[1]
    if role == "ops":
        return True
    if role == "gateway":
        return service in {"keyguard.v1.Authorization", "envoy.service.auth.v3.Authorization"}
    return service == "keyguard.v1.KeyManagement" and not method.endswith(("/FreezeAccount", "/UnfreezeAccount"))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(("name", "token"), [("gateway", GATEWAY), ("website", WEBSITE), ("ops", OPS)])
def test_each_role_calls_its_services_and_no_other(name: str, token: str, method: str) -> None:
    assert verdict(method, f"Bearer {token}") == (name if allowed(name, method) else PERMISSION_DENIED)


@pytest.mark.parametrize(
    "header",
    ["", "Bearer ", "Bearer   ", f"Basic {GATEWAY}", GATEWAY, f"Bearer {GATEWAY}x", b"Bearer " + GATEWAY.encode()],
    ids=["empty", "empty bearer", "blank bearer", "not bearer", "no scheme", "wrong token", "binary"],
)
def test_a_header_naming_no_caller_is_unauthenticated(header: str | bytes) -> None:
    assert verdict(AUTHORIZE, header) is UNAUTHENTICATED


def test_no_credential_is_unauthenticated() -> None:
    assert verdict(AUTHORIZE, None) is UNAUTHENTICATED


def test_the_scheme_is_case_blind_and_the_token_may_be_padded() -> None:
    assert verdict(AUTHORIZE, f"bearer   {GATEWAY}  ") == "gateway"


def test_refusals_say_why() -> None:
    admit = CALLERS.admission(FREEZE)
    assert admit is not None
    assert admit(f"Bearer {WEBSITE}", None) == (
        PERMISSION_DENIED,
        f"caller 'website' (manager) may not call {FREEZE}",
    )
    assert admit(None, None) == (UNAUTHENTICATED, "a valid caller token or client certificate is required")


def test_health_and_reflection_are_open() -> None:
    for method in (
        "/grpc.health.v1.Health/Check",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ):
        assert CALLERS.admission(method) is None


# -- client certificates ------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


def test_a_client_certificate_names_its_caller(ca: CertificateAuthority) -> None:
    assert verdict(LIST_KEYS, None, ca.issue("website").cert) == "website"
    assert verdict(LIST_KEYS, None, ca.issue("gateway").cert) is PERMISSION_DENIED
    assert verdict(LIST_KEYS, None, ca.issue("stranger").cert) is UNAUTHENTICATED


def test_a_server_certificate_names_no_caller(ca: CertificateAuthority) -> None:
    assert verdict(LIST_KEYS, None, ca.issue("website", server=True).cert) is UNAUTHENTICATED


def test_a_header_decides_alone(ca: CertificateAuthority) -> None:
    """With a header, the certificate is not read (the routing passes None): a bad header is
    refused whatever certificate came with it."""
    assert verdict(LIST_KEYS, "Bearer kgt_not-a-configured-token", ca.issue("website").cert) is UNAUTHENTICATED


# -- admitted headers -----------------------------------------------------------


@pytest.fixture
def digests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token the policy digests (its work on a header it does not remember)."""
    seen: list[str] = []

    def counting(token: str) -> str:
        seen.append(token)
        return token_sha256(token)

    monkeypatch.setattr(_callers, "token_sha256", counting)
    return seen


def test_an_admitted_header_is_remembered_by_its_method_only(digests: list[str]) -> None:
    authorize, check = CALLERS.admission(AUTHORIZE), CALLERS.admission("/envoy.service.auth.v3.Authorization/Check")
    assert authorize is not None and check is not None
    for _ in range(3):
        assert authorize(f"Bearer {GATEWAY}", None) == "gateway"
    assert len(digests) == 1
    assert check(f"Bearer {GATEWAY}", None) == "gateway"
    assert len(digests) == 2


def test_refused_headers_are_not_remembered(digests: list[str]) -> None:
    admit = CALLERS.admission(LIST_KEYS)
    assert admit is not None
    for _ in range(3):
        assert admit(f"Bearer {GATEWAY}", None)[0] is PERMISSION_DENIED
    assert len(digests) == 3


def test_past_the_bound_headers_are_judged_every_time(digests: list[str]) -> None:
    admit = CALLERS.admission(AUTHORIZE)
    assert admit is not None
    spellings = [f"Bearer {' ' * pad}{GATEWAY}" for pad in range(MAX_ADMITTED_HEADERS + 16)]
    for _ in range(2):
        assert all(admit(spelling, None) == "gateway" for spelling in spellings)
    assert len(digests) == len(spellings) + 16
