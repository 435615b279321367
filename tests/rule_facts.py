"""Rules run on their own, without a server: :func:`verdict` answers what a section of the
order of checks says of one request shape on one key row."""

from __future__ import annotations

from keyguard import Decision, Permission
from keyguard_server._validation import IPAddress, client_address
from keyguard_server._verify import VerificationCache
from keyguard_server.authorize._domain import KeyRow, Query, Request
from keyguard_server.authorize._rules import NO_PROOFS, Facts, Policy, Rule, settle

BOT = client_address("203.0.113.7")


def facts(
    row: KeyRow,
    now: int,
    permission: Permission = Permission.READ,
    symbol: str = "",
    lapse_us: int = 0,
    ip: IPAddress = BOT,
) -> Facts:
    query = Query("kg_test", "", str(ip), permission, symbol=symbol)
    request = Request(ip, str(ip), permission, None, symbol)
    return Facts(query, request, row, now, NO_PROOFS, Policy(30_000, lapse_us, VerificationCache(8)))


def verdict(section: tuple[Rule, ...], row: KeyRow, now: int, permission: Permission = Permission.READ,
            symbol: str = "", lapse_us: int = 0, ip: IPAddress = BOT) -> Decision | None:  # fmt: skip
    """The first refusal of ``section``'s rules (None: none)."""
    settled = settle(section, facts(row, now, permission, symbol, lapse_us, ip))
    assert settled is not None, "a rule of the section waits"
    return settled[0]
