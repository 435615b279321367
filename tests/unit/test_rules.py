"""The decision rules and their building blocks, without gRPC, a server or a database: the order
of the state checks, key rules, rotation grace, IP parsing, the failure limiter (on an injected
clock) and the verification cache. Each runs in microseconds; the integration tests prove the
same rules end to end through a real server."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from keyguard import AuthorizeResult, Decision, KeyType, Permission
from keyguard_server._secrets import ACCESS_KEY_RE, is_well_formed_private_key, new_access_key, new_private_key
from keyguard_server._validation import client_address, parse_allowed_ip
from keyguard_server._verify import FailureLimiter, VerificationCache, client_network
from keyguard_server.authorize._domain import DAY_US, KeyRow
from keyguard_server.authorize._rules import RULES, evaluate, management_on
from tests.rule_facts import facts, verdict

BOT = client_address("203.0.113.7")
NOW = 1_000 * DAY_US


def row(**fields: Any) -> KeyRow:
    """A TRADE key row, open to every IP, enabled, never expiring, unless ``fields`` say otherwise."""
    values: dict[str, Any] = {
        "account_id": "acct",
        "name": "bot",
        "permission": Permission.TRADE,
        "allowed_ips": "",
        "secret_hash": "now",
        "address_management": False,
        "enabled": True,
        "expires_at_us": None,
        "previous_secret_hash": "",
        "previous_valid_until_us": None,
        "key_type": KeyType.SECRET,
        "public_key": "",
        "previous_public_key": "",
    }
    return KeyRow(**{**values, **fields})


# -- the state checks, in the documented order (docs/security.md, the order of checks) -----------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"frozen": True, "enabled": False, "expires_at_us": 1, "allowed_ips": "10.0.0.1"}, Decision.ACCOUNT_FROZEN),
        ({"enabled": False, "expires_at_us": 1, "allowed_ips": "10.0.0.1"}, Decision.KEY_DISABLED),
        ({"expires_at_us": NOW, "allowed_ips": "10.0.0.1"}, Decision.KEY_EXPIRED),
        ({"expires_at_us": NOW + 1}, None),
        ({"allowed_ips": "10.0.0.1 198.51.100.0/24"}, Decision.IP_NOT_ALLOWED),
        ({"allowed_ips": "10.0.0.1 203.0.113.0/24"}, None),
    ],
    ids=["open key", "frozen first", "disabled before expired", "expired before IP", "expires later", "IP", "IP in"],
)
def test_state_refusal_order(fields: dict[str, Any], expected: Decision | None) -> None:
    assert verdict(RULES.before, row(**fields), NOW) is expected
    result = evaluate(RULES, facts(row(**fields), NOW))  # an empty secret: refused at the credential
    assert isinstance(result, AuthorizeResult) and result.decision is (expected or Decision.BAD_SECRET)
    assert result.account_id == ""  # no identity before the credential


def test_symbol_list_applies_to_trade_requests_only() -> None:
    listed = row(symbols="BTCUSDT ETH-USDT")
    assert verdict(RULES.after, listed, NOW, Permission.TRADE, "BTCUSDT") is None
    assert verdict(RULES.after, listed, NOW, Permission.TRADE, "XRPUSDT") is Decision.SYMBOL_NOT_ALLOWED
    assert verdict(RULES.after, listed, NOW, Permission.TRADE, "") is Decision.SYMBOL_NOT_ALLOWED
    assert verdict(RULES.after, listed, NOW, Permission.READ, "") is None
    assert verdict(RULES.after, row(), NOW, Permission.TRADE, "ANY") is None


def test_a_pending_off_keeps_address_management_on_until_it_is_due() -> None:
    assert management_on(True, None, NOW) and management_on(True, NOW + 1, NOW)
    assert not management_on(True, NOW, NOW) and not management_on(False, None, NOW)


def test_the_rotated_out_secret_is_accepted_only_within_its_grace() -> None:
    rotated = row(previous_secret_hash="before", previous_valid_until_us=NOW + 1)
    assert rotated.in_grace(NOW) and rotated.accepts_hash("before", NOW) and rotated.accepts_hash("now", NOW)
    assert not rotated.in_grace(NOW + 1) and not rotated.accepts_hash("before", NOW + 1)
    assert not row().accepts_hash("", NOW)  # no previous secret: "" is no hash


# -- key formats and IP parsing ------------------------------------------------------------


def test_generated_keys_have_the_checked_formats() -> None:
    assert ACCESS_KEY_RE.fullmatch(new_access_key())
    secret = new_private_key()
    assert is_well_formed_private_key(secret)
    assert not is_well_formed_private_key(secret[:-1] + ("A" if secret[-1] != "A" else "B"))  # checksum


@pytest.mark.parametrize(
    ("raw", "parsed"),
    [
        ("203.0.113.7", ipaddress.ip_address("203.0.113.7")),
        ("198.51.100.0/24", ipaddress.ip_network("198.51.100.0/24")),
        ("::ffff:203.0.113.7", ipaddress.ip_address("203.0.113.7")),  # IPv4-mapped: the IPv4 address
    ],
    ids=["address", "network", "IPv4-mapped"],
)
def test_allowlist_entries(raw: str, parsed: object) -> None:
    assert parse_allowed_ip(raw) == parsed


@pytest.mark.parametrize("raw", [" 203.0.113.7", "203.0.113.7\n", "fe80::1%eth0", "10.0.0.1/33", "host"])
def test_malformed_allowlist_entries_are_refused(raw: str) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_allowed_ip(raw)


def test_client_networks_group_ipv6_by_64() -> None:
    assert client_network(client_address("2001:db8::1")) == client_network(client_address("2001:db8::ffff"))
    assert client_network(client_address("2001:db8:0:1::1")) != client_network(client_address("2001:db8::1"))
    assert client_network(client_address("192.0.2.1")) != client_network(client_address("192.0.2.2"))


# -- the failure limiter, on a clock the test moves ----------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_failures_empty_a_bucket_that_refills_with_time() -> None:
    clock = Clock()
    limiter = FailureLimiter(burst=2, per_second=0.5, clock=clock)
    assert limiter.spend("k") and limiter.spend("k")
    assert limiter.hold("k") is False  # empty: refused
    clock.now = 2.0  # one token back
    assert limiter.hold("k") is True
    limiter.release("k", failed=False)  # not a failure: given back
    assert limiter.hold("k") is True


def test_held_tokens_make_the_next_attempt_wait_not_fail() -> None:
    limiter = FailureLimiter(burst=1, per_second=0.0, clock=Clock())
    assert limiter.hold("k", "net") is True
    assert limiter.hold("k", "net") is None  # only held, not spent: wait for it to settle
    limiter.release("k", "net", failed=True)
    assert limiter.hold("k", "net") is False
    assert limiter.hold("other key", "other net") is True  # buckets are independent


def test_refund_gives_a_spent_token_back() -> None:
    limiter = FailureLimiter(burst=1, per_second=0.0, clock=Clock())
    limiter.spend("k")
    limiter.refund("k")
    assert limiter.hold("k") is True


# -- the verification cache -----------------------------------------------------------------


def test_the_cache_remembers_a_secret_per_stored_hash_and_forgets_the_oldest() -> None:
    cache = VerificationCache(2)
    cache.remember("hash-1", "secret")
    assert cache.hit("hash-1", "secret")
    assert not cache.hit("hash-2", "secret") and not cache.hit("hash-1", "other")  # re-keyed: no revival
    cache.remember("hash-2", "secret")
    cache.remember("hash-3", "secret")
    assert len(cache) == 2 and not cache.hit("hash-1", "secret")
