"""Clients in other languages come from protos/: a Node.js client (@grpc/grpc-js) against the real server,
unary Authorize and the AuthorizeStream stream alike."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import google.rpc
import pytest

from tests.conftest import RunningServer

NODE_DIR = Path(__file__).parent / "node"
# google/api/annotations.proto, imported by keyguard.proto for its HTTP rules: from googleapis-common-protos.
GOOGLEAPIS = str(Path(google.rpc.__path__[0]).parents[1])
NODE, NPM = shutil.which("node"), shutil.which("npm")


@pytest.fixture(scope="module")
def node_client() -> Path:
    if NODE is None or NPM is None:
        pytest.fail("node and npm are needed for this test (the machine image ships them)")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").exists():
        subprocess.run(
            [NPM, "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            check=True,
            capture_output=True,
            timeout=300,
        )
    return NODE_DIR / "client.js"


def test_node_client_creates_a_key_and_authorizes(node_client: Path, server: RunningServer, account: str) -> None:
    assert NODE is not None
    out = subprocess.run(
        [NODE, str(node_client), server.target, server.admin_token, account, GOOGLEAPIS],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["created"]["account_id"] == account
    assert result["created"]["allowed_ips"] == ["2001:db8::/32"]
    assert result["created"]["access_key"].startswith("kg_")
    assert result["allowed"]["allowed"] is True
    assert result["allowed"]["decision"] == "DECISION_ALLOW"
    assert result["allowed"]["key_name"] == "node bot"
    assert result["denied"]["decision"] == "DECISION_PERMISSION_DENIED"
    assert result["invalid"]["code"] == 3  # INVALID_ARGUMENT
    assert "name" in result["invalid"]["details"]
    # Four messages on one AuthorizeStream stream, each answered under its own id.
    streamed = result["streamed"]
    assert set(streamed) == {"18446744073709551615", "2", "3", "4"}
    assert {k: a["result"] for k, a in streamed.items()} == {
        "18446744073709551615": "response",
        "2": "response",
        "3": "error",
        "4": "response",
    }
    assert streamed["18446744073709551615"]["response"]["decision"] == "DECISION_ALLOW"
    assert streamed["18446744073709551615"]["response"]["key_name"] == "node bot"
    assert streamed["2"]["response"]["decision"] == "DECISION_PERMISSION_DENIED"
    assert streamed["4"]["response"]["decision"] == "DECISION_ALLOW"
    error = streamed["3"]["error"]  # a malformed message: an error for its id, and the stream went on
    assert error["code"] == 3  # INVALID_ARGUMENT
    assert error["message"].startswith("client_ip: ")
    assert error["details"] == ["type.googleapis.com/google.rpc.BadRequest"]
    with server.client() as client:
        assert [k.name for k in client.list_keys(account)] == ["node bot"]
