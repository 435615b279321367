"""Limits never become a weapon: attacks on the failure limits and the argon2 queue.

Each test replays an attack from the security review: knowing a bot's access
key must not let anyone lock the bot out; concurrent or rotation-time attempts
must not buy more argon2 than the limits allow; one account's flood must not
starve other accounts; and a restart's stampede of correct secrets must not be
refused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import uvloop

from keyguard import AuthorizeResult, Client, CreatedKey, Decision, KeyType, Permission, Unavailable, sign_request
from keyguard.v1 import keyguard_pb2 as pb
from keyguard.v1 import keyguard_pb2_grpc as pb_grpc
from keyguard_server._secrets import new_private_key
from keyguard_server._verify import FailureLimiter
from keyguard_server.authorize._authorizer import Authorizer
from keyguard_server.authorize._domain import Query
from tests.conftest import RunningServer, StartServer

BOT_IP = "203.0.113.7"
ATTACKER_IP = "198.51.100.66"
MALFORMED = "kgsk_" + "A" * 43 + "_000000"  # the right shape, a wrong checksum: free to send
# argon2 slow enough (~10-30 ms) that concurrent attempts overlap, fast enough for a test.
MODERATE_ARGON2 = {"argon2_time_cost": 2, "argon2_memory_kib": 16384, "argon2_parallelism": 1}
# Slow enough (~30 ms) that a flood's backlog clearly outlasts a gateway's 0.5 s deadline.
SLOWER_ARGON2 = {"argon2_time_cost": 3, "argon2_memory_kib": 16384, "argon2_parallelism": 1}


def verifications(server: RunningServer) -> int:
    assert server.server.authorizer is not None
    return server.server.authorizer.hasher.verifications


def decide(client: Client, key: CreatedKey, secret: str, ip: str) -> Decision:
    return client.authorize(key.key.access_key, secret, ip, "read").decision


def test_an_attacker_who_knows_the_access_key_cannot_lock_out_the_bot(start_server: StartServer, account: str) -> None:
    """Wrong and malformed secrets for the bot's key from another address, far more than the
    failure burst: the bot's first-ever (uncached) request is still ALLOW."""
    server = start_server(failure_burst=3, failure_refill_per_second=0.001)
    with server.client() as client:
        key = client.create_key(account, "bot", "trade", [])
        for _ in range(30):
            assert decide(client, key, MALFORMED, ATTACKER_IP) is Decision.BAD_SECRET
            assert decide(client, key, new_private_key(), ATTACKER_IP) in (Decision.BAD_SECRET, Decision.RATE_LIMITED)
        assert decide(client, key, new_private_key(), ATTACKER_IP) is Decision.RATE_LIMITED  # the attacker is limited
        assert decide(client, key, key.private_key, BOT_IP) is Decision.ALLOW


def test_malformed_secrets_count_against_nothing(start_server: StartServer, account: str) -> None:
    """A malformed secret costs nothing, so even the attacker's own network is not limited by it."""
    server = start_server(failure_burst=2, failure_refill_per_second=0.001)
    with server.client() as client:
        key = client.create_key(account, "bot", "trade", [])
        for _ in range(20):
            assert decide(client, key, MALFORMED, BOT_IP) is Decision.BAD_SECRET
        assert decide(client, key, key.private_key, BOT_IP) is Decision.ALLOW


def test_bad_signatures_cannot_lock_out_an_ed25519_key(start_server: StartServer, account: str) -> None:
    """Signatures are checked (cheaply) before any limit: an attacker's bad signatures are limited,
    the owner's good signature from anywhere, their own network included, never is."""
    server = start_server(failure_burst=3, failure_refill_per_second=0.001)
    with server.client() as client:
        key = client.create_key(account, "signer", "trade", [], key_type=KeyType.ED25519)
        forger = client.create_key(account, "forger", "trade", [], key_type=KeyType.ED25519)
        decisions = set()
        for i in range(10):
            forged = sign_request(forger.private_key, key.key.access_key, f"GET /api/v3/account n={i}")
            decisions.add(client.authorize(key.key.access_key, "", ATTACKER_IP, "read", signed=forged).decision)
        assert decisions == {Decision.BAD_SIGNATURE, Decision.RATE_LIMITED}
        for ip in (BOT_IP, ATTACKER_IP):
            good = sign_request(key.private_key, key.key.access_key, "GET /api/v3/account")
            assert client.authorize(key.key.access_key, "", ip, "read", signed=good).decision is Decision.ALLOW


def test_concurrent_attempts_never_buy_more_argon2_than_the_burst(start_server: StartServer, account: str) -> None:
    """Twelve different wrong secrets at once from one network: the burst of 3 is reserved before
    argon2 runs, so exactly 3 reach argon2 and the rest are refused without it."""
    server = start_server(failure_burst=3, failure_refill_per_second=0.001, **MODERATE_ARGON2)
    with server.client() as client:
        key = client.create_key(account, "bot", "trade", [])
        before = verifications(server)
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda _: decide(client, key, new_private_key(), ATTACKER_IP), range(12)))
        assert sorted(results) == sorted([Decision.BAD_SECRET] * 3 + [Decision.RATE_LIMITED] * 9)
        assert verifications(server) - before == 3


def test_a_rotation_grace_charges_each_argon2_run(start_server: StartServer, account: str) -> None:
    """In a rotation's grace period a wrong secret costs two argon2 runs (new and old hash), and
    it is charged two tokens: the budget holds in grace too."""
    server = start_server(failure_burst=4, failure_refill_per_second=0.001)
    with server.client() as client:
        key = client.create_key(account, "bot", "trade", [])
        client.rotate_key(account, key.key.access_key, grace_seconds=3600)
        before = verifications(server)
        assert decide(client, key, new_private_key(), ATTACKER_IP) is Decision.BAD_SECRET
        assert decide(client, key, new_private_key(), ATTACKER_IP) is Decision.BAD_SECRET
        assert decide(client, key, new_private_key(), ATTACKER_IP) is Decision.RATE_LIMITED
        assert verifications(server) - before == 4
        assert decide(client, key, key.private_key, BOT_IP) is Decision.ALLOW  # the old secret, in grace


def test_a_restart_stampede_of_correct_secrets_is_served(start_server: StartServer, account: str) -> None:
    """50 bots with cold keys (a fresh server), each sending 5 requests at once: identical
    verifications share one argon2 run, and no correct secret is refused."""
    server = start_server(argon2_threads=2, **MODERATE_ARGON2)
    with server.client() as client:
        keys = [client.create_key(f"{account}-{i // 10}", f"bot-{i}", "read", []) for i in range(50)]
        before = verifications(server)
        started = time.monotonic()
        with ThreadPoolExecutor(250) as pool:
            results = list(
                pool.map(lambda i: decide(client, keys[i // 5], keys[i // 5].private_key, BOT_IP), range(250))
            )
        took = time.monotonic() - started
    assert results == [Decision.ALLOW] * 250, {d: results.count(d) for d in set(results)}
    assert verifications(server) - before == 50
    assert took < 8


def test_one_accounts_flood_does_not_starve_other_accounts(start_server: StartServer, account: str) -> None:
    """One customer floods argon2 with wrong secrets for its own 16 keys from 16 IPv6 /64s; other
    accounts' first verifications take their turn and are served, not refused."""
    server = start_server(argon2_threads=1, failure_burst=10, **MODERATE_ARGON2)
    with server.client() as client:
        own = [client.create_key(f"{account}-flooder", f"key-{i}", "read", []) for i in range(16)]
        others = [client.create_key(f"{account}-other-{i}", "bot", "read", []) for i in range(6)]
        with ThreadPoolExecutor(64) as pool:
            flood = [
                pool.submit(decide, client, own[i % 16], new_private_key(), f"2001:db8:{i % 16}::{i}")
                for i in range(160)
            ]
            time.sleep(0.1)  # the flood fills the queue
            victims = [pool.submit(decide, client, key, key.private_key, BOT_IP) for key in others]
            assert [v.result() for v in victims] == [Decision.ALLOW] * len(others)
            for f in flood:
                assert f.result() in (Decision.BAD_SECRET, Decision.RATE_LIMITED, Decision.VERIFICATION_BUSY)


def test_callers_who_hang_up_mid_argon2_are_charged_and_block_nothing_for_ever(
    start_server: StartServer, account: str
) -> None:
    """Wrong secrets whose callers hang up while argon2 runs: each run is still settled when it
    ends (spent as a failure), and once the bucket refills the network is served again; tokens
    held by cancelled calls used to stay held for ever, locking the network out."""
    server = start_server(failure_burst=3, failure_refill_per_second=5.0, **MODERATE_ARGON2)
    with server.client() as client:
        key = client.create_key(account, "bot", "trade", [])
    with grpc.insecure_channel(server.target) as channel:
        authorize = pb_grpc.AuthorizationStub(channel).Authorize
        for _ in range(3):
            request = pb.AuthorizeRequest(
                access_key=key.key.access_key,
                private_key=new_private_key(),
                client_ip=ATTACKER_IP,
                required_permission=pb.PERMISSION_READ,
            )
            call = authorize.future(request, timeout=10, metadata=(("authorization", f"Bearer {server.admin_token}"),))
            time.sleep(0.005)  # argon2 is running now
            call.cancel()  # the caller hangs up
    time.sleep(1.0)  # the runs end and are charged; then the bucket refills
    with server.client() as client:
        assert decide(client, key, key.private_key, ATTACKER_IP) is Decision.ALLOW


@pytest.mark.parametrize("restart", [False, True], ids=["same-process", "after-restart"])
def test_a_flood_from_many_networks_queues_behind_the_keys_owner(
    start_server: StartServer, account: str, restart: bool
) -> None:
    """Wrong secrets for a key with no allowlist from 40 IPv6 /64s at once fill argon2's queue;
    the owner's bot, uncached after a rotation (or a restart), still gets ALLOW: its network has
    proven the key before (in this process, or as the key's last-used address), and such
    verifications go first."""
    settings = {"argon2_threads": 1, "last_used_flush_seconds": 0.05, **MODERATE_ARGON2}
    server = start_server(**settings)
    with server.client() as client:
        key = client.create_key(account, "bot", "trade", [])
        assert decide(client, key, key.private_key, BOT_IP) is Decision.ALLOW
        if restart:
            time.sleep(0.3)  # the last-used address is flushed
            server.stop()
            server = start_server(data_dir=server.config.data_dir, **settings)
        else:
            key = dataclasses.replace(key, private_key=client.rotate_key(account, key.key.access_key).private_key)
    with server.client() as client, ThreadPoolExecutor(64) as pool:
        flood = [pool.submit(decide, client, key, new_private_key(), f"2001:db8:{i % 40:x}::{i}") for i in range(200)]
        time.sleep(0.2)  # the queue is full of the flood
        with Client(server.target, token=server.admin_token, timeout=0.5) as gateway:  # Envoy's deadline
            assert decide(gateway, key, key.private_key, BOT_IP) is Decision.ALLOW
        for f in flood:
            assert f.result() in (Decision.BAD_SECRET, Decision.RATE_LIMITED, Decision.VERIFICATION_BUSY)


def test_clients_behind_nat64_are_limited_one_ipv4_address_each(start_server: StartServer, account: str) -> None:
    """64:ff9b::/96 addresses are IPv4 clients: an attacker behind one of them drains its own
    bucket, not that of every NAT64 client (they would all share one /64)."""
    server = start_server(failure_burst=3, failure_refill_per_second=0.001)
    with server.client() as client:
        key = client.create_key(account, "bot", "trade", [])
        for _ in range(3):
            assert decide(client, key, new_private_key(), "64:ff9b::c633:6442") is Decision.BAD_SECRET
        assert decide(client, key, new_private_key(), "64:ff9b::c633:6442") is Decision.RATE_LIMITED
        assert decide(client, key, key.private_key, "64:ff9b::cb00:7107") is Decision.ALLOW


def test_calls_out_of_time_hold_no_tokens(start_server: StartServer, account: str) -> None:
    """A call whose deadline has passed by the time it would verify gives up without keeping the
    tokens it would have held (three such calls once locked their network out for good)."""
    server = start_server(failure_burst=3, failure_refill_per_second=0.001)
    authorizer = server.server.authorizer
    assert authorizer is not None
    with server.client() as client:
        key = client.create_key(account, "bot", "trade", [])
        for _ in range(3):
            try:
                query = Query(key.key.access_key, new_private_key(), BOT_IP, Permission.READ, time_left=1e-6)
                result = server.run(decided(authorizer, query))
            except Unavailable:
                continue  # the row read ran out of time first (PostgreSQL's round trip): fine too
            assert result.decision is Decision.VERIFICATION_BUSY
        assert decide(client, key, key.private_key, BOT_IP) is Decision.ALLOW


def test_the_old_secret_in_a_rotation_grace_is_no_failure(start_server: StartServer, account: str) -> None:
    """In a grace period the old secret first fails against the new hash; when it then matches the
    old one, that first run is not charged: bots on old secrets never drain their network's bucket."""
    server = start_server(failure_burst=3, failure_refill_per_second=0.001)
    with server.client() as client:
        keys = [client.create_key(account, f"bot-{i}", "trade", []) for i in range(5)]
        for key in keys:
            client.rotate_key(account, key.key.access_key, grace_seconds=3600)
        assert [decide(client, key, key.private_key, BOT_IP) for key in keys] == [Decision.ALLOW] * 5


def test_an_account_flooding_from_networks_it_proved_cannot_starve_other_accounts(
    start_server: StartServer, account: str
) -> None:
    """An attacker proves 8 networks on each of two keys of their own, then floods wrong secrets
    from them: those runs count as proven, yet other accounts' first verifications (not proven
    anywhere) take every other turn and are served within a gateway's deadline."""
    # A wide burst stands for the many networks a determined attacker would spread this over;
    # a long queue lets the flood queue ~100 runs, so that waiting behind it would take seconds.
    server = start_server(argon2_threads=1, failure_burst=100_000, argon2_max_wait_seconds=5.0, **SLOWER_ARGON2)
    networks = [f"2001:db8:{i:x}::1" for i in range(8)]
    with server.client() as client:
        own = [client.create_key(f"{account}-flooder", f"key-{i}", "read", []) for i in range(2)]
        for key in own:
            for ip in networks:
                assert decide(client, key, key.private_key, ip) is Decision.ALLOW  # proves the network
        others = [client.create_key(f"{account}-other-{i}", "bot", "read", []) for i in range(3)]
        # The victims' deadline: a handful of argon2 runs on this machine (taking turns, each waits
        # for a few of the flood's runs), far fewer than the ~100 the flood queues.
        assert server.server.authorizer is not None
        deadline = max(0.5, 15 * server.server.authorizer.hasher.seconds)
        with ThreadPoolExecutor(100) as pool:
            flood = [pool.submit(decide, client, own[i % 2], new_private_key(), networks[i % 8]) for i in range(150)]
            time.sleep(0.3)  # the flood is under way (what it may queue: its budget's worth, at most)
            with Client(server.target, token=server.admin_token, timeout=deadline) as gateway:
                victims = [pool.submit(decide, gateway, key, key.private_key, BOT_IP) for key in others]
                assert [v.result() for v in victims] == [Decision.ALLOW] * len(others)
            for f in flood:
                assert f.result() in (Decision.BAD_SECRET, Decision.RATE_LIMITED, Decision.VERIFICATION_BUSY)


def test_a_release_wakes_only_the_attempts_waiting_for_its_buckets() -> None:
    """Waiting attempts are woken per bucket: an attacker parking thousands of requests on their
    own network's held tokens cannot make every unrelated argon2 run wake them all."""

    async def scenario() -> None:
        limiter = FailureLimiter(burst=1, per_second=0.0)
        assert limiter.hold("key attacker", "attacker") is True
        assert limiter.hold("key attacker", "attacker") is None  # must wait for that hold
        waiting = asyncio.ensure_future(limiter.settled(5.0, "key attacker", "attacker"))
        await asyncio.sleep(0)
        assert limiter.hold("other bot", "bot") is True
        limiter.release("other bot", "bot", failed=False)  # someone else's run ends
        await asyncio.sleep(0.01)
        assert not waiting.done()
        limiter.release("key attacker", "attacker", failed=True)
        await asyncio.wait_for(waiting, 1.0)

    uvloop.run(scenario())


async def decided(authorizer: Authorizer, query: Query) -> AuthorizeResult:
    """``query``'s decision, on the server's loop (where the authorizer lives)."""
    answer = authorizer.decide(query)
    return answer if isinstance(answer, AuthorizeResult) else await answer
