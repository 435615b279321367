"""Authorization: every decision code, in the order docs/security.md gives them."""

from __future__ import annotations

import pytest

from keyguard import (
    Client,
    CreatedKey,
    Decision,
    InvalidArgument,
    Permission,
    WithdrawalDestination,
)

# Storage-dependent: the decision reads the key row and the whitelist from the database.
pytestmark = pytest.mark.all_backends

BOT_IP = "203.0.113.7"
BTC = WithdrawalDestination("BTC", "bc1qexampleaddress0000000000000000000000")


@pytest.fixture
def trade_key(client: Client, account: str) -> CreatedKey:
    return client.create_key(account, "trader", "trade", [BOT_IP])


@pytest.fixture
def withdraw_key(client: Client, account: str) -> CreatedKey:
    return client.create_key(account, "withdrawer", "withdraw", [BOT_IP])


def test_allow_returns_who_the_key_belongs_to(client: Client, account: str, trade_key: CreatedKey) -> None:
    result = client.authorize(trade_key.key.access_key, trade_key.private_key, BOT_IP, "trade")
    assert result.allowed
    assert result.decision is Decision.ALLOW
    assert (result.account_id, result.key_name, result.permission) == (account, "trader", Permission.TRADE)


def test_unknown_key(client: Client, trade_key: CreatedKey) -> None:
    for access_key in ("kg_" + "x" * 24, "not-a-key", "kg_short"):
        result = client.authorize(access_key, trade_key.private_key, BOT_IP, "read")
        assert (result.allowed, result.decision) == (False, Decision.UNKNOWN_KEY)
        assert (result.account_id, result.key_name, result.permission) == ("", "", None)


def test_deleted_key_is_unknown_at_once(client: Client, account: str, trade_key: CreatedKey) -> None:
    assert client.authorize(trade_key.key.access_key, trade_key.private_key, BOT_IP, "read").allowed
    client.delete_key(account, trade_key.key.access_key)
    result = client.authorize(trade_key.key.access_key, trade_key.private_key, BOT_IP, "read")
    assert result.decision is Decision.UNKNOWN_KEY


def test_keys_deleted_by_delete_all_are_unknown(client: Client, account: str) -> None:
    keys = [client.create_key(account, f"bot {i}", "read") for i in range(3)]
    client.delete_all_keys(account)
    for created in keys:
        result = client.authorize(created.key.access_key, created.private_key, BOT_IP, "read")
        assert result.decision is Decision.UNKNOWN_KEY


def test_ip_not_allowed_is_decided_before_the_secret(client: Client, trade_key: CreatedKey) -> None:
    good = client.authorize(trade_key.key.access_key, trade_key.private_key, "198.51.100.1", "read")
    wrong_secret = client.authorize(trade_key.key.access_key, "kgsk_wrong", "198.51.100.1", "read")
    for result in (good, wrong_secret):
        assert (result.allowed, result.decision) == (False, Decision.IP_NOT_ALLOWED)
        assert result.account_id == ""


@pytest.mark.parametrize(
    ("allowed_ips", "client_ip", "allowed"),
    [
        ([], "198.51.100.99", True),
        (["10.0.0.0/8"], "10.255.0.1", True),
        (["10.0.0.0/8"], "11.0.0.1", False),
        (["192.0.2.10"], "192.0.2.10", True),
        (["192.0.2.10"], "192.0.2.11", False),
        (["192.0.2.10"], "::ffff:192.0.2.10", True),
        (["2001:db8::/32"], "2001:db8:1234::5", True),
        (["2001:db8::/32"], "2001:db9::5", False),
        (["2001:db8::1"], "2001:0db8:0000::0001", True),
        (["2001:db8::/32"], "10.0.0.1", False),
        (["10.0.0.0/8"], "::a00:1", False),
        (["10.0.0.0/8", "2001:db8::/32"], "2001:db8::7", True),
    ],
)
def test_ip_allowlists(client: Client, account: str, allowed_ips: list[str], client_ip: str, allowed: bool) -> None:
    created = client.create_key(account, "bot", "read", allowed_ips)
    result = client.authorize(created.key.access_key, created.private_key, client_ip, "read")
    assert result.decision is (Decision.ALLOW if allowed else Decision.IP_NOT_ALLOWED)


def test_bad_secret(client: Client, trade_key: CreatedKey) -> None:
    secret = trade_key.private_key
    body, checksum = secret[len("kgsk_") : -7], secret[-6:]
    flipped = body[:-1] + ("A" if body[-1] != "A" else "B")
    candidates = [
        "",
        "x" * 500,
        secret + "x",
        secret.upper(),
        f"kgsk_{flipped}_{checksum}",  # checksum no longer matches: refused without argon2
    ]
    for candidate in candidates:
        result = client.authorize(trade_key.key.access_key, candidate, BOT_IP, "read")
        assert (result.allowed, result.decision) == (False, Decision.BAD_SECRET), candidate
        assert result.account_id == ""


def test_well_formed_secret_of_another_key_is_bad(client: Client, account: str, trade_key: CreatedKey) -> None:
    other = client.create_key(account, "other", "trade", [BOT_IP])
    result = client.authorize(trade_key.key.access_key, other.private_key, BOT_IP, "read")
    assert result.decision is Decision.BAD_SECRET


@pytest.mark.parametrize("key_level", list(Permission))
@pytest.mark.parametrize("required", list(Permission))
def test_permission_levels_include_the_lower_ones(
    client: Client, account: str, key_level: Permission, required: Permission
) -> None:
    created = client.create_key(account, "bot", key_level, [BOT_IP])
    destination = BTC if required is Permission.WITHDRAW else None
    result = client.authorize(created.key.access_key, created.private_key, BOT_IP, required, destination)
    expected = Decision.ALLOW if key_level >= required else Decision.PERMISSION_DENIED
    assert result.decision is expected
    # The secret was proven, so the gateway learns whose key it is either way.
    assert (result.account_id, result.permission) == (account, key_level)


def test_withdrawals_go_anywhere_while_address_management_is_off(
    client: Client, account: str, withdraw_key: CreatedKey
) -> None:
    assert not client.get_account_settings(account).address_management
    result = client.authorize(withdraw_key.key.access_key, withdraw_key.private_key, BOT_IP, "withdraw", BTC)
    assert result.decision is Decision.ALLOW


def test_address_management_on_allows_only_whitelisted_destinations(
    client: Client, account: str, withdraw_key: CreatedKey
) -> None:
    ak, sk = withdraw_key.key.access_key, withdraw_key.private_key
    assert client.set_address_management(account, True).address_management

    def decide(destination: WithdrawalDestination) -> Decision:
        return client.authorize(ak, sk, BOT_IP, "withdraw", destination).decision

    assert decide(BTC) is Decision.ADDRESS_NOT_WHITELISTED
    entry = client.add_withdrawal_address(account, "btc", BTC.address, label="cold wallet")
    assert decide(BTC) is Decision.ALLOW
    assert decide(WithdrawalDestination("btc", BTC.address)) is Decision.ALLOW  # asset case-insensitive
    assert decide(WithdrawalDestination("ETH", BTC.address)) is Decision.ADDRESS_NOT_WHITELISTED
    assert decide(WithdrawalDestination("BTC", BTC.address.upper())) is Decision.ADDRESS_NOT_WHITELISTED
    assert decide(WithdrawalDestination("BTC", BTC.address, memo="123")) is Decision.ADDRESS_NOT_WHITELISTED

    client.remove_withdrawal_address(account, entry.id)
    assert decide(BTC) is Decision.ADDRESS_NOT_WHITELISTED
    client.set_address_management(account, False)
    assert decide(BTC) is Decision.ALLOW


def test_whitelisted_memo_must_match(client: Client, account: str, withdraw_key: CreatedKey) -> None:
    client.set_address_management(account, True)
    client.add_withdrawal_address(account, "XRP", "rExchangeDepositAddress", memo="1234567")
    ak, sk = withdraw_key.key.access_key, withdraw_key.private_key

    def decide(memo: str) -> Decision:
        destination = WithdrawalDestination("XRP", "rExchangeDepositAddress", memo)
        return client.authorize(ak, sk, BOT_IP, "withdraw", destination).decision

    assert decide("1234567") is Decision.ALLOW
    assert decide("7654321") is Decision.ADDRESS_NOT_WHITELISTED
    assert decide("") is Decision.ADDRESS_NOT_WHITELISTED


def test_whitelist_of_one_account_does_not_open_another(client: Client, account: str, withdraw_key: CreatedKey) -> None:
    client.set_address_management(account, True)
    client.set_address_management(account + "-other", True)
    client.add_withdrawal_address(account + "-other", BTC.asset, BTC.address)
    result = client.authorize(withdraw_key.key.access_key, withdraw_key.private_key, BOT_IP, "withdraw", BTC)
    assert result.decision is Decision.ADDRESS_NOT_WHITELISTED


def test_permission_is_checked_before_the_whitelist(client: Client, account: str, trade_key: CreatedKey) -> None:
    client.set_address_management(account, True)
    result = client.authorize(trade_key.key.access_key, trade_key.private_key, BOT_IP, "withdraw", BTC)
    assert result.decision is Decision.PERMISSION_DENIED


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"access_key": ""}, "access_key"),
        ({"client_ip": ""}, "client_ip"),
        ({"client_ip": "256.1.1.1"}, "client_ip"),
        ({"client_ip": "10.0.0.0/8"}, "client_ip"),
        ({"client_ip": "fe80::1%eth0"}, "client_ip"),
        ({"required_permission": "withdraw"}, "destination"),
        ({"destination": BTC}, "destination"),
        ({"required_permission": "withdraw", "destination": WithdrawalDestination("", "x")}, "destination.asset"),
        ({"required_permission": "withdraw", "destination": WithdrawalDestination("B TC", "x")}, "destination.asset"),
        ({"required_permission": "withdraw", "destination": WithdrawalDestination("BTC", "")}, "destination.address"),
        (
            {"required_permission": "withdraw", "destination": WithdrawalDestination("BTC", "a b")},
            "destination.address",
        ),
        (
            {"required_permission": "withdraw", "destination": WithdrawalDestination("BTC", "x", "m\x00")},
            "destination.memo",
        ),
    ],
)
def test_malformed_requests_are_invalid_argument(
    client: Client, trade_key: CreatedKey, kwargs: dict[str, object], field: str
) -> None:
    request: dict[str, object] = {
        "access_key": trade_key.key.access_key,
        "private_key": trade_key.private_key,
        "client_ip": BOT_IP,
        "required_permission": "read",
        **kwargs,
    }
    with pytest.raises(InvalidArgument) as err:
        client.authorize(**request)  # type: ignore[arg-type]
    assert err.value.fields == (field,)
