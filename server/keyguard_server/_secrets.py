"""Key material: generation, the cheap format check, and argon2id hashing.

Private keys look like ``kgsk_<43 base62>_<6 base62>``: 43 base62 characters
carry 256 random bits from :mod:`secrets`, and the suffix is the CRC32 of that
body (GitHub-style), so a leaked key is recognisable by scanners and a typo or
random guess is refused without spending argon2 time on it.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import logging
import os
import re
import secrets
import select
import string
import subprocess
import sys
import time
import zlib
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from keyguard_server import _argon2_worker
from keyguard_server._metrics import ARGON2_CPU_SECONDS, ARGON2_PENDING, ARGON2_VERIFICATIONS
from keyguard_server._verify import VerificationCache

log = logging.getLogger("keyguard.argon2")

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
    """argon2 cannot take this job in time: its budget is spent for now, or its queue is full."""


class Priority(enum.IntEnum):
    """A verification's place in argon2's queue: a lower one always goes first."""

    # From a client network that proved this key's credential before: the key's own bots.
    PROVEN = 0
    # Neither the key's account nor the client's wide network failed a verification lately.
    CLEAN = 1
    # The rest: where wrong secrets came from lately. Only these are refused while others wait.
    SUSPECT = 2


# How long a failed verification marks its account and client network as suspect.
SUSPECT_SECONDS = 60.0
MAX_SUSPECTS = 100_000  # marks remembered (least recently marked forgotten first)
# What a failed verification marks: ("proof", account, client network), ("account", account),
# ("network", wide network). See SecretHasher.priority.
Mark = tuple[str, ...]


@dataclass(eq=False)
class _Job:
    stored_hash: str
    secret: str
    result: asyncio.Future[bool]
    cache: VerificationCache | None
    marks: tuple[Mark, ...]  # what a failure marks as suspect
    expires: float  # the hasher's clock: not started by then, it is dropped (its callers are gone)


@dataclass(eq=False)
class _Worker:
    """One verifier process (``_argon2_worker``), the pipe its answers come from, and its job."""

    process: subprocess.Popen[bytes]
    answers: asyncio.StreamReader
    pipe: asyncio.BaseTransport  # the loop's reading end of the process's standard output
    job: _Job | None = None
    started: float = 0.0
    reading: asyncio.Task[None] | None = field(default=None, repr=False)


class SecretHasher:
    """argon2id hashing and verification off the event loop, bounded, prioritised and fair.

    argon2 costs tens of milliseconds of CPU by design, and verifications are driven by
    untrusted bots, so:

    - Verifications run in worker processes at the lowest CPU priority (``_argon2_worker``):
      they use the CPU the event loop leaves, and never need the loop's GIL.
    - A **budget**: argon2 may use ``cpu_share`` of the machine's cores on average (a token
      bucket of CPU seconds, charged each run's measured cost), whatever the flood looks like.
    - Concurrent verifications of the same secret against the same hash are *coalesced*:
      one run, every asker gets its result.
    - **Priorities** (:class:`Priority`): proven networks first, then verifications from
      accounts and networks that failed none lately, then the suspect rest; within each,
      accounts (``share``) take turns. So a flood, spread over however many accounts, keys or
      networks, only ever queues behind itself once it has failed.
    - **Admission by time**: a job is refused at once (:class:`HasherBusy`) only when its
      expected wait, in that order, means it cannot finish before its caller's deadline.
      A proven or clean job that cannot finish in time but can start within
      ``max_wait`` seconds is still taken: it runs after its caller gave up, and its success
      is remembered in the cache, so the bot's next request is answered at once (a gateway's
      0.5 s timeout must never make a key unusable on a slow machine).
    - ``max_pending`` bounds memory (running + queued); a queued job whose every caller is
      gone and whose time ran out is dropped unrun.
    - Hashing new secrets has its own process and queue (at most ``max_pending_hashes``), so
      creating keys never delays a verification beyond sharing the CPU at the same priority.
    """

    def __init__(
        self,
        params: Argon2Params,
        processes: int,
        max_pending: int,
        max_pending_hashes: int = 64,
        *,
        cpu_share: float = 0.5,
        max_wait: float = 5.0,
        cpus: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._params = params
        self._hash_worker: _Worker | None = None  # one process hashes new secrets, in turn
        self._hash_turn = asyncio.Lock()
        self._processes = processes
        self._workers: list[_Worker] = []
        self._max_pending = max_pending
        self._max_pending_hashes = max_pending_hashes
        self._max_wait = max_wait
        self._clock = clock
        # The budget, in CPU seconds: refilled at _rate a second, at most _burst banked.
        self.cpus = cpus or os.cpu_count() or 1
        self._rate = cpu_share * self.cpus
        self.cpu_used = 0.0  # CPU seconds of every verification so far
        self._tokens = 0.0
        self._tokens_at = clock()
        self._wake: asyncio.TimerHandle | None = None
        # priority -> share -> its jobs, in turn order
        self._queues: dict[Priority, OrderedDict[str, deque[_Job]]] = {p: OrderedDict() for p in Priority}
        self._coalesce_key = secrets.token_bytes(32)
        self._in_flight: dict[tuple[str, bytes], _Job] = {}
        self._failed_at: OrderedDict[Mark, float] = OrderedDict()  # mark -> when it last failed
        # argon2's time (wall) and CPU cost per verification, measured as it runs; see calibrate().
        self._seconds = 0.1
        self._cpu_seconds = 0.1
        self.pending_hashes = 0
        self.verifications = 0
        self._closed = False

    async def calibrate(self) -> None:
        """Starts the argon2 processes and measures argon2's cost before the first verification
        counts on it: one run on each verifier at once, as under load."""
        self._hash_worker = await self._spawn()
        self._workers = [await self._spawn() for _ in range(self._processes)]
        sample = await self.hash("calibration")
        for _ in range(2):  # the first round also waits for the processes to start
            started = self._clock()
            answers = await asyncio.gather(*(self._verify(worker, sample, "calibration") for worker in self._workers))
            self._seconds = self._clock() - started
        self._cpu_seconds = max(cpu for _, cpu in answers)
        self._tokens, self._tokens_at = self._burst, self._clock()

    async def _spawn(self) -> _Worker:
        """An argon2 process, started by subprocess with vfork (no fork handlers run in a
        process full of gRPC's threads) on a thread of its own: no wait for the loop."""
        params = self._params
        args = (params.time_cost, params.memory_kib, params.parallelism)
        command = [sys.executable, "-I", _argon2_worker.__file__, *(str(n) for n in args)]
        process = await asyncio.to_thread(subprocess.Popen, command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        answers = asyncio.StreamReader()
        protocol = asyncio.StreamReaderProtocol(answers)
        assert process.stdout is not None
        pipe, _ = await asyncio.get_running_loop().connect_read_pipe(lambda: protocol, process.stdout)
        return _Worker(process, answers, pipe)

    @staticmethod
    async def _ask(worker: _Worker, *fields: str) -> tuple[str, float]:
        """One job for ``worker`` (see ``_argon2_worker``): its answer and its CPU seconds.
        Only ever awaited in a task of its own, never cancelled but with the process: a job
        given up half-way would leave its answer in the pipe for the next one."""
        job = "\t".join(fields).encode() + b"\n"
        if any("\t" in f or "\n" in f for f in fields) or len(job) >= select.PIPE_BUF:
            raise ValueError("not a hash or a secret")  # checked by the callers: never sent
        assert worker.process.stdin is not None
        # Never blocks: a worker is given one job at a time and reads it whole before it answers,
        # so the pipe is empty, and a write of less than PIPE_BUF bytes to it goes in whole at once.
        os.write(worker.process.stdin.fileno(), job)
        answer = await worker.answers.readline()
        if not answer:
            raise ConnectionError(f"argon2 process {worker.process.pid} ended")
        result, cpu = answer.decode().split()
        return result, float(cpu)

    async def _verify(self, worker: _Worker, stored_hash: str, secret: str) -> tuple[bool, float]:
        """(whether ``secret`` matches ``stored_hash``, the run's CPU seconds); a hash or a secret
        with a tab or a newline in it (neither is well-formed) matches nothing, unrun."""
        if "\t" in stored_hash + secret or "\n" in stored_hash + secret:
            return False, 0.0
        answer, cpu = await self._ask(worker, "verify", stored_hash, secret)
        return answer == "1", cpu

    @property
    def _burst(self) -> float:
        """CPU seconds the budget may bank: a second's worth, and at least a run per process."""
        return max(self._rate, self._cpu_seconds * self._processes)

    @property
    def seconds(self) -> float:
        """argon2's time per verification, as measured lately on this machine."""
        return self._seconds

    @property
    def cpu_seconds(self) -> float:
        """argon2's CPU time per verification, as measured lately on this machine."""
        return self._cpu_seconds

    @property
    def process_ids(self) -> list[int]:
        """The verifier processes' ids."""
        return [worker.process.pid for worker in self._workers]

    @property
    def pending(self) -> int:
        """Verifications running or queued."""
        return self._running + self._queued

    @property
    def _running(self) -> int:
        return sum(worker.job is not None for worker in self._workers)

    @property
    def _queued(self) -> int:
        return sum(len(q) for queues in self._queues.values() for q in queues.values())

    async def hash(self, secret: str) -> str:
        """The argon2id hash of a new secret; :class:`HasherBusy` if too many are queued."""
        if self._closed or self.pending_hashes >= self._max_pending_hashes:
            raise HasherBusy
        self.pending_hashes += 1
        try:
            # A task of its own, shielded: a caller that gives up must not abandon the job mid-way.
            job = asyncio.get_running_loop().create_task(self._hash(secret))
            job.add_done_callback(_retrieved)  # a caller that gave up is not there to read its failure
            return await asyncio.shield(job)
        finally:
            self.pending_hashes -= 1

    async def _hash(self, secret: str) -> str:
        async with self._hash_turn:
            worker = self._hash_worker
            if worker is None or self._closed:
                raise HasherBusy
            try:
                stored_hash, _ = await self._ask(worker, "hash", secret)
            except (ConnectionError, ValueError, OSError) as error:
                if not self._closed:  # else close() ended the process: the shutdown, not a failure
                    log.error("argon2 hashing process failed (%s); starting another", error)
                    await _stop(worker)
                    self._hash_worker = await self._spawn()
                raise HasherBusy from None
            return stored_hash

    def _run_key(self, stored_hash: str, secret: str) -> tuple[str, bytes]:
        return stored_hash, hmac.new(self._coalesce_key, secret.encode(), hashlib.sha256).digest()

    def is_running(self, stored_hash: str, secret: str) -> bool:
        """Whether a verification of this secret against this hash is under way (a new ask joins it)."""
        return self._run_key(stored_hash, secret) in self._in_flight

    def priority(self, proven: bool, marks: tuple[Mark, ...]) -> Priority:
        """PROVEN if ``proven`` and its ("proof", ...) mark did not fail lately (a network that
        proved an account's key once cannot then flood ahead of everyone); else SUSPECT if any
        other of ``marks`` failed lately; else CLEAN."""
        since = self._clock() - SUSPECT_SECONDS
        failed = {mark[0] for mark in marks if self._failed_at.get(mark, since) > since}
        if proven and "proof" not in failed:
            return Priority.PROVEN
        return Priority.SUSPECT if failed - {"proof"} else Priority.CLEAN

    def submit(
        self,
        stored_hash: str,
        secret: str,
        *,
        share: str = "",
        proven: bool = False,
        marks: tuple[Mark, ...] = (),
        time_left: float = 10.0,
        cache: VerificationCache | None = None,
    ) -> asyncio.Future[bool]:
        """The future verdict of ``secret`` against ``stored_hash``: a run already under way or
        queued for them, or a new one. Raises :class:`HasherBusy` if a new one is not taken
        (see the class's docstring); ``time_left``: the caller's deadline, in seconds from now.

        A match is remembered in ``cache`` the moment argon2 finds it, before any asker
        resumes, and so is a mismatch (a repeated wrong secret costs no second run). Await the
        result through ``asyncio.shield`` and with a timeout: one asker giving up must not
        cancel the others' answer, and a job may outlive its first caller's deadline.
        """
        key = self._run_key(stored_hash, secret)
        now = self._clock()
        if (job := self._in_flight.get(key)) is not None:
            job.expires = max(job.expires, now + time_left)
            return job.result
        if self._closed:
            raise HasherBusy
        priority = self.priority(proven, marks)
        wait = self._expected_wait(share, priority, now)
        if self.pending >= self._max_pending:
            raise HasherBusy
        if wait + self._seconds <= time_left:
            expires = now + time_left - self._seconds
        elif priority is not Priority.SUSPECT and wait <= self._max_wait:
            expires = now + self._max_wait  # outlives its caller: remembered for the next request
        else:
            raise HasherBusy
        job = _Job(stored_hash, secret, asyncio.get_running_loop().create_future(), cache, marks, expires)
        self._in_flight[key] = job
        job.result.add_done_callback(lambda _: self._in_flight.pop(key, None))
        self._queues[priority].setdefault(share, deque()).append(job)
        ARGON2_PENDING.inc()
        self._dispatch()
        return job.result

    def _expected_wait(self, share: str, priority: Priority, now: float) -> float:
        """Seconds until a new job of ``share`` at ``priority`` would start: every job of a
        higher priority first, then the shares of its own take turns; a process must be free
        and the budget must hold its cost."""
        ahead = sum(len(q) for p in Priority if p < priority for q in self._queues[p].values())
        queues = self._queues[priority]
        mine = len(queues.get(share, ()))
        ahead += mine + sum(min(len(q), mine + 1) for s, q in queues.items() if s != share)
        for_a_process = max(0, ahead + self._running - self._processes + 1) / self._processes * self._seconds
        for_the_budget = max(0.0, (ahead + 1) * self._cpu_seconds - self._refill(now)) / self._rate
        return max(for_a_process, for_the_budget)

    def _refill(self, now: float) -> float:
        self._tokens = min(self._burst, self._tokens + (now - self._tokens_at) * self._rate)
        self._tokens_at = now
        return self._tokens

    def _next_job(self, now: float) -> _Job | None:
        """The job whose turn it is (priorities in order, shares in turn), dropping those whose
        time ran out unrun (their callers are gone: nobody is told but the cancelled future)."""
        for priority in Priority:
            queues = self._queues[priority]
            while queues:
                share, queue = next(iter(queues.items()))
                job = queue.popleft()
                if queue:
                    queues.move_to_end(share)
                else:
                    del queues[share]
                if job.expires >= now:
                    return job
                ARGON2_PENDING.dec()
                job.result.set_exception(HasherBusy())
                job.result.exception()  # retrieved: an expired job's callers have all gone
        return None

    def _dispatch(self) -> None:
        if self._closed:
            return
        now = self._clock()
        for worker in self._workers:
            if worker.job is not None:
                continue
            if self._refill(now) < self._cpu_seconds and self._queued:
                self._sleep_until_budget()
                return
            job = self._next_job(now)
            if job is None:
                return
            self._tokens -= self._cpu_seconds  # charged now, corrected by the run's measured cost
            worker.job, worker.started = job, now
            self.verifications += 1
            ARGON2_VERIFICATIONS.inc()
            worker.reading = asyncio.get_running_loop().create_task(self._run(worker, job))

    def _sleep_until_budget(self) -> None:
        if self._wake is None:
            delay = max(0.001, (self._cpu_seconds - self._tokens) / self._rate)
            self._wake = asyncio.get_running_loop().call_later(delay, self._woken)

    def _woken(self) -> None:
        self._wake = None
        self._dispatch()

    async def _run(self, worker: _Worker, job: _Job) -> None:
        try:
            ok, cpu = await self._verify(worker, job.stored_hash, job.secret)
        except (ConnectionError, ValueError, OSError) as error:
            if not self._closed:
                log.error("argon2 verifying process failed (%s); starting another", error)
                await _stop(worker)
                self._workers[self._workers.index(worker)] = await self._spawn()
            if not job.result.done():
                job.result.set_exception(HasherBusy())
            ARGON2_PENDING.dec()
            self._dispatch()
            return
        now = self._clock()
        worker.job = None
        ARGON2_PENDING.dec()
        ARGON2_CPU_SECONDS.inc(cpu)
        self.cpu_used += cpu
        self._tokens += self._cpu_seconds - cpu  # the run's measured cost, not the estimate
        self._seconds = 0.8 * self._seconds + 0.2 * (now - worker.started)
        self._cpu_seconds = 0.8 * self._cpu_seconds + 0.2 * cpu
        if job.cache is not None:
            if ok:
                job.cache.remember(job.stored_hash, job.secret)
            else:
                job.cache.remember_failure(job.stored_hash, job.secret)
        if not ok:
            for mark in job.marks:
                self._failed_at[mark] = now
                self._failed_at.move_to_end(mark)
            while len(self._failed_at) > MAX_SUSPECTS:
                self._failed_at.popitem(last=False)
        if not job.result.done():
            job.result.set_result(ok)
        self._dispatch()

    async def close(self) -> None:
        """Refuses new work, cancels what waits and stops the verifier processes."""
        self._closed = True
        if self._wake is not None:
            self._wake.cancel()
        for queues in self._queues.values():
            for queue in queues.values():
                for job in queue:
                    job.result.cancel()
                    ARGON2_PENDING.dec()
            queues.clear()
        for worker in self._workers:
            if worker.job is not None:
                worker.job.result.cancel()
                ARGON2_PENDING.dec()
            if worker.reading is not None:
                worker.reading.cancel()
        everyone = [*self._workers, *([self._hash_worker] if self._hash_worker is not None else [])]
        await asyncio.gather(*(_stop(worker) for worker in everyone))


def _retrieved(job: asyncio.Task[str]) -> None:
    """Marks a hash job's failure as seen: its caller may have given up (a CreateKey answered
    at shutdown), and asyncio would log an unread one as a traceback."""
    if not job.cancelled():
        job.exception()


async def _stop(worker: _Worker) -> None:
    """Ends an argon2 process (it holds no state worth a goodbye), reaps it off the loop, and
    closes both ends of its pipes."""
    worker.process.kill()
    await asyncio.to_thread(worker.process.wait)
    worker.pipe.close()
    if worker.process.stdin is not None:
        worker.process.stdin.close()
