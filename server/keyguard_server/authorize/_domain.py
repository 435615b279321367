"""What Authorize reasons about: a key's row as the rules see it (:class:`KeyRow`), the query a
face asks (:class:`Query`), and :data:`LATER` (an answer that needs a wait first).

The store builds :class:`KeyRow` values from what it reads and knows nothing else of them; the
rules (``_rules``) and the authorizer give them meaning.
"""

from __future__ import annotations

import enum
import ipaddress
import time
from dataclasses import dataclass, field

from keyguard import AuthorizeResult, Decision, KeyType, Permission, SignedRequest, WithdrawalDestination
from keyguard_server._validation import IPAddress, IPNetwork, parse_allowed_ip

MAX_VERDICTS_PER_ROW = 8  # client addresses whose allowlist answer a KeyRow keeps (bounded memory)
MAX_OUTCOMES_PER_ROW = 16  # request shapes whose outcome a KeyRow keeps (bounded memory)
FOREVER = 2**63  # µs since the epoch: later than any time a row holds
DAY_US = 24 * 3600 * 10**6


class Later(enum.Enum):
    """An answer that cannot be given without waiting: await the async form instead."""

    LATER = "later"


LATER = Later.LATER


def now_us() -> int:
    """The wall clock in microseconds since the epoch: every time a row holds is one."""
    return time.time_ns() // 1000


@dataclass(slots=True)
class Query:
    """One Authorize question, as every face (gRPC unary, stream, Envoy's Check) asks it.

    Never changed once built (not ``frozen``: see ``_rules.Facts``). ``permission`` is the
    wire's number (0 and unknown numbers are refused as INVALID_ARGUMENT by the decision, naming
    ``required_permission``); ``time_left`` the caller's deadline in seconds from now (None: none).
    """

    access_key: str
    secret: str
    client_ip: str
    permission: int
    destination: WithdrawalDestination | None = None
    signed: SignedRequest | None = None
    symbol: str = ""
    time_left: float | None = None


@dataclass(frozen=True, slots=True)
class Request:
    """A query's validated, normalised parts: what the rules read of it besides the credential."""

    ip: IPAddress
    client_ip: str  # as written: the allowlist's answers are kept by it
    permission: Permission
    destination: WithdrawalDestination | None
    symbol: str  # upper case ("" none)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a key's row says of one request shape (client IP as written, permission, symbol),
    apart from the caller's credential: the refusal of the rules before the credential (or
    None), the answer of the rules after it, the request as validated, and the moments between
    which both hold (``since <= now < until``; ``until`` the earliest horizon the rules gave)."""

    before: AuthorizeResult | None
    after: AuthorizeResult
    request: Request
    since: int
    until: int


# A request shape: (client IP as written, required permission, symbol as written).
Shape = tuple[str, int, str]


@dataclass(frozen=True)
class KeyRow:
    """What Authorize knows about a key, read in one point lookup.

    The store keeps one object per distinct row value, so what is derived from the row alone
    (its parsed allowlist, its ALLOW answer, its kept outcomes) is derived once per value: a
    changed row (any column) is a new object, never a stale one.
    """

    account_id: str
    name: str
    permission: Permission
    allowed_ips: str
    secret_hash: str
    address_management: bool
    enabled: bool
    expires_at_us: int | None
    # The rotated-out hash and until when it is still accepted ("" / None: none).
    previous_secret_hash: str
    previous_valid_until_us: int | None
    key_type: KeyType
    public_key: str
    previous_public_key: str
    # Where the key was last used from (as last flushed): that network has proven the credential.
    last_used_ip: str = ""
    # Read in the same lookup: the account is frozen; a pending "address
    # management off" (on until then); the key's symbol list (space-joined, "" = any);
    # when its IP allowlist last became empty (None while it has one).
    frozen: bool = False
    address_management_off_at_us: int | None = None
    symbols: str = ""
    unrestricted_since_us: int | None = None
    # Derived from the fields above, once per row value.
    networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)
    allow: AuthorizeResult = field(init=False, repr=False, compare=False)
    # admits()'s answers by the client address as written (a bot calls from few addresses).
    verdicts: dict[str, bool] = field(init=False, repr=False, compare=False)
    # The rules' outcomes for this row value by request shape (see Authorizer.decide).
    outcomes: dict[Shape, Outcome] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        networks = tuple(ipaddress.ip_network(parse_allowed_ip(entry)) for entry in self.allowed_ips.split())
        object.__setattr__(self, "networks", networks)
        object.__setattr__(self, "verdicts", {})
        object.__setattr__(self, "outcomes", {})
        object.__setattr__(
            self, "allow", AuthorizeResult(True, Decision.ALLOW, self.account_id, self.name, self.permission)
        )

    def refusal(self, decision: Decision) -> AuthorizeResult:
        """A refusal after the caller proved it holds this key: with the key's identity."""
        return AuthorizeResult(False, decision, self.account_id, self.name, self.permission)

    def in_grace(self, now: int) -> bool:
        """Whether the rotated-out credential is still accepted."""
        return self.previous_valid_until_us is not None and now < self.previous_valid_until_us

    def accepts_hash(self, secret_hash: str, now: int) -> bool:
        """Whether a secret verified against ``secret_hash`` is valid for this key now."""
        if secret_hash == self.secret_hash:
            return True
        return secret_hash == self.previous_secret_hash and self.in_grace(now)

    def admits(self, ip: IPAddress, written: str = "") -> bool:
        """Whether the allowlist admits ``ip`` (an empty list admits every address). ``written``,
        the text ``ip`` was parsed from, keeps the answer for the next call from the same text."""
        if not self.networks:
            return True
        known = self.verdicts.get(written)
        if known is None:
            known = any(ip in network for network in self.networks)
            if written:
                if len(self.verdicts) >= MAX_VERDICTS_PER_ROW:
                    self.verdicts.clear()
                self.verdicts[written] = known
        return known

    def keep(self, shape: Shape, outcome: Outcome) -> None:
        """Keeps ``outcome`` for ``shape`` (bounded: all are dropped when full)."""
        if len(self.outcomes) >= MAX_OUTCOMES_PER_ROW:
            self.outcomes.clear()
        self.outcomes[shape] = outcome
