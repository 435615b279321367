"""The no-wait path and the full path run one list of rules, so they cannot disagree: on
generated key rows (written to a real server's SQLite file from outside, as another replica
would), requests and clock times, every request both decide gets the same answer, also when
the no-wait path answers from an outcome it kept at an earlier moment. And a rule added with
a horizon ends the outcomes kept before it at exactly that moment.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyguard import AuthorizeResult, Decision, InvalidArgument, Permission, WithdrawalDestination
from keyguard_server.authorize._authorizer import Authorizer
from keyguard_server.authorize._domain import DAY_US, LATER, Later, Query, now_us
from keyguard_server.authorize._rules import RULES, Facts, Pass, Refuse, Rules, Step
from keyguard_server.store._schema import AccountModel, AddressModel, KeyModel
from tests.conftest import RunningServer, StartServer

T0 = now_us() + 365 * DAY_US  # the moment every generated time is near
LAPSE_DAYS = 30
ADDRESS = WithdrawalDestination("BTC", "bc1qexampleexampleexampleexample00", "")
# Offsets (µs) around a boundary: just before, at, just after, and far from it.
NEAR = st.sampled_from([-DAY_US, -1, 0, 1, DAY_US])
Answer = AuthorizeResult | Later | tuple[str, ...]  # tuple: the fields an InvalidArgument named


@dataclass
class Fixture:
    server: RunningServer
    authorizer: Authorizer
    access_key: str
    secret: str
    account: str
    secret_hash: str


@pytest.fixture(scope="module")
def setup(launch: StartServer) -> Iterator[Fixture]:
    server = launch(unrestricted_key_days=LAPSE_DAYS, failure_burst=1_000_000, last_used_flush_seconds=3600)
    try:
        authorizer = server.server.authorizer
        assert authorizer is not None
        with server.client() as client:
            created = client.create_key("acct-rules", "bot", "withdraw", ["203.0.113.0/24"])
            client.add_withdrawal_address("acct-rules", ADDRESS.asset, ADDRESS.address)
        ((secret_hash,),) = server.sql(
            f"SELECT secret_hash FROM {KeyModel._meta.table_name} WHERE access_key = ?", (created.key.access_key,)
        )
        with server.client() as client:  # argon2 once: the no-wait path then decides the right secret too
            assert client.authorize(created.key.access_key, created.private_key, "203.0.113.5", "read").allowed
        yield Fixture(server, authorizer, created.key.access_key, created.private_key, "acct-rules", secret_hash)
    finally:
        server.stop()


def rows() -> st.SearchStrategy[dict[str, Any]]:
    """A key row's and its account's columns, times near T0."""
    near_t0 = NEAR.map(lambda d: T0 + d)
    return st.fixed_dictionaries(
        {
            "permission": st.sampled_from([1, 2, 3]),
            "allowed_ips": st.sampled_from(["", "203.0.113.0/24", "198.51.100.7", "2001:db8::/32"]),
            "enabled": st.booleans(),
            "expires_at_us": st.none() | near_t0,
            "symbols": st.sampled_from(["", "BTCUSDT", "BTCUSDT ETHUSDT"]),
            "unrestricted_since_us": st.none() | NEAR.map(lambda d: T0 - LAPSE_DAYS * DAY_US + d),
            "grace": st.none() | near_t0,  # the rotated-out hash is the current one's, valid until then
            "frozen": st.booleans(),
            "address_management": st.booleans(),
            "address_management_off_at_us": st.none() | near_t0,
            "usable_from_us": near_t0,
        }
    )


def queries(fixture: Fixture) -> st.SearchStrategy[Query]:
    return st.builds(
        lambda secret, ip, permission, symbol: Query(
            fixture.access_key,
            secret,
            ip,
            permission,
            ADDRESS if permission == 3 else None,
            None,
            symbol,
        ),
        st.sampled_from([fixture.secret, "", "kgsk_" + "A" * 43, fixture.secret[:-1] + "x"]),
        st.sampled_from(["203.0.113.5", "198.51.100.7", "2001:db8::1", "192.0.2.1", "not an ip"]),
        st.sampled_from([0, 1, 2, 3, 9]),
        st.sampled_from(["", "btcusdt", "XRPUSDT", "bad symbol!"]),
    )


def write(fixture: Fixture, row: dict[str, Any]) -> None:
    """The row, as a replica would write it: from outside this server's connections."""
    sql = fixture.server.sql
    grace = row["grace"]
    sql(
        f"UPDATE {KeyModel._meta.table_name} SET name = ?, permission = ?, allowed_ips = ?, enabled = ?, "
        "expires_at_us = ?, symbols = ?, unrestricted_since_us = ?, previous_secret_hash = ?, "
        "previous_valid_until_us = ? WHERE access_key = ?",
        (row.get("name", "bot"), row["permission"], row["allowed_ips"], row["enabled"], row["expires_at_us"],
         row["symbols"], row["unrestricted_since_us"], fixture.secret_hash if grace else "", grace, fixture.access_key),
    )  # fmt: skip
    sql(
        f"UPDATE {AccountModel._meta.table_name} SET frozen = ?, address_management = ?, "
        "address_management_off_at_us = ? WHERE account_id = ?",
        (row["frozen"], row["address_management"], row["address_management_off_at_us"], fixture.account),
    )
    sql(
        f"UPDATE {AddressModel._meta.table_name} SET usable_from_us = ? WHERE account_id = ?",
        (row["usable_from_us"], fixture.account),
    )


async def no_wait_then_full(authorizer: Authorizer, query: Query, kept_at: int, at: int) -> tuple[Answer, Answer]:
    """The no-wait path at ``at`` (after it kept what it could at ``kept_at``), then the full path at ``at``."""

    def asked(decide: Any) -> Any:
        try:
            return decide(query)
        except InvalidArgument as exc:
            return tuple(v.field for v in exc.violations)

    authorizer.clock = lambda: kept_at
    asked(authorizer._decide_now)
    authorizer.clock = lambda: at
    now = asked(authorizer._decide_now)
    try:
        later: Answer = await authorizer._decide_later(query)
    except InvalidArgument as exc:
        later = tuple(v.field for v in exc.violations)
    return now, later


@settings(
    max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data(), row=rows(), kept_at=NEAR.map(lambda d: T0 + d), at=NEAR.map(lambda d: T0 + d))
def test_the_no_wait_path_agrees_with_the_full_path(
    setup: Fixture, data: st.DataObject, row: dict[str, Any], kept_at: int, at: int
) -> None:
    query = data.draw(queries(setup))
    write(setup, row)
    now, later = setup.server.run(no_wait_then_full(setup.authorizer, query, kept_at, at))
    if now is not LATER:
        assert now == later, (row, query, kept_at, at)


def closes_at(moment: int) -> Any:
    """A rule that passes until ``moment`` and refuses from then on, saying so."""

    def closed(f: Facts) -> Step:
        return Pass(moment) if f.now < moment else Refuse(Decision.KEY_DISABLED)

    return closed


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(moment=NEAR.map(lambda d: T0 + d), after=st.booleans())
def test_a_rule_with_a_horizon_ends_kept_outcomes_then(setup: Fixture, moment: int, after: bool) -> None:
    """An outcome kept before a new rule's horizon is not served at or after it: the rule said
    when its answer would change, and nothing else had to be told."""
    write(setup, {**dict.fromkeys(["expires_at_us", "unrestricted_since_us", "grace"]), "permission": 2,
                  "allowed_ips": "", "enabled": True, "symbols": "", "frozen": False, "address_management": False,
                  "address_management_off_at_us": None, "usable_from_us": 0,
                  # A row value of its own: what rules another example ran kept nothing on it.
                  "name": f"bot {moment} {after}"})  # fmt: skip
    authorizer = setup.authorizer
    query = Query(setup.access_key, setup.secret, "203.0.113.5", Permission.READ)
    rule = closes_at(moment)
    if after:
        rules = Rules(RULES.before, RULES.credential, (*RULES.after, rule))
    else:
        rules = Rules((*RULES.before, rule), RULES.credential, RULES.after)

    async def kept_then_asked() -> tuple[Answer, Answer]:
        authorizer.rules = rules
        try:
            authorizer.clock = lambda: moment - 1
            await authorizer._decide_later(query)  # argon2 once: the secret is cached from then on
            kept = authorizer._decide_now(query)  # the outcome kept at moment - 1
            authorizer.clock = lambda: moment
            return kept, authorizer._decide_now(query)
        finally:
            authorizer.rules = RULES

    kept, asked = setup.server.run(kept_then_asked())
    assert isinstance(kept, AuthorizeResult) and kept.decision is Decision.ALLOW
    assert isinstance(asked, AuthorizeResult) and asked.decision is Decision.KEY_DISABLED
