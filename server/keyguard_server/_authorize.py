"""The Authorization use case: may this key do this, from this IP, now? (``Authorizer``, and
``UsageRecorder`` for the last-used times it records). Plain Python that knows nothing of gRPC.

The order of checks is docs/architecture.md's; the rules each step applies are the module's
functions (``_state_refusal``, ``_key_rule_refusal``, ``management_on``), so they can be tested
without a server. ``Authorizer.authorize`` is the hot path: see its docstring before adding to it.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, NoReturn, ParamSpec

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keyguard import (
    AuthorizeResult,
    Decision,
    KeyType,
    Permission,
    SignedRequest,
    Unavailable,
    WithdrawalDestination,
    signing,
)
from keyguard_server._config import Config
from keyguard_server._metrics import CACHE_HITS, DECISIONS
from keyguard_server._secrets import (
    ACCESS_KEY_RE,
    HasherBusy,
    SecretHasher,
    is_well_formed_private_key,
)
from keyguard_server._store import Store
from keyguard_server._validation import (
    IPAddress,
    Violations,
    client_address,
    is_symbol,
)
from keyguard_server._verify import FailureLimiter, VerificationCache, client_network, wide_network
from keyguard_server.authorize._domain import FOREVER, LATER, KeyRow, Later, Outcome, now_us

log = logging.getLogger("keyguard.service")
P = ParamSpec("P")

MAX_PROVEN_NETWORKS = 8  # per key: client networks whose verifications take turns with the rest
NONCE_CLOCK_MARGIN_MS = 60_000  # how far replicas' clocks may disagree without a replay slipping through
DAY_US = 24 * 3600 * 10**6
# Waits one authorize call may make: the secret (argon2), then a nonce or a destination, and
# one more argon2 run if the key was re-keyed meanwhile.
MAX_WAITS = 3


class _Wait(enum.Enum):
    """What :meth:`Authorizer._decide` needs before it can answer."""

    SECRET = "argon2 verifies the private key"  # noqa: S105 (a description, no password)
    NONCE = "the signed request's nonce is recorded (a replay is refused)"
    DESTINATION = "the withdrawal destination's whitelist entry is looked up"


@dataclass(frozen=True, slots=True)
class _Request:
    """An Authorize request, validated (``ip`` parsed from ``client_ip``)."""

    access_key: str
    private_key: str
    ip: IPAddress
    client_ip: str
    required: Permission
    destination: WithdrawalDestination | None
    signed: SignedRequest | None
    symbol: str


@dataclass(slots=True)
class _Proofs:
    """What one authorize call's waits established; each holds whatever the row is now."""

    hashes: set[str] = field(default_factory=set)  # stored hashes argon2 matched the secret against
    tried: set[str] = field(default_factory=set)  # stored hashes argon2 was asked about
    nonce_used: bool = False  # the signed request's nonce is recorded as this call's
    destination_of: str | None = None  # the account whose whitelist was looked up
    usable_from: int | None = None  # and when the destination is usable there (None: not listed)
    waits: int = 0


class UsageRecorder:
    """Last-used time and IP of keys, written in batches rather than per request."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._pending: dict[str, tuple[int, IPAddress]] = {}

    def record(self, access_key: str, ip: IPAddress, at_us: int) -> None:
        self._pending[access_key] = (at_us, ip)

    async def flush(self) -> int:
        """Writes what was recorded since the last flush, in one transaction (off the loop)."""
        if not self._pending:
            return 0
        batch, self._pending = self._pending, {}
        try:
            await self._store.record_last_used({key: (at_us, str(ip)) for key, (at_us, ip) in batch.items()})
        except BaseException:
            # Not lost: merged back (newer uses win) for the next flush to retry.
            for access_key, used in batch.items():
                self._pending.setdefault(access_key, used)
            raise
        return len(batch)


# The longest the periodic last-used flush waits between attempts while they fail.
FLUSH_BACKOFF_CAP = 60.0


class FlushBackoff:
    """When the periodic last-used flush runs next, and what its failures log.

    Every ``every`` seconds while flushes land; after a failure (the database down, or its disk
    full) exponentially less often, doubling up to ``FLUSH_BACKOFF_CAP``, so an outage is not
    hammered with retries nor the log flooded: the first failure of an outage is logged (one
    WARNING), the recovery once (INFO), the attempts in between not. Nothing recorded is lost
    meanwhile: :class:`UsageRecorder` merges a failed batch back, and the next attempt retries it.
    """

    def __init__(self, every: float) -> None:
        self._every = every
        self._cap = max(every, FLUSH_BACKOFF_CAP)
        self._failures = 0  # in a row

    @property
    def delay(self) -> float:
        """Seconds until the next attempt."""
        return min(self._cap, self._every * 2.0**self._failures)

    def failed(self, why: str) -> None:
        self._failures += 1
        if self._failures == 1:
            log.warning(
                "could not record last-used times: %s; retrying in %g s, then less often (at most every %g s) "
                "until it lands; nothing recorded is lost",
                why,
                self.delay,
                self._cap,
            )

    def landed(self) -> None:
        if self._failures:
            log.info("last-used times recorded again, after %d failed attempts", self._failures)
            self._failures = 0


# One counter child per decision, bound once: labels() per call costs a lock and a lookup.
_DECISION_COUNTERS = {decision: DECISIONS.labels(decision.name) for decision in Decision}


def _count(result: AuthorizeResult) -> AuthorizeResult:
    _DECISION_COUNTERS[result.decision].inc()
    return result


def _counted(
    decide: Callable[P, Coroutine[Any, Any, AuthorizeResult]],
) -> Callable[P, Coroutine[Any, Any, AuthorizeResult]]:
    """Counts every decision (gRPC Authorize and Envoy Check alike) for the metrics."""

    @functools.wraps(decide)
    async def counted(*args: P.args, **kwargs: P.kwargs) -> AuthorizeResult:
        return _count(await decide(*args, **kwargs))

    return counted


class Authorizer:
    """Authorization: may this key do this, from this IP, now? (docs/architecture.md, the order of checks).

    Every call reads the key's current row (a point lookup), so a delete or a
    restriction holds at once, on every replica. Only the argon2 verdict is
    cached, keyed by the stored hash (see ``_verify``).
    """

    def __init__(self, store: Store, hasher: SecretHasher, config: Config) -> None:
        self._store = store
        self.hasher = hasher  # its figures (runs, CPU, pending) are the operator's and the tests' too
        # Whether decide_now can ever decide (SQLite): elsewhere servicers go straight to authorize.
        self.decides_now = store.reads_inline
        self.cache = VerificationCache(config.verify_cache_size)
        self._failures = FailureLimiter(config.failure_burst, config.failure_refill_per_second)
        self.usage = UsageRecorder(store)
        self._window_ms = config.signature_window_ms
        # Microseconds since the epoch; replaceable, so tests move time instead of waiting.
        self.clock: Callable[[], int] = now_us
        self._read_timeout = config.database_statement_timeout_seconds
        self._argon2_max_wait = config.argon2_max_wait_seconds
        # Client networks that proved a key's credential in this process (the database
        # remembers the last one across restarts): their verifications take turns with all others.
        self._proven: OrderedDict[str, set[str]] = OrderedDict()
        self._max_proven = config.verify_cache_size
        # The unrestricted-key policy (0: off).
        self._lapse_us = config.unrestricted_key_days * DAY_US

    def decide_now(
        self,
        access_key: str,
        private_key: str,
        client_ip: str,
        *,
        required: Permission,
        destination: WithdrawalDestination | None = None,
        signed: SignedRequest | None = None,
        symbol: str = "",
    ) -> AuthorizeResult | Later:
        """:meth:`authorize`'s decision when it can be made without waiting, counted the same;
        LATER when it cannot (the row is not readable inline, a signature, a secret not in the
        verification cache, a destination to look up): then ``await authorize(...)``, which
        decides afresh. Raises what ``authorize`` raises.

        The hot path (every bot request): a cached secret's READ or TRADE request on SQLite is
        decided here with no await at all. The key's row is read (its memo, while SQLite's
        data_version says nothing was committed), then what the row says of the request's
        shape (client IP, permission, symbol: every step but the secret's) is looked up in the
        row's ``outcomes``, computed by :meth:`_outcome` from the same rules as ``authorize``'s
        and kept for as long as the clock leaves them true. Add no per-call objects, awaits or
        enum conversions here.
        """
        if not self.decides_now:  # the row is never readable without a wait (PostgreSQL)
            return LATER
        if destination is None and signed is None:
            row = self._store.auth_row_now(access_key)
            if row is LATER:
                return LATER
            if row is not None:
                now = self.clock()
                outcome = row.outcomes.get((client_ip, required, symbol))
                if outcome is None or not outcome.since <= now < outcome.until:
                    outcome = self._outcome(row, access_key, client_ip, required, symbol, now)
                if outcome.before is not None:
                    return _count(outcome.before)
                if row.key_type is KeyType.ED25519 or not self._cached(row, private_key, now):
                    return LATER
                CACHE_HITS.inc()
                if outcome.after is row.allow:
                    self.usage.record(access_key, outcome.ip, now)
                return _count(outcome.after)
        ip, level, destination, symbol = _shape(access_key, client_ip, required, destination, signed, symbol)
        if not ACCESS_KEY_RE.fullmatch(access_key):
            return _count(_deny(Decision.UNKNOWN_KEY))
        row = self._store.auth_row_now(access_key)
        if row is LATER:
            return LATER
        if row is None:
            return _count(_deny(Decision.UNKNOWN_KEY))
        now = self.clock()
        if (refusal := _state_refusal(row, ip, now, client_ip)) is not None:
            return _count(refusal)
        if row.key_type is KeyType.ED25519 or not self._cached(row, private_key, now):
            return LATER
        CACHE_HITS.inc()
        result = self._after_secret_now(access_key, row, ip, level, destination, symbol, now)
        return result if result is LATER else _count(result)

    def _outcome(
        self, row: KeyRow, access_key: str, client_ip: str, required: Permission, symbol: str, now: int
    ) -> Outcome:
        """What ``row`` says of a request without destination or signature, before the secret
        (steps 1-4, a refusal or None) and after it (steps 7-10, its result), with the parsed
        client IP; true from ``now`` until the first moment one of the row's times (expiry, the
        unrestricted-key lapse) passes. Kept in ``row.outcomes`` (bounded). Raises what
        :func:`_shape` raises for a malformed request."""
        ip, level, _, normal_symbol = _shape(access_key, client_ip, required, None, None, symbol)
        result = self._rules(row, level, None, normal_symbol, now)
        assert result is not LATER  # only a destination waits
        lapses = [row.unrestricted_since_us + self._lapse_us] if row.unrestricted_since_us is not None else []
        until = min((t for t in (row.expires_at_us, *lapses) if t is not None and t > now), default=FOREVER)
        outcome = Outcome(_state_refusal(row, ip, now, client_ip), result, ip, now, until)
        row.keep((client_ip, required, symbol), outcome)
        return outcome

    @_counted
    async def authorize(
        self,
        access_key: str,
        private_key: str,
        client_ip: str,
        *,
        required: Permission,
        destination: WithdrawalDestination | None = None,
        signed: SignedRequest | None = None,
        time_left: float | None = None,
        symbol: str = "",
    ) -> AuthorizeResult:
        """The decision; ``required`` the permission the request needs (servicers turn the wire's
        number into it with :func:`permission`, and hand a number that is none to
        :func:`refuse_malformed`); ``time_left`` the caller's deadline in seconds from now (None:
        none); ``symbol`` the trading symbol of the request ("" none), checked for TRADE requests.

        Raises :class:`InvalidArgument` for a malformed request and
        :class:`keyguard.Unavailable` when the key's row cannot be read in time
        (the gateway then fails closed); the read gives up before the deadline.

        Every case, waits included; servicers try :meth:`decide_now` first (no await).

        **One rule for every wait** (argon2, the nonce's write, the destination's lookup, and any
        added later): :meth:`_decide` judges a row it is given and names the wait it needs, if
        any; what the wait establishes is kept in :class:`_Proofs`, the key's row is read again,
        and the whole order of checks runs again on it. So an answer is only ever given from a
        row read after the call's last wait: a change acknowledged during a wait always wins.
        """
        ip, level, destination, symbol = _shape(access_key, client_ip, required, destination, signed, symbol)
        if not ACCESS_KEY_RE.fullmatch(access_key):
            return _deny(Decision.UNKNOWN_KEY)
        # Every wait below ends before the caller's deadline (with a margin to answer in).
        deadline = time.monotonic() + (self._read_timeout if time_left is None else 0.9 * time_left)
        request = _Request(access_key, private_key, ip, client_ip, level, destination, signed, symbol)
        proofs = _Proofs()
        for _ in range(MAX_WAITS + 1):
            row = self._store.auth_row_now(access_key)
            if row is LATER:
                row = await self._store.auth_lookup(access_key, self._read_budget(deadline))
            if row is None:
                return _deny(Decision.UNKNOWN_KEY)
            now = self.clock()
            step = self._decide(request, row, proofs, now)
            if isinstance(step, AuthorizeResult):
                if step is row.allow:
                    self.usage.record(access_key, ip, now)
                return step
            if (refusal := await self._wait(step, request, row, proofs, deadline)) is not None:
                return refusal
            proofs.waits += 1
        raise Unavailable("the key changed while it was being decided, again and again; try again")

    def _decide(self, request: _Request, row: KeyRow, proofs: _Proofs, now: int) -> AuthorizeResult | _Wait:
        """The order of checks on ``row`` at ``now``, with what earlier waits of this call
        proved: the answer, or the wait it needs first (then :meth:`authorize` waits, reads the
        row again and asks again)."""
        if (refusal := _state_refusal(row, request.ip, now, request.client_ip)) is not None:
            return refusal
        if row.key_type is KeyType.ED25519:
            signed = request.signed
            if signed is None:
                return _deny(Decision.BAD_SIGNATURE)
            if abs(now // 1000 - signed.timestamp_ms) > self._window_ms:
                return _deny(Decision.STALE_REQUEST)
            keys = [row.public_key]
            if row.previous_public_key and row.in_grace(now):
                keys.append(row.previous_public_key)
            if not any(signing.verify(_public_key(pem), request.access_key, signed) for pem in keys):
                # Only bad signatures are ever limited (checked cheaply, before any limit).
                limited = not self._failures.spend(*failure_buckets(request.access_key, request.ip))
                return _deny(Decision.RATE_LIMITED if limited else Decision.BAD_SIGNATURE)
            if not proofs.nonce_used:
                return _Wait.NONCE
        elif not any(row.accepts_hash(proven, now) for proven in proofs.hashes):
            if self._cached(row, request.private_key, now):
                # Verified before against this very hash: no argon2, and no failure limit (a flood
                # against a public access key must not lock out the bot that holds the secret).
                if not proofs.waits:
                    CACHE_HITS.inc()
            elif not is_well_formed_private_key(request.private_key):
                return _deny(Decision.BAD_SECRET)  # costs nothing, so it counts against nothing
            elif not self._candidates(row, request.private_key, proofs, now):
                return _deny(Decision.BAD_SECRET)  # argon2 refused this very secret lately
            else:
                return _Wait.SECRET
        result = self._rules(row, request.required, request.destination, request.symbol, now)
        if result is not LATER:
            return result
        destination = request.destination
        assert destination is not None
        if proofs.destination_of != row.account_id:
            return _Wait.DESTINATION
        if proofs.usable_from is None:
            return row.refusal(Decision.ADDRESS_NOT_WHITELISTED)
        if now < proofs.usable_from:
            return row.refusal(Decision.ADDRESS_ON_HOLD)
        return row.allow

    def _candidates(self, row: KeyRow, secret: str, proofs: _Proofs, now: int) -> list[str]:
        """The hashes ``secret`` may still match (the row's, and in a rotation's grace the
        previous one), less those this call already tried and those argon2 refused it lately."""
        hashes = [row.secret_hash] + ([row.previous_secret_hash] if row.in_grace(now) else [])
        return [h for h in hashes if h not in proofs.tried and not self.cache.failed(h, secret)]

    async def _wait(
        self, wait: _Wait, request: _Request, row: KeyRow, proofs: _Proofs, deadline: float
    ) -> AuthorizeResult | None:
        """Performs ``wait`` and keeps what it proved in ``proofs``; a refusal the wait itself
        decided (a wrong secret, a replayed nonce, limits), or None to decide again."""
        if wait is _Wait.SECRET:
            candidates = self._candidates(row, request.private_key, proofs, self.clock())
            matched = await self._verify(request, row, candidates, deadline)
            if isinstance(matched, Decision):
                return _deny(matched)
            proofs.tried.update(candidates)
            proofs.hashes.add(matched)
        elif wait is _Wait.NONCE:
            signed = request.signed
            assert signed is not None
            budget = self._read_budget(deadline)
            if not await self._store.use_nonce(request.access_key, signed.nonce, signed.timestamp_ms, budget):
                return _deny(Decision.REPLAYED_REQUEST)
            proofs.nonce_used = True
        else:
            destination = request.destination
            assert destination is not None
            # One lookup says whether the destination is whitelisted and from when.
            proofs.usable_from = await self._store.address_usable_from(
                row.account_id, destination.asset, destination.address, destination.memo, self._read_budget(deadline)
            )
            proofs.destination_of = row.account_id
        return None

    def _cached(self, row: KeyRow, private_key: str, now: int) -> bool:
        """Whether ``private_key`` was verified before against the row's hash (or, in a
        rotation's grace, the previous one)."""
        return self.cache.hit(row.secret_hash, private_key) or (
            row.in_grace(now) and self.cache.hit(row.previous_secret_hash, private_key)
        )

    def _read_budget(self, deadline: float) -> float:
        return min(self._read_timeout, max(0.001, deadline - time.monotonic()))

    async def _verify(self, request: _Request, row: KeyRow, candidates: list[str], deadline: float) -> str | Decision:
        """The candidate hash the request's secret matches; else why not: BAD_SECRET,
        RATE_LIMITED (failures emptied a bucket) or VERIFICATION_BUSY (argon2 could not answer
        before the deadline; a run under way goes on and is remembered).

        Each argon2 run holds a failure token of the (key, client network)
        bucket and of the network's own one, spent only if the run fails:
        failures from one network never use up another network's tokens,
        concurrent attempts never fail more often than there are tokens, and
        joining a run already under way for the same secret costs nothing.
        """
        access_key, secret, ip = request.access_key, request.private_key, request.ip
        buckets = failure_buckets(access_key, ip)
        network = buckets[1]
        last_used_ip = row.last_used_ip
        proven = network in self._proven.get(access_key, ()) or (
            bool(last_used_ip) and network == client_network(ipaddress.ip_address(last_used_ip))
        )
        # What a failure here marks (SecretHasher.priority): this network's proof of the account's
        # keys, the account, the client's wide network.
        marks = (("proof", row.account_id, network), ("account", row.account_id), ("network", wide_network(ip)))
        charged = 0  # failed runs of earlier candidates this call started
        for candidate in candidates:
            while True:  # until this secret is known good, joins a run, or holds its tokens
                if self.cache.hit(candidate, secret):  # verified while this call waited
                    return candidate
                if joining := self.hasher.is_running(candidate, secret):
                    break
                if (left := deadline - time.monotonic()) <= 0:
                    return Decision.VERIFICATION_BUSY
                held = self._failures.hold(*buckets)
                if held is False:
                    return Decision.RATE_LIMITED
                if held:
                    break
                await self._failures.settled(left, *buckets)
            try:
                run = self.hasher.submit(
                    candidate,
                    secret,
                    share=row.account_id,
                    proven=proven,
                    marks=marks,
                    time_left=deadline - time.monotonic(),
                    cache=self.cache,
                )
            except HasherBusy:
                if not joining:
                    self._failures.release(*buckets, failed=False)  # a run that could not be had costs nothing
                return Decision.VERIFICATION_BUSY
            if not joining:
                # Settled when argon2 is done, whatever becomes of this call (a caller who
                # hangs up mid-run is charged like one who waits).
                run.add_done_callback(functools.partial(self._settle, buckets))
            try:
                matched = await asyncio.wait_for(asyncio.shield(run), max(0.0, deadline - time.monotonic()))
            except (TimeoutError, HasherBusy):
                return Decision.VERIFICATION_BUSY  # the run goes on (or was dropped) without this caller
            if matched:
                for _ in range(charged):  # in a rotation's grace, the old secret is no failure
                    self._failures.refund(*buckets)
                networks = self._proven.setdefault(access_key, set())
                if len(networks) < MAX_PROVEN_NETWORKS:
                    networks.add(network)
                self._proven.move_to_end(access_key)
                while len(self._proven) > self._max_proven:
                    self._proven.popitem(last=False)
                return candidate
            charged += not joining
        return Decision.BAD_SECRET

    def _settle(self, buckets: tuple[str, str], run: asyncio.Future[bool]) -> None:
        failed = not run.cancelled() and run.exception() is None and not run.result()
        self._failures.release(*buckets, failed=failed)

    async def forget_old_nonces(self) -> int:
        """Forgets nonces whose requests no replica would accept any more.

        A nonce is kept by its request's own timestamp (not when it arrived: a request
        stamped up to a window ahead stays acceptable that much longer), for the window,
        another window, and NONCE_CLOCK_MARGIN for replicas whose clocks disagree.
        """
        return await self._store.prune_nonces(self.clock() - (2 * self._window_ms + NONCE_CLOCK_MARGIN_MS) * 1000)

    def _after_secret_now(
        self,
        access_key: str,
        row: KeyRow,
        ip: IPAddress,
        required: Permission,
        destination: WithdrawalDestination | None,
        symbol: str,
        now: int,
    ) -> AuthorizeResult | Later:
        """Steps 7-10 of the order of checks, for a caller who proved it holds the key; ``now``
        the authorizer's clock when the row was read; an ALLOW recorded as the key's last use.
        LATER when the destination must be looked up (address management on): then
        :meth:`authorize`."""
        result = self._rules(row, required, destination, symbol, now)
        if result is row.allow:
            self.usage.record(access_key, ip, now)
        return result

    def _rules(
        self, row: KeyRow, required: Permission, destination: WithdrawalDestination | None, symbol: str, now: int
    ) -> AuthorizeResult | Later:
        """The rules of steps 7-10, without the destination's lookup (LATER when one is needed)."""
        if row.permission < required:
            return row.refusal(Decision.PERMISSION_DENIED)
        # An unrestricted key's lapsed rights, then the key's symbol list.
        if (refusal := _key_rule_refusal(row, required, symbol, now, self._lapse_us)) is not None:
            return row.refusal(refusal)
        if destination is not None and management_on(row.address_management, row.address_management_off_at_us, now):
            return LATER
        return row.allow


_PERMISSIONS: dict[int, Permission] = {int(level): level for level in Permission}


def permission(number: int) -> Permission | None:
    """The Permission a wire number stands for, None for one that stands for none (0 included):
    a dict lookup, so servicers convert without constructing an enum per call."""
    return _PERMISSIONS.get(number)


def refuse_malformed(
    access_key: str,
    client_ip: str,
    required: int,
    destination: WithdrawalDestination | None,
    signed: SignedRequest | None,
    symbol: str,
) -> NoReturn:
    """Raises the :class:`InvalidArgument` of an Authorize request whose ``required`` number is no
    Permission, naming it (``required_permission``) and every other malformed field, exactly as
    ``authorize`` names them."""
    _validated(access_key, client_ip, required, destination, signed, symbol)
    raise AssertionError("a required permission that is no Permission always violates")  # pragma: no cover


_DENIALS = {decision: AuthorizeResult(False, decision) for decision in Decision}


def failure_buckets(access_key: str, ip: IPAddress) -> tuple[str, str]:
    """The failure buckets an attempt from ``ip`` on ``access_key`` is charged to: the (key,
    client network) one and the network's own. Never the key's alone: failures from one network
    must not refuse another network's correct credential."""
    network = client_network(ip)
    return f"{access_key} {network}", network


def _deny(decision: Decision) -> AuthorizeResult:
    """A refusal before the caller proved it holds the key: no identity in it."""
    return _DENIALS[decision]


def _shape(
    access_key: str,
    client_ip: str,
    required: Permission,
    destination: WithdrawalDestination | None,
    signed: SignedRequest | None,
    symbol: str,
) -> tuple[IPAddress, Permission, WithdrawalDestination | None, str]:
    """:func:`_validated`'s answer; the common shape (a secret key's READ or TRADE request, a
    well-formed client IP and symbol) without building ``Violations``."""
    try:
        ip = client_address(client_ip)
    except ValueError:
        return _validated(access_key, client_ip, required, destination, signed, symbol)
    if (
        required is Permission.WITHDRAW
        or not access_key
        or destination is not None
        or signed is not None
        or (symbol and not is_symbol(symbol))
    ):
        return _validated(access_key, client_ip, required, destination, signed, symbol)
    return ip, required, None, symbol.upper()


def _validated(
    access_key: str,
    client_ip: str,
    required: int,
    destination: WithdrawalDestination | None,
    signed: SignedRequest | None,
    symbol: str,
) -> tuple[IPAddress, Permission, WithdrawalDestination | None, str]:
    """An Authorize request's client address, permission, normalised destination and symbol;
    :class:`InvalidArgument` naming every malformed field."""
    v = Violations()
    if not access_key:
        v.add("access_key", "is required")
    ip = v.client_ip(client_ip)
    level = v.permission(required, "required_permission")
    if level is Permission.WITHDRAW and destination is None:
        v.add("destination", "is required when required_permission is WITHDRAW")
    elif level is not Permission.WITHDRAW and destination is not None:
        v.add("destination", "is only allowed when required_permission is WITHDRAW")
    if destination is not None:
        destination = WithdrawalDestination(
            v.asset(destination.asset, "destination.asset"),
            v.address(destination.address, "destination.address"),
            v.memo(destination.memo, "destination.memo"),
        )
    if signed is not None:
        v.signed_request(signed)
    symbol = v.symbol(symbol)
    v.raise_if_any()
    assert ip is not None
    return ip, level, destination, symbol


def _state_refusal(row: KeyRow, ip: IPAddress, now: int, written_ip: str = "") -> AuthorizeResult | None:
    """Steps 3-4 of the order of checks (docs/architecture.md): frozen account, disabled,
    expired, client IP (``written_ip``: the text ``ip`` was parsed from, see ``KeyRow.admits``)."""
    if row.frozen:  # before anything else about the key, and before any argon2
        return _deny(Decision.ACCOUNT_FROZEN)
    if not row.enabled:
        return _deny(Decision.KEY_DISABLED)
    if row.expires_at_us is not None and now >= row.expires_at_us:
        return _deny(Decision.KEY_EXPIRED)
    if not row.admits(ip, written_ip):
        return _deny(Decision.IP_NOT_ALLOWED)
    return None


def _key_rule_refusal(row: KeyRow, required: Permission, symbol: str, now: int, lapse_us: int) -> Decision | None:
    """Step 8 of the order of checks, after the permission: a TRADE/WITHDRAW request of a key
    unrestricted for longer than the policy allows (``lapse_us``, 0: off), then a TRADE request
    naming no symbol, or one not on the key's symbol list (only for keys that have one)."""
    if (
        lapse_us
        and required >= Permission.TRADE
        and not row.allowed_ips
        and row.unrestricted_since_us is not None
        and now >= row.unrestricted_since_us + lapse_us
    ):
        return Decision.IP_RESTRICTION_REQUIRED
    if required is Permission.TRADE and row.symbols and symbol not in _symbols(row.symbols):
        return Decision.SYMBOL_NOT_ALLOWED
    return None


def management_on(enabled: bool, off_at_us: int | None, now: int) -> bool:
    """Whether address management is on at ``now``: a pending off only takes effect at ``off_at_us``."""
    return enabled and (off_at_us is None or now < off_at_us)


@functools.lru_cache(maxsize=4096)
def _symbols(symbols: str) -> frozenset[str]:
    """Parsed symbol lists, cached by their stored text."""
    return frozenset(symbols.split())


@functools.lru_cache(maxsize=4096)
def _public_key(pem: str) -> Ed25519PublicKey:
    """Parsed public keys, cached by their stored PEM."""
    return signing.load_public_key(pem)
