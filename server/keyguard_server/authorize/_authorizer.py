"""The Authorization use case: may this key do this, from this IP, now? Plain Python that knows
nothing of gRPC: every face builds a :class:`Query` and asks :meth:`Authorizer.decide`.

The rules are ``_rules.RULES``; this module runs them. It reads the key's row, evaluates the
rules, and when a rule needs a wait (argon2, a nonce, a destination's lookup) performs it,
keeps what it proved, reads the row again and evaluates again. The no-wait path is the same
list, stopped where a rule would wait.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keyguard import AuthorizeResult, Decision, KeyType, Permission, Unavailable, WithdrawalDestination, signing
from keyguard_server._config import Config
from keyguard_server._metrics import CACHE_HITS, DECISIONS
from keyguard_server._secrets import ACCESS_KEY_RE, HasherBusy, SecretHasher
from keyguard_server._validation import IPAddress, Violations, client_address, is_symbol
from keyguard_server._verify import FailureLimiter, VerificationCache, client_network, wide_network
from keyguard_server.authorize._domain import DAY_US, LATER, KeyRow, Later, Outcome, Query, Request, now_us
from keyguard_server.authorize._rules import (
    NO_PROOFS,
    RULES,
    Facts,
    Pass,
    Policy,
    Proofs,
    Rules,
    Wait,
    candidates,
    deny,
    evaluate,
    public_keys,
    settle,
)
from keyguard_server.authorize._usage import UsageRecorder
from keyguard_server.store import Store

MAX_PROVEN_NETWORKS = 8  # per key: client networks whose verifications take turns with the rest
NONCE_CLOCK_MARGIN_MS = 60_000  # how far replicas' clocks may disagree without a replay slipping through
# Waits one call may make: the credential, then a destination, and the credential once more if
# the key was re-keyed meanwhile.
MAX_WAITS = 3

# One counter child per decision, bound once: labels() per call costs a lock and a lookup.
_DECISION_COUNTERS = {decision: DECISIONS.labels(decision.name) for decision in Decision}
_PERMISSIONS: dict[int, Permission] = {int(level): level for level in Permission}


class Authorizer:
    """Authorization: may this key do this, from this IP, now?

    Every decision reads the key's current row (a point lookup, or on SQLite its memo while
    nothing was committed), so a delete or a restriction holds at once, on every replica. What
    is kept across calls is only what a row value and the clock determine (``KeyRow.outcomes``,
    valid until the rules' earliest horizon) and argon2's verdicts, keyed by the stored hash.
    """

    def __init__(self, store: Store, hasher: SecretHasher, config: Config, rules: Rules = RULES) -> None:
        self.rules = rules  # the order of checks (_rules.RULES; tests add to it)
        self._store = store
        self.hasher = hasher  # its figures (runs, CPU, pending) are the operator's and the tests' too
        self._decides_now = store.reads_inline  # SQLite: rows readable without a wait
        self.cache = VerificationCache(config.verify_cache_size)
        self.policy = Policy(config.signature_window_ms, config.unrestricted_key_days * DAY_US, self.cache)
        self._failures = FailureLimiter(config.failure_burst, config.failure_refill_per_second)
        self.usage = UsageRecorder(store)
        # Microseconds since the epoch; replaceable, so tests move time instead of waiting.
        self.clock: Callable[[], int] = now_us
        self._read_timeout = config.database_statement_timeout_seconds
        # Client networks that proved a key's credential in this process (the database
        # remembers the last one across restarts): their verifications take turns with all others.
        self._proven: OrderedDict[str, set[str]] = OrderedDict()
        self._max_proven = config.verify_cache_size

    def decide(self, query: Query) -> AuthorizeResult | Coroutine[Any, Any, AuthorizeResult]:
        """The one entry point: the decision at once when no rule has to wait (no await at all),
        else a coroutine that waits and decides. Every decision is counted, and every ALLOW
        recorded as the key's last use, here.

        Raises :class:`keyguard.InvalidArgument` naming every malformed field, and (the
        coroutine) :class:`keyguard.Unavailable` when the key's row cannot be read in time.
        """
        decided = self._decide_now(query)
        return self._decide_later(query) if decided is LATER else decided

    def _decide_now(self, q: Query) -> AuthorizeResult | Later:
        """The hot path (every bot request): a cached secret's request of a kept shape on SQLite
        is decided from the row's memo and kept outcome, with no await and no validation. Add no
        per-call objects, awaits or enum conversions here."""
        if not self._decides_now:
            return LATER
        row = self._store.auth_row_now(q.access_key)
        if row is LATER:
            return LATER
        now = self.clock()
        if row is not None and q.destination is None and q.signed is None:
            outcome = row.outcomes.get((q.client_ip, q.permission, q.symbol))
            if outcome is None or not outcome.since <= now < outcome.until:
                outcome = self._outcome(q, row, now)
            if outcome is not None:
                if outcome.before is not None:
                    return self._finish(q, outcome.before, outcome.request.ip, now)
                facts = Facts(q, outcome.request, row, now, NO_PROOFS, self.policy)
                for rule in self.rules.credential:
                    step = rule(facts)
                    if not isinstance(step, Pass):
                        return LATER if isinstance(step, Wait) else self._finish(q, deny(step.decision), None, now)
                if row.key_type is KeyType.SECRET:
                    CACHE_HITS.inc()
                return self._finish(q, outcome.after, outcome.request.ip, now)
        request = validated(q)
        if row is None or not ACCESS_KEY_RE.fullmatch(q.access_key):
            return self._finish(q, deny(Decision.UNKNOWN_KEY), None, now)
        result = evaluate(self.rules, Facts(q, request, row, now, NO_PROOFS, self.policy))
        if isinstance(result, Wait):
            return LATER
        if result.account_id and row.key_type is KeyType.SECRET:
            CACHE_HITS.inc()  # past the credential, proven by nothing but the cache
        return self._finish(q, result, request.ip, now)

    def _outcome(self, q: Query, row: KeyRow, now: int) -> Outcome | None:
        """What the rules other than the credential's say of ``q``'s shape on ``row`` at
        ``now``, kept on the row until the earliest horizon they gave; None when one of them
        would wait (then nothing is kept). Raises what :func:`validated` raises."""
        request = validated(q)
        facts = Facts(q, request, row, now, NO_PROOFS, self.policy)
        before, after = settle(self.rules.before, facts), settle(self.rules.after, facts)
        if before is None or after is None:
            return None
        refusal, after_refusal = before[0], after[0]
        outcome = Outcome(
            None if refusal is None else deny(refusal),
            row.allow if after_refusal is None else row.refusal(after_refusal),
            request,
            now,
            min(before[1], after[1]),
        )
        row.keep((q.client_ip, q.permission, q.symbol), outcome)
        return outcome

    def _finish(self, q: Query, result: AuthorizeResult, ip: IPAddress | None, now: int) -> AuthorizeResult:
        """Counts the decision; records an ALLOW as the key's last use."""
        _DECISION_COUNTERS[result.decision].inc()
        if result.allowed and ip is not None:
            self.usage.record(q.access_key, ip, now)
        return result

    async def _decide_later(self, q: Query) -> AuthorizeResult:
        """The decision, waits included (:meth:`decide` when a rule waits, or the row is not
        readable without a wait, as on PostgreSQL).

        **One rule for every wait** (argon2, the nonce's write, the destination's lookup, and any
        added later): the rules name the wait they need; what it establishes is kept in
        :class:`Proofs`, the key's row is read again, and every rule runs again on it. So an
        answer is only ever given from a row read after the call's last wait: a change
        acknowledged during a wait always wins. Every wait ends before the caller's deadline
        (``q.time_left``, with a margin to answer in); the row's read gives up before it too.
        """
        request = validated(q)
        if not ACCESS_KEY_RE.fullmatch(q.access_key):
            return self._finish(q, deny(Decision.UNKNOWN_KEY), None, 0)
        deadline = time.monotonic() + (self._read_timeout if q.time_left is None else 0.9 * q.time_left)
        proofs = Proofs()
        for _ in range(MAX_WAITS + 1):
            row = self._store.auth_row_now(q.access_key)
            if row is LATER:
                row = await self._store.auth_lookup(q.access_key, self._read_budget(deadline))
            now = self.clock()
            if row is None:
                return self._finish(q, deny(Decision.UNKNOWN_KEY), None, now)
            facts = Facts(q, request, row, now, proofs, self.policy)
            step = evaluate(self.rules, facts)
            if isinstance(step, AuthorizeResult):
                if step.account_id and row.key_type is KeyType.SECRET and not proofs.hashes:
                    CACHE_HITS.inc()  # past the credential, proven by nothing but the cache
                return self._finish(q, step, request.ip, now)
            if (refusal := await self._wait(step, facts, deadline)) is not None:
                return self._finish(q, refusal, None, now)
        raise Unavailable("the key changed while it was being decided, again and again; try again")

    async def _wait(self, wait: Wait, f: Facts, deadline: float) -> AuthorizeResult | None:
        """Performs ``wait`` and keeps what it proved in ``f.proofs``; a refusal the wait itself
        decided (a wrong secret or signature, a replayed nonce, limits), or None to decide again."""
        q, row, proofs = f.query, f.row, f.proofs
        if wait is Wait.SECRET:
            tried = candidates(f)
            matched = await self._verify(f, tried, deadline)
            if isinstance(matched, Decision):
                return deny(matched)
            proofs.tried.update(tried)
            proofs.hashes.add(matched)
        elif wait is Wait.SIGNATURE:
            signed = q.signed
            assert signed is not None
            keys = public_keys(row, f.now)
            verified = [pem for pem in keys if signing.verify(_public_key(pem), q.access_key, signed)]
            if not verified:
                # Only bad signatures are ever limited (checked cheaply, before any limit).
                limited = not self._failures.spend(*failure_buckets(q.access_key, f.request.ip))
                return deny(Decision.RATE_LIMITED if limited else Decision.BAD_SIGNATURE)
            if not proofs.nonce_used:
                budget = self._read_budget(deadline)
                if not await self._store.use_nonce(q.access_key, signed.nonce, signed.timestamp_ms, budget):
                    return deny(Decision.REPLAYED_REQUEST)
                proofs.nonce_used = True
            proofs.signed_with.update(verified)
        else:
            destination = f.request.destination
            assert destination is not None
            # One lookup says whether the destination is whitelisted and from when.
            proofs.usable_from = await self._store.address_usable_from(
                row.account_id, destination.asset, destination.address, destination.memo, self._read_budget(deadline)
            )
            proofs.destination_of = row.account_id
        return None

    def _read_budget(self, deadline: float) -> float:
        return min(self._read_timeout, max(0.001, deadline - time.monotonic()))

    async def _verify(self, f: Facts, candidates: list[str], deadline: float) -> str | Decision:
        """The candidate hash the request's secret matches; else why not: BAD_SECRET,
        RATE_LIMITED (failures emptied a bucket) or VERIFICATION_BUSY (argon2 could not answer
        before the deadline; a run under way goes on and is remembered).

        Each argon2 run holds a failure token of the (key, client network)
        bucket and of the network's own one, spent only if the run fails:
        failures from one network never use up another network's tokens,
        concurrent attempts never fail more often than there are tokens, and
        joining a run already under way for the same secret costs nothing.
        """
        access_key, secret, ip, row = f.query.access_key, f.query.secret, f.request.ip, f.row
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
        return await self._store.prune_nonces(
            self.clock() - (2 * self.policy.signature_window_ms + NONCE_CLOCK_MARGIN_MS) * 1000
        )


def failure_buckets(access_key: str, ip: IPAddress) -> tuple[str, str]:
    """The failure buckets an attempt from ``ip`` on ``access_key`` is charged to: the (key,
    client network) one and the network's own. Never the key's alone: failures from one network
    must not refuse another network's correct credential."""
    network = client_network(ip)
    return f"{access_key} {network}", network


def validated(q: Query) -> Request:
    """``q``'s parts as the rules read them; :class:`InvalidArgument` naming every malformed
    field. The common shape (a READ or TRADE request, a well-formed client IP and symbol) is
    checked without building ``Violations``."""
    level = _PERMISSIONS.get(q.permission)
    try:
        ip = client_address(q.client_ip)
    except ValueError:
        pass
    else:
        if (
            level is not None
            and level is not Permission.WITHDRAW
            and q.access_key
            and q.destination is None
            and q.signed is None
            and (not q.symbol or is_symbol(q.symbol))
        ):
            return Request(ip, q.client_ip, level, None, q.symbol.upper())
    v = Violations()
    if not q.access_key:
        v.add("access_key", "is required")
    parsed = v.client_ip(q.client_ip)
    level = v.permission(q.permission, "required_permission")
    destination = q.destination
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
    if q.signed is not None:
        v.signed_request(q.signed)
    symbol = v.symbol(q.symbol)
    v.raise_if_any()
    assert parsed is not None
    return Request(parsed, q.client_ip, level, destination, symbol)


@functools.lru_cache(maxsize=4096)
def _public_key(pem: str) -> Ed25519PublicKey:
    """Parsed public keys, cached by their stored PEM."""
    return signing.load_public_key(pem)
