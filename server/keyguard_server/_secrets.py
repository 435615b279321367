"""Key material: generation, the cheap format check, and argon2id hashing.

Private keys look like ``kgsk_<43 base62>_<6 base62>``: 43 base62 characters
carry 256 random bits from :mod:`secrets`, and the suffix is the CRC32 of that
body (GitHub-style), so a leaked key is recognisable by scanners and a typo or
random guess is refused without spending argon2 time on it.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import hashlib
import hmac
import logging
import math
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
STUCK_SECONDS = 60.0  # and 20 runs' time: a verifier process silent for that long is replaced
# What a failed verification marks: ("proof", account, client network), ("account", account),
# ("network", wide network), ("key", stored hash). See SecretHasher.priority.
Mark = tuple[str, ...]


@dataclass(eq=False)
class _Job:
    stored_hash: str
    secret: str
    result: asyncio.Future[bool]
    cache: VerificationCache | None
    marks: tuple[Mark, ...]  # what a failure marks as suspect
    expires: float  # the hasher's clock: not started by then, it is dropped (its callers are gone)
    share: str
    priority: Priority
    queued: bool = True  # not yet started
    charged: float = 0.0  # CPU seconds its run was charged to the budget when it started


@dataclass(eq=False)
class _Worker:
    """One verifier process (``_argon2_worker``), the pipe its answers come from, and its job."""

    process: subprocess.Popen[bytes]
    answers: asyncio.StreamReader
    pipe: asyncio.BaseTransport  # the loop's reading end of the process's standard output
    job: _Job | None = None
    started: float = 0.0
    reading: asyncio.Task[None] | None = field(default=None, repr=False)


@dataclass(eq=False)
class _Budget:
    """CPU seconds argon2 may use: ``rate`` a second on average, at most ``burst`` at once."""

    rate: float
    runs: int  # runs it may bank at least (its pool's processes): however costly a run turns out
    tokens: float = 0.0
    at: float = 0.0
    wake: asyncio.TimerHandle | None = None  # a dispatch when the tokens will be there

    def refill(self, now: float, cost: float) -> float:
        """The tokens now; they bank up to a second's worth, and at least ``runs`` runs of
        ``cost``, so a run costlier than measured so far can never stall the pool."""
        self.tokens = min(max(self.rate, cost * self.runs), self.tokens + (now - self.at) * self.rate)
        self.at = now
        return self.tokens


@dataclass(eq=False)
class _Pool:
    """Verifier processes that serve some priorities, their budget, and their time per run."""

    serves: tuple[Priority, ...]
    background: bool  # at the lowest CPU priority: runs only on CPU nobody else wants
    budget: _Budget
    workers: list[_Worker] = field(default_factory=list)
    seconds: float = 0.1

    @property
    def running(self) -> int:
        return sum(worker.job is not None for worker in self.workers)


class SecretHasher:
    """argon2id hashing and verification off the event loop, bounded, prioritised and fair.

    argon2 costs tens of milliseconds of CPU by design, and verifications are driven by
    untrusted bots, so:

    - Verifications run in processes of their own (``_argon2_worker``), so they never need the
      loop's GIL. Suspect ones (see below) run in ``processes`` of their own at the lowest CPU
      priority: a flood's argon2 uses only CPU nobody else wants, and never slows the loop.
      The others run in ``processes`` at normal priority: a correct secret's first
      verification makes progress however busy the machine is.
    - A **budget**: proven and clean verifications may use ``cpu_share`` of the machine's
      cores on average, suspect ones ``suspect_cpu_share`` (token buckets of CPU seconds,
      charged each run's measured cost), whatever the flood looks like. A low priority keeps
      a flood's argon2 off the loop's core, but not out of the caches and memory bandwidth
      the cores share: only a small budget does.
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
        suspect_cpu_share: float = 0.05,
        max_wait: float = 5.0,
        cpus: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._params = params
        self._hash_worker: _Worker | None = None  # one process hashes new secrets, in turn
        self._hash_turn = asyncio.Lock()
        self._processes = processes
        self.cpus = cpus or os.cpu_count() or 1
        self._pools = (
            _Pool((Priority.PROVEN, Priority.CLEAN), False, _Budget(cpu_share * self.cpus, processes)),
            _Pool((Priority.SUSPECT,), True, _Budget(suspect_cpu_share * self.cpus, processes)),
        )
        self._max_pending = max_pending
        self._max_pending_hashes = max_pending_hashes
        self._max_wait = max_wait
        self._clock = clock
        self.cpu_used = 0.0  # CPU seconds of every verification so far
        # priority -> share -> its jobs, in turn order
        self._queues: dict[Priority, OrderedDict[str, deque[_Job]]] = {p: OrderedDict() for p in Priority}
        self._coalesce_key = secrets.token_bytes(32)
        self._in_flight: dict[tuple[str, bytes], _Job] = {}
        self._by_hash: dict[str, list[_Job]] = {}  # stored hash -> its jobs not done (distinct secrets)
        # stored hash -> its last secret's digest, and when; forgotten when a secret matches
        self._last_tried: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._failed_at: OrderedDict[Mark, float] = OrderedDict()  # mark -> when it last failed
        # argon2's CPU cost per verification, measured as it runs (its wall time: the pools'); see
        # calibrate().
        self._cpu_seconds = 0.1
        self.pending_hashes = 0
        self.verifications = 0
        self._closed = False

    async def calibrate(self) -> None:
        """Starts the argon2 processes and measures argon2's cost before the first verification
        counts on it: one run on each verifier of a pool at once, as under load."""
        self._hash_worker = await self._spawn(background=False)
        for pool in self._pools:
            pool.workers = [await self._spawn(pool.background) for _ in range(self._processes)]
        sample = await self.hash("calibration")
        # The first round waits for every process to start; the second is timed.
        for workers in ([w for pool in self._pools for w in pool.workers], self._pools[0].workers):
            started = self._clock()
            answers = await asyncio.gather(*(self._verify(worker, sample, "calibration") for worker in workers))
            seconds = self._clock() - started
        for pool in self._pools:
            pool.seconds = seconds
        self._cpu_seconds = max(cpu for _, cpu in answers)
        for pool in self._pools:  # full at the start
            pool.budget.tokens, pool.budget.at = math.inf, self._clock()
            pool.budget.refill(self._clock(), self._cpu_seconds)

    async def _spawn(self, background: bool) -> _Worker:
        """An argon2 process, started by subprocess with vfork (no fork handlers run in a
        process full of gRPC's threads) on a thread of its own: no wait for the loop."""
        params = self._params
        args = (params.time_cost, params.memory_kib, params.parallelism)
        command = [sys.executable, "-I", _argon2_worker.__file__, *(str(n) for n in args)]
        command.append(_argon2_worker.BACKGROUND if background else _argon2_worker.FOREGROUND)
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
    def seconds(self) -> float:
        """argon2's time per verification at normal priority, as measured lately on this machine."""
        return self._pools[0].seconds

    @property
    def cpu_seconds(self) -> float:
        """argon2's CPU time per verification, as measured lately on this machine."""
        return self._cpu_seconds

    def process_ids(self, *, background: bool) -> list[int]:
        """The ids of the verifier processes at normal priority, or of the background ones."""
        return [worker.process.pid for pool in self._pools if pool.background == background for worker in pool.workers]

    @property
    def pending(self) -> int:
        """Verifications running or queued."""
        return sum(pool.running for pool in self._pools) + self._queued

    def _pool(self, priority: Priority) -> _Pool:
        return self._pools[priority is Priority.SUSPECT]

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
                    self._hash_worker = await self._spawn(background=False)
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
            job.expires = max(job.expires, now + time_left - self._pool(job.priority).seconds)
            self._promote(job, self.priority(proven, marks))  # a proven asker lifts the run it joins
            return job.result
        if self._closed:
            raise HasherBusy
        # Two distinct secrets for one stored hash, at once or one after the other: at least one
        # of them is wrong, and nothing tells which, so both are suspect, and so is the key for
        # a while. A bot has one secret (its repeats are coalesced above, or ask again the same);
        # a flood tries several per key, and is known for what it is before any run has failed.
        marks = (*marks, ("key", stored_hash))
        last, at = self._last_tried.get(stored_hash, (key[1], now))
        if last != key[1] and now - at < SUSPECT_SECONDS:
            self._mark(marks[-1], now)
            for rival in self._by_hash.get(stored_hash, ()):
                self._demote(rival)
        self._last_tried[stored_hash] = (key[1], now)
        self._last_tried.move_to_end(stored_hash)
        if len(self._last_tried) > MAX_SUSPECTS:
            self._last_tried.popitem(last=False)
        priority = self.priority(proven, marks)
        wait = self._expected_wait(share, priority, now)
        if self.pending >= self._max_pending:
            raise HasherBusy
        seconds = self._pool(priority).seconds
        if wait + seconds <= time_left:
            expires = now + time_left - seconds
        elif priority is not Priority.SUSPECT and wait <= self._max_wait:
            expires = now + self._max_wait  # outlives its caller: remembered for the next request
        else:
            raise HasherBusy
        job = _Job(
            stored_hash, secret, asyncio.get_running_loop().create_future(), cache, marks, expires, share, priority
        )
        self._in_flight[key] = job
        self._by_hash.setdefault(stored_hash, []).append(job)
        job.result.add_done_callback(functools.partial(self._forget, key, job))
        self._queues[priority].setdefault(share, deque()).append(job)
        ARGON2_PENDING.inc()
        self._dispatch()
        return job.result

    def _forget(self, key: tuple[str, bytes], job: _Job, _: object) -> None:
        self._in_flight.pop(key, None)
        rivals = self._by_hash[job.stored_hash]
        rivals.remove(job)
        if not rivals:
            del self._by_hash[job.stored_hash]

    def _demote(self, job: _Job) -> None:
        """Moves a queued CLEAN job to the SUSPECT queue of its share (a PROVEN one stays)."""
        if job.priority is Priority.CLEAN:
            self._requeue(job, Priority.SUSPECT)

    def _promote(self, job: _Job, priority: Priority) -> None:
        if priority < job.priority:
            self._requeue(job, priority)

    def _requeue(self, job: _Job, priority: Priority) -> None:
        """Moves a job still queued to the end of its share's queue at ``priority``."""
        if not job.queued:
            return
        queues = self._queues[job.priority]
        queues[job.share].remove(job)
        if not queues[job.share]:
            del queues[job.share]
        job.priority = priority
        self._queues[priority].setdefault(job.share, deque()).append(job)
        self._dispatch()  # the other pool may be free

    def _mark(self, mark: Mark, now: float) -> None:
        self._failed_at[mark] = now
        self._failed_at.move_to_end(mark)
        while len(self._failed_at) > MAX_SUSPECTS:
            self._failed_at.popitem(last=False)

    def _expected_wait(self, share: str, priority: Priority, now: float) -> float:
        """Seconds until a new job of ``share`` at ``priority`` would start: every job of a
        higher priority its pool serves first, then the shares of its own take turns; one of
        the pool's processes must be free and the budget must hold its cost."""
        pool = self._pool(priority)
        ahead = sum(len(q) for p in pool.serves if p < priority for q in self._queues[p].values())
        queues = self._queues[priority]
        mine = len(queues.get(share, ()))
        ahead += mine + sum(min(len(q), mine + 1) for s, q in queues.items() if s != share)
        for_a_process = max(0, ahead + pool.running - self._processes + 1) / self._processes * pool.seconds
        tokens = pool.budget.refill(now, self._cpu_seconds)
        for_the_budget = max(0.0, (ahead + 1) * self._cpu_seconds - tokens) / pool.budget.rate
        return max(for_a_process, for_the_budget)

    def _next_job(self, pool: _Pool, now: float) -> _Job | None:
        """The job whose turn it is in ``pool`` (priorities in order, shares in turn), dropping
        those whose time ran out unrun (their callers are gone: nobody is told but the cancelled
        future)."""
        for priority in pool.serves:
            queues = self._queues[priority]
            while queues:
                share, queue = next(iter(queues.items()))
                job = queue.popleft()
                if queue:
                    queues.move_to_end(share)
                else:
                    del queues[share]
                job.queued = False
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
        for pool in self._pools:  # the normal priority's first: its jobs get the budget first
            for worker in pool.workers:
                if worker.job is not None:
                    continue
                if pool.budget.refill(now, self._cpu_seconds) < self._cpu_seconds:
                    self._sleep_until_budget(pool.budget)
                    break
                job = self._next_job(pool, now)
                if job is None:
                    break
                job.charged = self._cpu_seconds  # now; corrected by the run's measured cost
                pool.budget.tokens -= job.charged
                worker.job, worker.started = job, now
                self.verifications += 1
                ARGON2_VERIFICATIONS.inc()
                worker.reading = asyncio.get_running_loop().create_task(self._run(pool, worker, job))

    def _sleep_until_budget(self, budget: _Budget) -> None:
        if budget.wake is None and self._queued:
            delay = max(0.001, (self._cpu_seconds - budget.tokens) / budget.rate)
            budget.wake = asyncio.get_running_loop().call_later(delay, self._woken, budget)

    def _woken(self, budget: _Budget) -> None:
        budget.wake = None
        self._dispatch()

    async def _run(self, pool: _Pool, worker: _Worker, job: _Job) -> None:
        try:
            # A process that answers nothing for this long is stuck, not slow: replaced.
            ok, cpu = await asyncio.wait_for(
                self._verify(worker, job.stored_hash, job.secret), STUCK_SECONDS + 20 * pool.seconds
            )
        except (ConnectionError, ValueError, OSError, TimeoutError) as error:
            # Settled first, whatever becomes of the process: its askers, their failure tokens
            # and every later asker of the same secret wait on this job.
            if not job.result.done():
                job.result.set_exception(HasherBusy())
                job.result.exception()  # retrieved: its askers may all be gone
            ARGON2_PENDING.dec()
            if not self._closed:
                log.error("argon2 verifying process failed (%r); starting another", error)
                pool.workers.remove(worker)
                await _stop(worker)
                try:
                    pool.workers.append(await self._spawn(pool.background))
                except OSError as spawning:  # the pool runs one process short until a restart
                    log.error("could not start an argon2 process: %s", spawning)
            self._dispatch()
            return
        if job.cache is not None and ok:
            self._last_tried.pop(job.stored_hash, None)  # the key's secret: no conflict with it
        now = self._clock()
        worker.job = None
        ARGON2_PENDING.dec()
        ARGON2_CPU_SECONDS.inc(cpu)
        self.cpu_used += cpu
        pool.budget.tokens += job.charged - cpu  # the run's measured cost, not the estimate
        pool.seconds = 0.8 * pool.seconds + 0.2 * (now - worker.started)
        self._cpu_seconds = 0.8 * self._cpu_seconds + 0.2 * cpu
        if job.cache is not None:
            if ok:
                job.cache.remember(job.stored_hash, job.secret)
            else:
                job.cache.remember_failure(job.stored_hash, job.secret)
        if not ok:
            for mark in job.marks:
                self._mark(mark, now)
        if not job.result.done():
            job.result.set_result(ok)
        self._dispatch()

    async def close(self) -> None:
        """Refuses new work, cancels what waits and stops the verifier processes."""
        self._closed = True
        for pool in self._pools:
            if pool.budget.wake is not None:
                pool.budget.wake.cancel()
        for queues in self._queues.values():
            for queue in queues.values():
                for job in queue:
                    job.result.cancel()
                    ARGON2_PENDING.dec()
            queues.clear()
        verifiers = [worker for pool in self._pools for worker in pool.workers]
        for worker in verifiers:
            if worker.job is not None:
                worker.job.result.cancel()
                ARGON2_PENDING.dec()
            if worker.reading is not None:
                worker.reading.cancel()
        everyone = [*verifiers, *([self._hash_worker] if self._hash_worker is not None else [])]
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
