"""Account settings and the withdrawal-address whitelist."""

from __future__ import annotations

import pytest

from keyguard import AlreadyExists, Client, LimitExceeded, NotFound
from tests.conftest import StartServer

# Storage-dependent: whitelist storage and its limits.
pytestmark = pytest.mark.all_backends


def test_unknown_account_has_the_defaults(client: Client, account: str) -> None:
    settings = client.get_account_settings(account)
    assert (settings.account_id, settings.address_management, settings.key_count, settings.max_keys) == (
        account,
        False,
        0,
        16,
    )
    assert client.list_withdrawal_addresses(account) == []


def test_address_management_toggles_and_is_per_account(client: Client, account: str) -> None:
    assert client.set_address_management(account, True).address_management
    assert client.get_account_settings(account).address_management
    assert not client.get_account_settings(account + "-other").address_management
    assert not client.set_address_management(account, False).address_management
    assert not client.get_account_settings(account).address_management


def test_add_list_remove(client: Client, account: str) -> None:
    first = client.add_withdrawal_address(account, "usdt-trc20", "TXYZabc123", label="treasury")
    second = client.add_withdrawal_address(account, "XRP", "rAddr", memo="42", label="exchange")
    assert (first.asset, first.address, first.memo, first.label) == ("USDT-TRC20", "TXYZabc123", "", "treasury")
    assert client.list_withdrawal_addresses(account) == [first, second]
    client.remove_withdrawal_address(account, first.id)
    assert client.list_withdrawal_addresses(account) == [second]
    with pytest.raises(NotFound):
        client.remove_withdrawal_address(account, first.id)


def test_same_address_with_another_memo_or_asset_is_another_entry(client: Client, account: str) -> None:
    client.add_withdrawal_address(account, "XRP", "rAddr", memo="1")
    client.add_withdrawal_address(account, "XRP", "rAddr", memo="2")
    client.add_withdrawal_address(account, "XRP", "rAddr")
    client.add_withdrawal_address(account, "XLM", "rAddr")
    with pytest.raises(AlreadyExists):
        client.add_withdrawal_address(account, "xrp", "rAddr", memo="1", label="different label")
    assert len(client.list_withdrawal_addresses(account)) == 4


def test_entries_of_another_account_cannot_be_removed(client: Client, account: str) -> None:
    entry = client.add_withdrawal_address(account, "BTC", "bc1q")
    with pytest.raises(NotFound):
        client.remove_withdrawal_address(account + "-intruder", entry.id)
    assert client.list_withdrawal_addresses(account) == [entry]


def test_whitelist_size_is_limited(start_server: StartServer, account: str) -> None:
    with start_server(max_withdrawal_addresses=2).client() as client:
        client.add_withdrawal_address(account, "BTC", "a")
        client.add_withdrawal_address(account, "BTC", "b")
        with pytest.raises(LimitExceeded):
            client.add_withdrawal_address(account, "BTC", "c")
