"""Key lifecycle: expiry, disable/enable, UpdateKey, RotateKey with and without grace."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from keyguard import AlreadyExists, AuditAction, Client, CreatedKey, Decision, InvalidArgument, NotFound, Permission
from keyguard_server.authorize._domain import now_us
from tests.conftest import RunningServer, StartServer

# Storage-dependent: updates, rotation and expiry as stored and read back.
pytestmark = pytest.mark.all_backends

BOT_IP = "203.0.113.7"


def decide(
    client: Client, key: CreatedKey, secret: str | None = None, *, ip: str = BOT_IP, need: str = "read"
) -> Decision:
    return client.authorize(key.key.access_key, key.private_key if secret is None else secret, ip, need).decision


@pytest.fixture
def key(client: Client, account: str) -> CreatedKey:
    return client.create_key(account, "bot", "trade", [BOT_IP])


def soon(**delta: float) -> datetime:
    return datetime.now(UTC) + timedelta(**delta)


def test_expiry_set_at_creation_is_shown_and_enforced(server: RunningServer, client: Client, account: str) -> None:
    expires = soon(days=30)
    created = client.create_key(account, "temp", "read", expires_at=expires)
    assert created.key.expires_at is not None
    assert abs(created.key.expires_at - expires) < timedelta(milliseconds=1)
    assert client.get_key(account, created.key.access_key).expires_at == created.key.expires_at
    assert decide(client, created) is Decision.ALLOW
    # Let the clock pass the expiry (as 30 days would), from outside the server.
    server.sql("UPDATE key_model SET expires_at_us = ? WHERE access_key = ?", (1, created.key.access_key))
    assert decide(client, created) is Decision.KEY_EXPIRED  # even with its secret cached


def test_expiry_is_enforced_by_the_clock_alone(server: RunningServer, client: Client, account: str) -> None:
    """What a key's row says of a request is kept between calls, only while the clock leaves it
    true: past the expiry it is refused, and a clock stepped back before it allows it again."""
    created = client.create_key(account, "temp", "read", expires_at=soon(hours=1))
    authorizer = server.server.authorizer
    assert authorizer is not None
    assert decide(client, created) is Decision.ALLOW
    try:
        authorizer.clock = lambda: now_us() + 2 * 3600 * 10**6
        assert decide(client, created) is Decision.KEY_EXPIRED
        authorizer.clock = lambda: now_us() - 60 * 10**6
        assert decide(client, created) is Decision.ALLOW
    finally:
        authorizer.clock = now_us


def test_expiry_must_be_in_the_future(client: Client, account: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        client.create_key(account, "late", "read", expires_at=soon(seconds=-1))
    assert err.value.fields == ("expires_at",)
    key = client.create_key(account, "bot", "read")
    with pytest.raises(InvalidArgument) as err:
        client.update_key(account, key.key.access_key, expires_at=soon(hours=-1))
    assert err.value.fields == ("expires_at",)


def test_expiry_can_be_set_later_and_removed(client: Client, account: str, key: CreatedKey) -> None:
    ak = key.key.access_key
    assert client.get_key(account, ak).expires_at is None
    updated = client.update_key(account, ak, expires_at=soon(days=1))
    assert updated.expires_at is not None
    assert client.update_key(account, ak, clear_expires_at=True).expires_at is None
    with pytest.raises(InvalidArgument) as err:
        client.update_key(account, ak, expires_at=soon(days=1), clear_expires_at=True)
    assert err.value.fields == ("clear_expires_at",)


def test_disable_and_enable(client: Client, account: str, key: CreatedKey) -> None:
    assert key.key.enabled
    assert decide(client, key) is Decision.ALLOW  # cached from here on
    assert not client.update_key(account, key.key.access_key, enabled=False).enabled
    assert decide(client, key) is Decision.KEY_DISABLED
    assert decide(client, key, "kgsk_wrong") is Decision.KEY_DISABLED  # decided before the secret
    assert client.update_key(account, key.key.access_key, enabled=True).enabled
    assert decide(client, key) is Decision.ALLOW


def test_update_changes_name_permission_and_ips(client: Client, account: str, key: CreatedKey) -> None:
    ak = key.key.access_key
    assert decide(client, key, need="trade") is Decision.ALLOW
    updated = client.update_key(account, ak, name="renamed", permission="read", allowed_ips=["2001:DB8::/32"])
    assert (updated.name, updated.permission, updated.allowed_ips) == ("renamed", Permission.READ, ("2001:db8::/32",))
    assert client.get_key(account, ak) == updated
    assert decide(client, key, ip="2001:db8::1", need="trade") is Decision.PERMISSION_DENIED
    assert decide(client, key, ip=BOT_IP) is Decision.IP_NOT_ALLOWED
    assert client.update_key(account, ak, allowed_ips=[]).allowed_ips == ()  # any IP
    assert decide(client, key, ip="198.51.100.1") is Decision.ALLOW


def test_update_keeps_the_creation_rules(client: Client, account: str, key: CreatedKey) -> None:
    ak = key.key.access_key
    client.create_key(account, "taken", "read")
    with pytest.raises(AlreadyExists):
        client.update_key(account, ak, name="taken")
    with pytest.raises(InvalidArgument) as err:
        client.update_key(account, ak, name=" padded", allowed_ips=["10.0.0.1/8"])
    assert err.value.fields == ("name", "allowed_ips[0]")
    # WITHDRAW needs an IP list: as the result of the update, whichever field changes.
    client.update_key(account, ak, permission="withdraw")
    with pytest.raises(InvalidArgument) as err:
        client.update_key(account, ak, allowed_ips=[])
    assert err.value.fields == ("allowed_ips",)
    open_key = client.create_key(account, "open", "trade")
    with pytest.raises(InvalidArgument):
        client.update_key(account, open_key.key.access_key, permission="withdraw")
    assert client.get_key(account, ak).permission is Permission.WITHDRAW  # the refused updates changed nothing
    assert client.get_key(account, ak).allowed_ips == (BOT_IP,)
    with pytest.raises(NotFound):
        client.update_key(account + "-other", ak, name="x")


def test_updates_are_audited(client: Client, account: str, key: CreatedKey) -> None:
    client.update_key(account, key.key.access_key, name="renamed", enabled=False)
    events, _ = client.list_audit_events(account)
    assert events[0].action is AuditAction.KEY_UPDATED
    assert events[0].details == {"name": "renamed", "enabled": "False"}


def test_rotate_with_grace_keeps_the_old_key_working_until_then(
    server: RunningServer, client: Client, account: str, key: CreatedKey
) -> None:
    assert decide(client, key) is Decision.ALLOW  # the old secret is cached
    rotated = client.rotate_key(account, key.key.access_key, grace_seconds=3600)
    assert rotated.key.access_key == key.key.access_key
    assert rotated.private_key != key.private_key
    assert rotated.key.previous_key_valid_until is not None
    assert timedelta(minutes=59) < rotated.key.previous_key_valid_until - datetime.now(UTC) <= timedelta(hours=1)
    assert decide(client, rotated) is Decision.ALLOW
    assert decide(client, key) is Decision.ALLOW  # still, during the grace period
    # The grace period ends (as an hour would), seen from outside the server.
    server.sql("UPDATE key_model SET previous_valid_until_us = ? WHERE access_key = ?", (1, key.key.access_key))
    assert decide(client, key) is Decision.BAD_SECRET  # even though it was cached
    assert decide(client, rotated) is Decision.ALLOW
    events, _ = client.list_audit_events(account)
    assert (events[0].action, events[0].details) == (AuditAction.KEY_ROTATED, {"grace_seconds": "3600"})


def test_rotate_without_grace_stops_the_old_key_at_once(client: Client, account: str, key: CreatedKey) -> None:
    assert decide(client, key) is Decision.ALLOW
    rotated = client.rotate_key(account, key.key.access_key, grace_seconds=0)
    assert rotated.key.previous_key_valid_until is None
    assert decide(client, key) is Decision.BAD_SECRET
    assert decide(client, rotated) is Decision.ALLOW


def test_rotate_defaults_to_a_day_of_grace(client: Client, account: str, key: CreatedKey) -> None:
    rotated = client.rotate_key(account, key.key.access_key)
    assert rotated.key.previous_key_valid_until is not None
    grace = rotated.key.previous_key_valid_until - datetime.now(UTC)
    assert timedelta(hours=23, minutes=59) < grace <= timedelta(hours=24)
    assert decide(client, key) is Decision.ALLOW


def test_rotate_refusals(client: Client, account: str, key: CreatedKey) -> None:
    with pytest.raises(InvalidArgument) as err:
        client.rotate_key(account, key.key.access_key, grace_seconds=31 * 24 * 3600)
    assert err.value.fields == ("grace_seconds",)
    with pytest.raises(NotFound):
        client.rotate_key(account, "kg_" + "z" * 24)


def test_rotated_secret_is_stored_only_as_a_hash(
    server: RunningServer, client: Client, account: str, key: CreatedKey
) -> None:
    rotated = client.rotate_key(account, key.key.access_key)
    rows = repr(server.sql("SELECT * FROM key_model WHERE access_key = ?", (key.key.access_key,)))
    assert rotated.private_key not in rows and key.private_key not in rows
    assert rows.count("$argon2id$") == 2  # the current hash and the one in its grace period


def test_lifecycle_survives_a_restart(start_server: StartServer, account: str) -> None:
    first = start_server()
    with first.client() as client:
        key = client.create_key(account, "bot", "read", expires_at=soon(days=2))
        client.update_key(account, key.key.access_key, enabled=False)
    first.stop()
    with start_server(data_dir=first.config.data_dir).client() as client:
        stored = client.get_key(account, key.key.access_key)
        assert (stored.enabled, stored.expires_at) == (False, key.key.expires_at)
        assert decide(client, key) is Decision.KEY_DISABLED
