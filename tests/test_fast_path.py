"""The Authorize fast path: verification cache, failure limits, bounded argon2, last used."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import argon2
import pytest
import uvloop

from keyguard import Client, CreatedKey, Decision, Permission, WithdrawalAddress
from keyguard_server import Config
from keyguard_server._secrets import new_private_key
from keyguard_server._verify import FailureLimiter
from keyguard_server.authorize._domain import KeyRow
from keyguard_server.store import AccountState, Store, StoredKey
from keyguard_server.store._schema import VERSION
from tests.conftest import RunningServer, StartServer
from tests.processes import ServeProcess

# Storage-dependent: the Authorize lookup is SQLite inline vs PostgreSQL on the loop.
pytestmark = pytest.mark.all_backends
on_sqlite = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)  # the inline row memo is SQLite's

BOT_IP = "203.0.113.7"
WRONG = new_private_key()  # well-formed, checksum and all: only argon2 can tell it is wrong
# Slow enough that a test can act while one verification is running.
SLOW_ARGON2 = {"argon2_time_cost": 6, "argon2_memory_kib": 65536, "argon2_parallelism": 1}


def verifications(server: RunningServer) -> int:
    assert server.server.authorizer is not None
    return server.server.authorizer.hasher.verifications


def allow(client: Client, key: CreatedKey, secret: str | None = None, ip: str = BOT_IP) -> Decision:
    return client.authorize(key.key.access_key, key.private_key if secret is None else secret, ip, "read").decision


def test_cache_hit_skips_argon2(server: RunningServer, client: Client, account: str) -> None:
    key = client.create_key(account, "bot", "trade", [BOT_IP])
    before = verifications(server)
    assert allow(client, key) is Decision.ALLOW
    assert verifications(server) == before + 1
    for _ in range(20):
        assert allow(client, key) is Decision.ALLOW
    assert verifications(server) == before + 1


def test_cache_never_revives_a_deleted_key(server: RunningServer, client: Client, account: str) -> None:
    key = client.create_key(account, "bot", "trade", [BOT_IP])
    assert allow(client, key) is Decision.ALLOW  # now cached
    client.delete_key(account, key.key.access_key)
    assert allow(client, key) is Decision.UNKNOWN_KEY


def test_cache_never_accepts_the_old_secret_of_a_rekeyed_key(
    server: RunningServer, client: Client, account: str
) -> None:
    key = client.create_key(account, "bot", "trade", [BOT_IP])
    assert allow(client, key) is Decision.ALLOW  # the old secret is cached
    other = client.create_key(account, "other", "trade", [BOT_IP])
    # Re-key from outside this process (as a rotation on another replica would):
    # the key's stored hash becomes that of another secret.
    ((new_hash,),) = server.sql("SELECT secret_hash FROM key_model WHERE access_key = ?", (other.key.access_key,))
    server.sql("UPDATE key_model SET secret_hash = ? WHERE access_key = ?", (new_hash, key.key.access_key))
    assert allow(client, key) is Decision.BAD_SECRET
    assert allow(client, key, other.private_key) is Decision.ALLOW


@on_sqlite
def test_every_commit_by_another_connection_is_seen_by_the_next_call(
    server: RunningServer, client: Client, account: str
) -> None:
    """On SQLite a key's row is memoised between calls: whatever another connection commits
    (another connection, here) must still hold from the very next call (PRAGMA data_version)."""
    key = client.create_key(account, "bot", "trade", [BOT_IP])
    access_key = key.key.access_key
    assert allow(client, key) is Decision.ALLOW
    for _ in range(10):
        server.sql("UPDATE key_model SET enabled = 0 WHERE access_key = ?", (access_key,))
        assert allow(client, key) is Decision.KEY_DISABLED
        server.sql("UPDATE key_model SET enabled = 1 WHERE access_key = ?", (access_key,))
        assert allow(client, key) is Decision.ALLOW
    server.sql("DELETE FROM key_model WHERE access_key = ?", (access_key,))
    assert allow(client, key) is Decision.UNKNOWN_KEY


def test_a_change_is_seen_after_other_processes_checkpoint_and_reopen_the_database(tmp_path: Path) -> None:
    """Another process disables a key, a checkpoint empties the WAL and yet another process opens
    the database: the very next inline read (an earlier store on the database closed, its
    connections may linger) serves the key's new row, never the memoised old one."""
    path = tmp_path / "keyguard.db"
    access_key = "kg_" + "A" * 24

    def elsewhere(sql: str, params: tuple[str, ...] = ()) -> None:
        script = (
            "import sqlite3, sys; sqlite3.connect(sys.argv[1], isolation_level=None).execute(sys.argv[2], sys.argv[3:])"
        )
        subprocess.run([sys.executable, "-c", script, str(path), sql, *params], check=True)

    async def run() -> tuple[bool, bool]:
        settings = Config(data_dir=str(tmp_path)).database_settings
        await (await Store.open(settings)).close()  # one before, in this process: its connections may linger
        store = await Store.open(settings)
        try:
            await store.insert_key(
                caller="t",
                account_id="acct",
                access_key=access_key,
                name="bot",
                permission=Permission.TRADE,
                allowed_ips=[],
                secret_hash="h",
                max_keys=10,
            )
            elsewhere("PRAGMA wal_checkpoint(TRUNCATE)")
            elsewhere("SELECT count(*) FROM key_model")
            before = store.auth_row_now(access_key)
            elsewhere("UPDATE key_model SET enabled = 0 WHERE access_key = ?", (access_key,))
            elsewhere("PRAGMA wal_checkpoint(TRUNCATE)")
            elsewhere("SELECT count(*) FROM key_model")
            after = store.auth_row_now(access_key)
            assert isinstance(before, KeyRow) and isinstance(after, KeyRow)
            return before.enabled, after.enabled
        finally:
            await store.close()

    assert uvloop.run(run()) == (True, False)


@on_sqlite
def test_strings_that_are_no_access_key_are_neither_looked_up_nor_kept(
    server: RunningServer, client: Client, account: str
) -> None:
    """A flood of made-up access keys is refused without a database read and leaves the
    memoised rows of real keys alone."""
    store = server.server._store
    assert store is not None and store._inline is not None
    key = client.create_key(account, "bot", "trade", [BOT_IP])
    assert allow(client, key) is Decision.ALLOW
    server.run(server.server.flush_usage())  # its last use written now: no commit in the loop below
    store.auth_row_now(key.key.access_key)  # read again after that commit
    kept = dict(store._inline._current)
    for i in range(200):
        made_up = f"{key.key.access_key[:-1]}-{i}"
        assert client.authorize(made_up, key.private_key, BOT_IP, "read").decision is Decision.UNKNOWN_KEY
    assert store._inline._current == kept


def test_key_deleted_while_argon2_runs_is_refused(start_server: StartServer, account: str) -> None:
    server = start_server(**SLOW_ARGON2)
    with server.client() as client:
        key = client.create_key(account, "bot", "trade", [BOT_IP])
        results: list[Decision] = []
        worker = threading.Thread(target=lambda: results.append(allow(client, key)))
        started = time.monotonic()
        worker.start()
        time.sleep(0.05)
        client.delete_key(account, key.key.access_key)
        assert time.monotonic() - started < 0.2, "argon2 was too fast for this test to mean anything"
        worker.join()
    assert results == [Decision.UNKNOWN_KEY]


def test_failures_are_limited_per_key_and_network_and_recover(start_server: StartServer, account: str) -> None:
    server = start_server(failure_burst=3, failure_refill_per_second=2.0)
    with server.client() as client:
        key = client.create_key(account, "bot", "trade", [])
        for _ in range(3):
            assert allow(client, key, new_private_key(), ip="192.0.2.1") is Decision.BAD_SECRET
        before = verifications(server)
        # From that network, refused without looking at the secret, even the right one...
        assert allow(client, key, ip="192.0.2.1") is Decision.RATE_LIMITED
        assert verifications(server) == before
        time.sleep(0.6)  # refills one attempt
        assert allow(client, key, ip="192.0.2.1") is Decision.ALLOW
        # ...while another network's attempts were never limited by those failures.
        other = client.create_key(account, "other", "trade", [])
        for _ in range(3):
            assert allow(client, other, new_private_key(), ip="192.0.2.2") is Decision.BAD_SECRET
        assert allow(client, other, ip="198.51.100.1") is Decision.ALLOW


def test_failures_are_limited_per_client_network(start_server: StartServer, account: str) -> None:
    server = start_server(failure_burst=3, failure_refill_per_second=0.001)
    with server.client() as client:
        first = client.create_key(account, "first", "read")
        second = client.create_key(account, "second", "read")
        third = client.create_key(account, "third", "read")
        fourth = client.create_key(account, "fourth", "read")
        for i in range(3):  # one IPv6 /64, three addresses in it
            assert allow(client, first, new_private_key(), ip=f"2001:db8:1:2::{i + 1}") is Decision.BAD_SECRET
        assert allow(client, second, ip="2001:db8:1:2::99") is Decision.RATE_LIMITED
        assert allow(client, second, ip="2001:db8:1:3::1") is Decision.ALLOW
        for _ in range(3):
            assert allow(client, third, new_private_key(), ip="192.0.2.50") is Decision.BAD_SECRET
        assert allow(client, fourth, ip="192.0.2.50") is Decision.RATE_LIMITED
        assert allow(client, fourth, ip="192.0.2.51") is Decision.ALLOW


def test_a_flood_does_not_lock_out_the_bot_that_holds_the_secret(start_server: StartServer, account: str) -> None:
    server = start_server(failure_burst=3, failure_refill_per_second=0.001)
    with server.client() as client:
        key = client.create_key(account, "bot", "trade", [])
        assert allow(client, key) is Decision.ALLOW  # the bot, verified once
        for i in range(20):
            assert allow(client, key, new_private_key(), ip=f"198.51.100.{i % 4}") in (
                Decision.BAD_SECRET,
                Decision.RATE_LIMITED,
            )
        assert allow(client, key, new_private_key(), ip="198.51.100.1") is Decision.RATE_LIMITED
        assert allow(client, key, ip="198.51.100.1") is Decision.ALLOW  # cached: no limit applies


def test_malformed_secrets_never_reach_argon2(server: RunningServer, client: Client, account: str) -> None:
    key = client.create_key(account, "bot", "trade", [BOT_IP])
    before = verifications(server)
    body = key.private_key[5:48]
    for secret in ("", "nonsense", "kgsk_" + "A" * 43 + "_000000", f"kgsk_{body}_zzzzzz", key.private_key[:-1]):
        assert allow(client, key, secret) is Decision.BAD_SECRET
    assert verifications(server) == before


def test_saturated_argon2_pool_answers_at_once(start_server: StartServer, account: str) -> None:
    server = start_server(argon2_threads=1, argon2_max_pending=1, **SLOW_ARGON2)
    with server.client() as client:
        first = client.create_key(account, "first", "read")
        second = client.create_key(account, "second", "read")
        worker = threading.Thread(target=lambda: allow(client, first))
        worker.start()
        time.sleep(0.03)  # the first verification now occupies the pool
        started = time.monotonic()
        assert allow(client, second) is Decision.VERIFICATION_BUSY
        assert time.monotonic() - started < 0.1
        worker.join()
        assert allow(client, second) is Decision.ALLOW  # once the pool is free


def test_key_creation_never_delays_verification(start_server: StartServer, account: str) -> None:
    """Hashing new secrets has its own argon2 thread and queue: a burst of rotations queued behind
    each other does not hold up a bot's first (uncached) verification."""
    server = start_server(argon2_threads=1, **SLOW_ARGON2)
    with server.client() as client:
        keys = [client.create_key(account, f"key-{i}", "read") for i in range(7)]
        bot = keys.pop()
        rotations = ThreadPoolExecutor(len(keys))
        started = time.monotonic()
        pending = [rotations.submit(client.rotate_key, account, k.key.access_key) for k in keys]
        time.sleep(0.05)  # the rotations are queued for the hashing thread now
        verify_started = time.monotonic()
        assert allow(client, bot) is Decision.ALLOW
        verified_after = time.monotonic() - verify_started
        for rotation in pending:
            rotation.result()
        rotated_after = time.monotonic() - started
        rotations.shutdown()
    # Six hashes in a row take about six verifications; the bot waited for about one.
    assert verified_after < rotated_after / 2, (verified_after, rotated_after)


def test_limiter_refills_by_the_clock() -> None:
    now = [0.0]
    limiter = FailureLimiter(burst=2, per_second=0.5, clock=lambda: now[0])
    assert limiter.spend("k") and limiter.spend("k")
    assert limiter.hold("k") is False
    now[0] = 1.9
    assert limiter.hold("k") is False
    now[0] = 2.0
    assert limiter.hold("k") is True
    limiter.release("k", failed=True)
    assert limiter.hold("k") is False
    now[0] = 100.0  # refills to the burst, not beyond
    assert limiter.spend("k") and limiter.spend("k")
    assert not limiter.spend("k")
    assert limiter.hold("other") is True


def test_limiter_holds_tokens_of_every_bucket_or_none() -> None:
    limiter = FailureLimiter(burst=1, per_second=0.0)
    assert limiter.hold("key net", "net") is True
    assert limiter.hold("other-key net", "net") is None  # the network's token is held: wait, don't refuse
    limiter.release("key net", "net", failed=False)  # the attempt succeeded: the token comes back
    assert limiter.hold("other-key net", "net") is True
    limiter.release("other-key net", "net", failed=True)
    assert limiter.hold("key net", "net") is False  # that failure spent the network's only token


def test_limiter_memory_is_bounded() -> None:
    limiter = FailureLimiter(burst=1, per_second=0.0, max_buckets=100)
    for i in range(1000):
        assert limiter.spend(f"k{i}")
    assert limiter.hold("k999") is False
    assert limiter.hold("k0") is True  # dropped: treated as a full bucket


def test_last_used_is_recorded_in_batches(start_server: StartServer, account: str) -> None:
    server = start_server(last_used_flush_seconds=0.05)
    with server.client() as client:
        key = client.create_key(account, "bot", "trade", ["2001:db8::/32", BOT_IP])
        assert client.get_key(account, key.key.access_key).last_used_at is None
        assert allow(client, key, WRONG) is Decision.BAD_SECRET
        assert allow(client, key, ip="2001:db8::7") is Decision.ALLOW
        used = wait_for(lambda: client.get_key(account, key.key.access_key).last_used_at is not None)
        stored = client.get_key(account, key.key.access_key)
        assert used and stored.last_used_ip == "2001:db8::7"
        assert stored.last_used_at is not None and stored.last_used_at >= stored.created_at


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_last_used_is_flushed_on_shutdown(start_server: StartServer, account: str) -> None:
    first = start_server(last_used_flush_seconds=3600)
    with first.client() as client:
        key = client.create_key(account, "bot", "trade", [BOT_IP])
        assert allow(client, key) is Decision.ALLOW
    first.stop()
    second = start_server(data_dir=first.config.data_dir)
    with second.client() as client:
        assert client.get_key(account, key.key.access_key).last_used_ip == BOT_IP


async def open_and_close(config: Config) -> None:
    store = await Store.open(config.database_settings)
    await store.close()


def test_a_version_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    config = Config(data_dir=str(tmp_path))
    uvloop.run(open_and_close(config))
    # Make it look like a database written before schema versioning.
    with sqlite3.connect(tmp_path / "keyguard.db") as db:
        db.execute("DROP TABLE schema_version")
        for column in (  # everything added since version 1
            "last_used_at_us",
            "last_used_ip",
            "expires_at_us",
            "enabled",
            "previous_secret_hash",
            "previous_valid_until_us",
            "key_type",
            "public_key",
            "previous_public_key",
            "symbols",
            "unrestricted_since_us",
        ):
            db.execute(f"ALTER TABLE key_model DROP COLUMN {column}")
        for table, column in (
            ("account_model", "frozen"),
            ("account_model", "address_management_off_at_us"),
            ("address_model", "usable_from_us"),
        ):
            db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        db.execute("INSERT INTO account_model (account_id, address_management) VALUES ('acct', 1)")
        db.execute(
            "INSERT INTO address_model (account_id, asset, address, memo, label, created_at_us)"
            " VALUES ('acct', 'BTC', 'bc1qold', '', '', 5)"
        )
        db.execute("DROP TABLE nonce_model")
        db.execute(
            "INSERT INTO key_model (account_id, access_key, name, permission, allowed_ips, secret_hash, created_at_us)"
            " VALUES ('acct', 'kg_aaaaaaaaaaaaaaaaaaaaaaaa', 'old', 1, '', ?, 1)",
            (argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1).hash("x"),),
        )

    async def upgrade_and_list() -> tuple[list[StoredKey], list[WithdrawalAddress], AccountState]:
        store = await Store.open(config.database_settings)
        try:
            return (
                await store.list_keys("acct"),
                await store.list_addresses("acct"),
                await store.account_settings("acct"),
            )
        finally:
            await store.close()

    started = datetime.now(UTC)
    ((key, unrestricted_since_us),), (address,), account = uvloop.run(upgrade_and_list())
    assert (key.name, key.last_used_at, key.last_used_ip, key.enabled, key.expires_at) == ("old", None, "", True, None)
    assert key.symbols == ()
    # Whitelisted before the upgrade: usable, no hold. Unrestricted before it: counted from it.
    assert address.usable_from == address.created_at
    assert account == AccountState(True, None, False, 1)
    assert unrestricted_since_us is not None and unrestricted_since_us >= started.timestamp() * 1e6 - 1e6
    with sqlite3.connect(tmp_path / "keyguard.db") as db:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(VERSION,)]


def test_stores_opening_together_in_one_process_each_migrate_their_own_database(tmp_path: Path) -> None:
    """Models are bound per database thread: schema creation on one store's threads never lands
    in another store's database (peewee's shared SchemaManager once made it do so)."""
    configs = [Config(data_dir=str(tmp_path / f"store-{i}")) for i in range(8)]

    async def open_all() -> None:
        stores = await asyncio.gather(*(Store.open(c.database_settings) for c in configs))
        await asyncio.gather(*(store.close() for store in stores))

    for _ in range(3):
        uvloop.run(open_all())
    for config in configs:
        with sqlite3.connect(Path(config.data_dir) / "keyguard.db") as db:
            assert db.execute("SELECT version FROM schema_version").fetchall() == [(VERSION,)]


def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    config = Config(data_dir=str(tmp_path))
    uvloop.run(open_and_close(config))
    with sqlite3.connect(tmp_path / "keyguard.db") as db:
        db.execute("UPDATE schema_version SET version = version + 1")
    with pytest.raises(RuntimeError, match="newer than this keyguard"):
        uvloop.run(open_and_close(config))


def test_workers_share_one_port(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path, "--workers", "2")
    try:
        wait_for(lambda: server.log.read_text().count("keyguard serving") == 2)
        log = server.log.read_text()
        assert "worker-1" in log and "worker-2" in log
        with server.client() as client:
            key = client.create_key("acct-workers", "bot", "trade", [BOT_IP])
        for _ in range(10):  # fresh connections land on either worker
            with server.client() as client:
                assert allow(client, key) is Decision.ALLOW
    finally:
        assert server.terminate() == 0
    assert server.log.read_text().count("keyguard stopped") == 2
