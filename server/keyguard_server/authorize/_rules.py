"""The order of checks, as data: every rule Authorize applies, in the order it applies them.

Read :data:`RULES` top to bottom: that is the whole policy. Each rule is a small function of
:class:`Facts` (the query, the key's row, the clock, what this call's waits proved, the policy)
that answers one of:

- :class:`Pass` (nothing to refuse) or :class:`Refuse` (this decision), each with the moment
  ``until`` which the answer holds (:data:`FOREVER` when only a change of the row can change
  it). A kept outcome (``KeyRow.outcomes``) is valid until the earliest of these, so a rule
  that depends on the clock says so where it is written, and nowhere else;
- :class:`Wait`: the rule cannot answer before something slow is done (argon2, recording a
  nonce, looking up a destination). The no-wait path stops there with LATER; the waiting path
  does it, records what it proved in :class:`Proofs`, reads the row again and runs the whole
  list again (``_authorizer``).

Both paths run this one list, so they cannot disagree (a property test holds them to it).
Rules are pure: no I/O, no limits spent, no metrics; they may be run more than once per call.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

from keyguard import AuthorizeResult, Decision, KeyType, Permission
from keyguard_server._secrets import is_well_formed_private_key
from keyguard_server._verify import VerificationCache
from keyguard_server.authorize._domain import FOREVER, KeyRow, Query, Request


@dataclass(frozen=True, slots=True)
class Pass:
    """Nothing to refuse, until ``until`` (µs since the epoch)."""

    until: int = FOREVER


@dataclass(frozen=True, slots=True)
class Refuse:
    """Refused with ``decision``, until ``until``."""

    decision: Decision
    until: int = FOREVER


class Wait(enum.Enum):
    """What must be done before a rule can answer."""

    SECRET = "argon2 verifies the private key"  # noqa: S105 (a description, no password)
    SIGNATURE = "the signature is verified and its nonce recorded (a replay is refused)"
    DESTINATION = "the withdrawal destination's whitelist entry is looked up"


Step = Pass | Refuse | Wait
PASS = Pass()
_REFUSE = {decision: Refuse(decision) for decision in Decision}


@dataclass(slots=True)
class Proofs:
    """What one call's waits established; each stays true of whatever the row is now."""

    hashes: set[str] = field(default_factory=set)  # stored hashes argon2 matched the secret against
    tried: set[str] = field(default_factory=set)  # stored hashes argon2 was asked about
    signed_with: set[str] = field(default_factory=set)  # public keys (PEM) the signature verified with
    nonce_used: bool = False  # the signed request's nonce is recorded as this call's
    destination_of: str | None = None  # the account whose whitelist was looked up
    usable_from: int | None = None  # and when the destination is usable there (None: not listed)


NO_PROOFS = Proofs()  # the no-wait path's: it never waits, so it proves nothing (never mutated)


@dataclass(frozen=True, slots=True)
class Policy:
    """The configured parts of the rules."""

    signature_window_ms: int
    unrestricted_lapse_us: int  # how long a TRADE/WITHDRAW key may stay without an allowlist (0: for ever)
    cache: VerificationCache  # secrets argon2 accepted (and refused) lately


@dataclass(slots=True)
class Facts:
    """What a rule may look at. Never changed once built (not ``frozen``: a frozen dataclass is
    built through ``object.__setattr__`` per field, five times the cost, and one is built per call)."""

    query: Query  # as the face asked it (the secret, the signature)
    request: Request  # its validated, normalised parts
    row: KeyRow
    now: int  # µs since the epoch
    proofs: Proofs
    policy: Policy


Rule = Callable[[Facts], Step]


# -- before the credential: refusals say nothing of the key ---------------------------------------


def account_not_frozen(f: Facts) -> Step:
    """A frozen account stops every key of it, before anything else and before any argon2."""
    return _REFUSE[Decision.ACCOUNT_FROZEN] if f.row.frozen else PASS


def key_enabled(f: Facts) -> Step:
    return PASS if f.row.enabled else _REFUSE[Decision.KEY_DISABLED]


def key_not_expired(f: Facts) -> Step:
    expires = f.row.expires_at_us
    if expires is None:
        return PASS
    return _REFUSE[Decision.KEY_EXPIRED] if f.now >= expires else Pass(expires)


def client_ip_allowed(f: Facts) -> Step:
    """The allowlist (an empty one admits every address)."""
    return PASS if f.row.admits(f.request.ip, f.request.client_ip) else _REFUSE[Decision.IP_NOT_ALLOWED]


# -- the credential: the caller proves it holds the key ------------------------------------------


def signature_verified(f: Facts) -> Step:
    """An Ed25519 key's request: signed, within the window, by the key (or, in a rotation's
    grace, the previous one), its nonce recorded for this call only (a replay is refused)."""
    row, signed = f.row, f.query.signed
    if row.key_type is not KeyType.ED25519:
        return PASS
    if signed is None:
        return _REFUSE[Decision.BAD_SIGNATURE]
    window_ms = f.policy.signature_window_ms
    if abs(f.now // 1000 - signed.timestamp_ms) > window_ms:
        return _REFUSE[Decision.STALE_REQUEST]
    if f.proofs.nonce_used and any(key in f.proofs.signed_with for key in public_keys(row, f.now)):
        return Pass((signed.timestamp_ms + window_ms + 1) * 1000)  # stale from then on
    return Wait.SIGNATURE


def secret_verified(f: Facts) -> Step:
    """A secret key's private key: proven by argon2 in this call, or accepted by it before
    (the verification cache: no argon2 and no failure limit, so a flood against a public
    access key cannot lock out the bot that holds the secret)."""
    row, secret = f.row, f.query.secret
    if row.key_type is not KeyType.SECRET:
        return PASS
    proven = f.proofs.hashes and any(row.accepts_hash(h, f.now) for h in f.proofs.hashes)
    if proven or cached(row, secret, f.now, f.policy.cache):
        return Pass(row.previous_valid_until_us or FOREVER) if row.in_grace(f.now) else PASS
    if not is_well_formed_private_key(secret) or not candidates(f):
        return _REFUSE[Decision.BAD_SECRET]  # malformed (free to send) or refused lately: no argon2
    return Wait.SECRET


# -- after the credential: refusals name the key -------------------------------------------------


def permission_held(f: Facts) -> Step:
    return PASS if f.row.permission >= f.request.permission else _REFUSE[Decision.PERMISSION_DENIED]


def restriction_not_lapsed(f: Facts) -> Step:
    """The unrestricted-key policy: a TRADE/WITHDRAW request of a key that has had no IP
    allowlist for longer than it allows is refused until the key gets one."""
    row, lapse = f.row, f.policy.unrestricted_lapse_us
    if not lapse or f.request.permission < Permission.TRADE or row.allowed_ips or row.unrestricted_since_us is None:
        return PASS
    lapses = row.unrestricted_since_us + lapse
    return _REFUSE[Decision.IP_RESTRICTION_REQUIRED] if f.now >= lapses else Pass(lapses)


def symbol_allowed(f: Facts) -> Step:
    """A TRADE request of a key with a symbol list names one of them."""
    row = f.row
    if f.request.permission is Permission.TRADE and row.symbols and f.request.symbol not in _symbols(row.symbols):
        return _REFUSE[Decision.SYMBOL_NOT_ALLOWED]
    return PASS


def destination_whitelisted(f: Facts) -> Step:
    """With address management on, a withdrawal goes only to a whitelisted address, once its
    hold has passed. A pending "off" keeps management on until it is due."""
    row, destination = f.row, f.request.destination
    off_at = row.address_management_off_at_us
    if destination is None or not management_on(row.address_management, off_at, f.now):
        return PASS
    if f.proofs.destination_of != row.account_id:
        return Wait.DESTINATION
    until = off_at or FOREVER
    usable_from = f.proofs.usable_from
    if usable_from is None:
        return Refuse(Decision.ADDRESS_NOT_WHITELISTED, until)
    if f.now < usable_from:
        return Refuse(Decision.ADDRESS_ON_HOLD, min(until, usable_from))
    return Pass(until)


@dataclass(frozen=True, slots=True)
class Rules:
    """The order of checks: refusals before the credential carry no identity (nothing of the
    key is told to a caller who has not proven it holds it); those after it name the key.

    Rules ``before`` and ``after`` the credential may read the query's shape only (client IP,
    permission, symbol, destination), the row and the clock: their outcome is kept per shape
    (``KeyRow.outcomes``). Only the ``credential`` rules read the secret or the signature.
    """

    before: tuple[Rule, ...]
    credential: tuple[Rule, ...]
    after: tuple[Rule, ...]


RULES = Rules(
    before=(account_not_frozen, key_enabled, key_not_expired, client_ip_allowed),
    credential=(signature_verified, secret_verified),
    after=(permission_held, restriction_not_lapsed, symbol_allowed, destination_whitelisted),
)


_DENIALS = {decision: AuthorizeResult(False, decision) for decision in Decision}


def deny(decision: Decision) -> AuthorizeResult:
    """A refusal before the caller proved it holds the key: no identity in it."""
    return _DENIALS[decision]


def evaluate(rules: Rules, f: Facts) -> AuthorizeResult | Wait:
    """The answer of ``rules`` on ``f``: the first refusal, else ALLOW; or the first wait."""
    for section in (rules.before, rules.credential):
        for rule in section:
            step = rule(f)
            if not isinstance(step, Pass):
                return step if isinstance(step, Wait) else deny(step.decision)
    for rule in rules.after:
        step = rule(f)
        if not isinstance(step, Pass):
            return step if isinstance(step, Wait) else f.row.refusal(step.decision)
    return f.row.allow


def settle(section: tuple[Rule, ...], f: Facts) -> tuple[Decision | None, int] | None:
    """For a kept outcome: the first refusal of ``section``'s rules on ``f`` (None: none) and
    the earliest horizon of them all; None when one of them would wait (nothing can be kept)."""
    refusal: Decision | None = None
    until = FOREVER
    for rule in section:
        step = rule(f)
        if isinstance(step, Wait):
            return None
        until = min(until, step.until)
        if refusal is None and isinstance(step, Refuse):
            refusal = step.decision
    return refusal, until


def public_keys(row: KeyRow, now: int) -> tuple[str, ...]:
    """The public keys a signature may be made with now: the key's, and in a rotation's grace the previous one."""
    if row.previous_public_key and row.in_grace(now):
        return (row.public_key, row.previous_public_key)
    return (row.public_key,)


def cached(row: KeyRow, secret: str, now: int, cache: VerificationCache) -> bool:
    """Whether ``secret`` was verified before against the row's hash (or, in a rotation's
    grace, the previous one)."""
    return cache.hit(row.secret_hash, secret) or (row.in_grace(now) and cache.hit(row.previous_secret_hash, secret))


def candidates(f: Facts) -> list[str]:
    """The stored hashes the secret may still match (the row's, and in a rotation's grace the
    previous one), less those this call already tried and those argon2 refused it lately."""
    row, secret = f.row, f.query.secret
    hashes = [row.secret_hash] + ([row.previous_secret_hash] if row.in_grace(f.now) else [])
    return [h for h in hashes if h not in f.proofs.tried and not f.policy.cache.failed(h, secret)]


def management_on(enabled: bool, off_at_us: int | None, now: int) -> bool:
    """Whether address management is on at ``now``: a pending off only takes effect at ``off_at_us``."""
    return enabled and (off_at_us is None or now < off_at_us)


@functools.lru_cache(maxsize=4096)
def _symbols(symbols: str) -> frozenset[str]:
    """Parsed symbol lists, cached by their stored text."""
    return frozenset(symbols.split())
