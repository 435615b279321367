"""Keeping argon2 off the hot path, and floods of wrong secrets cheap.

- :class:`VerificationCache`: after argon2 accepted a secret, remember a keyed
  BLAKE2b MAC of it (under a per-process random key) indexed by the stored
  argon2 hash string. Later calls compare digests in constant time. Deleting
  or re-keying a key removes or changes its stored hash, so the cache can
  never keep a dead secret alive: a lookup needs the *current* hash.
- :class:`FailureLimiter`: token buckets of failures per (access key, client
  network) and per client network, reserved before argon2 runs. Limits must
  never become a weapon: failures from one network never refuse another
  network's correct credential, a malformed secret (free to send) counts
  against nothing, and a cached good secret skips the limits altogether.
- :class:`SecretHasher` (``_secrets``) runs argon2 within a CPU budget, at
  the lowest priority, proven networks and clean accounts first: one run per
  distinct (hash, secret) however many callers ask, and a verification
  refused at once only when its expected wait would outlast its caller's
  deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable


class VerificationCache:
    """What argon2 said, remembered as keyed digests: the one secret each stored hash accepted
    (:meth:`hit`), and recent (hash, secret) pairs it refused (:meth:`failed`), so a repeated
    wrong secret is answered at once, with no second run. Both are bounded (least recently
    used first out) and keyed by the stored hash: a new hash starts with nothing remembered.
    """

    def __init__(self, max_entries: int) -> None:
        # Keyed BLAKE2b is a MAC by design (RFC 7693) and CPython's own code: a third of the
        # cost of OpenSSL 3's HMAC-SHA256, which fetches its digest and takes locks per call.
        # Keyed once: each digest copies the state that has already absorbed the key's block.
        self._keyed = hashlib.blake2b(key=secrets.token_bytes(32), digest_size=32)
        self._digests: OrderedDict[str, bytes] = OrderedDict()
        self._failures: OrderedDict[bytes, None] = OrderedDict()  # digests of (hash, secret)
        self._max = max_entries

    def _digest(self, secret: str) -> bytes:
        mac = self._keyed.copy()
        mac.update(secret.encode())
        return mac.digest()

    def hit(self, stored_hash: str, secret: str) -> bool:
        known = self._digests.get(stored_hash)
        if known is None or not hmac.compare_digest(known, self._digest(secret)):
            return False
        self._digests.move_to_end(stored_hash)
        return True

    def remember(self, stored_hash: str, secret: str) -> None:
        self._digests[stored_hash] = self._digest(secret)
        self._digests.move_to_end(stored_hash)
        while len(self._digests) > self._max:
            self._digests.popitem(last=False)

    def _pair_digest(self, stored_hash: str, secret: str) -> bytes:
        mac = self._keyed.copy()
        mac.update(f"{stored_hash}\n{secret}".encode())  # a hash holds no newline
        return mac.digest()

    def failed(self, stored_hash: str, secret: str) -> bool:
        """Whether argon2 refused ``secret`` against ``stored_hash`` lately."""
        return self._pair_digest(stored_hash, secret) in self._failures

    def remember_failure(self, stored_hash: str, secret: str) -> None:
        digest = self._pair_digest(stored_hash, secret)
        self._failures[digest] = None
        self._failures.move_to_end(digest)
        while len(self._failures) > self._max:
            self._failures.popitem(last=False)

    def __len__(self) -> int:
        return len(self._digests)


class FailureLimiter:
    """Token buckets of failures: ``burst`` at once, refilled at ``per_second``.

    An attempt that may fail expensively *holds* a token of every bucket it
    is charged to while it runs, and spends it only if it fails: so N
    concurrent attempts can never fail more often than there are tokens
    (checking first and charging after would let them all run). A bucket whose
    tokens are all held by attempts still running is not empty: the next
    attempt waits for one of them to settle instead of being refused, so
    correct credentials arriving together (a restart) are served in turn.

    Bounded in memory: the least recently touched buckets are dropped first
    (a dropped bucket is a full one, which errs towards letting a caller try).
    """

    def __init__(
        self,
        burst: int,
        per_second: float,
        max_buckets: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._burst = float(burst)
        self._rate = per_second
        self._max = max_buckets
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._held: Counter[str] = Counter()
        self._settled: dict[str, list[asyncio.Future[None]]] = {}  # bucket -> who waits for it

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self._burst, now))
        return min(self._burst, tokens + (now - at) * self._rate)

    def hold(self, *keys: str) -> bool | None:
        """Holds a token of each bucket: True; False if failures emptied one of them (refuse);
        None if only attempts still running hold its tokens (wait for :meth:`settled`, retry)."""
        now = self._clock()
        tokens = [self._tokens(key, now) for key in keys]
        if any(t < 1.0 for t in tokens):
            return False
        if any(t - self._held[key] < 1.0 for key, t in zip(keys, tokens, strict=True)):
            return None
        self._held.update(keys)
        return True

    def release(self, *keys: str, failed: bool) -> None:
        """Settles a :meth:`hold`: the attempt failed (the tokens are spent) or not (given back)."""
        self._held.subtract(keys)
        for key in keys:
            if self._held[key] <= 0:
                del self._held[key]
        if failed:
            self.spend(*keys)
        for key in keys:  # wakes only who waits for these buckets
            for waiter in self._settled.pop(key, ()):
                if not waiter.done():
                    waiter.set_result(None)

    def refund(self, *keys: str) -> None:
        """Gives back a token a failure spent, once the failure turned out not to be one."""
        now = self._clock()
        for key in keys:
            self._buckets[key] = (min(self._burst, self._tokens(key, now) + 1.0), now)

    def spend(self, *keys: str) -> bool:
        """Charges a failure that has already happened; False if a bucket was already empty."""
        now = self._clock()
        empty = False
        for key in keys:
            tokens = self._tokens(key, now)
            empty = empty or tokens < 1.0
            self._buckets[key] = (max(0.0, tokens - 1.0), now)
            self._buckets.move_to_end(key)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return not empty

    async def settled(self, within: float, *keys: str) -> None:
        """Returns when an attempt holding one of these buckets settles, or after ``within``."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for key in keys:
            self._settled.setdefault(key, []).append(waiter)
        try:
            await asyncio.wait_for(waiter, within)
        except TimeoutError:
            for key in keys:  # nobody released these meanwhile: leave no waiter behind
                if waiter in (waiting := self._settled.get(key, [])):
                    waiting.remove(waiter)
                    if not waiting:
                        del self._settled[key]


# IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64, RFC 6052 and
# RFC 8215; IPv4-compatible): whoever is behind them is that IPv4 client.
IPV4_EMBEDDING = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("64:ff9b:1::/48"),
    ipaddress.IPv6Network("::/96"),
)


def client_network(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """What one attacker controls: an IPv4 address (also behind NAT64), or an IPv6 /64."""
    if ip.version == 6:
        if any(ip in prefix for prefix in IPV4_EMBEDDING):
            return str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


def wide_network(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The network one operator commonly holds (an IPv4 /24, an IPv6 /48): where a flood's
    failures mark the neighbours as suspect, so they queue behind clean traffic and are paid
    for by the suspect budget. It refuses nobody by itself: a suspect verification is refused
    only when, in that order, it could not finish before its caller's deadline."""
    if ip.version == 6:
        if not any(ip in prefix for prefix in IPV4_EMBEDDING):
            return str(ipaddress.IPv6Network((int(ip) >> 80 << 80, 48)))
        ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)  # NAT64: that IPv4 client's network
    return str(ipaddress.IPv4Network((int(ip) >> 8 << 8, 24)))
