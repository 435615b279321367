"""The client distribution alone: run by .ci/run in a fresh virtualenv holding only the `keyguard`
wheel and its dependencies, never the repository's sources or the server.

Proves what a bot or a gateway relies on when it installs `keyguard` without `keyguard-server`:
the package imports, a Client can be built, requests can be signed (and verify), the generated
stubs load, the admin CLI runs and says what to install for `keyguard serve`, and the server
(with Envoy's stubs, argon2, Peewee) is not there to be imported by accident.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import keyguard
import keyguard.signing
from keyguard.v1 import keyguard_pb2

# The wheel, not a checkout that happens to be on sys.path.
assert Path(sys.prefix) in Path(keyguard.__file__).parents, keyguard.__file__
for server_side in ("keyguard_server", "argon2", "peewee", "psycopg2"):
    assert importlib.util.find_spec(server_side) is None, f"{server_side} is importable beside the client alone"

with keyguard.Client("127.0.0.1:1", token="kgt_smoke", timeout=1) as client:
    assert client is not None

private_pem, public_pem = keyguard.signing.new_key_pair()
payload = keyguard.envoy_payload("POST", "/api/v3/order?symbol=BTCUSDT", b"{}", symbol="BTCUSDT")
signed = keyguard.sign_request(private_pem, "kg_smoke", payload)
assert keyguard.signing.verify(keyguard.signing.load_public_key(public_pem), "kg_smoke", signed)
assert not keyguard.signing.verify(keyguard.signing.load_public_key(public_pem), "kg_other", signed)
assert keyguard_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name == "keyguard.v1.Authorization"

cli = Path(sys.executable).parent / "keyguard"
help_text = subprocess.run([cli, "--help"], capture_output=True, text=True, check=True).stdout
assert "keys" in help_text, help_text
serve = subprocess.run([cli, "serve"], capture_output=True, text=True, env={"PATH": str(cli.parent)})
assert serve.returncode == 1 and "pip install keyguard-server" in serve.stderr, serve

print(f"client wheel alone: ok (keyguard from {Path(keyguard.__file__).parent})")
