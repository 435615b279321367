"""The audit log: every change, written with the change, readable newest first."""

from __future__ import annotations

import pytest

from keyguard import AlreadyExists, AuditAction, Client, InvalidArgument, LimitExceeded, NotFound
from tests.conftest import StartServer

# Storage-dependent: the audit log's storage and paging.
pytestmark = pytest.mark.all_backends


def actions(client: Client, account: str) -> list[tuple[AuditAction, str]]:
    events, _ = client.list_audit_events(account, page_size=500)
    return [(e.action, e.access_key) for e in reversed(events)]


def test_every_change_is_recorded_with_caller_and_details(client: Client, account: str) -> None:
    created = client.create_key(account, "bot", "withdraw", ["192.0.2.1", "10.0.0.0/24"])
    ak = created.key.access_key
    other = client.create_key(account, "other", "read").key.access_key
    client.set_address_management(account, True)
    entry = client.add_withdrawal_address(account, "BTC", "bc1q", memo="7")
    client.remove_withdrawal_address(account, entry.id)
    client.set_address_management(account, False)
    client.delete_key(account, other)
    client.delete_all_keys(account)

    events, next_token = client.list_audit_events(account)
    assert next_token == ""
    assert [(e.action, e.access_key) for e in reversed(events)] == [
        (AuditAction.KEY_CREATED, ak),
        (AuditAction.KEY_CREATED, other),
        (AuditAction.ADDRESS_MANAGEMENT_ENABLED, ""),
        (AuditAction.ADDRESS_ADDED, ""),
        (AuditAction.ADDRESS_REMOVED, ""),
        (AuditAction.ADDRESS_MANAGEMENT_DISABLED, ""),
        (AuditAction.KEY_DELETED, other),
        (AuditAction.ALL_KEYS_DELETED, ""),
    ]
    assert {e.caller for e in events} == {"admin"}
    assert {e.account_id for e in events} == {account}
    assert [e.time for e in events] == sorted((e.time for e in events), reverse=True)
    newest = events[0]
    assert newest.details == {"count": "1", "access_keys": ak}
    first = events[-1]
    assert first.details == {"name": "bot", "permission": "WITHDRAW", "allowed_ips": "192.0.2.1 10.0.0.0/24"}
    added = events[4]
    assert added.details.pop("usable_from_us").isdigit()  # when its hold ends (test_protections.py)
    assert added.details == {"id": str(entry.id), "asset": "BTC", "address": "bc1q", "memo": "7"}
    for event in events:
        assert created.private_key not in repr(event)


def test_refused_changes_leave_no_event(start_server: StartServer, account: str) -> None:
    with start_server(max_keys_per_account=1, max_withdrawal_addresses=1).client() as client:
        client.create_key(account, "bot", "read")
        client.add_withdrawal_address(account, "BTC", "a")
        before = actions(client, account)
        with pytest.raises(LimitExceeded):
            client.create_key(account, "second", "read")
        with pytest.raises(LimitExceeded):
            client.add_withdrawal_address(account, "BTC", "b")
        with pytest.raises(NotFound):
            client.delete_key(account, "kg_" + "z" * 24)
        with pytest.raises(NotFound):
            client.remove_withdrawal_address(account, 10**9)
        with pytest.raises(InvalidArgument):
            client.create_key(account, "", "read")
        client.delete_all_keys(account)
        with pytest.raises(AlreadyExists):
            client.add_withdrawal_address(account, "BTC", "a")
        assert actions(client, account) == [*before, (AuditAction.ALL_KEYS_DELETED, "")]


def test_pages_newest_first(client: Client, account: str) -> None:
    for i in range(7):
        client.create_key(account, f"bot {i}", "read")
    pages: list[list[str]] = []
    token = ""
    while True:
        events, token = client.list_audit_events(account, page_size=3, page_token=token)
        pages.append([e.details["name"] for e in events])
        if not token:
            break
    assert pages == [["bot 6", "bot 5", "bot 4"], ["bot 3", "bot 2", "bot 1"], ["bot 0"]]


def test_all_accounts_when_no_account_is_given(client: Client, account: str) -> None:
    client.create_key(account + "-a", "bot", "read")
    client.create_key(account + "-b", "bot", "read")
    events, _ = client.list_audit_events(page_size=2)
    assert [e.account_id for e in events] == [account + "-b", account + "-a"]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"page_size": 501}, "page_size"),
        ({"page_token": "abc"}, "page_token"),
        ({"page_token": "-1"}, "page_token"),
        ({"page_token": "9" * 30}, "page_token"),
        ({"account_id": "a b"}, "account_id"),
    ],
)
def test_bad_paging_is_invalid_argument(client: Client, kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        client.list_audit_events(**kwargs)  # type: ignore[arg-type]
    assert err.value.fields == (field,)
