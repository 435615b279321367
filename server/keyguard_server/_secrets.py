"""Key material: generation, the cheap format check, and argon2id hashing.

Private keys look like ``kgsk_<43 base62>_<6 base62>``: 43 base62 characters
carry 256 random bits from :mod:`secrets`, and the suffix is the CRC32 of that
body (GitHub-style), so a leaked key is recognisable by scanners and a typo or
random guess is refused without spending argon2 time on it.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import string
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import argon2

from keyguard_server._metrics import ARGON2_PENDING, ARGON2_VERIFICATIONS

_BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
ACCESS_KEY_PREFIX = "kg_"
PRIVATE_KEY_PREFIX = "kgsk_"
_PRIVATE_KEY_RE = re.compile(r"kgsk_([0-9A-Za-z]{43})_([0-9A-Za-z]{6})")


def _random_base62(length: int) -> str:
    return "".join(secrets.choice(_BASE62) for _ in range(length))


def _checksum(body: str) -> str:
    crc = zlib.crc32(body.encode("ascii"))
    digits = []
    for _ in range(6):  # 62**6 > 2**32
        crc, digit = divmod(crc, 62)
        digits.append(_BASE62[digit])
    return "".join(reversed(digits))


def new_access_key() -> str:
    return ACCESS_KEY_PREFIX + _random_base62(24)


def new_private_key() -> str:
    body = _random_base62(43)
    return f"{PRIVATE_KEY_PREFIX}{body}_{_checksum(body)}"


def is_well_formed_private_key(value: str) -> bool:
    """Prefix, length, alphabet and checksum: what can be checked for free."""
    match = _PRIVATE_KEY_RE.fullmatch(value)
    return match is not None and _checksum(match[1]) == match[2]


@dataclass(frozen=True)
class Argon2Params:
    """Defaults are RFC 9106's second recommended option (argon2-cffi's default)."""

    time_cost: int = 3
    memory_kib: int = 65536
    parallelism: int = 4


class HasherBusy(Exception):
    """Too many verifications are already waiting for argon2."""


class SecretHasher:
    """argon2id hashing and verification on a bounded thread pool.

    argon2 costs tens of milliseconds by design; argon2-cffi releases the GIL,
    so running it on a small pool keeps the event loop answering other calls.
    Verifications (driven by untrusted bots) may queue at most ``max_pending``
    deep; past that :meth:`verify` raises :class:`HasherBusy` at once, so a
    flood of wrong secrets cannot build an unbounded backlog. Hashing new
    secrets has its own thread and queue (at most ``max_pending_hashes``), so
    a burst of key creations or rotations never delays a verification.
    """

    def __init__(self, params: Argon2Params, threads: int, max_pending: int, max_pending_hashes: int = 64) -> None:
        self._hasher = argon2.PasswordHasher(
            time_cost=params.time_cost,
            memory_cost=params.memory_kib,
            parallelism=params.parallelism,
            type=argon2.Type.ID,
        )
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="argon2")
        self._hash_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="argon2-hash")
        self._max_pending = max_pending
        self._max_pending_hashes = max_pending_hashes
        self.pending = 0
        self.pending_hashes = 0
        self.verifications = 0

    async def hash(self, secret: str) -> str:
        """The argon2id hash of a new secret; :class:`HasherBusy` if too many are queued."""
        if self.pending_hashes >= self._max_pending_hashes:
            raise HasherBusy
        self.pending_hashes += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._hash_pool, self._hasher.hash, secret)
        finally:
            self.pending_hashes -= 1

    async def verify(self, stored_hash: str, secret: str) -> bool:
        if self.pending >= self._max_pending:
            raise HasherBusy
        self.pending += 1
        self.verifications += 1
        ARGON2_VERIFICATIONS.inc()
        ARGON2_PENDING.inc()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._verify, stored_hash, secret)
        finally:
            self.pending -= 1
            ARGON2_PENDING.dec()

    def _verify(self, stored_hash: str, secret: str) -> bool:
        try:
            return self._hasher.verify(stored_hash, secret)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            return False

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._hash_pool.shutdown(wait=True, cancel_futures=True)
