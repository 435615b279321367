"""Several processes on one SQLite file, and a server killed mid-stream."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from keyguard import AuditAction, CreatedKey, KeyguardError, LimitExceeded, Unavailable
from tests.databases import run_sql
from tests.processes import ServeProcess

# Storage-dependent: what survives a crash, and what another replica reads.
pytestmark = pytest.mark.all_backends


def test_fifty_concurrent_creates_over_two_processes_make_exactly_sixteen(
    tmp_path: Path, serve_database: tuple[list[str], str]
) -> None:
    flags, _ = serve_database
    first = ServeProcess(tmp_path, *flags, log_name="a.log")
    second = ServeProcess(tmp_path, *flags, log_name="b.log")  # the same database
    try:
        clients = [first.client(), second.client()]
        barrier = threading.Barrier(50)

        def create(i: int) -> str:
            barrier.wait()
            try:
                clients[i % 2].create_key("acct-race", f"bot {i}", "read")
            except LimitExceeded:
                return "limit"
            return "created"

        with ThreadPoolExecutor(50) as pool:
            outcomes = list(pool.map(create, range(50)))
        assert outcomes.count("created") == 16
        assert outcomes.count("limit") == 34
        for client in clients:
            assert len(client.list_keys("acct-race")) == 16
            client.close()
    finally:
        first.terminate()
        second.terminate()


def test_sigkill_mid_stream_loses_no_acknowledged_change(tmp_path: Path, serve_database: tuple[list[str], str]) -> None:
    flags, database_url = serve_database
    server = ServeProcess(tmp_path, *flags)
    created: dict[str, CreatedKey] = {}
    deleted: set[str] = set()
    in_doubt: set[str] = set()  # a delete the server died under: it may or may not have landed
    stop = threading.Event()
    rng = random.Random(7)

    def stream() -> None:
        with server.client() as client:
            for i in range(10_000):
                if stop.is_set():
                    return
                try:
                    if created.keys() - deleted and rng.random() < 0.4:
                        victim = rng.choice(sorted(created.keys() - deleted))
                        in_doubt.add(victim)
                        client.delete_key(created[victim].key.account_id, victim)
                        deleted.add(victim)  # acknowledged
                        in_doubt.discard(victim)
                    else:
                        key = client.create_key(f"acct-crash-{i // 10}", f"bot {i}", "trade", ["192.0.2.1"])
                        created[key.key.access_key] = key  # acknowledged
                except (Unavailable, KeyguardError):
                    return  # the server died under this call: it may or may not have landed

    worker = threading.Thread(target=stream)
    worker.start()
    deadline = time.monotonic() + 20
    while len(created) < 40 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.kill()  # SIGKILL: no shutdown, no WAL checkpoint
    stop.set()
    worker.join(20)
    assert len(created) >= 40, "the stream did not get going"

    restarted = ServeProcess(tmp_path, *flags, log_name="restart.log")
    try:
        with restarted.client() as client:
            for access_key, key in created.items():
                if access_key in in_doubt:
                    continue
                present = [k.access_key for k in client.list_keys(key.key.account_id)]
                if access_key in deleted:
                    assert access_key not in present
                else:
                    assert access_key in present
                    result = client.authorize(access_key, key.private_key, "192.0.2.1", "trade")
                    assert result.allowed, result
            events, _ = client.list_audit_events(page_size=500)
        audited = {(e.action, e.access_key) for e in events}
        assert {(AuditAction.KEY_CREATED, k) for k in created} <= audited
        assert {(AuditAction.KEY_DELETED, k) for k in deleted} <= audited
    finally:
        restarted.terminate()

    # No half-written key: every row is complete and has its creation event
    # (written in the same transaction), acknowledged or not.
    rows = run_sql(database_url, "SELECT access_key, name, permission, allowed_ips, secret_hash FROM key_model")
    created_events = {
        ak for (ak,) in run_sql(database_url, "SELECT access_key FROM audit_model WHERE action = ?", (1,))
    }
    assert rows
    for access_key, name, permission, allowed_ips, secret_hash in rows:
        assert name and permission == 2 and allowed_ips == "192.0.2.1"
        assert secret_hash.startswith("$argon2id$")
        assert access_key in created_events


def test_a_change_through_one_replica_holds_on_the_other_at_once(
    tmp_path: Path, serve_database: tuple[list[str], str]
) -> None:
    flags, database_url = serve_database
    a = ServeProcess(tmp_path, *flags, log_name="a.log")
    b = ServeProcess(tmp_path, *flags, log_name="b.log")
    try:
        with a.client() as via_a, b.client() as via_b:

            def on_b(key: CreatedKey, required: str = "trade", ip: str = "192.0.2.1") -> str:
                return via_b.authorize(key.key.access_key, key.private_key, ip, required).decision.name

            doomed = via_a.create_key("acct-replicas", "doomed", "trade", ["192.0.2.1"])
            assert on_b(doomed) == "ALLOW"  # B has now verified (and cached) its secret
            via_a.delete_key("acct-replicas", doomed.key.access_key)
            assert on_b(doomed) == "UNKNOWN_KEY"

            # Restricting a key (UpdateKey is still to come; a write to its row is what it will do).
            key = via_a.create_key("acct-replicas", "bot", "trade", ["192.0.2.1"])
            assert on_b(key) == "ALLOW"
            run_sql(database_url, "UPDATE key_model SET permission = 1 WHERE access_key = ?", (key.key.access_key,))
            assert on_b(key) == "PERMISSION_DENIED"
            assert on_b(key, "read") == "ALLOW"
            run_sql(
                database_url,
                "UPDATE key_model SET allowed_ips = ? WHERE access_key = ?",
                ("10.0.0.0/8", key.key.access_key),
            )
            assert on_b(key, "read") == "IP_NOT_ALLOWED"

            assert via_a.delete_all_keys("acct-replicas") == 1
            assert on_b(key, "read", "10.0.0.1") == "UNKNOWN_KEY"
    finally:
        a.terminate()
        b.terminate()
