"""A wrong-secret flood never slows anyone else, a stampede is never refused, a change always wins.

Each test replays an attack measured against an earlier version: argon2 competing with the
event loop, every repeat of a wrong secret paying a fresh argon2 run, a restart's stampede
refused after a second, a gateway's short timeout keeping a new key unusable for ever, a flood
spread over many accounts refusing everyone else's first verification, and a change
acknowledged while a decision waited (argon2, the nonce's write, the whitelist lookup) losing
to the decision made before it.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import psycopg2
import pytest

from keyguard import (
    Client,
    CreatedKey,
    Decision,
    KeyguardError,
    KeyType,
    Permission,
    WithdrawalDestination,
    sign_request,
)
from keyguard_server import _secrets
from keyguard_server._argon2_worker import LOWEST_PRIORITY
from keyguard_server._secrets import Priority, new_private_key
from tests.conftest import RunningServer, StartServer

BOT_IP = "203.0.113.7"
# argon2 slow enough (~30 ms) that a flood's backlog is seconds long, fast enough for a test.
SLOWER_ARGON2 = {"argon2_time_cost": 3, "argon2_memory_kib": 16384, "argon2_parallelism": 1}
# The server's own defaults (RFC 9106's second option): ~0.12 s a run here, ~0.18 s of CPU.
DEFAULT_ARGON2 = {"argon2_time_cost": 3, "argon2_memory_kib": 65536, "argon2_parallelism": 4}


def decide(client: Client, key: CreatedKey, secret: str, ip: str = BOT_IP) -> Decision:
    return client.authorize(key.key.access_key, secret, ip, "read").decision


def hurried(client: Client, key: CreatedKey, secret: str) -> Decision | str:
    """``decide`` for a caller with a short deadline: its decision, or "DEADLINE_EXCEEDED" when a
    busy machine delivered the server's answer (made before the deadline) too late."""
    try:
        return decide(client, key, secret)
    except KeyguardError as exc:
        if exc.code is not grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
        return exc.code.name


def verifications(server: RunningServer) -> int:
    assert server.server.authorizer is not None
    return server.server.authorizer.hasher.verifications


def scheduling(pid: int) -> tuple[int, int]:
    """A process's nice value and scheduling policy (proc(5))."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16]), int(fields[38])


def test_suspect_verifications_run_at_the_lowest_cpu_priority(start_server: StartServer, account: str) -> None:
    """argon2 runs in processes of its own: suspect verifications (after failures from their
    account or network) at the lowest priority (SCHED_IDLE, nice 19), where they get only the
    CPU the loop leaves; the others at normal priority, so a correct secret's first
    verification progresses however busy the machine is."""
    server = start_server()
    assert server.server.authorizer is not None
    hasher = server.server.authorizer.hasher
    assert {scheduling(pid) for pid in hasher.process_ids(background=True)} == {(LOWEST_PRIORITY, os.SCHED_IDLE)}
    assert {scheduling(pid) for pid in hasher.process_ids(background=False)} == {(0, os.SCHED_OTHER)}
    with server.client() as client:
        key = client.create_key(account, "bot", "read", [])
        assert decide(client, key, new_private_key(), "198.51.100.1") is Decision.BAD_SECRET  # the account is suspect
        assert hasher.priority(False, (("account", account),)) is Priority.SUSPECT
        assert hasher.priority(False, (("account", f"{account}-other"),)) is Priority.CLEAN


def test_a_repeated_wrong_secret_costs_one_argon2_run(start_server: StartServer, account: str) -> None:
    """The same wrong secret, sent again and again (from anywhere), is answered from memory."""
    server = start_server(failure_burst=100)
    with server.client() as client:
        key = client.create_key(account, "bot", "read", [])
        wrong = new_private_key()
        before = verifications(server)
        for i in range(6):
            assert decide(client, key, wrong, f"198.51.100.{i}") is Decision.BAD_SECRET
        assert verifications(server) - before == 1
        assert decide(client, key, key.private_key) is Decision.ALLOW  # and the owner is not limited


def test_the_budget_bounds_argon2_whatever_the_flood(start_server: StartServer, account: str) -> None:
    """Distinct wrong secrets from all over IPv4, far more than the budget: argon2 gets its
    configured share of the cores (the clean one, and the suspect one) and no more; what is
    over is answered at once."""
    shares = {"argon2_cpu_share": 0.05, "argon2_suspect_cpu_share": 0.02}
    server = start_server(argon2_threads=2, failure_burst=1000, **shares, **SLOWER_ARGON2)
    authorizer = server.server.authorizer
    assert authorizer is not None
    hasher = authorizer.hasher
    with server.client() as client, ThreadPoolExecutor(32) as pool:
        key = client.create_key(account, "victim", "read", [])
        used_before, started = hasher.cpu_used, time.monotonic()
        ips = [f"{random.randrange(1, 224)}.{random.randrange(256)}.{random.randrange(256)}.7" for _ in range(300)]
        answers = list(pool.map(lambda ip: decide(client, key, new_private_key(), ip), ips))
        elapsed = time.monotonic() - started
        used = hasher.cpu_used - used_before
    # Each bucket starts full (a second's worth, or a run per process) and refills at its rate.
    rates = [share * hasher.cpus for share in shares.values()]
    allowance = sum(max(rate, 2 * hasher.cpu_seconds) + rate * elapsed for rate in rates)
    assert used <= allowance * 1.2 + hasher.cpu_seconds, (used, allowance, elapsed)
    assert set(answers) <= {Decision.BAD_SECRET, Decision.VERIFICATION_BUSY}
    assert answers.count(Decision.VERIFICATION_BUSY) > answers.count(Decision.BAD_SECRET)


def stampede(client: Client, keys: list[CreatedKey]) -> tuple[list[Decision], float]:
    """Three concurrent correct requests per key, all from one address, with 20 s deadlines."""
    started = time.monotonic()
    with ThreadPoolExecutor(3 * len(keys)) as pool:
        results = list(pool.map(lambda i: decide(client, keys[i // 3], keys[i // 3].private_key), range(3 * len(keys))))
    return results, time.monotonic() - started


def test_a_stampede_from_one_address_waits_and_is_all_allowed(start_server: StartServer, account: str) -> None:
    """30 fresh keys x 3 concurrent correct requests from one NAT address, on a fresh server and
    right after a flood from another network: 90/90 ALLOW, none refused after a second."""
    server = start_server(argon2_threads=2, **DEFAULT_ARGON2)
    with Client(server.target, timeout=20, token=server.admin_token) as client:
        fresh = [client.create_key(f"{account}-{i}", "bot", "read", []) for i in range(30)]
        results, took = stampede(client, fresh)
        assert results == [Decision.ALLOW] * 90, ({d: results.count(d) for d in set(results)}, took)
        flooded = client.create_key(f"{account}-flooded", "bot", "read", [])
        after = [client.create_key(f"{account}-after-{i}", "bot", "read", []) for i in range(30)]
        # A flood of wrong secrets from one /24 (a flooder's 2 s deadlines), then the stampede.
        with Client(server.target, timeout=2, token=server.admin_token) as flooder, ThreadPoolExecutor(32) as pool:
            ips = [f"198.51.100.{i % 256}" for i in range(200)]
            flood = [pool.submit(decide, flooder, flooded, new_private_key(), ip) for ip in ips]
            for f in flood:
                assert f.result() in (Decision.BAD_SECRET, Decision.RATE_LIMITED, Decision.VERIFICATION_BUSY)
        results, took = stampede(client, after)
        assert results == [Decision.ALLOW] * 90, ({d: results.count(d) for d in set(results)}, took)


def test_a_verification_that_outlasts_its_callers_deadline_is_remembered(
    start_server: StartServer, account: str
) -> None:
    """A gateway's deadline shorter than one argon2 run: the first request is told the
    verification is busy (not "too many failures"), the run goes on, and the bot's next
    request is allowed from memory."""
    server = start_server(argon2_time_cost=16, argon2_memory_kib=65536, argon2_parallelism=1)
    assert server.server.authorizer is not None
    run = server.server.authorizer.hasher.seconds
    assert run > 0.5, "argon2 was too fast for this test to mean anything"
    with server.client() as setup:
        key = setup.create_key(account, "bot", "read", [])
    with Client(server.target, timeout=0.5, token=server.admin_token) as gateway:  # a gateway's
        assert hurried(gateway, key, key.private_key) in (Decision.VERIFICATION_BUSY, "DEADLINE_EXCEEDED")
        deadline = time.monotonic() + 10 * run + 5
        while (answer := hurried(gateway, key, key.private_key)) is not Decision.ALLOW:
            assert answer in (Decision.VERIFICATION_BUSY, "DEADLINE_EXCEEDED")  # never "too many failures"
            assert time.monotonic() < deadline, "the verification was never remembered"
            time.sleep(run / 2)


def test_a_flood_over_many_accounts_never_refuses_another_accounts_first_verification(
    start_server: StartServer, account: str
) -> None:
    """Wrong secrets spread over 64 keys of 64 accounts from 64 IPv6 networks keep argon2 busy;
    other accounts' first correct verifications are all allowed (10 s deadlines here, for a
    busy test machine; benchmarks/stampede.py measures the 5 s case)."""
    server = start_server(argon2_threads=2, failure_burst=1000, **SLOWER_ARGON2)
    with server.client() as client:
        targets = [client.create_key(f"{account}-target-{i}", "bot", "read", []) for i in range(64)]
        others = [client.create_key(f"{account}-other-{i}", "bot", "read", []) for i in range(12)]
    stop = threading.Event()

    def flood(i: int) -> None:
        with Client(server.target, timeout=5, token=server.admin_token) as flooder:
            while not stop.is_set():
                decide(flooder, targets[i], new_private_key(), f"2001:db8:{i:x}:{random.randrange(65536):x}::1")

    with ThreadPoolExecutor(64) as pool:
        flooding = [pool.submit(flood, i) for i in range(64)]
        try:
            time.sleep(1.0)  # the flood has failed, and fills argon2's queue
            assert server.server.authorizer is not None
            assert server.server.authorizer.hasher.pending > 1
            with Client(server.target, timeout=10, token=server.admin_token) as victim, ThreadPoolExecutor(12) as them:
                results = list(them.map(lambda key: decide(victim, key, key.private_key), others))
        finally:
            stop.set()
        for f in flooding:
            f.result()
    assert results == [Decision.ALLOW] * len(others), {d: results.count(d) for d in set(results)}


# -- a change acknowledged during a wait wins ----------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_delete_during_the_nonce_write_wins(start_server: StartServer, account: str) -> None:
    """An ED25519 request's nonce write is held up (a table lock from outside); the key is
    deleted meanwhile, and the answer after the write is not ALLOW."""
    server = start_server()
    with server.client() as client:
        key = client.create_key(account, "signer", "read", [], key_type=KeyType.ED25519)
        with psycopg2.connect(server.database_url) as locker, locker.cursor() as cursor:
            cursor.execute("LOCK TABLE nonce_model IN EXCLUSIVE MODE")
            with ThreadPoolExecutor(1) as pool:
                signed = sign_request(key.private_key, key.key.access_key, "GET /api/v3/account")
                answer = pool.submit(client.authorize, key.key.access_key, "", BOT_IP, "read", None, signed)
                time.sleep(0.3)  # the nonce write waits for the lock
                assert not answer.done()
                client.delete_key(account, key.key.access_key)  # acknowledged during the wait
                locker.commit()
                assert answer.result().decision is Decision.UNKNOWN_KEY


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_a_freeze_during_the_whitelist_lookup_wins(start_server: StartServer, account: str) -> None:
    """A withdrawal's whitelist lookup is held up (a table lock from outside); the account is
    frozen meanwhile, and the answer after the lookup is not ALLOW."""
    server = start_server(address_hold_seconds=0)
    with server.client() as client:
        key = client.create_key(account, "withdrawer", "withdraw", [BOT_IP])
        client.set_address_management(account, True)
        client.add_withdrawal_address(account, "BTC", "bc1qcold", label="cold")
        destination = WithdrawalDestination("BTC", "bc1qcold")
        assert client.authorize(key.key.access_key, key.private_key, BOT_IP, Permission.WITHDRAW, destination).allowed
        with psycopg2.connect(server.database_url) as locker, locker.cursor() as cursor:
            cursor.execute("LOCK TABLE address_model IN ACCESS EXCLUSIVE MODE")
            with ThreadPoolExecutor(1) as pool:
                answer = pool.submit(
                    client.authorize, key.key.access_key, key.private_key, BOT_IP, Permission.WITHDRAW, destination
                )
                time.sleep(0.3)  # the lookup waits for the lock
                assert not answer.done()
                client.freeze_account(account, reason="incident")  # acknowledged during the wait
                locker.commit()
                assert answer.result().decision is Decision.ACCOUNT_FROZEN


def test_two_secrets_for_one_key_make_it_suspect_before_any_run_fails(start_server: StartServer, account: str) -> None:
    """A bot has one secret; a flood tries several per key. The second distinct secret for a key
    marks it suspect at once (both go to the background queue), long before argon2 has failed
    either: a flood over many fresh keys cannot keep its first attempts ahead of everyone."""
    server = start_server(argon2_time_cost=16, argon2_memory_kib=65536, argon2_parallelism=1)
    assert server.server.authorizer is not None
    hasher = server.server.authorizer.hasher
    assert hasher.seconds > 0.5, "argon2 was too fast for this test to mean anything"
    with server.client() as client:
        key = client.create_key(account, "bot", "read", [])
        ((stored_hash,),) = server.sql("SELECT secret_hash FROM key_model WHERE access_key = ?", (key.key.access_key,))
        assert hasher.priority(False, (("key", stored_hash),)) is Priority.CLEAN
        started = time.monotonic()
        with Client(server.target, timeout=0.5, token=server.admin_token) as gateway, ThreadPoolExecutor(2) as pool:
            # Both at once; each gives up before argon2 could answer.
            answers = list(
                pool.map(lambda secret: hurried(gateway, key, secret), [new_private_key(), new_private_key()])
            )
        assert set(answers) <= {Decision.VERIFICATION_BUSY, "DEADLINE_EXCEEDED"}, answers
        assert hasher.priority(False, (("key", stored_hash),)) is Priority.SUSPECT
        assert time.monotonic() - started < hasher.seconds  # no run had failed yet
        assert decide(client, key, key.private_key) is Decision.ALLOW  # suspect is an order, not a refusal


def test_a_verifier_process_killed_mid_run_is_replaced_and_its_askers_answered(
    start_server: StartServer, account: str
) -> None:
    """kill -9 of an argon2 process while it verifies: that verification answers
    VERIFICATION_BUSY (never hangs), a new process takes its place, and the key's next request
    is allowed."""
    server = start_server(argon2_threads=1, argon2_time_cost=16, argon2_memory_kib=65536, argon2_parallelism=1)
    assert server.server.authorizer is not None
    hasher = server.server.authorizer.hasher
    (victim,) = hasher.process_ids(background=False)
    with server.client() as client, ThreadPoolExecutor(1) as pool:
        key = client.create_key(account, "bot", "read", [])
        answer = pool.submit(decide, client, key, key.private_key)
        time.sleep(hasher.seconds / 3)  # mid-run
        os.kill(victim, signal.SIGKILL)
        assert answer.result() is Decision.VERIFICATION_BUSY
        started = time.monotonic()
        while not hasher.process_ids(background=False):  # the replacement starts after the answer
            assert time.monotonic() - started < 10, "no process replaced the one killed"
            time.sleep(0.05)
        assert hasher.process_ids(background=False) != [victim]
        assert decide(client, key, key.private_key) is Decision.ALLOW


def test_a_stuck_verifier_process_is_replaced(
    start_server: StartServer, account: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A verifier that stops answering (SIGSTOP here; a hung process in life) keeps no slot for
    ever: after STUCK_SECONDS it is killed and replaced, and verifications go on."""
    monkeypatch.setattr(_secrets, "STUCK_SECONDS", 1.0)
    server = start_server(argon2_threads=1)
    assert server.server.authorizer is not None
    hasher = server.server.authorizer.hasher
    (stuck,) = hasher.process_ids(background=False)
    os.kill(stuck, signal.SIGSTOP)
    try:
        with server.client() as client:
            key = client.create_key(account, "bot", "read", [])
            started = time.monotonic()
            while (answer := decide(client, key, key.private_key)) is not Decision.ALLOW:
                assert answer is Decision.VERIFICATION_BUSY
                assert time.monotonic() - started < 15, "the stuck process kept its slot"
                time.sleep(0.2)
        assert stuck not in hasher.process_ids(background=False)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stuck, signal.SIGKILL)
