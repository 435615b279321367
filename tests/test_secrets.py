"""Private keys exist in the clear only in the CreateKey response."""

from __future__ import annotations

import logging
from pathlib import Path

import argon2
import pytest

from keyguard import Client
from keyguard_server._secrets import is_well_formed_private_key, new_private_key
from tests.conftest import StartServer

# Storage-dependent: what each database holds of a secret (only its argon2 hash).
pytestmark = pytest.mark.all_backends


def test_secret_is_in_neither_database_files_nor_logs(
    start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server = start_server()
    with server.client() as client:
        created = client.create_key("acct-leak", "bot", "withdraw", ["192.0.2.1"])
        client.authorize(created.key.access_key, created.private_key, "192.0.2.1", "read")
        client.authorize(created.key.access_key, created.private_key + "x", "192.0.2.1", "read")
        client.list_keys("acct-leak")
    secret = created.private_key
    body = secret[len("kgsk_") : -7]
    # Every row of every table, as the database returns it...
    tables = ("account_model", "key_model", "address_model", "audit_model", "schema_version")
    rows = repr([server.sql(f"SELECT * FROM {table}") for table in tables])
    assert created.key.access_key in rows
    assert secret not in rows and body not in rows
    server.stop()  # ...and for SQLite the files themselves, WAL checkpointed
    if server.backend == "sqlite":
        db_file = Path(server.database_url.removeprefix("sqlite:///"))
        files = list(db_file.parent.glob("keyguard.db*"))
        assert db_file in files
        for path in files:
            content = path.read_bytes()
            assert secret.encode() not in content and body.encode() not in content, path
    assert created.key.access_key in caplog.text  # the logs do speak of the key...
    assert created.private_key not in caplog.text  # ...never of its secret
    assert body not in caplog.text


def test_stored_hash_is_argon2id_of_the_secret(start_server: StartServer) -> None:
    server = start_server()
    with server.client() as client:
        created = client.create_key("acct-hash", "bot", "read")
    ((stored,),) = server.sql("SELECT secret_hash FROM key_model WHERE access_key = ?", (created.key.access_key,))
    assert stored.startswith("$argon2id$")
    assert argon2.PasswordHasher().verify(stored, created.private_key)


def test_private_key_format_and_checksum() -> None:
    keys = {new_private_key() for _ in range(200)}
    assert len(keys) == 200
    for key in keys:
        assert is_well_formed_private_key(key)
        body, checksum = key[5:48], key[49:]
        tampered = body[:10] + ("a" if body[10] != "a" else "b") + body[11:]
        assert not is_well_formed_private_key(f"kgsk_{tampered}_{checksum}")
    assert not is_well_formed_private_key("")
    assert not is_well_formed_private_key("kgsk_" + "a" * 43)


def test_created_key_repr_hides_the_secret(client: Client, account: str) -> None:
    created = client.create_key(account, "bot", "read")
    assert created.private_key not in repr(created)
    assert created.private_key not in str(created)
