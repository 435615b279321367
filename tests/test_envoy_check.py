"""keyguard's Envoy ext_authz Check, called directly with raw CheckRequests.

No Envoy here: another proxy may not normalise paths or strip headers, so
keyguard's own refusals are tested on exactly the requests an attacker sends
(``tests/test_envoy.py`` runs the same attacks through a real Envoy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from keyguard import Client, CreatedKey, KeyType, Permission, WithdrawalDestination, sign_request
from keyguard.signing import envoy_payload
from keyguard_server import _envoy
from keyguard_server._config import EnvoyRoute
from keyguard_server.authorize._domain import now_us
from keyguard_server.envoy.service.auth.v3 import external_auth_pb2 as ext
from keyguard_server.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from tests.conftest import RunningServer, StartServer
from tests.test_envoy import GENERIC_401, ROUTES


@dataclasses.dataclass
class Answer:
    status: int  # the HTTP status Envoy would answer (200: forwarded)
    body: Any  # the JSON body of a refusal
    decision: str  # what the gRPC status message names (Envoy's logs)
    headers: dict[str, str]  # set on the forwarded request
    removed: list[str]  # removed from the forwarded request

    @property
    def refusal(self) -> tuple[int, Any]:
        return self.status, self.body


Check = Callable[..., Answer]


@contextlib.contextmanager
def checker(server: RunningServer) -> Iterator[Check]:
    with grpc.insecure_channel(server.target) as channel:
        stub = ext_grpc.AuthorizationStub(channel)

        def check(
            method: str, path: str, headers: dict[str, str], *, peer: str = "127.0.0.1", body: bytes = b""
        ) -> Answer:
            request = ext.CheckRequest()
            http = request.attributes.request.http
            http.method, http.path, http.raw_body = method, path, body
            http.headers.update(headers)
            request.attributes.source.address.socket_address.address = peer
            response = stub.Check(request, timeout=10, metadata=(("authorization", f"Bearer {server.admin_token}"),))
            decision = response.status.message.split(":", 1)[0]
            if response.HasField("ok_response"):
                ok = response.ok_response
                headers = {h.header.key: h.header.value for h in ok.headers}
                return Answer(200, None, "ALLOW", headers, list(ok.headers_to_remove))
            denied = response.denied_response
            return Answer(denied.status.code, json.loads(denied.body), decision, {}, [])

        yield check


@pytest.fixture(scope="module")
def keyguard(launch: StartServer) -> Iterator[RunningServer]:
    # Whitelisted addresses usable at once; the new decisions' answers have a server of their own below.
    running = launch(envoy_routes=ROUTES, failure_burst=100_000, address_hold_seconds=0)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def check(keyguard: RunningServer) -> Iterator[Check]:
    with checker(keyguard) as check:
        yield check


@pytest.fixture
def client(keyguard: RunningServer) -> Iterator[Client]:
    with keyguard.client() as c:
        yield c


def secret(key: CreatedKey, private_key: str | None = None) -> dict[str, str]:
    return {"x-api-key": key.key.access_key, "x-api-secret": key.private_key if private_key is None else private_key}


def signed(key: CreatedKey, payload: str, timestamp_ms: int | None = None) -> dict[str, str]:
    request = sign_request(key.private_key, key.key.access_key, payload, timestamp_ms=timestamp_ms)
    return {
        "x-api-key": key.key.access_key,
        "x-api-timestamp": str(request.timestamp_ms),
        "x-api-nonce": request.nonce,
        "x-api-signature": request.signature,
    }


# -- routing: what the upstream could read as another path or method ---------------


@pytest.mark.parametrize(
    "path",
    [
        "/api/v3/order/../../../sapi/v1/withdraw?coin=BTC",
        "/api/v3/order/%2e%2e/%2e%2e/%2e%2e/sapi/v1/withdraw",
        "/api/v3/order%2F..%2F..%2F..%2Fsapi/v1/withdraw",
        "/sapi/v1//withdraw",
        "/sapi/v1/./withdraw",
        "/sapi/v1/x/../withdraw",
        "/sapi/v1/%77ithdraw",
        "/sapi/v1/%2577ithdraw",  # double encoding
        "/sapi/v1/with\\draw",
        "/sapi/v1/x\\..\\withdraw",
        "/sapi/v1/withdraw;x=1",  # Java servers strip ";..." from a segment
        "/sapi/v1/withdraw/..",
        "/sapi/v1/withdraw/...",
        "/sapi/v1/withdraw%00",
        "/sapi/v1/withdraw.",  # servers that trim trailing dots serve /sapi/v1/withdraw
        "/sapi/v1/withdraw..",
        "sapi/v1/withdraw",
        "*",
        "",
    ],
)
def test_non_canonical_paths_are_refused(check: Check, client: Client, account: str, path: str) -> None:
    """Refused before anything else about the request (an override header included), the
    second time (the path's route remembered) as the first."""
    trader = client.create_key(account, "trader", "trade", ["127.0.0.1"])
    for headers in (secret(trader), {**secret(trader), "x-http-method-override": "GET"}):
        answer = check("POST", path, headers)
        assert (answer.status, answer.body["error"]) == (403, "PATH_NOT_CANONICAL")


def test_prefixes_match_whole_segments_in_any_case(check: Check, client: Client, account: str) -> None:
    reader = client.create_key(account, "reader", "read", ["127.0.0.1"])
    assert check("GET", "/sapi/v1/capital/config", secret(reader)).status == 200  # the /sapi/v1/ read route
    for path in ("/sapi/v1/Withdraw", "/SAPI/V1/WITHDRAW", "/sapi/v1/withdraw/", "/sapi/v1/withdraw/apply"):
        answer = check("POST", path, {**secret(reader), "x-withdraw-asset": "BTC", "x-withdraw-address": "bc1q"})
        assert (answer.status, answer.body["error"]) == (403, "PERMISSION_DENIED"), path
    # Suffix-matching frameworks, and Struts-style "action!method".
    for path in ("/sapi/v1/withdraw.json", "/sapi/v1/Withdraw.xml/apply", "/sapi/v1/withdraw!execute"):
        answer = check("POST", path, {**secret(reader), "x-withdraw-asset": "BTC", "x-withdraw-address": "bc1q"})
        assert (answer.status, answer.body["error"]) == (403, "PERMISSION_DENIED"), path
    answer = check("GET", "/api/v3/accountTransfer", secret(reader))  # not below /api/v3/account
    assert (answer.status, answer.body["error"]) == (403, "ROUTE_NOT_MAPPED")
    assert check("GET", "/api/v3/account/", secret(reader)).status == 200


@pytest.mark.parametrize(
    ("header", "query"),
    [
        ("x-http-method-override", ""),
        ("x-http-method", ""),
        ("x-method-override", ""),
        ("x_http_method_override", ""),  # what a proxy that keeps underscores passes on
        ("x-original-url", ""),
        ("x-rewrite-url", ""),
        ("x-forwarded-method", ""),
        ("x-original-method", ""),
        ("x-original-uri", ""),
        ("", "?symbol=BTCUSDT&_method=DELETE"),
        ("", "?_Method=DELETE"),
        ("", "?_method[]=DELETE"),
        ("", "?_method%00=DELETE"),
    ],
)
def test_method_overrides_are_refused(check: Check, client: Client, account: str, header: str, query: str) -> None:
    reader = client.create_key(account, "reader", "read", ["127.0.0.1"])
    assert check("GET", "/api/v3/order", secret(reader)).status == 200  # reading orders needs only READ
    answer = check("GET", f"/api/v3/order{query}", {**secret(reader), **({header: "DELETE"} if header else {})})
    assert (answer.status, answer.body["error"]) == (403, "METHOD_OVERRIDE")


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-www-form-urlencoded", "symbol=BTCUSDT&_method=DELETE"),
        (
            "multipart/form-data; boundary=b",
            '--b\r\nContent-Disposition: form-data; name="_method"\r\n\r\nDELETE\r\n--b--',
        ),
    ],
    ids=["urlencoded", "multipart"],
)
def test_method_overrides_in_a_form_body_are_refused(
    check: Check, client: Client, account: str, content_type: str, body: str
) -> None:
    """Rails, Laravel and Symfony honour ``_method`` in a POST form: a READ route's GET must not
    become a DELETE upstream."""
    reader = client.create_key(account, "reader", "read", ["127.0.0.1"])
    headers = {**secret(reader), "content-type": content_type, "content-length": str(len(body))}
    answer = check("GET", "/api/v3/order", headers, body=body.encode())
    assert (answer.status, answer.body["error"]) == (403, "METHOD_OVERRIDE")


# -- what a refusal tells ---------------------------------------------------------


def test_refusals_before_the_credential_is_proven_all_look_alike(check: Check, client: Client, account: str) -> None:
    key = client.create_key(account, "bot", "trade", ["127.0.0.1"])
    wrong = key.private_key[:-1] + ("A" if key.private_key[-1] != "A" else "B")
    elsewhere = client.create_key(account, "elsewhere", "trade", ["192.0.2.1"])
    disabled = client.create_key(account, "disabled", "trade", ["127.0.0.1"])
    client.update_key(account, disabled.key.access_key, enabled=False)
    expired = client.create_key(account, "expired", "trade", expires_at=datetime.now(UTC) + timedelta(seconds=1))
    signer = client.create_key(account, "signer", "trade", ["127.0.0.1"], key_type=KeyType.ED25519)
    order = envoy_payload("GET", "/api/v3/account")
    replayed = signed(signer, order)
    assert check("GET", "/api/v3/account", replayed).status == 200
    time.sleep(1.1)  # let "expired" expire
    cases = {
        "UNKNOWN_KEY": {"x-api-key": "kg_" + "A" * 24, "x-api-secret": key.private_key},
        "BAD_SECRET": secret(key, wrong),
        "IP_NOT_ALLOWED": secret(elsewhere),
        "KEY_DISABLED": secret(disabled),
        "KEY_EXPIRED": secret(expired),
        "BAD_SIGNATURE": signed(signer, envoy_payload("GET", "/api/v3/other")),
        "STALE_REQUEST": signed(signer, order, timestamp_ms=time.time_ns() // 1_000_000 - 3_600_000),
        "REPLAYED_REQUEST": replayed,
    }
    for decision, headers in cases.items():
        answer = check("GET", "/api/v3/account", headers)
        assert answer.decision == decision  # Envoy's logs still say which
        assert answer.refusal == GENERIC_401, decision


def test_refusals_after_the_credential_is_proven_say_why(check: Check, client: Client, account: str) -> None:
    reader = client.create_key(account, "reader", "read", ["127.0.0.1"])
    assert check("POST", "/api/v3/order", secret(reader)).refusal == (
        403,
        {"error": "PERMISSION_DENIED", "message": "this API key lacks the permission for this request"},
    )


# -- what the upstream gets --------------------------------------------------------


def test_account_id_and_key_name_are_percent_encoded(check: Check, client: Client) -> None:
    account = f"acct,x-keyguard-permission=WITHDRAW;{time.time_ns()}"
    key = client.create_key(account, "bot, ünïcode", "trade", ["127.0.0.1"])
    answer = check("POST", "/api/v3/order", secret(key))
    assert answer.headers["x-keyguard-account-id"] == account.replace(",", "%2C").replace(";", "%3B")
    assert answer.headers["x-keyguard-key-name"] == "bot%2C %C3%BCn%C3%AFcode"


def test_forged_keyguard_headers_are_removed(check: Check, client: Client, account: str) -> None:
    key = client.create_key(account, "bot", "trade", ["127.0.0.1"])
    assert check("POST", "/api/v3/order", secret(key)).removed == ["x-api-secret"]  # this answer is remembered
    forged = {"x-keyguard-withdraw-address": "thief", "x_keyguard_account_id": "evil", "x-keyguard-account-id": "evil"}
    answer = check("POST", "/api/v3/order", {**secret(key), **forged})
    assert answer.headers["x-keyguard-account-id"] == account  # overwritten
    assert sorted(answer.removed) == ["x-api-secret", "x-keyguard-withdraw-address", "x_keyguard_account_id"]


def test_forged_header_names_never_grow_the_answer_cache(check: Check, client: Client, account: str) -> None:
    """ALLOW answers are memoised, but never by what a client chose: a key holder sending new
    x-keyguard-* names on every request gets them removed without filling keyguard's memory."""
    key = client.create_key(account, "bot", "trade", ["127.0.0.1"])
    check("POST", "/api/v3/order", secret(key))  # the key's own answer, cached once
    cached = _envoy._ok.cache_info().currsize
    for i in range(64):
        forged = f"x-keyguard-{'junk' * 50}-{i}"
        answer = check("POST", "/api/v3/order", {**secret(key), forged: "x"})
        assert answer.decision == "ALLOW"
        assert forged in answer.removed
    assert _envoy._ok.cache_info().currsize == cached


def test_the_checked_withdrawal_destination_is_passed_on(check: Check, client: Client, account: str) -> None:
    withdrawer = client.create_key(account, "withdrawer", "withdraw", ["127.0.0.1"])
    client.set_address_management(account, True)
    client.add_withdrawal_address(account, "XRP", "rCold", memo="memo, 42")
    destination = {"x-withdraw-asset": "XRP", "x-withdraw-address": "rCold", "x-withdraw-memo": "memo, 42"}
    answer = check("POST", "/sapi/v1/withdraw?coin=XRP&address=rThief", {**secret(withdrawer), **destination})
    assert answer.status == 200
    assert {k: v for k, v in answer.headers.items() if k.startswith("x-keyguard-withdraw-")} == {
        "x-keyguard-withdraw-asset": "XRP",
        "x-keyguard-withdraw-address": "rCold",
        "x-keyguard-withdraw-memo": "memo%2C 42",
    }
    reading = check("GET", "/api/v3/account", secret(withdrawer))
    assert not any(name.startswith("x-keyguard-withdraw-") for name in reading.headers)


# -- signed requests: body and destination are covered ----------------------------


def test_signed_body_cannot_be_changed(check: Check, client: Client, account: str) -> None:
    signer = client.create_key(account, "signer", "trade", ["127.0.0.1"], key_type=KeyType.ED25519)
    body = b'{"symbol":"BTCUSDT","side":"BUY","quantity":"1"}'
    path = "/api/v3/order?recvWindow=5000"
    length = {"content-length": str(len(body))}
    assert check("POST", path, {**signed(signer, envoy_payload("POST", path, body)), **length}, body=body).status == 200
    tampered = body.replace(b'"1"', b'"100"')
    headers = {**signed(signer, envoy_payload("POST", path, body)), "content-length": str(len(tampered))}
    answer = check("POST", path, headers, body=tampered)
    assert (answer.refusal, answer.decision) == (GENERIC_401, "BAD_SIGNATURE")


@pytest.mark.parametrize(
    "extra",
    [
        {"x-envoy-auth-partial-body": "true"},  # cut at max_request_bytes
        {"content-length": "999"},  # Envoy forwards no body (no with_request_body)
    ],
)
def test_signed_request_needs_the_whole_body(check: Check, client: Client, account: str, extra: dict[str, str]) -> None:
    signer = client.create_key(account, "signer", "trade", ["127.0.0.1"], key_type=KeyType.ED25519)
    body = b"symbol=BTCUSDT"
    headers = {**signed(signer, envoy_payload("POST", "/api/v3/order", body)), "content-length": str(len(body))}
    answer = check("POST", "/api/v3/order", {**headers, **extra}, body=body)
    assert (answer.status, answer.body["error"]) == (400, "BAD_REQUEST")


def test_signed_withdrawal_destination_cannot_be_changed(check: Check, client: Client, account: str) -> None:
    signer = client.create_key(account, "signer", "withdraw", ["127.0.0.1"], key_type=KeyType.ED25519)
    cold = WithdrawalDestination("BTC", "bc1qcold")
    headers = {"x-withdraw-asset": "BTC", "x-withdraw-address": "bc1qcold"}
    payload = envoy_payload("POST", "/sapi/v1/withdraw", destination=cold)
    assert payload.endswith(" asset=BTC&address=bc1qcold&memo=")
    assert check("POST", "/sapi/v1/withdraw", {**signed(signer, payload), **headers}).status == 200
    stolen = {**signed(signer, payload), **headers, "x-withdraw-address": "bc1qthief"}
    answer = check("POST", "/sapi/v1/withdraw", stolen)
    assert (answer.refusal, answer.decision) == (GENERIC_401, "BAD_SIGNATURE")


# -- issue 14's decisions: frozen, unrestricted, symbols, held addresses ----------------


def test_the_protections_answer_through_envoy(start_server: StartServer, account: str) -> None:
    """What the bot sees of each new decision: after the secret is proven, 403 and why;
    a frozen account is decided before the secret, so it looks like every other such refusal."""
    server = start_server(envoy_routes=ROUTES, failure_burst=100_000, unrestricted_key_days=90)
    authorizer = server.server.authorizer
    assert authorizer is not None
    with server.client() as client, checker(server) as check:
        btc_only = client.create_key(account, "btc", "trade", ["127.0.0.1"], symbols=["BTCUSDT"])
        order = secret(btc_only)
        answer = check("POST", "/api/v3/order", {**order, "x-api-symbol": "btcusdt"})
        assert (answer.status, answer.headers["x-keyguard-symbol"]) == (200, "BTCUSDT")  # what the upstream trades
        answer = check("POST", "/api/v3/order", {**order, "x-api-symbol": "ETHUSDT"})
        assert (answer.status, answer.body["error"]) == (403, "SYMBOL_NOT_ALLOWED")
        assert check("POST", "/api/v3/order", order).body["error"] == "SYMBOL_NOT_ALLOWED"  # no symbol named
        assert check("GET", "/api/v3/order", order).status == 200  # a READ route: symbols do not matter
        answer = check("POST", "/api/v3/order", {**order, "x-api-symbol": "BTC USDT"})
        assert (answer.status, answer.body["error"]) == (400, "BAD_REQUEST")

        forged = {**order, "x-api-symbol": "BTCUSDT", "x-keyguard-symbol": "ETHUSDT"}
        assert check("POST", "/api/v3/order", forged).headers["x-keyguard-symbol"] == "BTCUSDT"

        client.freeze_account(account)
        answer = check("POST", "/api/v3/order", {**order, "x-api-symbol": "BTCUSDT"})
        assert (answer.refusal, answer.decision) == (GENERIC_401, "ACCOUNT_FROZEN")
        client.unfreeze_account(account)

        withdrawer = client.create_key(account, "treasury", "withdraw", ["127.0.0.1"])
        client.set_address_management(account, True)
        client.add_withdrawal_address(account, "BTC", "bc1qcold")
        cold = {"x-withdraw-asset": "BTC", "x-withdraw-address": "bc1qcold"}
        answer = check("POST", "/sapi/v1/withdraw", {**secret(withdrawer), **cold})
        assert (answer.status, answer.body["error"]) == (403, "ADDRESS_ON_HOLD")

        anywhere = client.create_key(account, "anywhere", "trade")
        assert check("POST", "/api/v3/order", secret(anywhere)).status == 200
        try:
            authorizer.clock = lambda: now_us() + 91 * 24 * 3600 * 10**6  # 91 days later
            answer = check("POST", "/api/v3/order", secret(anywhere))
            assert (answer.status, answer.body["error"]) == (403, "IP_RESTRICTION_REQUIRED")
            assert check("GET", "/api/v3/account", secret(anywhere)).status == 200  # READ still works
            answer = check("POST", "/sapi/v1/withdraw", {**secret(withdrawer), **cold})
            assert answer.status == 200  # the hold is over
        finally:
            authorizer.clock = now_us


def test_a_signed_order_covers_its_symbol(start_server: StartServer, account: str) -> None:
    server = start_server(envoy_routes=ROUTES)
    with server.client() as client, checker(server) as check:
        signer = client.create_key(
            account, "signer", "trade", ["127.0.0.1"], key_type=KeyType.ED25519, symbols=["BTCUSDT", "ETHUSDT"]
        )
        payload = envoy_payload("POST", "/api/v3/order", symbol="BTCUSDT")
        assert payload.endswith(" symbol=BTCUSDT")
        assert check("POST", "/api/v3/order", {**signed(signer, payload), "x-api-symbol": "BTCUSDT"}).status == 200
        switched = {**signed(signer, payload), "x-api-symbol": "ETHUSDT"}  # allowed, but not what was signed
        answer = check("POST", "/api/v3/order", switched)
        assert (answer.refusal, answer.decision) == (GENERIC_401, "BAD_SIGNATURE")


# -- the client IP -----------------------------------------------------------------


def test_the_client_cannot_choose_its_ip(start_server: StartServer, account: str) -> None:
    """Only the proxies listed in envoy_trusted_proxies may name the client: the client IP is
    the right-most address, of X-Forwarded-For and then Envoy's peer, that is not one of them."""
    server = start_server(
        envoy_routes=ROUTES, envoy_client_ip_header="X-Forwarded-For", envoy_trusted_proxies="10.0.0.0/8, 192.0.2.9"
    )
    assert server.config.envoy_client_ip_header == "x-forwarded-for"
    with server.client() as client:
        key = client.create_key(account, "bot", "read", ["203.0.113.7"])
    with checker(server) as check:
        headers = secret(key)

        def status(xff: str, peer: str) -> int:
            return check("GET", "/api/v3/account", {**headers, "x-forwarded-for": xff}, peer=peer).status

        assert status("203.0.113.7", peer="127.0.0.1") == 401  # straight to Envoy: the peer is the client
        assert status("203.0.113.7", peer="10.1.2.3") == 200  # through the load balancer
        assert status("203.0.113.7, 10.0.0.5", peer="192.0.2.9") == 200  # through two trusted proxies
        assert status("203.0.113.7, 198.51.100.9", peer="10.1.2.3") == 401  # the client wrote 203.0.113.7


def test_forwarded_for_is_ignored_by_default(check: Check, client: Client, account: str) -> None:
    key = client.create_key(account, "bot", "read", ["203.0.113.7"])
    headers = {**secret(key), "x-forwarded-for": "203.0.113.7", "x-envoy-external-address": "203.0.113.7"}
    assert check("GET", "/api/v3/account", headers, peer="127.0.0.1").refusal == GENERIC_401
    assert check("GET", "/api/v3/account", headers, peer="203.0.113.7").status == 200


def test_a_dotted_read_prefix_never_outranks_a_withdraw_route(start_server: StartServer, account: str) -> None:
    """Specificity is the length of a prefix as matched, so "/sapi/v1.0-legacy" (matched as
    "/sapi/v1") does not win over "/sapi/v1/withdraw" because its text is longer."""
    routes = (
        EnvoyRoute("/sapi/v1/withdraw", Permission.WITHDRAW),
        EnvoyRoute("/sapi/v1.0-legacy", Permission.READ, method="GET"),
    )
    server = start_server(envoy_routes=routes, failure_burst=100_000)
    with server.client() as client, checker(server) as check:
        reader = client.create_key(account, "reader", "read", ["127.0.0.1"])
        headers = {**secret(reader), "x-withdraw-asset": "BTC", "x-withdraw-address": "bc1q"}
        answer = check("GET", "/sapi/v1/withdraw", headers)
        assert (answer.status, answer.body["error"]) == (403, "PERMISSION_DENIED")
