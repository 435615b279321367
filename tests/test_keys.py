"""KeyManagement: the life of a key, through the real server and client."""

from __future__ import annotations

import re
import threading
from datetime import UTC, datetime, timedelta

import pytest

from keyguard import AlreadyExists, Client, InvalidArgument, LimitExceeded, NotFound, Permission
from tests.conftest import StartServer

# Storage-dependent: key storage: counts and limits under concurrent creates, unique names, transactions.
pytestmark = pytest.mark.all_backends

ACCESS_KEY = re.compile(r"kg_[0-9A-Za-z]{24}")
PRIVATE_KEY = re.compile(r"kgsk_[0-9A-Za-z]{43}_[0-9A-Za-z]{6}")


def test_create_returns_both_keys_once_and_list_get_never_return_the_secret(client: Client, account: str) -> None:
    created = client.create_key(account, "my bot", "trade", ["203.0.113.7"])

    assert ACCESS_KEY.fullmatch(created.key.access_key)
    assert PRIVATE_KEY.fullmatch(created.private_key)
    assert created.private_key not in repr(created)
    key = created.key
    assert (key.account_id, key.name, key.permission, key.allowed_ips) == (
        account,
        "my bot",
        Permission.TRADE,
        ("203.0.113.7",),
    )
    assert abs(key.created_at - datetime.now(UTC)) < timedelta(minutes=1)
    assert client.list_keys(account) == [key]
    assert client.get_key(account, key.access_key) == key


def test_every_key_gets_fresh_random_keys(client: Client, account: str) -> None:
    created = [client.create_key(account, f"bot {i}", "read") for i in range(5)]
    assert len({c.key.access_key for c in created}) == 5
    assert len({c.private_key for c in created}) == 5


def test_list_is_in_creation_order_and_per_account(client: Client, account: str) -> None:
    names = ["alpha", "beta", "gamma"]
    for name in names:
        client.create_key(account, name, "read")
    client.create_key(account + "-other", "alpha", "read")
    assert [k.name for k in client.list_keys(account)] == names
    assert client.list_keys("acct-never-seen") == []


def test_name_is_unique_within_an_account_only(client: Client, account: str) -> None:
    client.create_key(account, "bot", "read")
    with pytest.raises(AlreadyExists, match="bot"):
        client.create_key(account, "bot", "trade")
    client.create_key(account + "-b", "bot", "read")
    assert len(client.list_keys(account)) == 1


def test_sixteen_keys_then_resource_exhausted(client: Client, account: str) -> None:
    for i in range(16):
        client.create_key(account, f"bot {i}", "read")
    with pytest.raises(LimitExceeded, match="16"):
        client.create_key(account, "one too many", "read")
    assert len(client.list_keys(account)) == 16
    assert client.get_account_settings(account).key_count == 16
    client.delete_key(account, client.list_keys(account)[0].access_key)
    client.create_key(account, "fits again", "read")


def test_key_limit_is_configurable(start_server: StartServer, account: str) -> None:
    with start_server(max_keys_per_account=2).client() as client:
        client.create_key(account, "a", "read")
        client.create_key(account, "b", "read")
        with pytest.raises(LimitExceeded):
            client.create_key(account, "c", "read")
        assert client.get_account_settings(account).max_keys == 2


def test_concurrent_creates_never_pass_the_limit(client: Client, account: str) -> None:
    errors: list[Exception] = []

    def create(i: int) -> None:
        try:
            client.create_key(account, f"bot {i}", "read")
        except LimitExceeded as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(client.list_keys(account)) == 16
    assert len(errors) == 8


def test_allowed_ips_are_normalised_and_deduplicated(client: Client, account: str) -> None:
    key = client.create_key(
        account,
        "bot",
        "trade",
        [
            "2001:DB8:0:0::1",
            "10.0.0.0/8",
            "2001:db8::1",
            "192.0.2.1/32",
            "2001:db8:abcd::/48",
            "::ffff:198.51.100.7",
            "10.0.0.0/8",
        ],
    ).key
    assert key.allowed_ips == ("2001:db8::1", "10.0.0.0/8", "192.0.2.1", "2001:db8:abcd::/48", "198.51.100.7")


def test_withdraw_key_needs_an_ip_allowlist(client: Client, account: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        client.create_key(account, "withdrawer", "withdraw")
    assert err.value.fields == ("allowed_ips",)
    assert client.list_keys(account) == []
    assert client.create_key(account, "withdrawer", "withdraw", ["192.0.2.0/24"]).key.permission is Permission.WITHDRAW


def test_withdraw_ip_policy_can_be_turned_off(start_server: StartServer, account: str) -> None:
    with start_server(withdraw_requires_ip_allowlist=False).client() as client:
        key = client.create_key(account, "withdrawer", "withdraw").key
        assert key.allowed_ips == ()


def test_get_and_delete_unknown_key_are_not_found(client: Client, account: str) -> None:
    missing = "kg_" + "A" * 24
    with pytest.raises(NotFound):
        client.get_key(account, missing)
    with pytest.raises(NotFound):
        client.delete_key(account, missing)


def test_a_key_is_invisible_from_another_account(client: Client, account: str) -> None:
    key = client.create_key(account, "bot", "read").key
    with pytest.raises(NotFound):
        client.get_key(account + "-intruder", key.access_key)
    with pytest.raises(NotFound):
        client.delete_key(account + "-intruder", key.access_key)
    assert client.get_key(account, key.access_key) == key


def test_delete_removes_exactly_one_key(client: Client, account: str) -> None:
    keep = client.create_key(account, "keep", "read").key
    drop = client.create_key(account, "drop", "read").key
    client.delete_key(account, drop.access_key)
    assert client.list_keys(account) == [keep]
    with pytest.raises(NotFound):
        client.delete_key(account, drop.access_key)


def test_delete_all_deletes_every_key_of_the_account_only(client: Client, account: str) -> None:
    for i in range(5):
        client.create_key(account, f"bot {i}", "read")
    other = client.create_key(account + "-other", "bot", "read").key
    assert client.delete_all_keys(account) == 5
    assert client.list_keys(account) == []
    assert client.delete_all_keys(account) == 0
    assert client.list_keys(account + "-other") == [other]


def test_keys_survive_a_restart(start_server: StartServer, account: str) -> None:
    first = start_server()
    with first.client() as client:
        created = client.create_key(account, "bot", "trade", ["192.0.2.1"])
    first.stop()
    second = start_server(data_dir=first.config.data_dir)
    with second.client() as client:
        assert client.list_keys(account) == [created.key]
        result = client.authorize(created.key.access_key, created.private_key, "192.0.2.1", "trade")
        assert result.allowed


@pytest.mark.parametrize(
    ("allowed_ips", "fields"),
    [
        (["0.0.0.0/1", "128.0.0.0/1"], ("allowed_ips[0]", "allowed_ips[1]")),  # the IPv4 internet in two halves
        (["::/1", "8000::/1"], ("allowed_ips[0]", "allowed_ips[1]")),
        (["192.0.2.1", "10.0.0.0/23"], ("allowed_ips[1]",)),
        (["2001:db8::/47"], ("allowed_ips[0]",)),
    ],
    ids=["ipv4-halves", "ipv6-halves", "ipv4-/23", "ipv6-/47"],
)
def test_a_withdraw_key_allowlist_must_restrict(
    client: Client, account: str, allowed_ips: list[str], fields: tuple[str, ...]
) -> None:
    """ "WITHDRAW needs an IP allowlist" cannot be met with networks that cover the internet."""
    with pytest.raises(InvalidArgument) as err:
        client.create_key(account, "withdrawer", "withdraw", allowed_ips)
    assert err.value.fields == fields
    trade = client.create_key(account, "trader", "trade", allowed_ips)  # other permissions may be broad
    with pytest.raises(InvalidArgument):
        client.update_key(account, trade.key.access_key, permission="withdraw")
    narrow = client.create_key(account, "narrow", "withdraw", ["10.0.0.0/24", "2001:db8::/48", "192.0.2.7"])
    assert narrow.key.permission is Permission.WITHDRAW


@pytest.mark.parametrize("entry", ["64:ff9b::/96", "64:ff9b::/64", "::/96", "64:ff9b:1::/48"])
def test_a_withdraw_key_cannot_allow_all_of_ipv4_through_nat64(client: Client, account: str, entry: str) -> None:
    """64:ff9b::/96 is only a /96, but behind NAT64 it is every IPv4 client: such prefixes need the
    IPv4 minimum in their last 32 bits (/120 for /24)."""
    with pytest.raises(InvalidArgument) as err:
        client.create_key(account, "withdrawer", "withdraw", [entry])
    assert err.value.fields == ("allowed_ips[0]",)
    narrow = client.create_key(account, "narrow", "withdraw", ["64:ff9b::c000:200/120"])
    assert narrow.key.allowed_ips == ("64:ff9b::c000:200/120",)
