"""Keeping argon2 off the hot path, and floods of wrong secrets cheap.

- :class:`VerificationCache`: after argon2 accepted a secret, remember an
  HMAC-SHA256 of it (under a per-process random key) indexed by the stored
  argon2 hash string. Later calls compare digests in constant time. Deleting
  or re-keying a key removes or changes its stored hash, so the cache can
  never keep a dead secret alive: a lookup needs the *current* hash.
- :class:`FailureLimiter`: token buckets of failures per access key and per
  client network; an empty bucket refuses without looking at the secret.
- :class:`SecretHasher` (``_secrets``) bounds the argon2 queue: when it is
  full a verification is refused at once instead of queueing without bound.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable


class VerificationCache:
    def __init__(self, max_entries: int) -> None:
        self._key = secrets.token_bytes(32)
        self._digests: OrderedDict[str, bytes] = OrderedDict()
        self._max = max_entries

    def _digest(self, secret: str) -> bytes:
        return hmac.new(self._key, secret.encode(), hashlib.sha256).digest()

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

    def __len__(self) -> int:
        return len(self._digests)


class FailureLimiter:
    """Token buckets: ``burst`` failures at once, refilled at ``per_second``.

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

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (self._burst, now))
        return min(self._burst, tokens + (now - at) * self._rate)

    def exhausted(self, key: str) -> bool:
        return key in self._buckets and self._tokens(key, self._clock()) < 1.0

    def failed(self, key: str) -> None:
        now = self._clock()
        self._buckets[key] = (max(0.0, self._tokens(key, now) - 1.0), now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)


def client_network(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """What one attacker controls: an IPv4 address, or an IPv6 /64."""
    if ip.version == 6:
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)
