"""Attacks from the red-team review, each reproduced against a real server and refused."""

from __future__ import annotations

import base64
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keyguard import Client, InvalidArgument, KeyType
from keyguard.v1 import keyguard_pb2 as pb
from keyguard.v1 import keyguard_pb2_grpc as pb_grpc
from keyguard_server._callers import new_token, token_sha256
from keyguard_server._config import Caller, Role
from keyguard_server._server import GRPC_LIMITS, MAX_HEALTH_WATCHES, _redact
from keyguard_server._validation import ed25519_public_key, weak_ed25519_public_key
from tests.certs import CertificateAuthority, Pem
from tests.conftest import RunningServer, StartServer
from tests.databases import Postgres
from tests.processes import ServeProcess

# -- small-order Ed25519 public keys --------------------------------------------

# The canonical encodings of the points of order 1, 2, 4, 4, 8, 8, 8, 8.
SMALL_ORDER = [
    "0100000000000000000000000000000000000000000000000000000000000000",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000000000080",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",
]
P = 2**255 - 19
NON_CANONICAL = [
    P.to_bytes(32, "little").hex(),  # y = p: the order-4 y = 0, spelled y + p
    (P + 1).to_bytes(32, "little").hex(),  # the identity, spelled y + p
    (2**255 - 1).to_bytes(32, "little").hex(),  # the largest y
    "0100000000000000000000000000000000000000000000000000000000000080",  # the identity with x = -0
]


def pem(raw_hex: str) -> str:
    key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(raw_hex))
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def test_the_identity_key_accepts_a_constant_signature_for_any_message() -> None:
    """The attack: R = identity, S = 0 verifies under the identity public key, whatever is signed."""
    identity = Ed25519PublicKey.from_public_bytes(bytes.fromhex(SMALL_ORDER[0]))
    forged = bytes.fromhex(SMALL_ORDER[0]) + bytes(32)
    for message in (b"GET /api/v3/account", b"POST /sapi/v1/capital/withdraw/apply amount=1000000"):
        identity.verify(forged, message)  # raises if it does not verify


@pytest.mark.parametrize("raw", SMALL_ORDER + NON_CANONICAL)
def test_weak_public_keys_are_named(raw: str) -> None:
    assert weak_ed25519_public_key(bytes.fromhex(raw))
    with pytest.raises(ValueError, match="not a usable Ed25519 public key"):
        ed25519_public_key(pem(raw))
    with pytest.raises(ValueError, match="not a usable Ed25519 public key"):
        ed25519_public_key(base64.b64encode(bytes.fromhex(raw)).decode())


def test_real_public_keys_are_fine() -> None:
    for _ in range(200):
        raw = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
        assert weak_ed25519_public_key(raw) is None
        assert ed25519_public_key(base64.b64encode(raw).decode()).public_bytes_raw() == raw


@pytest.mark.parametrize("raw", SMALL_ORDER)
def test_create_key_refuses_a_small_order_public_key(
    server: RunningServer, client: Client, account: str, raw: str
) -> None:
    with pytest.raises(InvalidArgument) as err:
        client.create_key(account, "forgeable", "trade", key_type=KeyType.ED25519, public_key=pem(raw))
    assert err.value.fields == ("public_key",)
    assert server.sql("SELECT count(*) FROM key_model WHERE account_id = ?", (account,)) == [(0,)]


@pytest.mark.parametrize("raw", SMALL_ORDER)
def test_rotate_key_refuses_a_small_order_public_key(client: Client, account: str, raw: str) -> None:
    key = client.create_key(account, "signer", "trade", key_type=KeyType.ED25519).key
    with pytest.raises(InvalidArgument) as err:
        client.rotate_key(account, key.access_key, public_key=pem(raw))
    assert err.value.fields == ("public_key",)
    assert client.get_key(account, key.access_key).public_key == key.public_key


# -- caller tokens --------------------------------------------------------------


def planted_token(data_dir: Path, token: str) -> Path:
    data_dir.mkdir(exist_ok=True)
    path = data_dir / "admin.token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("token", ["", "   ", "kgt_short"])
def test_an_empty_or_short_admin_token_is_refused_at_start(
    start_server: StartServer, tmp_path: Path, token: str
) -> None:
    planted_token(tmp_path, token)
    with pytest.raises(ValueError, match="fewer than 32"):
        start_server(data_dir=str(tmp_path))


def test_an_admin_token_owned_by_another_user_is_refused(start_server: StartServer, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    os.chown(planted_token(tmp_path, new_token()), 65534, 65534)
    with pytest.raises(PermissionError, match="owned by the user keyguard runs as"):
        start_server(data_dir=str(tmp_path))


def test_an_admin_token_that_is_a_link_is_refused(start_server: StartServer, tmp_path: Path) -> None:
    elsewhere = planted_token(tmp_path / "elsewhere", new_token())
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "admin.token").symlink_to(elsewhere)
    with pytest.raises(PermissionError, match="symbolic link"):
        start_server(data_dir=str(tmp_path / "data"))


@pytest.mark.parametrize("header", ["Bearer  ", "bearer      "])
def test_a_blank_bearer_token_is_no_token(start_server: StartServer, header: str) -> None:
    """Even a caller configured with the digest of the empty token cannot be reached by a blank one."""
    blank = start_server(callers=(Caller("blank", Role.ADMIN, token_sha256=token_sha256("")),))
    with grpc.insecure_channel(blank.target) as channel:
        stub = pb_grpc.KeyManagementStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ListKeys(pb.ListKeysRequest(account_id="acct"), metadata=(("authorization", header),), timeout=10)
    assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED


# -- local files ------------------------------------------------------------------

on_sqlite = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
on_postgres = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@on_sqlite
def test_data_dir_and_database_files_are_private(start_server: StartServer, tmp_path: Path, account: str) -> None:
    data = tmp_path / "fresh" / "data"
    server = start_server(data_dir=str(data))
    with server.client() as client:
        client.create_key(account, "bot", "read")  # the WAL holds a hash now
    assert mode(data) == 0o700
    for name in ("keyguard.db", "keyguard.db-wal", "keyguard.db-shm", "admin.token"):
        assert mode(data / name) == 0o600, name


@on_sqlite
def test_readable_database_files_are_made_private(start_server: StartServer, tmp_path: Path) -> None:
    first = start_server(data_dir=str(tmp_path))
    first.stop()
    files = [
        tmp_path / name for name in ("keyguard.db", "keyguard.db-wal", "keyguard.db-shm") if (tmp_path / name).exists()
    ]
    for path in files:
        path.chmod(0o644)
    start_server(data_dir=str(tmp_path))
    assert [mode(path) for path in files] == [0o600] * len(files)


# -- logs -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "logged"),
    [
        ("postgresql://kg:hunter2@db:5432/kg", "postgresql://kg:***@db:5432/kg"),
        ("postgresql://kg@db/kg?sslmode=require&password=hunter2", "postgresql://kg@db/kg?sslmode=***&password=***"),
        ("postgresql://kg@db/kg?sslpassword=hunter2", "postgresql://kg@db/kg?sslpassword=***"),
        ("postgresql://kg@db/kg?a=1;password=hunter2&pass%77ord=hunter2", "postgresql://kg@db/kg?a=***&pass%77ord=***"),
        ("sqlite:///data/keyguard.db", "sqlite:///data/keyguard.db"),
    ],
)
def test_database_passwords_are_not_logged(url: str, logged: str) -> None:
    assert _redact(url) == logged


@on_postgres
def test_a_password_query_parameter_is_not_logged(
    start_server: StartServer, postgres: Postgres, caplog: pytest.LogCaptureFixture
) -> None:
    parts = urlsplit(postgres.create())
    password = parts.password or "hunter2-unused-by-trust-auth"
    netloc = parts.netloc.replace(f":{parts.password}@", "@") if parts.password else parts.netloc
    caplog.set_level(logging.INFO, logger="keyguard")
    start_server(database=urlunsplit(parts._replace(netloc=netloc, query=f"password={password}")))
    serving = [r.getMessage() for r in caplog.records if "keyguard serving on" in r.getMessage()]
    assert serving and "password=***" in serving[0]
    assert password not in caplog.text


def test_debug_logs_hold_no_hash_or_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEYGUARD_LOG_LEVEL", "DEBUG")
    serve = ServeProcess(tmp_path)
    try:
        with serve.client() as client:
            created = client.create_key("acct-debug", "bot", "read", ["192.0.2.1"])
            client.authorize(created.key.access_key, created.private_key, "192.0.2.1", "read")
    finally:
        serve.terminate()
    log = serve.log.read_text()
    assert " DEBUG " in log  # the level took effect
    assert "$argon2id$" not in log
    assert created.private_key not in log


# -- page tokens ------------------------------------------------------------------


@pytest.mark.parametrize("token", ["²", "١٢", "9" * 5000])  # superscript two, Arabic-Indic "12", past int()'s limit
def test_a_page_token_of_other_digits_is_invalid_argument(client: Client, token: str) -> None:
    """str.isdigit() is true for "²", which int() refuses: the server answered INTERNAL."""
    with pytest.raises(InvalidArgument) as err:
        client.list_audit_events(page_token=token)
    assert err.value.fields == ("page_token",)


# -- connections and streams --------------------------------------------------------

SETTINGS, GOAWAY = 0x4, 0x7
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
# The HTTP/2 client preface and an empty SETTINGS frame.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, SETTINGS, 0, 0, 0, 0, 0])


def h2_connection(server: RunningServer) -> socket.socket:
    host, port = server.target.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(H2_PREFACE)
    return sock


def read_frame(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next HTTP/2 frame's type and payload; None once the server has closed the connection."""

    def exactly(n: int) -> bytes | None:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    header = exactly(9)
    if header is None:
        return None
    payload = exactly(int.from_bytes(header[:3], "big"))
    return None if payload is None else (header[3], payload)


def frame_types_until_closed(sock: socket.socket) -> list[int]:
    types = []
    while (frame := read_frame(sock)) is not None:
        types.append(frame[0])
    return types


@on_sqlite
def test_a_connection_carries_at_most_100_streams(server: RunningServer) -> None:
    with h2_connection(server) as sock:
        frame = read_frame(sock)
    assert frame is not None and frame[0] == SETTINGS
    settings = {int.from_bytes(frame[1][i : i + 2], "big"): frame[1][i + 2 : i + 6] for i in range(0, len(frame[1]), 6)}
    assert (
        int.from_bytes(settings[SETTINGS_MAX_CONCURRENT_STREAMS], "big") == GRPC_LIMITS["grpc.max_concurrent_streams"]
    )


@on_sqlite
def test_connections_are_capped_and_idle_ones_closed(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(GRPC_LIMITS, "grpc.max_allowed_incoming_connections", 3)
    monkeypatch.setitem(GRPC_LIMITS, "grpc.max_connection_idle_ms", 300)
    capped = start_server()
    held = [h2_connection(capped) for _ in range(3)]
    try:
        assert [frame and frame[0] for frame in map(read_frame, held)] == [SETTINGS] * 3
        with h2_connection(capped) as one_too_many:
            assert read_frame(one_too_many) is None  # closed on arrival
        for sock in held:  # idle: told to go away, then closed
            assert GOAWAY in frame_types_until_closed(sock)
    finally:
        for sock in held:
            sock.close()
    with h2_connection(capped) as later:  # the idle ones' slots are free again
        frame = read_frame(later)
    assert frame is not None and frame[0] == SETTINGS


@on_sqlite
def test_health_watches_are_capped(start_server: StartServer) -> None:
    watched = start_server()
    request = health_pb2.HealthCheckRequest()
    with grpc.insecure_channel(watched.target) as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)
        watches = [health.Watch(request, timeout=30) for _ in range(MAX_HEALTH_WATCHES)]
        try:
            assert {next(watch).status for watch in watches} == {health_pb2.HealthCheckResponse.SERVING}
            with pytest.raises(grpc.RpcError) as err:
                next(health.Watch(request, timeout=5))
            assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert health.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        finally:
            for watch in watches:
                watch.cancel()


# -- client certificates ------------------------------------------------------------------


class FlexibleCA(CertificateAuthority):
    """Issues client certificates with any CNs and extended key usages (None: no such extension)."""

    def client(self, *common_names: str, usages: list[x509.ObjectIdentifier] | None) -> Pem:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name) for name in common_names])
        builder = self._builder(subject, key.public_key())
        if usages is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        return Pem(
            builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM),
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )


CLIENT_AUTH, SERVER_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH
WEBSITE = Caller("website", Role.MANAGER, cert_common_name="website")


@pytest.fixture(scope="module")
def flexible_ca() -> FlexibleCA:
    return FlexibleCA()


@pytest.fixture
def mtls(start_server: StartServer, flexible_ca: FlexibleCA, tmp_path: Path) -> RunningServer:
    cert, key = flexible_ca.issue("keyguard.internal", server=True).write(tmp_path, "server")
    (tmp_path / "ca.crt").write_bytes(flexible_ca.pem)
    return start_server(
        callers=(WEBSITE,), tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=str(tmp_path / "ca.crt")
    )


def list_keys_as(server: RunningServer, ca: FlexibleCA, pem: Pem) -> grpc.StatusCode:
    credentials = grpc.ssl_channel_credentials(ca.pem, pem.key, pem.cert)
    with grpc.secure_channel(server.target, credentials) as channel:
        try:
            pb_grpc.KeyManagementStub(channel).ListKeys(pb.ListKeysRequest(account_id="acct"), timeout=10)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    return grpc.StatusCode.OK


@on_sqlite
@pytest.mark.parametrize(
    ("common_names", "usages", "expected"),
    [
        (["website"], [CLIENT_AUTH], grpc.StatusCode.OK),
        (["website"], [SERVER_AUTH, CLIENT_AUTH], grpc.StatusCode.OK),
        # gRPC reports only the first CN: either order is ambiguous.
        (["website", "stranger"], [CLIENT_AUTH], grpc.StatusCode.UNAUTHENTICATED),
        (["stranger", "website"], [CLIENT_AUTH], grpc.StatusCode.UNAUTHENTICATED),
        # No extended key usage: good for any purpose, a server's for instance.
        (["website"], None, grpc.StatusCode.UNAUTHENTICATED),
        (["website"], [SERVER_AUTH], grpc.StatusCode.UNAVAILABLE),  # refused by TLS itself
    ],
    ids=["client", "client and server", "two CNs, caller first", "two CNs, caller last", "no EKU", "server only"],
)
def test_a_client_certificate_names_one_caller_and_is_for_clients(
    mtls: RunningServer,
    flexible_ca: FlexibleCA,
    common_names: list[str],
    usages: list[x509.ObjectIdentifier] | None,
    expected: grpc.StatusCode,
) -> None:
    assert list_keys_as(mtls, flexible_ca, flexible_ca.client(*common_names, usages=usages)) is expected
