"""Exchange-grade protections (issue 14): address holds, delayed address-management off,
unrestricted keys lapsing, per-key symbol lists, frozen accounts.

Time is moved, never waited for: the server's ``Authorizer.clock`` and ``KeyManager.clock``
(µs since the epoch) are set forward together, as days passing would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from keyguard import (
    AuditAction,
    Client,
    CreatedKey,
    Decision,
    FailedPrecondition,
    InvalidArgument,
    KeyType,
    Permission,
    WithdrawalDestination,
)
from keyguard_server.authorize._domain import DAY_US, KeyRow, now_us
from keyguard_server.authorize._rules import RULES, management_on
from tests.conftest import RunningServer, StartServer
from tests.rule_facts import verdict

# Storage-dependent: freezes, holds and pending changes are stored and read in the one lookup.
pytestmark = pytest.mark.all_backends

BOT_IP = "203.0.113.7"
HOLD = timedelta(hours=24)  # the default address_hold_seconds
LAPSE_DAYS = 90
COLD = WithdrawalDestination("BTC", "bc1qcold")

Later = Callable[..., contextlib.AbstractContextManager[None]]


@pytest.fixture(scope="module")
def guarded(launch: StartServer) -> Iterator[RunningServer]:
    """Default holds, and the unrestricted-key policy on."""
    running = launch(failure_burst=100_000, unrestricted_key_days=LAPSE_DAYS)
    yield running
    running.stop()


@pytest.fixture
def kg(guarded: RunningServer) -> Iterator[Client]:
    with guarded.client() as c:
        yield c


@pytest.fixture
def later(guarded: RunningServer) -> Iterator[Later]:
    """``with later(days=1):`` the server's clocks run that much ahead (restored after the test)."""
    authorizer, manager = guarded.server.authorizer, guarded.server.manager
    assert authorizer is not None and manager is not None

    @contextlib.contextmanager
    def ahead(**delta: float) -> Iterator[None]:
        offset = int(timedelta(**delta).total_seconds() * 1e6)
        authorizer.clock = manager.clock = lambda: now_us() + offset
        try:
            yield
        finally:
            authorizer.clock = manager.clock = now_us

    try:
        yield ahead
    finally:
        authorizer.clock = manager.clock = now_us


def withdraw(kg: Client, key: CreatedKey, to: WithdrawalDestination = COLD) -> Decision:
    return kg.authorize(key.key.access_key, key.private_key, BOT_IP, "withdraw", to).decision


def trade(kg: Client, key: CreatedKey, symbol: str = "", need: str = "trade") -> Decision:
    return kg.authorize(key.key.access_key, key.private_key, BOT_IP, need, symbol=symbol).decision


def actions(kg: Client, account: str) -> list[AuditAction]:
    return [e.action for e in reversed(kg.list_audit_events(account)[0])]


# -- 1. new whitelist addresses are held -------------------------------------------


def test_a_new_address_is_on_hold_until_it_becomes_usable(kg: Client, account: str, later: Later) -> None:
    key = kg.create_key(account, "treasury", "withdraw", [BOT_IP])
    kg.set_address_management(account, True)
    entry = kg.add_withdrawal_address(account, "BTC", "bc1qcold")
    assert entry.usable_from is not None
    assert abs(entry.usable_from - (entry.created_at + HOLD)) < timedelta(seconds=1)
    assert kg.list_withdrawal_addresses(account) == [entry]
    result = kg.authorize(key.key.access_key, key.private_key, BOT_IP, "withdraw", COLD)
    # Whitelisted but not yet usable; told after the secret was proven, like the whitelist.
    assert (result.allowed, result.decision, result.account_id) == (False, Decision.ADDRESS_ON_HOLD, account)
    assert withdraw(kg, key, WithdrawalDestination("BTC", "bc1qthief")) is Decision.ADDRESS_NOT_WHITELISTED
    with later(hours=23, minutes=59):
        assert withdraw(kg, key) is Decision.ADDRESS_ON_HOLD
    with later(hours=24, seconds=1):
        assert withdraw(kg, key) is Decision.ALLOW
        kg.remove_withdrawal_address(account, entry.id)  # removal is immediate
        assert withdraw(kg, key) is Decision.ADDRESS_NOT_WHITELISTED


def test_holds_do_not_matter_with_address_management_off(kg: Client, account: str) -> None:
    key = kg.create_key(account, "treasury", "withdraw", [BOT_IP])
    kg.add_withdrawal_address(account, "BTC", "bc1qcold")
    assert withdraw(kg, key) is Decision.ALLOW  # off: any destination


def test_without_a_hold_an_address_is_usable_at_once(client: Client, account: str) -> None:
    """The shared server runs with address_hold_seconds = 0."""
    key = client.create_key(account, "treasury", "withdraw", [BOT_IP])
    client.set_address_management(account, True)
    entry = client.add_withdrawal_address(account, "BTC", "bc1qcold")
    assert entry.usable_from == entry.created_at
    assert client.authorize(key.key.access_key, key.private_key, BOT_IP, "withdraw", COLD).allowed


# -- 2. address management: off is delayed, on is immediate --------------------------


def test_turning_address_management_off_takes_the_hold(kg: Client, account: str, later: Later) -> None:
    key = kg.create_key(account, "treasury", "withdraw", [BOT_IP])
    kg.set_address_management(account, True)
    asked = datetime.now(UTC)
    settings = kg.set_address_management(account, False)
    assert settings.address_management  # still on...
    off_at = settings.address_management_off_at
    assert off_at is not None and abs(off_at - (asked + HOLD)) < timedelta(seconds=2)  # ...until then
    assert kg.get_account_settings(account) == settings
    assert withdraw(kg, key) is Decision.ADDRESS_NOT_WHITELISTED  # still enforced by Authorize
    assert kg.set_address_management(account, False) == settings  # asking again restarts nothing
    with later(hours=24, seconds=2):
        now_off = kg.get_account_settings(account)
        assert (now_off.address_management, now_off.address_management_off_at) == (False, None)
        assert withdraw(kg, key) is Decision.ALLOW
    assert actions(kg, account) == [
        AuditAction.KEY_CREATED,
        AuditAction.ADDRESS_MANAGEMENT_ENABLED,
        AuditAction.ADDRESS_MANAGEMENT_OFF_REQUESTED,  # once: the repeated request changed nothing
    ]
    requested = kg.list_audit_events(account)[0][0]
    assert requested.details["effective_at_us"].isdigit()


def test_turning_address_management_on_is_immediate_and_cancels_a_pending_off(
    kg: Client, account: str, later: Later
) -> None:
    key = kg.create_key(account, "treasury", "withdraw", [BOT_IP])
    assert withdraw(kg, key) is Decision.ALLOW
    assert kg.set_address_management(account, True).address_management
    assert withdraw(kg, key) is Decision.ADDRESS_NOT_WHITELISTED  # at once
    assert kg.set_address_management(account, False).address_management_off_at is not None
    settings = kg.set_address_management(account, True)
    assert (settings.address_management, settings.address_management_off_at) == (True, None)
    with later(days=2):
        assert kg.get_account_settings(account).address_management
        assert withdraw(kg, key) is Decision.ADDRESS_NOT_WHITELISTED
    assert actions(kg, account)[1:] == [
        AuditAction.ADDRESS_MANAGEMENT_ENABLED,
        AuditAction.ADDRESS_MANAGEMENT_OFF_REQUESTED,
        AuditAction.ADDRESS_MANAGEMENT_OFF_CANCELLED,
    ]


def test_management_off_is_immediate_without_a_hold(client: Client, account: str) -> None:
    client.set_address_management(account, True)
    settings = client.set_address_management(account, False)
    assert (settings.address_management, settings.address_management_off_at) == (False, None)
    assert actions(client, account) == [
        AuditAction.ADDRESS_MANAGEMENT_ENABLED,
        AuditAction.ADDRESS_MANAGEMENT_DISABLED,
    ]


# -- 3. unrestricted keys lapse -----------------------------------------------------


def test_an_unrestricted_trade_key_loses_trading_after_the_policy_days(kg: Client, account: str, later: Later) -> None:
    trader = kg.create_key(account, "trader", "trade")
    until = trader.key.unrestricted_until
    assert until is not None
    assert abs(until - (trader.key.created_at + timedelta(days=LAPSE_DAYS))) < timedelta(seconds=1)
    assert kg.get_key(account, trader.key.access_key).unrestricted_until == until
    assert kg.create_key(account, "reader", "read").key.unrestricted_until is None  # READ: no policy
    assert kg.create_key(account, "fenced", "trade", [BOT_IP]).key.unrestricted_until is None
    assert trade(kg, trader) is Decision.ALLOW
    with later(days=LAPSE_DAYS, seconds=1):
        result = kg.authorize(trader.key.access_key, trader.private_key, BOT_IP, "trade")
        assert (result.decision, result.account_id) == (Decision.IP_RESTRICTION_REQUIRED, account)
        assert trade(kg, trader, need="read") is Decision.ALLOW  # READ keeps working
        restricted = kg.update_key(account, trader.key.access_key, allowed_ips=[BOT_IP])
        assert restricted.unrestricted_until is None
        assert trade(kg, trader) is Decision.ALLOW  # an allowlist restores it
        # Emptying the list again starts a new period, from now.
        reopened = kg.update_key(account, trader.key.access_key, allowed_ips=[])
        assert reopened.unrestricted_until is not None and reopened.unrestricted_until > until
        assert trade(kg, trader) is Decision.ALLOW
    with later(days=2 * LAPSE_DAYS, seconds=2):
        assert trade(kg, trader) is Decision.IP_RESTRICTION_REQUIRED


def test_updates_that_keep_a_list_empty_do_not_restart_the_period(kg: Client, account: str) -> None:
    trader = kg.create_key(account, "trader", "trade")
    renamed = kg.update_key(account, trader.key.access_key, name="renamed", allowed_ips=[])
    assert renamed.unrestricted_until == trader.key.unrestricted_until


def test_the_policy_is_off_by_default(client: Client, account: str) -> None:
    trader = client.create_key(account, "trader", "trade")
    assert trader.key.unrestricted_until is None


WHOLE_INTERNET = ["0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1"]
EVERY_ENTRY = [f"allowed_ips[{i}]" for i in range(len(WHOLE_INTERNET))]


def test_an_allowlist_covering_the_internet_does_not_dodge_the_lapse(kg: Client, account: str) -> None:
    """With the policy on, a TRADE or WITHDRAW key's allowlist counts as a restriction only if
    every entry is as narrow as a WITHDRAW key's must be; a wider one is refused, not stored."""
    for level in ("trade", "withdraw"):
        with pytest.raises(InvalidArgument) as err:
            kg.create_key(account, f"{level}-anywhere", level, WHOLE_INTERNET)
        assert list(err.value.fields) == EVERY_ENTRY
        assert err.value.violations[0].description == f"a {level.upper()} key's networks must be /24 or narrower"
    assert err.value.violations[3].description == "a WITHDRAW key's networks must be /48 or narrower"  # 8000::/1
    with pytest.raises(InvalidArgument) as err:  # all of IPv4 behind NAT64 is as wide as 0.0.0.0/0
        kg.create_key(account, "nat64", "trade", ["64:ff9b::/96", "198.51.100.0/24", "2001:db8::/48"])
    assert list(err.value.fields) == ["allowed_ips[0]"]
    assert kg.list_keys(account) == []

    trader = kg.create_key(account, "trader", "trade", [BOT_IP])
    with pytest.raises(InvalidArgument) as err:
        kg.update_key(account, trader.key.access_key, allowed_ips=WHOLE_INTERNET)
    assert list(err.value.fields) == EVERY_ENTRY
    assert kg.get_key(account, trader.key.access_key) == trader.key

    # READ keys are not under the policy; their list cannot be carried into TRADE by an upgrade.
    reader = kg.create_key(account, "reader", "read", WHOLE_INTERNET)
    assert reader.key.allowed_ips == tuple(WHOLE_INTERNET)
    with pytest.raises(InvalidArgument) as err:
        kg.update_key(account, reader.key.access_key, permission="trade")
    assert list(err.value.fields) == EVERY_ENTRY
    assert kg.get_key(account, reader.key.access_key).permission is Permission.READ
    narrowed = kg.update_key(account, reader.key.access_key, permission="trade", allowed_ips=["198.51.100.0/24"])
    assert (narrowed.permission, narrowed.unrestricted_until) == (Permission.TRADE, None)
    assert actions(kg, account) == [AuditAction.KEY_CREATED, AuditAction.KEY_CREATED, AuditAction.KEY_UPDATED]


def test_wide_trade_allowlists_are_accepted_with_the_policy_off(client: Client, account: str) -> None:
    assert client.create_key(account, "trader", "trade", WHOLE_INTERNET).key.allowed_ips == tuple(WHOLE_INTERNET)


def auth_row(permission: Permission, allowed_ips: str, unrestricted_since_us: int | None) -> KeyRow:
    return KeyRow(
        "acct", "bot", permission, allowed_ips, "", False, True, None, "", None, KeyType.SECRET, "", "",
        unrestricted_since_us=unrestricted_since_us,
    )  # fmt: skip


def test_the_lapse_rule_covers_withdraw_and_only_unrestricted_keys() -> None:
    """The pure rule: TRADE and WITHDRAW requests of a key unrestricted too long; nothing else."""
    since = 1_000 * DAY_US
    row = auth_row(Permission.WITHDRAW, "", since)
    lapsed = since + 90 * DAY_US
    assert (
        verdict(RULES.after, row, lapsed, Permission.WITHDRAW, lapse_us=90 * DAY_US) is Decision.IP_RESTRICTION_REQUIRED
    )
    assert verdict(RULES.after, row, lapsed, Permission.TRADE, lapse_us=90 * DAY_US) is Decision.IP_RESTRICTION_REQUIRED
    assert verdict(RULES.after, row, lapsed, Permission.READ, lapse_us=90 * DAY_US) is None
    assert verdict(RULES.after, row, lapsed - 1, Permission.TRADE, lapse_us=90 * DAY_US) is None
    assert verdict(RULES.after, row, lapsed, Permission.TRADE, lapse_us=0) is None  # policy off
    fenced = auth_row(Permission.TRADE, "10.0.0.1", None)
    assert verdict(RULES.after, fenced, lapsed, Permission.TRADE, lapse_us=90 * DAY_US) is None
    assert management_on(True, None, 5) and management_on(True, 6, 5)
    assert not management_on(True, 5, 5) and not management_on(False, None, 5)


# -- 4. per-key symbol lists ----------------------------------------------------------


def test_a_key_with_symbols_trades_only_those(kg: Client, account: str) -> None:
    key = kg.create_key(account, "btc-bot", "trade", [BOT_IP], symbols=["btcusdt", "Eth-Usdt", "SOL/USDC"])
    assert key.key.symbols == ("BTCUSDT", "ETH-USDT", "SOL/USDC")
    assert kg.get_key(account, key.key.access_key).symbols == key.key.symbols
    assert trade(kg, key, "BTCUSDT") is Decision.ALLOW
    assert trade(kg, key, "eth-usdt") is Decision.ALLOW  # any case
    result = kg.authorize(key.key.access_key, key.private_key, BOT_IP, "trade", symbol="XRPUSDT")
    assert (result.decision, result.account_id) == (Decision.SYMBOL_NOT_ALLOWED, account)
    assert trade(kg, key) is Decision.SYMBOL_NOT_ALLOWED  # a TRADE request must name its symbol
    assert trade(kg, key, need="read") is Decision.ALLOW  # READ is not about symbols
    with kg.authorizer(streams=1) as streamed:
        assert streamed.authorize(key.key.access_key, key.private_key, BOT_IP, "trade", symbol="btcusdt").allowed
    cleared = kg.update_key(account, key.key.access_key, symbols=[])
    assert cleared.symbols == ()
    assert trade(kg, key) is Decision.ALLOW
    assert kg.update_key(account, key.key.access_key, symbols=["ADAUSDT"]).symbols == ("ADAUSDT",)
    assert trade(kg, key, "BTCUSDT") is Decision.SYMBOL_NOT_ALLOWED


def test_symbols_do_not_restrict_withdrawals_or_keys_without_a_list(kg: Client, account: str) -> None:
    free = kg.create_key(account, "free", "trade", [BOT_IP])
    assert trade(kg, free) is Decision.ALLOW
    assert trade(kg, free, "ANYTHING") is Decision.ALLOW
    withdrawer = kg.create_key(account, "treasury", "withdraw", [BOT_IP], symbols=["BTCUSDT"])
    assert withdraw(kg, withdrawer) is Decision.ALLOW
    assert trade(kg, withdrawer, "ETHUSDT") is Decision.SYMBOL_NOT_ALLOWED


@pytest.mark.parametrize(
    ("symbols", "fields"),
    [
        (["BTCUSDT", "bad symbol", "btcusdt", "X", "A" * 21, "BTC-"], ["symbols[1]", "symbols[2]", "symbols[3]",
                                                                      "symbols[4]", "symbols[5]"]),
        (["BTC--USDT", "BTC-USDT-X", "ÉTHUSDT", "BTC\u0000"], ["symbols[0]", "symbols[1]", "symbols[2]", "symbols[3]"]),
        ([f"SYM{i:03d}" for i in range(101)], ["symbols"]),
    ],
)  # fmt: skip
def test_bad_symbol_lists_are_refused_naming_each_entry(
    kg: Client, account: str, symbols: list[str], fields: list[str]
) -> None:
    with pytest.raises(InvalidArgument) as err:
        kg.create_key(account, "bot", "trade", symbols=symbols)
    assert list(err.value.fields) == fields
    key = kg.create_key(account, "bot", "trade", [BOT_IP])
    with pytest.raises(InvalidArgument) as err:
        kg.update_key(account, key.key.access_key, symbols=symbols)
    assert list(err.value.fields) == fields
    assert kg.get_key(account, key.key.access_key).symbols == ()


def test_a_malformed_request_symbol_is_invalid_argument(kg: Client, account: str) -> None:
    key = kg.create_key(account, "bot", "trade", [BOT_IP])
    with pytest.raises(InvalidArgument) as err:
        trade(kg, key, "BTC USDT")
    assert err.value.fields == ("symbol",)


# -- 5. frozen accounts -------------------------------------------------------------


def test_a_frozen_account_refuses_every_key_until_unfrozen(guarded: RunningServer, kg: Client, account: str) -> None:
    trader = kg.create_key(account, "trader", "trade", [BOT_IP])
    reader = kg.create_key(account, "reader", "read")
    neighbour = kg.create_key(account + "-other", "trader", "trade", [BOT_IP])
    assert trade(kg, trader) is Decision.ALLOW  # its secret is cached from here on
    settings = kg.freeze_account(account, reason="ticket 4711")
    assert settings.frozen and kg.get_account_settings(account).frozen
    authorizer = guarded.server.authorizer
    assert authorizer is not None
    runs = authorizer.hasher.verifications
    assert trade(kg, trader) is Decision.ACCOUNT_FROZEN
    result = kg.authorize(reader.key.access_key, reader.private_key, "198.51.100.1", "read")
    assert (result.decision, result.account_id) == (Decision.ACCOUNT_FROZEN, "")  # nothing told before the secret
    assert kg.authorize(reader.key.access_key, "kgsk_wrong", BOT_IP, "read").decision is Decision.ACCOUNT_FROZEN
    assert authorizer.hasher.verifications == runs  # decided before any argon2
    assert trade(kg, neighbour) is Decision.ALLOW  # other accounts are not touched
    assert len(kg.list_keys(account)) == 2  # keys are kept
    assert not kg.unfreeze_account(account).frozen
    assert trade(kg, trader) is Decision.ALLOW
    assert trade(kg, reader, need="read") is Decision.ALLOW
    events = [e for e in reversed(kg.list_audit_events(account)[0]) if e.action.name.startswith("ACCOUNT_")]
    assert [(e.action, e.details) for e in events] == [
        (AuditAction.ACCOUNT_FROZEN, {"reason": "ticket 4711"}),
        (AuditAction.ACCOUNT_UNFROZEN, {}),
    ]


def test_freezing_an_account_never_seen_holds_for_keys_made_later(kg: Client, account: str) -> None:
    assert not kg.get_account_settings(account).frozen
    assert kg.freeze_account(account).frozen
    with pytest.raises(FailedPrecondition):
        kg.create_key(account, "bot", "read")
    assert kg.list_keys(account) == []


def test_a_frozen_account_refuses_every_change_that_widens_access(kg: Client, account: str) -> None:
    """A hijacked manager session, the usual reason for a freeze, can queue nothing for the
    moment support unfreezes: no key, no rotation, no update, no address, no management off."""
    trader = kg.create_key(account, "trader", "trade", [BOT_IP])
    kg.set_address_management(account, True)
    entry = kg.add_withdrawal_address(account, "BTC", "bc1qcold")
    kg.freeze_account(account, reason="hijacked session")
    settings = kg.get_account_settings(account)
    events = kg.list_audit_events(account)[0]
    refused: list[Callable[[], object]] = [
        lambda: kg.create_key(account, "thief", "withdraw", [BOT_IP]),
        lambda: kg.create_key(account, "thief", "read"),
        lambda: kg.rotate_key(account, trader.key.access_key),
        lambda: kg.update_key(account, trader.key.access_key, allowed_ips=[]),
        lambda: kg.update_key(account, trader.key.access_key, name="renamed"),  # any field
        lambda: kg.update_key(account, trader.key.access_key, enabled=False),
        lambda: kg.add_withdrawal_address(account, "BTC", "bc1qthief"),
        lambda: kg.set_address_management(account, False),
    ]
    for change in refused:
        with pytest.raises(FailedPrecondition) as err:
            change()
        frozen = f"account {account!r} is frozen; unfreeze it first"
        assert (err.value.code, err.value.message) == (grpc.StatusCode.FAILED_PRECONDITION, frozen)
    # A refused change wrote nothing.
    assert kg.list_audit_events(account)[0] == events
    assert kg.list_keys(account) == [trader.key]
    assert kg.list_withdrawal_addresses(account) == [entry]
    assert kg.get_account_settings(account) == settings
    # What narrows access stays allowed.
    assert kg.set_address_management(account, True).address_management
    kg.remove_withdrawal_address(account, entry.id)
    kg.delete_key(account, trader.key.access_key)
    assert kg.delete_all_keys(account) == 0
    kg.unfreeze_account(account)
    assert trade(kg, kg.create_key(account, "bot", "trade", [BOT_IP])) is Decision.ALLOW


@pytest.mark.parametrize("change", ["create", "rotate"])
def test_a_freeze_racing_a_change_wins(
    guarded: RunningServer, kg: Client, account: str, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """The freeze commits while the change hashes its new secret, after any early look at the
    account: the change's own transaction still sees the freeze and refuses."""
    manager = guarded.server.manager
    assert manager is not None
    trader = kg.create_key(account, "trader", "trade", [BOT_IP])
    credential = manager._credential

    async def freeze_meanwhile(kind: KeyType, public_key: str) -> tuple[str, str, str]:
        made = await credential(kind, public_key)
        await manager._store.set_frozen(caller="support", account_id=account, frozen=True, reason="race")
        return made

    monkeypatch.setattr(manager, "_credential", freeze_meanwhile)
    changes: dict[str, Callable[[], object]] = {
        "create": lambda: kg.create_key(account, "thief", "trade", [BOT_IP]),
        "rotate": lambda: kg.rotate_key(account, trader.key.access_key),
    }
    with pytest.raises(FailedPrecondition):
        changes[change]()
    assert kg.list_keys(account) == [trader.key]
    assert actions(kg, account) == [AuditAction.KEY_CREATED, AuditAction.ACCOUNT_FROZEN]


def test_freeze_validates_its_input(kg: Client, account: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        kg.freeze_account("", reason="x" * 257)
    assert err.value.fields == ("account_id", "reason")
    with pytest.raises(InvalidArgument) as err:
        kg.unfreeze_account(account, reason="line\nbreak")
    assert err.value.fields == ("reason",)
    assert kg.list_audit_events(account)[0] == []


def test_a_freeze_through_one_replica_holds_on_the_other_at_once(start_server: StartServer, account: str) -> None:
    first = start_server()
    second = start_server(data_dir=first.config.data_dir)  # the same database
    with first.client() as a, second.client() as b:
        key = a.create_key(account, "bot", "trade", [BOT_IP], symbols=["BTCUSDT"])
        assert trade(b, key, "BTCUSDT") is Decision.ALLOW  # B has verified (and cached) its secret
        a.freeze_account(account)
        assert trade(b, key, "BTCUSDT") is Decision.ACCOUNT_FROZEN
        a.unfreeze_account(account)
        assert trade(b, key, "BTCUSDT") is Decision.ALLOW
        a.update_key(account, key.key.access_key, symbols=["ETHUSDT"])
        assert trade(b, key, "BTCUSDT") is Decision.SYMBOL_NOT_ALLOWED
        # Address management on through A: B holds it at once; a pending off is still on for B.
        a.set_address_management(account, True)
        withdrawer = a.create_key(account, "treasury", "withdraw", [BOT_IP])
        assert withdraw(b, withdrawer) is Decision.ADDRESS_NOT_WHITELISTED
        a.add_withdrawal_address(account, COLD.asset, COLD.address)
        assert withdraw(b, withdrawer) is Decision.ADDRESS_ON_HOLD
        a.set_address_management(account, False)
        assert withdraw(b, withdrawer, WithdrawalDestination("BTC", "bc1qthief")) is Decision.ADDRESS_NOT_WHITELISTED
