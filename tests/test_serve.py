"""`keyguard-server serve` as a user runs it, and the CLI walk-throughs of docs/cli.md."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.processes import KEYGUARD, KEYGUARD_SERVER, ServeProcess


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    process = ServeProcess(tmp_path_factory.mktemp("serve"))
    yield process
    if process.proc.poll() is None:
        process.terminate()


def test_serves_health_and_reflection(serve: ServeProcess) -> None:
    with grpc.insecure_channel(serve.target) as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)  # the typeshed stub lists no methods
        for service in ("", "keyguard.v1.KeyManagement", "keyguard.v1.Authorization"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"keyguard.v1.KeyManagement", "keyguard.v1.Authorization", "grpc.health.v1.Health"} <= services


def test_data_lives_in_the_local_data_dir(serve: ServeProcess) -> None:
    assert (serve.log.parent / "data" / "keyguard.db").exists()


def test_readme_walkthrough(serve: ServeProcess) -> None:
    """docs/cli.md's walk-through, step by step, with its outputs."""
    out = serve.cli("keys", "create", "acct-42", "--name", "my-bot", "--permission", "trade", "--ip", "203.0.113.7")
    assert out.returncode == 0, out.stderr
    assert "shown only this once" in out.stdout and "Never give it to anyone" in out.stdout
    access_key = re.search(r"Access key:\s+(kg_\w+)", out.stdout)[1]  # type: ignore[index]
    private_key = re.search(r"Private key:\s+(kgsk_\w+)", out.stdout)[1]  # type: ignore[index]

    listing = serve.cli("keys", "list", "acct-42")
    assert access_key in listing.stdout and "TRADE" in listing.stdout and private_key not in listing.stdout
    assert access_key in serve.cli("keys", "get", "acct-42", access_key).stdout

    def authorize(*args: str) -> subprocess.CompletedProcess[str]:
        return serve.cli("authorize", "--access-key", access_key, "--private-key", private_key, *args)

    allowed = authorize("--ip", "203.0.113.7", "--permission", "trade")
    assert (allowed.returncode, allowed.stdout.split(":")[0]) == (0, "ALLOW")
    wrong_ip = authorize("--ip", "198.51.100.9", "--permission", "trade")
    assert (wrong_ip.returncode, wrong_ip.stdout.strip()) == (3, "DENY: IP_NOT_ALLOWED")
    too_much = authorize("--ip", "203.0.113.7", "--permission", "withdraw", "--asset", "BTC", "--address", "bc1q")
    assert (too_much.returncode, too_much.stdout.strip()) == (3, "DENY: PERMISSION_DENIED")

    out = serve.cli(
        "keys",
        "create",
        "acct-42",
        "--name",
        "treasury",
        "--permission",
        "withdraw",
        "--ip",
        "203.0.113.7,2001:db8::/48",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    withdrawer = json.loads(out.stdout)
    assert withdrawer["allowed_ips"] == ["203.0.113.7", "2001:db8::/48"]
    assert serve.cli("address-management", "on", "acct-42").stdout.strip().endswith("is on.")
    assert (
        serve.cli(
            "addresses", "add", "acct-42", "--asset", "BTC", "--address", "bc1qcold", "--label", "cold"
        ).returncode
        == 0
    )
    listed = serve.cli("addresses", "list", "acct-42").stdout
    assert "bc1qcold" in listed and "USABLE" in listed and " UTC" in listed  # on hold for 24 h

    def withdraw(address: str) -> subprocess.CompletedProcess[str]:
        return serve.cli(
            "authorize",
            "--access-key",
            withdrawer["access_key"],
            "--private-key",
            withdrawer["private_key"],
            "--ip",
            "2001:db8::42",
            "--permission",
            "withdraw",
            "--asset",
            "BTC",
            "--address",
            address,
        )

    assert withdraw("bc1qcold").stdout.strip() == "DENY: ADDRESS_ON_HOLD"  # ALLOW once the hold is over
    assert withdraw("bc1qthief").stdout.strip() == "DENY: ADDRESS_NOT_WHITELISTED"

    refused = serve.cli("keys", "delete-all", "acct-42", stdin="")
    assert refused.returncode == 1 and "--yes" in refused.stderr
    assert len(json.loads(serve.cli("keys", "list", "acct-42", "--json").stdout)) == 2
    deleted = serve.cli("keys", "delete-all", "acct-42", "--yes")
    assert deleted.stdout.strip() == "Deleted 2 keys of account acct-42."
    gone = authorize("--ip", "203.0.113.7", "--permission", "read")
    assert gone.stdout.strip() == "DENY: UNKNOWN_KEY"


def test_cli_reports_errors_by_field(serve: ServeProcess) -> None:
    out = serve.cli("keys", "create", "acct-43", "--name", "w", "--permission", "withdraw", "--ip", "10.0.0.1/8")
    assert out.returncode == 1
    assert "allowed_ips[0]" in out.stderr and "did you mean 10.0.0.0/8" in out.stderr
    missing = serve.cli("keys", "get", "acct-43", "kg_" + "a" * 24)
    assert missing.returncode == 1 and "no key" in missing.stderr


def test_cli_says_when_the_server_is_unreachable(tmp_path: Path) -> None:
    out = subprocess.run(
        [KEYGUARD, "--target", "127.0.0.1:1", "--timeout", "2", "keys", "list", "acct"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1 and "cannot reach keyguard at 127.0.0.1:1" in out.stderr


def test_sigterm_shuts_down_cleanly(tmp_path: Path) -> None:
    process = ServeProcess(tmp_path)
    assert process.cli("keys", "create", "acct-1", "--name", "bot", "--permission", "read").returncode == 0
    assert process.terminate() == 0
    log = process.log.read_text()
    assert "shutting down" in log and "keyguard stopped" in log
    assert "Traceback" not in log


def test_second_server_on_the_same_port_fails_loudly(serve: ServeProcess, tmp_path: Path) -> None:
    """Through the client's `keyguard serve`, which runs `keyguard-server serve`: the server's
    exit status and message reach the user unchanged."""
    out = subprocess.run(
        [KEYGUARD, "serve", "--listen", serve.target, "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1 and "cannot listen" in out.stderr


def test_cli_lifecycle(serve: ServeProcess) -> None:
    """docs/cli.md's lifecycle commands: update, disable/enable, rotate with grace."""
    created = json.loads(
        serve.cli("keys", "create", "acct-44", "--name", "bot", "--permission", "trade", "--ip", "192.0.2.1",
                  "--expires-in", "90d", "--json").stdout
    )  # fmt: skip
    ak, old = created["access_key"], created["private_key"]
    assert created["expires_at"] is not None

    def authorize(secret: str) -> str:
        return serve.cli("authorize", "--access-key", ak, "--private-key", secret, "--ip", "192.0.2.1",
                         "--permission", "trade").stdout.strip()  # fmt: skip

    assert "Enabled:     no" in serve.cli("keys", "disable", "acct-44", ak).stdout
    assert "disabled" in serve.cli("keys", "list", "acct-44").stdout
    assert authorize(old) == "DENY: KEY_DISABLED"
    assert serve.cli("keys", "enable", "acct-44", ak).returncode == 0
    updated = serve.cli("keys", "update", "acct-44", ak, "--name", "renamed", "--no-expiry")
    assert "Name:        renamed" in updated.stdout and "Expires:     never" in updated.stdout
    rotated = serve.cli("keys", "rotate", "acct-44", ak, "--grace", "1h")
    new = re.search(r"New private key for kg_\w+: (kgsk_\w+)", rotated.stdout)[1]  # type: ignore[index]
    assert "The previous private key works until" in rotated.stdout
    assert authorize(new).startswith("ALLOW") and authorize(old).startswith("ALLOW")
    serve.cli("keys", "rotate", "acct-44", ak, "--grace", "0")
    assert authorize(new) == "DENY: BAD_SECRET"
    assert "KEY_ROTATED" in serve.cli("audit", "acct-44").stdout


def test_cli_protections(serve: ServeProcess) -> None:
    """docs/cli.md's commands for symbol lists, frozen accounts and a delayed address-management off."""
    created = json.loads(
        serve.cli("keys", "create", "acct-45", "--name", "bot", "--permission", "trade", "--ip", "192.0.2.1",
                  "--symbols", "btcusdt,ETH-USDT", "--json").stdout
    )  # fmt: skip
    assert created["symbols"] == ["BTCUSDT", "ETH-USDT"]
    ak, secret = created["access_key"], created["private_key"]

    def authorize(*args: str) -> str:
        return serve.cli("authorize", "--access-key", ak, "--private-key", secret, "--ip", "192.0.2.1",
                         "--permission", "trade", *args).stdout.strip()  # fmt: skip

    assert authorize("--symbol", "BTCUSDT").startswith("ALLOW")
    assert authorize("--symbol", "XRPUSDT") == "DENY: SYMBOL_NOT_ALLOWED"
    assert "Symbols:     any" in serve.cli("keys", "update", "acct-45", ak, "--any-symbol").stdout
    assert authorize().startswith("ALLOW")

    frozen = serve.cli("accounts", "freeze", "acct-45", "--reason", "ticket 7")
    assert frozen.returncode == 0 and "is frozen" in frozen.stdout
    assert "FROZEN" in serve.cli("accounts", "show", "acct-45").stdout
    assert authorize() == "DENY: ACCOUNT_FROZEN"
    assert serve.cli("accounts", "unfreeze", "acct-45").returncode == 0
    assert authorize().startswith("ALLOW")
    assert "ACCOUNT_FROZEN" in serve.cli("audit", "acct-45").stdout

    serve.cli("address-management", "on", "acct-45")
    off = serve.cli("address-management", "off", "acct-45").stdout
    assert "is on." in off and "It turns off at" in off
    assert "turns off at" in serve.cli("accounts", "show", "acct-45").stdout


@pytest.mark.parametrize(
    "command",
    [[KEYGUARD_SERVER, "new-token"], [sys.executable, "-m", "keyguard_server", "new-token"], [KEYGUARD, "new-token"]],
    ids=["keyguard-server", "python -m keyguard_server", "keyguard (client)"],
)
def test_every_spelling_of_the_server_command_makes_a_token(command: list[str]) -> None:
    out = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
    token = re.search(r"^token: +(kgt_\w+)$", out.stdout, re.MULTILINE)
    assert token and re.search(r'^token_sha256 = "[0-9a-f]{64}"$', out.stdout, re.MULTILINE), out.stdout


def test_keyguard_serve_without_the_server_says_what_to_install(tmp_path: Path) -> None:
    """The client distribution alone (here: a PATH and an interpreter directory without
    keyguard-server) has no server to run: `keyguard serve` says which package brings it."""
    script = (
        "import sys; from keyguard import cli; sys.executable = sys.argv[1]; "
        "sys.exit(cli.main(['serve', '--listen', '127.0.0.1:0']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "python")],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": str(tmp_path)},
    )
    assert out.returncode == 1, out
    assert "pip install keyguard-server" in out.stderr and "Traceback" not in out.stderr


def test_a_postgresql_url_without_its_driver_stops_at_start_saying_what_to_install(tmp_path: Path) -> None:
    """PostgreSQL's driver is the optional extra `postgres`: without it (psycopg2 made
    unimportable here), `keyguard-server serve` with a PostgreSQL URL exits at once with status
    1 and one line naming the extra, no traceback; nothing was listening meanwhile."""
    script = "import sys; sys.modules['psycopg2'] = None; from keyguard_server.cli import main; sys.exit(main())"
    database = "postgresql://keyguard@127.0.0.1:5432/keyguard"
    out = subprocess.run(
        [sys.executable, "-c", script, "serve", "--listen", "127.0.0.1:0", "--database", database],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert out.returncode == 1, out
    assert "pip install 'keyguard-server[postgres]'" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert "(port " not in out.stderr + out.stdout  # the line a started server logs
