"""Key material: generation, the cheap format check, and argon2id hashing.

Private keys look like ``kgsk_<43 base62>_<6 base62>``: 43 base62 characters
carry 256 random bits from :mod:`secrets`, and the suffix is the CRC32 of that
body (GitHub-style), so a leaked key is recognisable by scanners and a typo or
random guess is refused without spending argon2 time on it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import re
import secrets
import string
import time
import zlib
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import argon2

from keyguard_server._metrics import ARGON2_PENDING, ARGON2_VERIFICATIONS
from keyguard_server._threads import share_core_until
from keyguard_server._verify import VerificationCache

_BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase
# The formats of the two halves of a key, defined once: the generators below and the checks
# (_validation for requests, is_well_formed_private_key) derive from these.
ACCESS_KEY_PREFIX = "kg_"
ACCESS_KEY_LENGTH = 24  # base62 characters after the prefix
ACCESS_KEY_RE = re.compile(rf"{ACCESS_KEY_PREFIX}[0-9A-Za-z]{{{ACCESS_KEY_LENGTH}}}")
ACCESS_KEY_RULE = f'is not an access key ("{ACCESS_KEY_PREFIX}" and {ACCESS_KEY_LENGTH} letters or digits)'
PRIVATE_KEY_PREFIX = "kgsk_"
_PRIVATE_KEY_BODY = 43  # base62 characters (~256 bits), then "_" and a 6-character checksum
_CHECKSUM_LENGTH = 6  # 62**6 > 2**32
_PRIVATE_KEY_RE = re.compile(
    rf"{PRIVATE_KEY_PREFIX}([0-9A-Za-z]{{{_PRIVATE_KEY_BODY}}})_([0-9A-Za-z]{{{_CHECKSUM_LENGTH}}})"
)


def _random_base62(length: int) -> str:
    return "".join(secrets.choice(_BASE62) for _ in range(length))


def _checksum(body: str) -> str:
    crc = zlib.crc32(body.encode("ascii"))
    digits = []
    for _ in range(_CHECKSUM_LENGTH):
        crc, digit = divmod(crc, 62)
        digits.append(_BASE62[digit])
    return "".join(reversed(digits))


def new_access_key() -> str:
    return ACCESS_KEY_PREFIX + _random_base62(ACCESS_KEY_LENGTH)


def new_private_key() -> str:
    body = _random_base62(_PRIVATE_KEY_BODY)
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
    """argon2 cannot take this job in time (or its queue is full)."""


@dataclass
class _Job:
    stored_hash: str
    secret: str
    result: asyncio.Future[bool]
    cache: VerificationCache | None


class SecretHasher:
    """argon2id hashing and verification off the event loop, fair and bounded.

    argon2 costs tens of milliseconds by design; argon2-cffi releases the GIL,
    so its threads leave the event loop free. Verifications are driven by
    untrusted bots, so:

    - Concurrent verifications of the same secret against the same hash are
      *coalesced*: one argon2 run, every asker gets its result (a restart
      does not turn 5 concurrent requests per bot into 5 runs).
    - Jobs from client networks that have proven the key before and jobs
      from others take turns, so however many networks an attacker floods a
      key from, its owner waits for about one run; within each class, jobs
      wait in one queue per *share* (the key's account) and the threads take
      the shares in turn, so one account's flood (its own keys, networks it
      proved itself) delays other accounts by at most one turn each.
    - A job is refused at once (:class:`HasherBusy`) when its expected wait
      (jobs ahead of it in that order x the measured argon2 time / threads)
      is too long, or it could not finish before its caller's deadline,
      rather than by a fixed queue length: a
      correct secret is not refused merely because others are being
      verified. ``max_pending`` bounds memory (running + queued).
    - Hashing new secrets has its own thread and queue (at most
      ``max_pending_hashes``), so creating keys never delays a verification.
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
        self._threads = threads
        self._max_pending = max_pending
        self._max_pending_hashes = max_pending_hashes
        # proven? -> share -> its jobs, in turn order
        self._queues: dict[bool, OrderedDict[str, deque[_Job]]] = {True: OrderedDict(), False: OrderedDict()}
        self._proven_next = True
        self._running = 0
        self._coalesce_key = secrets.token_bytes(32)
        self._in_flight: dict[tuple[str, bytes], asyncio.Future[bool]] = {}
        # argon2's time per verification, measured as it runs; see calibrate().
        self._seconds = 0.1
        self.pending_hashes = 0
        self.verifications = 0
        self._closed = False

    async def calibrate(self) -> None:
        """Measures argon2's time per verification before the first one counts on it: one run on
        each thread at once, as under load (with parallelism > 1 the runs share the cores; a
        lone run takes about half as long, and admitting by it lets verifications miss their
        deadlines after a restart)."""
        loop = asyncio.get_running_loop()
        sample = await loop.run_in_executor(self._hash_pool, self._hasher.hash, "calibration")
        runs = [
            loop.run_in_executor(self._pool, self._timed_verify, sample, "calibration") for _ in range(self._threads)
        ]
        self._seconds = max(seconds for _, seconds in await asyncio.gather(*runs))

    @property
    def seconds(self) -> float:
        """argon2's time per verification, as measured lately on this machine."""
        return self._seconds

    @property
    def pending(self) -> int:
        """Verifications running or queued."""
        return self._running + sum(len(q) for queues in self._queues.values() for q in queues.values())

    async def hash(self, secret: str) -> str:
        """The argon2id hash of a new secret; :class:`HasherBusy` if too many are queued."""
        if self._closed or self.pending_hashes >= self._max_pending_hashes:
            raise HasherBusy
        self.pending_hashes += 1
        try:
            hashing = asyncio.get_running_loop().run_in_executor(self._hash_pool, self._hasher.hash, secret)
            share_core_until(hashing)
            return await hashing
        finally:
            self.pending_hashes -= 1

    def _run_key(self, stored_hash: str, secret: str) -> tuple[str, bytes]:
        return stored_hash, hmac.new(self._coalesce_key, secret.encode(), hashlib.sha256).digest()

    def is_running(self, stored_hash: str, secret: str) -> bool:
        """Whether a verification of this secret against this hash is under way (a new ask joins it)."""
        return self._run_key(stored_hash, secret) in self._in_flight

    def submit(
        self,
        stored_hash: str,
        secret: str,
        *,
        share: str = "",
        proven: bool = False,
        time_left: float = 10.0,
        max_queue_wait: float = 1.0,
        cache: VerificationCache | None = None,
    ) -> asyncio.Future[bool]:
        """The future verdict of ``secret`` against ``stored_hash``: a run already under way for
        them, or a new one. Raises :class:`HasherBusy` if a new one would queue longer than
        ``max_queue_wait`` or not finish within ``time_left``.

        ``proven`` jobs (from a client network that has proven this key's credential before)
        and the others take turns: however many networks an attacker sends wrong secrets
        from, the key's owner waits for about one of their runs, not all of them. A match is remembered in
        ``cache`` the moment argon2 finds it, before any asker resumes. Await the result
        through ``asyncio.shield``: one asker giving up must not cancel the others' answer.
        """
        key = self._run_key(stored_hash, secret)
        result = self._in_flight.get(key)
        if result is not None:
            return result
        if self._closed:
            raise HasherBusy
        queue_wait = self._queue_wait(share, proven)
        if self.pending >= self._max_pending or queue_wait > max_queue_wait or queue_wait + self._seconds > time_left:
            raise HasherBusy
        result = asyncio.get_running_loop().create_future()
        self._in_flight[key] = result
        result.add_done_callback(lambda _: self._in_flight.pop(key, None))
        self._queues[proven].setdefault(share, deque()).append(_Job(stored_hash, secret, result, cache))
        ARGON2_PENDING.inc()
        self._dispatch()
        return result

    def _queue_wait(self, share: str, proven: bool) -> float:
        """Seconds until a new job of ``share`` would start: the two classes take turns, and so
        do the shares within a class."""
        queues = self._queues[proven]
        mine = len(queues.get(share, ()))
        ahead = mine + sum(min(len(q), mine + 1) for s, q in queues.items() if s != share)
        ahead += min(ahead + 1, sum(len(q) for q in self._queues[not proven].values()))
        ahead += max(0, self._running - self._threads + 1)  # a free thread starts it now
        return ahead / self._threads * self._seconds

    def _dispatch(self) -> None:
        while self._running < self._threads and (self._queues[True] or self._queues[False]):
            # The classes take turns while both wait: proven jobs never queue behind a flood of
            # unproven ones, and no account's proven jobs (its own keys, its own networks) can
            # keep every other account's first verifications waiting.
            proven = self._proven_next if self._queues[self._proven_next] else not self._proven_next
            self._proven_next = not proven
            queues = self._queues[proven]
            share, queue = next(iter(queues.items()))
            job = queue.popleft()
            if queue:
                queues.move_to_end(share)
            else:
                del queues[share]
            self._running += 1
            self.verifications += 1
            ARGON2_VERIFICATIONS.inc()
            loop = asyncio.get_running_loop()
            run = loop.run_in_executor(self._pool, self._timed_verify, job.stored_hash, job.secret)
            share_core_until(run)
            run.add_done_callback(functools.partial(self._finished, job))

    def _finished(self, job: _Job, run: asyncio.Future[tuple[bool, float]]) -> None:
        self._running -= 1
        ARGON2_PENDING.dec()
        if not job.result.done():
            if run.cancelled():
                job.result.cancel()
            elif (error := run.exception()) is not None:
                job.result.set_exception(error)
            else:
                ok, seconds = run.result()
                self._seconds = 0.8 * self._seconds + 0.2 * seconds
                if ok and job.cache is not None:
                    job.cache.remember(job.stored_hash, job.secret)
                job.result.set_result(ok)
        self._dispatch()

    def _timed_verify(self, stored_hash: str, secret: str) -> tuple[bool, float]:
        started = time.perf_counter()
        ok: bool
        try:
            ok = self._hasher.verify(stored_hash, secret)
        except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
            ok = False
        return ok, time.perf_counter() - started

    def close(self) -> None:
        """Refuses new work and cancels what waits; runs under way finish on their own (this
        never waits for them: it is called on the event loop)."""
        self._closed = True
        for queues in self._queues.values():
            for queue in queues.values():
                for job in queue:
                    job.result.cancel()
                    ARGON2_PENDING.dec()
            queues.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._hash_pool.shutdown(wait=False, cancel_futures=True)
