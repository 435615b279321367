"""ED25519 keys: signed requests, a receive window, and nonces that never replay (across replicas too)."""

from __future__ import annotations

import dataclasses
import time

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keyguard import Client, CreatedKey, Decision, InvalidArgument, KeyType, SignedRequest, sign_request
from keyguard_server.authorize._domain import now_us
from tests.conftest import RunningServer, StartServer

# Storage-dependent: replay nonces are stored in the database, shared by replicas.
pytestmark = pytest.mark.all_backends

BOT_IP = "203.0.113.7"
ORDER = "POST /api/v3/order symbol=BTCUSDT&side=BUY&quantity=1"


@pytest.fixture
def ed_key(client: Client, account: str) -> CreatedKey:
    return client.create_key(account, "signer", "trade", [BOT_IP], key_type=KeyType.ED25519)


def authorize(client: Client, key: CreatedKey, signed: SignedRequest | None, need: str = "trade") -> Decision:
    return client.authorize(key.key.access_key, "", BOT_IP, need, signed=signed).decision


def test_generated_pair_signs_requests(client: Client, ed_key: CreatedKey) -> None:
    assert ed_key.key.key_type is KeyType.ED25519
    assert ed_key.private_key.startswith("-----BEGIN PRIVATE KEY-----")
    assert ed_key.key.public_key.startswith("-----BEGIN PUBLIC KEY-----")
    signed = sign_request(ed_key.private_key, ed_key.key.access_key, ORDER)
    result = client.authorize(ed_key.key.access_key, "", BOT_IP, "trade", signed=signed)
    assert (result.decision, result.key_name) == (Decision.ALLOW, "signer")


def test_own_public_key_and_keyguard_never_holds_the_private_key(
    server: RunningServer, client: Client, account: str
) -> None:
    own = Ed25519PrivateKey.generate()
    public_pem = (
        own.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    created = client.create_key(account, "mine", "read", key_type=KeyType.ED25519, public_key=public_pem)
    assert created.private_key == ""
    assert created.key.public_key == public_pem
    private_pem = own.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    assert authorize(
        client, created, sign_request(private_pem, created.key.access_key, "GET /api/v3/account"), "read"
    ) is (Decision.ALLOW)
    (row,) = server.sql("SELECT secret_hash, public_key FROM key_model WHERE access_key = ?", (created.key.access_key,))
    assert row == ("", public_pem)


def test_replayed_nonce_is_refused(client: Client, ed_key: CreatedKey) -> None:
    signed = sign_request(ed_key.private_key, ed_key.key.access_key, ORDER)
    assert authorize(client, ed_key, signed) is Decision.ALLOW
    assert authorize(client, ed_key, signed) is Decision.REPLAYED_REQUEST
    fresh = sign_request(ed_key.private_key, ed_key.key.access_key, ORDER)
    assert authorize(client, ed_key, fresh) is Decision.ALLOW


def test_replay_is_refused_by_another_replica(start_server: StartServer, account: str) -> None:
    first = start_server()
    second = start_server(data_dir=first.config.data_dir)  # the same database
    with first.client() as a, second.client() as b:
        key = a.create_key(account, "signer", "trade", [BOT_IP], key_type=KeyType.ED25519)
        signed = sign_request(key.private_key, key.key.access_key, ORDER)
        assert authorize(a, key, signed) is Decision.ALLOW
        assert authorize(b, key, signed) is Decision.REPLAYED_REQUEST


@pytest.mark.parametrize("skew_ms", [-60_000, -5_500, 5_500, 3_600_000])
def test_stale_or_future_timestamp_is_refused(client: Client, ed_key: CreatedKey, skew_ms: int) -> None:
    now_ms = time.time_ns() // 1_000_000
    signed = sign_request(ed_key.private_key, ed_key.key.access_key, ORDER, timestamp_ms=now_ms + skew_ms)
    assert authorize(client, ed_key, signed) is Decision.STALE_REQUEST


def test_tampering_breaks_the_signature(client: Client, ed_key: CreatedKey, account: str) -> None:
    signed = sign_request(ed_key.private_key, ed_key.key.access_key, ORDER)
    for tampered in (
        dataclasses.replace(signed, payload=ORDER.replace("quantity=1", "quantity=100")),
        dataclasses.replace(signed, nonce=signed.nonce + "x"),
        dataclasses.replace(signed, timestamp_ms=signed.timestamp_ms + 1),
        dataclasses.replace(signed, signature=signed.signature[:-4] + "AAA="),
    ):
        assert authorize(client, ed_key, tampered) is Decision.BAD_SIGNATURE
    other = client.create_key(account, "other", "trade", [BOT_IP], key_type=KeyType.ED25519)
    # Signed by another key, or for another key's access key.
    assert authorize(client, ed_key, sign_request(other.private_key, ed_key.key.access_key, ORDER)) is (
        Decision.BAD_SIGNATURE
    )
    assert authorize(client, ed_key, sign_request(ed_key.private_key, other.key.access_key, ORDER)) is (
        Decision.BAD_SIGNATURE
    )
    assert authorize(client, ed_key, signed) is Decision.ALLOW  # the untampered one still works, once


def test_credentials_of_the_wrong_kind_are_refused(client: Client, ed_key: CreatedKey, account: str) -> None:
    assert authorize(client, ed_key, None) is Decision.BAD_SIGNATURE
    secret_key = client.create_key(account, "secret", "trade", [BOT_IP])
    signed = sign_request(ed_key.private_key, secret_key.key.access_key, ORDER)
    assert client.authorize(secret_key.key.access_key, "", BOT_IP, "trade", signed=signed).decision is (
        Decision.BAD_SECRET
    )


def test_signed_requests_go_through_the_same_checks(client: Client, ed_key: CreatedKey, account: str) -> None:
    def sign() -> SignedRequest:
        return sign_request(ed_key.private_key, ed_key.key.access_key, ORDER)

    assert client.authorize(ed_key.key.access_key, "", "198.51.100.1", "trade", signed=sign()).decision is (
        Decision.IP_NOT_ALLOWED
    )
    client.update_key(account, ed_key.key.access_key, enabled=False)
    assert authorize(client, ed_key, sign()) is Decision.KEY_DISABLED
    client.update_key(account, ed_key.key.access_key, enabled=True, permission="read")
    assert authorize(client, ed_key, sign()) is Decision.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"nonce": "short"}, "signed.nonce"),
        ({"nonce": "has space in it"}, "signed.nonce"),
        ({"signature": ""}, "signed.signature"),
        ({"timestamp_ms": 0}, "signed.timestamp_ms"),
        ({"payload": "x" * 9000}, "signed.payload"),
    ],
)
def test_malformed_signed_requests_are_invalid(
    client: Client, ed_key: CreatedKey, change: dict[str, object], field: str
) -> None:
    signed = dataclasses.replace(sign_request(ed_key.private_key, ed_key.key.access_key, ORDER), **change)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument) as err:
        authorize(client, ed_key, signed)
    assert err.value.fields == (field,)


def test_bad_public_keys_are_refused(client: Client, account: str, ed_key: CreatedKey) -> None:
    with pytest.raises(InvalidArgument) as err:
        client.create_key(account, "bad", "read", key_type=KeyType.ED25519, public_key="not a key")
    assert err.value.fields == ("public_key",)
    with pytest.raises(InvalidArgument) as err:
        client.create_key(account, "bad", "read", public_key=ed_key.key.public_key)  # a SECRET key
    assert err.value.fields == ("public_key",)
    with pytest.raises(InvalidArgument) as err:
        client.rotate_key(account, ed_key.key.access_key, public_key="not a key")
    assert err.value.fields == ("public_key",)
    secret_key = client.create_key(account, "secret", "read")
    with pytest.raises(InvalidArgument) as err:
        client.rotate_key(account, secret_key.key.access_key, public_key=ed_key.key.public_key)
    assert err.value.fields == ("public_key",)


def test_rotating_an_ed25519_key(server: RunningServer, client: Client, ed_key: CreatedKey) -> None:
    ak, account = ed_key.key.access_key, ed_key.key.account_id

    def with_key(private_pem: str) -> Decision:
        return authorize(client, ed_key, sign_request(private_pem, ak, ORDER))

    rotated = client.rotate_key(account, ak, grace_seconds=3600)
    assert rotated.private_key.startswith("-----BEGIN PRIVATE KEY-----")
    assert rotated.key.public_key != ed_key.key.public_key
    assert with_key(rotated.private_key) is Decision.ALLOW
    assert with_key(ed_key.private_key) is Decision.ALLOW  # during the grace period
    server.sql("UPDATE key_model SET previous_valid_until_us = ? WHERE access_key = ?", (1, ak))
    assert with_key(ed_key.private_key) is Decision.BAD_SIGNATURE  # after it
    # The owner's own new key, effective at once.
    own = Ed25519PrivateKey.generate()
    own_pem = own.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = (
        own.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    mine = client.rotate_key(account, ak, grace_seconds=0, public_key=public_pem)
    assert (mine.private_key, mine.key.public_key) == ("", public_pem)
    assert with_key(own_pem) is Decision.ALLOW
    assert with_key(rotated.private_key) is Decision.BAD_SIGNATURE


def test_pruning_nonces_never_holds_up_signed_requests(start_server: StartServer, account: str) -> None:
    """Forgetting old nonces runs every flush on the nonce connection itself: it must never wait
    for a lock of its own making, nor hold up the signed requests recording theirs."""
    server = start_server(last_used_flush_seconds=0.05, database_lock_timeout_seconds=1.0)
    with server.client() as client:
        key = client.create_key(account, "signer", "trade", [BOT_IP], key_type=KeyType.ED25519)
        slowest = 0.0
        for i in range(20):
            started = time.monotonic()
            assert authorize(client, key, sign_request(key.private_key, key.key.access_key, f"{ORDER}&n={i}")) is (
                Decision.ALLOW
            )
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.02)
    assert slowest < 0.5, f"a signed request took {slowest:.2f} s"


def test_a_replica_with_a_fast_clock_never_prunes_a_nonce_that_can_still_be_replayed(
    start_server: StartServer, account: str
) -> None:
    """A request stamped 4.9 s ahead (inside the 5 s window) stays acceptable until its own
    timestamp + 5 s. Pruning on a replica whose clock runs 1 s fast must not forget its nonce
    before then: nonces are kept by the request's timestamp, with a margin for clocks."""
    server = start_server()
    authorizer = server.server.authorizer
    assert authorizer is not None
    with server.client() as client:
        key = client.create_key(account, "signer", "trade", [BOT_IP], key_type=KeyType.ED25519)
        now_ms = time.time_ns() // 1_000_000
        signed = sign_request(key.private_key, key.key.access_key, ORDER, timestamp_ms=now_ms + 4_900)
        assert authorize(client, key, signed) is Decision.ALLOW
        try:
            authorizer.clock = lambda: (now_ms + 10_500) * 1000  # 9.5 s later, on a clock 1 s fast
            server.run(authorizer.forget_old_nonces())
            authorizer.clock = lambda: (now_ms + 9_500) * 1000  # 9.5 s later, an accurate clock
            assert authorize(client, key, signed) is Decision.REPLAYED_REQUEST
        finally:
            authorizer.clock = now_us
