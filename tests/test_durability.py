"""Several processes on one SQLite file, and a server killed mid-stream."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from keyguard import AuditAction, CreatedKey, KeyguardError, LimitExceeded, Unavailable
from tests.processes import ServeProcess


def test_fifty_concurrent_creates_over_two_processes_make_exactly_sixteen(tmp_path: Path) -> None:
    first = ServeProcess(tmp_path, log_name="a.log")
    second = ServeProcess(tmp_path, log_name="b.log")  # same ./data/keyguard.db
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


def test_sigkill_mid_stream_loses_no_acknowledged_change(tmp_path: Path) -> None:
    server = ServeProcess(tmp_path)
    created: dict[str, CreatedKey] = {}
    deleted: set[str] = set()
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
                        client.delete_key(created[victim].key.account_id, victim)
                        deleted.add(victim)  # acknowledged
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

    restarted = ServeProcess(tmp_path, log_name="restart.log")
    try:
        with restarted.client() as client:
            for access_key, key in created.items():
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
    with sqlite3.connect(tmp_path / "data" / "keyguard.db") as db:
        rows = db.execute("SELECT access_key, name, permission, allowed_ips, secret_hash FROM key_model").fetchall()
        created_events = {
            ak
            for (ak,) in db.execute("SELECT access_key FROM audit_model WHERE action = ?", (AuditAction.KEY_CREATED,))
        }
    assert rows
    for access_key, name, permission, allowed_ips, secret_hash in rows:
        assert name and permission == 2 and allowed_ips == "192.0.2.1"
        assert secret_hash.startswith("$argon2id$")
        assert access_key in created_events
