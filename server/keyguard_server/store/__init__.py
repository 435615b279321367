"""Storage: every query keyguard makes (the models are in ``_schema``).

Concurrency contract: the event loop never waits on the database. Every store
method is a coroutine; its work runs on a small pool of database threads, each
with its own connection and the models bound to it once, and every wait is
bounded (a timeout ends in :class:`keyguard.Unavailable` or
:class:`keyguard.Aborted`, never in a hung call):

- *reads*: the Authorize point lookups, management reads and the health ping.
  On SQLite the Authorize lookups first run inline on the loop, on a
  read-only connection with no busy wait: a WAL-mode read never waits for a
  writer, and in the rare case it would (recovery after a crash), it falls
  back to the read threads instead of waiting. That saves the thread hop on
  the hot path (see docs/architecture.md for the numbers).
- *writes*: every change, in one transaction with its audit row, and the
  batched last-used times.
- *nonces*: signed requests' replay nonces, on a connection of their own with
  cheaper durability (SQLite ``synchronous=NORMAL``, PostgreSQL
  ``synchronous_commit=off``): a nonce only has to outlive its request's
  receive window, and a crash that loses the last moments of commits is
  followed by a restart longer than that window. Other sessions see the
  nonce at commit either way, so a replay on another replica is refused.

Across processes the per-account limits (count, then insert) are serialised
per account:

- SQLite: every transaction starts with ``BEGIN IMMEDIATE``, taking the file's
  write lock first; ``busy_timeout`` bounds the wait.
- PostgreSQL: the transaction locks the account's row (``SELECT ... FOR
  UPDATE``, after an ``INSERT ... ON CONFLICT DO NOTHING`` so the row exists);
  ``lock_timeout`` bounds the wait. Creates for one account queue on that
  lock, other accounts are unaffected. SERIALIZABLE would also prevent the
  race but aborts one of two conflicting transactions, which every caller
  would then have to retry.

A connection the server dropped (restart, failover, ``pg_terminate_backend``)
is replaced on the next call, which is retried once when that is safe: always
for reads, and for a transaction unless the connection died during COMMIT
(then the outcome is unknown and the caller is told so).

The query builder is used on cold paths for clarity; the per-Authorize lookup
is built once into SQL text and run with ``execute_sql`` (~7 µs instead of
~110 µs per call).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import ipaddress
import json
import logging
import math
import mmap
import os
import socket
import sqlite3
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar

import peewee as pw
import psycopg2
from playhouse import db_url

from keyguard import (
    Aborted,
    AlreadyExists,
    ApiKey,
    AuditAction,
    AuditEvent,
    FailedPrecondition,
    KeyguardError,
    KeyType,
    LimitExceeded,
    NotFound,
    Permission,
    StorageFull,
    Unavailable,
    WithdrawalAddress,
)
from keyguard_server._metrics import DATABASE_FAILURES, DATABASE_WRITABLE
from keyguard_server._schema import MODELS, AccountModel, AddressModel, AuditModel, KeyModel, NonceModel, migrate
from keyguard_server._secrets import ACCESS_KEY_RE
from keyguard_server._threads import share_core_until
from keyguard_server.authorize._domain import LATER, KeyRow, Later, now_us

P = ParamSpec("P")
T = TypeVar("T")

log = logging.getLogger("keyguard.store")

# An outage's WARNINGs: at most one per kind in this many seconds (each call meets it).
OUTAGE_LOG_SECONDS = 10.0
# Replicas starting together wait for the one that migrates.
MIGRATION_TIMEOUT = 120.0
# Distinct key rows whose derived state (KeyRow) is kept; all are dropped when full.
MAX_MEMOISED_ROWS = 20_000
# PostgreSQL SQLSTATEs: lock_timeout and statement_timeout expired.
_LOCK_NOT_AVAILABLE = "55P03"
_QUERY_CANCELED = "57014"
_CONFLICTS = ("40P01", "40001")  # deadlock detected, serialization failure: rolled back, retry
_READ_ONLY = "25006"  # a primary turned standby (failover): a new connection finds the new primary


@dataclass(frozen=True)
class AccountState:
    """An account's settings as stored; the domain decides what they mean now."""

    address_management: bool
    # A pending "off": management stays on until then.
    address_management_off_at_us: int | None
    frozen: bool
    key_count: int


def to_datetime(microseconds: int) -> datetime:
    return datetime.fromtimestamp(microseconds / 1e6, tz=UTC)


@dataclass(frozen=True)
class DatabaseSettings:
    """Where the database is, and how long any wait for it may last."""

    url: str
    # Opening a connection (PostgreSQL: TCP connect and authentication).
    connect_timeout: float = 3.0
    # One statement (PostgreSQL statement_timeout); also bounds every store call.
    statement_timeout: float = 5.0
    # Waiting for another transaction's lock (PostgreSQL lock_timeout, SQLite busy_timeout).
    lock_timeout: float = 2.0
    # PostgreSQL TCP keepalives: a silent peer is declared dead after about 3x this.
    keepalive_seconds: float = 5.0
    read_threads: int = 4
    write_threads: int = 2

    @property
    def is_sqlite(self) -> bool:
        return self.url.startswith("sqlite")

    @property
    def call_timeout(self) -> float:
        """The longest a store call may take, queueing, connecting and running included."""
        return self.connect_timeout + self.statement_timeout + 0.5


# The wal-index header's first copy (https://sqlite.org/walformat.html#the_wal_index_file_format):
# its change counter, frame count, salts and checksum change with every commit. It starts with
# the wal-index format version (native byte order) and an "initialised" byte at offset 12.
WAL_INDEX_HEADER = 48
WAL_INDEX_VERSION = 3007000


class _WalIndex:
    """A SQLite database's wal-index header (its ``-shm`` file), mapped read-only.

    Closing *any* descriptor of a file drops *all* of the process's POSIX locks on it, SQLite's
    own shared lock on ``-shm`` included: the lock that tells another process opening the
    database that the wal-index is in use and must not be rebuilt. A store cannot know when
    every SQLite connection of the process to the database is closed (its threads' connections
    close when their threads and the garbage collector get to them), so the file and the mapping
    (which keeps a descriptor of its own) are opened once per ``-shm`` file and never closed: a
    descriptor and a page per database for the life of the process.
    """

    _open: ClassVar[dict[tuple[int, int], _WalIndex]] = {}  # by the -shm file's (device, inode)

    def __init__(self, fd: int) -> None:
        self._fd = fd
        try:
            self._mapping: mmap.mmap | None = mmap.mmap(fd, WAL_INDEX_HEADER, access=mmap.ACCESS_READ)
        except (OSError, ValueError):
            self._mapping = None
        # Only a header SQLite's format describes is read (else None: data_version per call).
        self.header = (
            self._mapping
            if self._mapping is not None
            and int.from_bytes(self._mapping[0:4], sys.byteorder) == WAL_INDEX_VERSION
            and self._mapping[12] == 1
            else None
        )

    @classmethod
    def header_of(cls, database: pw.Database) -> mmap.mmap | None:
        """The database's wal-index header, mapped, or None when it has none to use (not in WAL
        mode, in memory, not in SQLite's format): data_version is read on every call then."""
        connection = _connection(database)
        if connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            return None
        # The file as SQLite opened it (symbolic links resolved), not as the URL spelled it.
        main = next((row[2] for row in connection.execute("PRAGMA database_list") if row[1] == "main"), "")
        if not main:
            return None
        # SQLite deletes -shm when its last connection closes and makes a new one: a file mapped
        # before is another inode, whose header never changes again.
        path = f"{main}-shm"
        try:
            status = os.stat(path)
            index = cls._open.get((status.st_dev, status.st_ino))
            if index is None:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # never closed: see the class
                status = os.fstat(fd)
                index = cls._open[status.st_dev, status.st_ino] = cls(fd)
        except OSError:
            return None
        return index.header


def open_database(settings: DatabaseSettings, *, role: str = "main") -> pw.Database:
    """A Database from a URL, with its timeouts; SQLite gets WAL, FULL sync and the write-lock-first rule.

    ``synchronous=FULL``: a delete acknowledged to the caller must survive a
    power cut, or a revoked key could come back. ``role`` "inline" is the
    loop's read-only SQLite connection that never waits for a lock; "nonces"
    trades durability for speed as the module docstring argues.
    """
    url = settings.url
    scheme = url.split("://", 1)[0]
    if scheme in ("postgres", "postgresql"):
        options = {
            "statement_timeout": int(settings.statement_timeout * 1000),
            "lock_timeout": int(settings.lock_timeout * 1000),
            # A transaction left open by a stalled client must not hold its locks for ever.
            "idle_in_transaction_session_timeout": int(settings.call_timeout * 1000) + 1000,
        }
        if role == "nonces":
            options["synchronous_commit"] = "off"  # type: ignore[assignment]
        keepalive = max(1, int(settings.keepalive_seconds))
        database: pw.Database = db_url.connect(
            "postgresql://" + url.split("://", 1)[1],
            connect_timeout=max(1, round(settings.connect_timeout)),
            keepalives=1,
            keepalives_idle=keepalive,
            keepalives_interval=keepalive,
            keepalives_count=3,
            # Unacknowledged data (a dead peer) fails the call instead of hanging it.
            tcp_user_timeout=int((settings.statement_timeout + settings.connect_timeout) * 1000),
            application_name=f"keyguard-{role}",
            options=" ".join(f"-c {name}={value}" for name, value in options.items()),
        )
        return database
    if settings.is_sqlite:
        path = url.split(":///", 1)[-1].split("?", 1)[0]
        if path and path != ":memory:" and role == "main":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        busy_ms = 0 if role == "inline" else int(settings.lock_timeout * 1000)
        pragmas: dict[str, object] = {"busy_timeout": busy_ms, "foreign_keys": 1}
        if role == "main":
            pragmas.update(journal_mode="wal", synchronous="full")
        elif role == "nonces":
            pragmas["synchronous"] = "normal"
        else:
            pragmas["query_only"] = 1
        database = db_url.connect(
            url,
            lock_type="IMMEDIATE",
            timeout=busy_ms / 1000,
            pragmas=pragmas,
            check_same_thread=False,  # each connection has one thread; only close() comes from another
        )
        return database
    database = db_url.connect(url)
    return database


class WriteState:
    """Whether writes land: False from a write that met a full disk until one lands again. The
    health watcher reports it (``keyguard.writes``) and so does ``keyguard_database_writable``."""

    def __init__(self) -> None:
        self._landing = True
        DATABASE_WRITABLE.set(1)

    @property
    def landing(self) -> bool:
        return self._landing

    @landing.setter
    def landing(self, landing: bool) -> None:
        if landing != self._landing:
            self._landing = landing
            DATABASE_WRITABLE.set(int(landing))
            if landing:
                log.info("writes land again: the database's disk has room")


class _DatabaseThreads:
    """A bounded pool of threads, each with its own connection to ``db`` and the models bound to it.

    :meth:`call` runs a function there and waits at most ``timeout``; a call
    that is still queued then is cancelled (so it changes nothing), one that
    is running is abandoned to finish (or fail) on its own.
    """

    def __init__(
        self, db: pw.Database, name: str, threads: int, *, changes: bool, writes: WriteState | None = None
    ) -> None:
        """``writes``: told of every call that returns (a write landed) or meets a full disk."""
        self.db = db
        self._write_state = writes
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=name, initializer=db.bind, initargs=(MODELS,))
        self._changes = changes  # whether a call that ran past its bound may have changed something
        self._connections: set[Any] = set()  # every thread's connection, to close them all at the end
        self._lock = threading.Lock()

    async def call(self, within: float, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        future = self._pool.submit(functools.partial(self._reconnecting, fn, *args, **kwargs))
        share_core_until(future)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(future), within)
        except StorageFull:
            if self._write_state is not None:
                self._write_state.landing = False
            raise
        except TimeoutError:
            if future.cancel() or not self._changes:
                raise Unavailable(f"the database did not answer within {within:g} s; nothing was changed") from None
            raise Unavailable(
                f"the database did not answer within {within:g} s; a change may or may not have been applied"
            ) from None
        if self._write_state is not None:
            self._write_state.landing = True
        return result

    def _reconnecting(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn``, retried once on a fresh connection if the old one turned out to be dead."""
        _thread.committing = False
        try:
            return _mapped(fn, *args, **kwargs)
        except _ConnectionLost as lost:
            self._discard_connection()
            if _thread.committing:
                _report_outage("connection_lost", "the database connection was lost while committing", lost)
                raise Unavailable(
                    "the database connection was lost while committing; the change may or may not have been applied"
                ) from lost.__cause__
        try:
            return _mapped(fn, *args, **kwargs)
        except _ConnectionLost as lost:
            self._discard_connection()
            _report_outage("unreachable", "the database is unreachable", lost)
            raise Unavailable("the database is unreachable; nothing was changed") from lost.__cause__
        finally:
            self._remember_connection()

    def _remember_connection(self) -> None:
        if not self.db.is_closed():
            with self._lock:
                self._connections.add(_connection(self.db))

    def _discard_connection(self) -> None:
        _discard_connection(self.db)

    def close(self) -> None:
        """Cancels queued calls and closes every connection (a thread still running a statement
        gets an error, which nobody waits for any more)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            with contextlib.suppress(Exception):
                connection.close()


def _execute(db: Any, sql: str, params: tuple[object, ...] = ()) -> Any:
    """``db.execute_sql`` (peewee's stubs leave it untyped): the cursor."""
    return db.execute_sql(sql, params)


def _connection(db: Any) -> Any:
    """This thread's open connection to ``db``."""
    return db.connection()


def _discard_connection(db: pw.Database) -> None:
    """Forgets this thread's connection to ``db`` (dead, or in doubt); the next call reconnects."""
    with contextlib.suppress(Exception):
        db.close()
    db.dispose()  # whatever close() managed


_thread = threading.local()  # per database thread: whether its transaction is committing


@contextlib.contextmanager
def _transaction(db: pw.Database) -> Iterator[None]:
    """One transaction on this thread's connection, marked while it commits (see ``_reconnecting``)."""
    with db.atomic():
        yield
        _thread.committing = True


class _Failure(enum.Enum):
    """What a failed database call means to its caller, whatever the driver raised."""

    LOCKED = "locked"  # a lock not had in time: ABORTED
    CONFLICT = "conflict"  # rolled back for a concurrent change: ABORTED
    TIMED_OUT = "timed out"  # the statement timeout: UNAVAILABLE
    UNREACHABLE = "unreachable"  # no usable connection: a new one may work, else UNAVAILABLE
    DISK_FULL = "disk full"  # the change was rolled back: RESOURCE_EXHAUSTED


# SQLite's primary result codes (https://sqlite.org/rescode.html), as sqlite3 reports them.
_SQLITE_BUSY, _SQLITE_LOCKED, _SQLITE_FULL, _SQLITE_CANTOPEN = 5, 6, 13, 14
_SQLITE_TEXTS = (
    ("database is locked", _Failure.LOCKED),
    ("database table is locked", _Failure.LOCKED),
    ("database or disk is full", _Failure.DISK_FULL),
    ("unable to open database file", _Failure.UNREACHABLE),
)
_SQLITE_CODES = {
    _SQLITE_BUSY: _Failure.LOCKED,
    _SQLITE_LOCKED: _Failure.LOCKED,
    _SQLITE_FULL: _Failure.DISK_FULL,
    _SQLITE_CANTOPEN: _Failure.UNREACHABLE,
}
# PostgreSQL's class 53, insufficient resources: disk_full, its class's generic code, out_of_memory.
# (53300 too_many_connections comes from libpq at connect, without a SQLSTATE: unreachable.)
_PG_DISK_FULL = ("53100", "53000", "53200")
# SQLSTATE classes of a connection that is gone: 08 connection exception, 57P0x the server
# shutting down, crashed or not yet accepting connections (a restart).
_PG_UNREACHABLE_PREFIXES = ("08", "57P01", "57P02", "57P03")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception behind it, outermost first: peewee's ``orig`` (peewee wraps a
    connection that cannot be opened twice, once in ``connect`` and again around the statement
    that opened it), ``__cause__`` and ``__context__`` (a rollback that failed after the error)."""
    seen: set[int] = set()
    todo = deque([exc])
    while todo:
        current = todo.popleft()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        for behind in (getattr(current, "orig", None), current.__cause__, current.__context__):
            if isinstance(behind, BaseException):
                todo.append(behind)


def _failure_of(exc: BaseException) -> _Failure | None:
    """The failure a database error stands for, read from the driver's own error wherever it is
    wrapped (the first one in ``_chain`` that says); None: not one keyguard expects."""
    for error in _chain(exc):
        if isinstance(error, psycopg2.Error):
            code = error.pgcode or ""
            if code == _LOCK_NOT_AVAILABLE:
                return _Failure.LOCKED
            if code in _CONFLICTS:
                return _Failure.CONFLICT
            if code == _QUERY_CANCELED:
                return _Failure.TIMED_OUT
            if code in _PG_DISK_FULL:
                return _Failure.DISK_FULL
            if code == _READ_ONLY or code.startswith(_PG_UNREACHABLE_PREFIXES):
                return _Failure.UNREACHABLE
            # No SQLSTATE: libpq's own error (refused, timed out, closed by the server).
            if not code and isinstance(error, (psycopg2.OperationalError, psycopg2.InterfaceError)):
                return _Failure.UNREACHABLE
        elif isinstance(error, sqlite3.Error):
            known = _SQLITE_CODES.get(getattr(error, "sqlite_errorcode", -1) & 0xFF)
            text = str(error)
            known = known or next((failure for words, failure in _SQLITE_TEXTS if words in text), None)
            if known is not None:
                return known
    return None


class _ConnectionLost(Exception):
    """The connection is dead (its cause says why); a new one may work."""


class _RateLimitedWarnings:
    """An expected outage's WARNINGs: one line per kind per ``every`` seconds, however many calls
    meet it, naming the driver's own words (no traceback: nothing is wrong with keyguard), and
    counting the ones left out meanwhile. Thread-safe (database threads log)."""

    def __init__(self, every: float) -> None:
        self._every = every
        self._last: dict[str, tuple[float, int]] = {}  # kind -> (when last logged, left out since)
        self._lock = threading.Lock()

    def warning(self, kind: str, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        with self._lock:
            logged_at, left_out = self._last.get(kind, (-math.inf, 0))
            if now - logged_at < self._every:
                self._last[kind] = (logged_at, left_out + 1)
                return
            self._last[kind] = (now, 0)
        errors = [e for e in _chain(exc) if isinstance(e, (psycopg2.Error, sqlite3.Error))]
        words = " ".join(str(errors[-1] if errors else exc.__cause__ or exc).split())  # the driver's, on one line
        since = f" (and {left_out} more in the last {now - logged_at:.0f} s)" if left_out else ""
        log.warning("%s: %s%s", what, words, since)


_outage_log = _RateLimitedWarnings(OUTAGE_LOG_SECONDS)


def _report_outage(reason: str, what: str, exc: BaseException) -> None:
    """A call failed for the database's sake: counted (``keyguard_database_failures_total``) and
    logged, rate-limited."""
    DATABASE_FAILURES.labels(reason).inc()
    _outage_log.warning(reason, what, exc)


def _mapped(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """The one mapping of database failures to what they mean to a caller (keyguard errors pass
    through; one keyguard does not expect is raised as it is, and answers INTERNAL)."""
    try:
        return fn(*args, **kwargs)
    except (pw.PeeweeException, psycopg2.Error, sqlite3.Error) as exc:
        failure = _failure_of(exc)
        if failure is _Failure.LOCKED:
            raise Aborted(
                "another change holds the database lock this change needs (lock timeout); nothing was changed"
            ) from exc
        if failure is _Failure.TIMED_OUT:
            raise Unavailable("the database did not answer in time (statement timeout); nothing was changed") from exc
        if failure is _Failure.CONFLICT:
            raise Aborted("the change met a concurrent one and was rolled back; nothing was changed") from exc
        if failure is _Failure.DISK_FULL:  # a failed statement or COMMIT: rolled back
            _report_outage("disk_full", "the database's disk is full", exc)
            raise StorageFull("the database's disk is full; nothing was changed") from exc
        if failure is _Failure.UNREACHABLE:
            raise _ConnectionLost from exc
        raise

    # -- keys -----------------------------------------------------------------


# Placeholder values a _Statement's query is built with, each standing for one parameter.
_S_ACCOUNT = "\x00account_id"
_S_ACCESS_KEY = "\x00access_key"
_S_CALLER = "\x00caller"
_S_DETAILS = "\x00details"
_S_TIME = -7_000_001
_S_ACTION = -7_000_002


class _Statement:
    """A query's SQL, built once; each run binds its placeholder values (``_S_*``) anew and keeps
    the rest of the parameters peewee made (column defaults) as they were."""

    def __init__(self, query: pw.Query | None = None) -> None:
        self.sql, self._params = query.sql() if query is not None else ("", [])

    def params(self, values: dict[object, object]) -> tuple[object, ...]:
        return tuple(values.get(p, p) for p in self._params)

    def run(self, db: pw.Database, values: dict[object, object]) -> Any:
        return _execute(db, self.sql, self.params(values))


# What a change of a key may write (update_key, rotate_key): never its identity, its creation
# time, or the last-used columns UsageRecorder writes (a change must not undo a flush).
_KEY_SETTINGS = (
    KeyModel.name,
    KeyModel.permission,
    KeyModel.allowed_ips,
    KeyModel.secret_hash,
    KeyModel.expires_at_us,
    KeyModel.enabled,
    KeyModel.previous_secret_hash,
    KeyModel.previous_valid_until_us,
    KeyModel.key_type,
    KeyModel.public_key,
    KeyModel.previous_public_key,
    KeyModel.symbols,
    KeyModel.unrestricted_since_us,
)
_S_ID = "\x00id"
_S_ON = "\x00on"
_S_OFF_AT = "\x00off_at"
_S_COLUMN = {field: f"\x00column {field.name}" for field in _KEY_SETTINGS}


class _Queries:
    """The store's SQL, run on database threads (never on the event loop); see the module docstring."""

    def __init__(self, db: pw.Database, unrestricted_lapse_us: int = 0) -> None:
        self.db = db
        self._row_locks = isinstance(db, pw.PostgresqlDatabase)
        # The unrestricted-key policy (0: off), for ApiKey.unrestricted_until.
        self._lapse_us = unrestricted_lapse_us
        self.auth_sql = self.auth_many_sql = self.whitelisted_sql = self.nonce_sql = ""
        # Every change's own statements, built once too (peewee builds SQL anew on each
        # execute: ~90-100 µs a statement on this project's VM).
        self._account_insert = self._account_select = self._audit_insert = _Statement()
        self._key_select = self._key_update = self._key_count = _Statement()
        self._account_state = self._management_update = _Statement()
        self._address_count = self._address_select = self._address_delete = _Statement()

    def build(self) -> None:
        """Builds the hot path's SQL once (on a thread whose models are bound)."""
        columns = (
            KeyModel.account_id,
            KeyModel.name,
            KeyModel.permission,
            KeyModel.allowed_ips,
            KeyModel.secret_hash,
            pw.fn.COALESCE(AccountModel.address_management, pw.SQL("FALSE")),
            KeyModel.enabled,
            KeyModel.expires_at_us,
            KeyModel.previous_secret_hash,
            KeyModel.previous_valid_until_us,
            KeyModel.key_type,
            KeyModel.public_key,
            KeyModel.previous_public_key,
            KeyModel.last_used_ip,
            pw.fn.COALESCE(AccountModel.frozen, pw.SQL("FALSE")),
            AccountModel.address_management_off_at_us,
            KeyModel.symbols,
            KeyModel.unrestricted_since_us,
        )
        # The row as one JSON array text (the memo key of its KeyRow as it comes): the driver
        # hands over one value instead of 18 (measured on SQLite: 17 -> 10 µs per lookup).
        # (PostgreSQL: cast to text, or psycopg2 would parse it on every read.)
        row = pw.fn.json_build_array(*columns).cast("text") if self._row_locks else pw.fn.json_array(*columns)
        key_and_account = KeyModel.select(row).join(
            AccountModel, pw.JOIN.LEFT_OUTER, on=AccountModel.account_id == KeyModel.account_id
        )
        self.auth_sql = key_and_account.where(KeyModel.access_key == "").sql()[0]
        # PostgreSQL: every lookup waiting at once, in one statement (see _LoopLookups).
        batched = key_and_account.select_extend(KeyModel.access_key).where(
            KeyModel.access_key == pw.fn.ANY(pw.SQL("%s"))
        )
        self.auth_many_sql = batched.sql()[0]
        # Whether the destination is whitelisted, and from when it is usable (the hold).
        whitelisted = AddressModel.select(AddressModel.usable_from_us).where(
            (AddressModel.account_id == "")
            & (AddressModel.asset == "")
            & (AddressModel.address == "")
            & (AddressModel.memo == "")
        )
        self.whitelisted_sql = whitelisted.sql()[0]
        self.nonce_sql = NonceModel.insert(access_key="", nonce="", seen_at_us=0).sql()[0]
        self._account_insert = _Statement(AccountModel.insert(account_id=_S_ACCOUNT).on_conflict_ignore())
        frozen = AccountModel.select(AccountModel.frozen).where(AccountModel.account_id == _S_ACCOUNT)
        self._account_select = _Statement(frozen.for_update() if self._row_locks else frozen)
        self._key_select = _Statement(
            KeyModel.select().where((KeyModel.account_id == _S_ACCOUNT) & (KeyModel.access_key == _S_ACCESS_KEY))
        )
        self._key_update = _Statement(
            KeyModel.update({field: pw.Value(_S_COLUMN[field], converter=False) for field in _KEY_SETTINGS}).where(
                KeyModel.id == pw.Value(_S_ID, converter=False)
            )
        )
        self._key_count = _Statement(KeyModel.select(pw.fn.COUNT(KeyModel.id)).where(KeyModel.account_id == _S_ACCOUNT))
        self._account_state = _Statement(
            AccountModel.select(
                AccountModel.address_management, AccountModel.address_management_off_at_us, AccountModel.frozen
            ).where(AccountModel.account_id == _S_ACCOUNT)
        )
        self._management_update = _Statement(
            AccountModel.update(
                {
                    AccountModel.address_management: pw.Value(_S_ON, converter=False),
                    AccountModel.address_management_off_at_us: pw.Value(_S_OFF_AT, converter=False),
                }
            ).where(AccountModel.account_id == _S_ACCOUNT)
        )
        self._address_count = _Statement(
            AddressModel.select(pw.fn.COUNT(AddressModel.id)).where(AddressModel.account_id == _S_ACCOUNT)
        )
        this_address = (AddressModel.account_id == _S_ACCOUNT) & (AddressModel.id == pw.Value(_S_ID, converter=False))
        self._address_select = _Statement(
            AddressModel.select(AddressModel.asset, AddressModel.address, AddressModel.memo).where(this_address)
        )
        self._address_delete = _Statement(AddressModel.delete().where(this_address))
        self._audit_insert = _Statement(
            AuditModel.insert(
                time_us=_S_TIME,
                caller=_S_CALLER,
                action=_S_ACTION,
                account_id=_S_ACCOUNT,
                access_key=_S_ACCESS_KEY,
                details=_S_DETAILS,
            )
        )

    def ping(self) -> None:
        _execute(self.db, "SELECT 1").fetchone()

    def fetch_one(self, sql: str, params: tuple[object, ...]) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = _execute(self.db, sql, params).fetchone()
        return row

    def probe_write(self) -> None:
        """A write that leaves nothing behind when it lands: a nonce row (of no key, so no request
        can ever match it) inserted and deleted in one transaction, whose commit still writes."""
        probe = f"write-probe-{uuid.uuid4().hex}"
        with _transaction(self.db):
            NonceModel.insert(access_key="", nonce=probe, seen_at_us=0).execute()
            NonceModel.delete().where((NonceModel.access_key == "") & (NonceModel.nonce == probe)).execute()

    def whitelisted(self, account_id: str, asset: str, address: str, memo: str) -> bool:
        params = (account_id, asset, address, memo)
        return _execute(self.db, self.whitelisted_sql, params).fetchone() is not None

    def record_last_used(self, usage: dict[str, tuple[int, str]]) -> None:
        """Batch of access key -> (time, ip); never moves a last-used time backwards."""
        with _transaction(self.db):
            for access_key, (at_us, ip) in sorted(usage.items()):  # one order: replicas never deadlock
                KeyModel.update(last_used_at_us=at_us, last_used_ip=ip).where(
                    (KeyModel.access_key == access_key)
                    & (KeyModel.last_used_at_us.is_null() | (KeyModel.last_used_at_us < at_us))
                ).execute()

    def _key(self, account_id: str, access_key: str) -> KeyModel | None:
        """The account's key as a model instance, or None."""
        params = self._key_select.params({_S_ACCOUNT: account_id, _S_ACCESS_KEY: access_key})
        return next(iter(KeyModel.raw(self._key_select.sql, *params)), None)

    def _save_key(self, row: KeyModel) -> None:
        """Writes ``row``'s settings and credentials (``_KEY_SETTINGS``) back."""
        values: dict[object, object] = {
            _S_COLUMN[f]: f.db_value(getattr(row, f.name))  # type: ignore[no-untyped-call]  # peewee is untyped
            for f in _KEY_SETTINGS
        }
        values[_S_ID] = row.id
        self._key_update.run(self.db, values)

    def _lock_account(self, account_id: str) -> bool:
        """Inside a transaction: serialise this account's changes across processes. Returns
        whether the account is frozen, read under the lock: a freeze committed before it is seen,
        and one not yet committed waits for this transaction (it locks the same row)."""
        self._account_insert.run(self.db, {_S_ACCOUNT: account_id})
        row = self._account_select.run(self.db, {_S_ACCOUNT: account_id}).fetchone()
        return bool(row[0])

    def _lock_unfrozen(self, account_id: str) -> None:
        """``_lock_account`` for a change that widens or creates access: refused (nothing
        written) while the account is frozen."""
        if self._lock_account(account_id):
            raise _frozen(account_id)

    def check_unfrozen(self, account_id: str) -> None:
        """Outside a transaction, before costly work (argon2): an early answer only; the change's
        own transaction decides (``_lock_unfrozen``)."""
        if AccountModel.select().where((AccountModel.account_id == account_id) & AccountModel.frozen).exists():
            raise _frozen(account_id)

    def _audit(
        self, caller: str, action: AuditAction, account_id: str, access_key: str = "", **details: object
    ) -> None:
        self._audit_insert.run(
            self.db,
            {
                _S_TIME: now_us(),
                _S_CALLER: caller,
                _S_ACTION: int(action),
                _S_ACCOUNT: account_id,
                _S_ACCESS_KEY: access_key,
                _S_DETAILS: json.dumps({k: str(v) for k, v in details.items()}, sort_keys=True),
            },
        )

    def insert_key(
        self,
        *,
        caller: str,
        account_id: str,
        access_key: str,
        name: str,
        permission: Permission,
        allowed_ips: list[str],
        secret_hash: str,
        max_keys: int,
        expires_at_us: int | None = None,
        key_type: KeyType = KeyType.SECRET,
        public_key: str = "",
        symbols: tuple[str, ...] = (),
        now: int | None = None,
    ) -> ApiKey:
        """Insert a key unless the account is full or the name taken, atomically (``now``: the
        domain's clock, else the system's)."""
        with _transaction(self.db):
            self._lock_unfrozen(account_id)
            self.check_key_room(account_id, name, max_keys)
            created = now_us() if now is None else now
            row = KeyModel(
                account_id=account_id,
                access_key=access_key,
                name=name,
                permission=int(permission),
                allowed_ips=" ".join(allowed_ips),
                secret_hash=secret_hash,
                created_at_us=created,
                expires_at_us=expires_at_us,
                key_type=int(key_type),
                public_key=public_key,
                symbols=" ".join(symbols),
                unrestricted_since_us=None if allowed_ips else created,
            )
            row.save(force_insert=True)
            self._audit(
                caller,
                AuditAction.KEY_CREATED,
                account_id,
                access_key,
                name=name,
                permission=permission.name,
                allowed_ips=" ".join(allowed_ips),
                **({"expires_at_us": expires_at_us} if expires_at_us else {}),
                **({"key_type": key_type.name} if key_type is not KeyType.SECRET else {}),
                **({"symbols": " ".join(symbols)} if symbols else {}),
            )
        return _key_row(row, self._lapse_us)

    def check_key_room(self, account_id: str, name: str, max_keys: int) -> None:
        if KeyModel.select().where((KeyModel.account_id == account_id) & (KeyModel.name == name)).exists():
            raise AlreadyExists(f"account {account_id!r} already has a key named {name!r}")
        if KeyModel.select().where(KeyModel.account_id == account_id).count() >= max_keys:
            raise LimitExceeded(f"account {account_id!r} already has the maximum of {max_keys} keys")

    def list_keys(self, account_id: str) -> list[ApiKey]:
        query = KeyModel.select().where(KeyModel.account_id == account_id).order_by(KeyModel.id)
        return [_key_row(k, self._lapse_us) for k in query]

    def get_key(self, account_id: str, access_key: str) -> ApiKey:
        key = self._key(account_id, access_key)
        if key is None:
            raise NotFound(f"account {account_id!r} has no key {access_key!r}")
        return _key_row(key, self._lapse_us)

    def update_key(
        self,
        *,
        caller: str,
        account_id: str,
        access_key: str,
        changes: dict[str, Any],
        check: Callable[[ApiKey], None],
        now: int | None = None,
    ) -> ApiKey:
        """Applies ``changes`` (column -> value) if ``check`` accepts the resulting key, atomically.
        An allowlist emptied ``now`` (the domain's clock, else the system's) starts the key's
        unrestricted period; one set ends it."""
        with _transaction(self.db):
            self._lock_unfrozen(account_id)  # any field: support unfreezes first
            row = self._key(account_id, access_key)
            if row is None:
                raise NotFound(f"account {account_id!r} has no key {access_key!r}")
            if "name" in changes and changes["name"] != row.name:
                taken = KeyModel.select().where(
                    (KeyModel.account_id == account_id) & (KeyModel.name == changes["name"])
                )
                if taken.exists():
                    raise AlreadyExists(f"account {account_id!r} already has a key named {changes['name']!r}")
            if "allowed_ips" in changes and bool(changes["allowed_ips"]) != bool(row.allowed_ips):
                # Unrestricted from now (the policy counts from here), or restricted again.
                row.unrestricted_since_us = None if changes["allowed_ips"] else (now_us() if now is None else now)
            for column, value in changes.items():
                setattr(row, column, value)
            updated = _key_row(row, self._lapse_us)
            check(updated)
            if changes:
                self._save_key(row)
                self._audit(caller, AuditAction.KEY_UPDATED, account_id, access_key, **changes)
        return updated

    def rotate_key(
        self,
        *,
        caller: str,
        account_id: str,
        access_key: str,
        grace_us: int,
        secret_hash: str = "",
        public_key: str = "",
    ) -> ApiKey:
        """New credential (hash for SECRET keys, public key for ED25519); the old one
        stays valid for ``grace_us`` (0: not at all)."""
        with _transaction(self.db):
            self._lock_unfrozen(account_id)
            row = self._key(account_id, access_key)
            if row is None:
                raise NotFound(f"account {account_id!r} has no key {access_key!r}")
            row.previous_secret_hash = row.secret_hash if grace_us else ""
            row.previous_public_key = row.public_key if grace_us else ""
            row.previous_valid_until_us = now_us() + grace_us if grace_us else None
            row.secret_hash = secret_hash
            row.public_key = public_key
            self._save_key(row)
            self._audit(caller, AuditAction.KEY_ROTATED, account_id, access_key, grace_seconds=grace_us // 10**6)
            return _key_row(row, self._lapse_us)

    def delete_key(self, *, caller: str, account_id: str, access_key: str) -> None:
        with _transaction(self.db):
            deleted = (
                KeyModel.delete()
                .where((KeyModel.account_id == account_id) & (KeyModel.access_key == access_key))
                .execute()
            )
            if not deleted:
                raise NotFound(f"account {account_id!r} has no key {access_key!r}")
            self._audit(caller, AuditAction.KEY_DELETED, account_id, access_key)

    def delete_all_keys(self, *, caller: str, account_id: str) -> int:
        with _transaction(self.db):
            keys = [k.access_key for k in KeyModel.select(KeyModel.access_key).where(KeyModel.account_id == account_id)]
            KeyModel.delete().where(KeyModel.account_id == account_id).execute()
            self._audit(caller, AuditAction.ALL_KEYS_DELETED, account_id, count=len(keys), access_keys=" ".join(keys))
        return len(keys)

    # -- account settings -----------------------------------------------------

    def account_settings(self, account_id: str) -> AccountState:
        """The account's stored settings and key count; defaults for an account never seen."""
        account = self._account_state.run(self.db, {_S_ACCOUNT: account_id}).fetchone()
        count = int(self._key_count.run(self.db, {_S_ACCOUNT: account_id}).fetchone()[0])
        if account is None:
            return AccountState(False, None, False, count)
        management, off_at_us, frozen = account
        return AccountState(bool(management), off_at_us, bool(frozen), count)

    def set_address_management(self, *, caller: str, account_id: str, enabled: bool, now: int, hold_us: int) -> None:
        """On: at once, cancelling a pending off. Off: after ``hold_us`` (0: at once); while an
        off is pending, asking again changes nothing (the hold is not restarted, nor audited).
        Off is refused while the account is frozen."""
        with _transaction(self.db):
            if self._lock_account(account_id) and not enabled:
                raise _frozen(account_id)  # on narrows access, so it is allowed
            management, off_at, _ = self._account_state.run(self.db, {_S_ACCOUNT: account_id}).fetchone()
            pending = bool(management) and off_at is not None and now < off_at
            on = bool(management) and (off_at is None or now < off_at)

            def set_management(on: bool, off_at_us: int | None) -> None:
                self._management_update.run(self.db, {_S_ACCOUNT: account_id, _S_ON: on, _S_OFF_AT: off_at_us})

            if enabled:
                set_management(True, None)
                if pending:
                    self._audit(caller, AuditAction.ADDRESS_MANAGEMENT_OFF_CANCELLED, account_id, off_at_us=off_at)
                else:
                    self._audit(caller, AuditAction.ADDRESS_MANAGEMENT_ENABLED, account_id)
            elif pending:
                return
            elif on and hold_us > 0:
                set_management(True, now + hold_us)
                self._audit(
                    caller, AuditAction.ADDRESS_MANAGEMENT_OFF_REQUESTED, account_id, effective_at_us=now + hold_us
                )
            else:
                set_management(False, None)
                self._audit(caller, AuditAction.ADDRESS_MANAGEMENT_DISABLED, account_id)

    def set_frozen(self, *, caller: str, account_id: str, frozen: bool, reason: str) -> None:
        """Freezes or unfreezes the account's API access (every call audited, repeated or not)."""
        with _transaction(self.db):
            self._lock_account(account_id)
            AccountModel.update(frozen=frozen).where(AccountModel.account_id == account_id).execute()
            action = AuditAction.ACCOUNT_FROZEN if frozen else AuditAction.ACCOUNT_UNFROZEN
            self._audit(caller, action, account_id, **({"reason": reason} if reason else {}))

    # -- withdrawal whitelist -------------------------------------------------

    def add_address(
        self,
        *,
        caller: str,
        account_id: str,
        asset: str,
        address: str,
        memo: str,
        label: str,
        max_addresses: int,
        now: int,
        hold_us: int,
    ) -> WithdrawalAddress:
        """Whitelists the destination at ``now``, usable for withdrawals ``hold_us`` later
        (refused while the account is frozen)."""
        with _transaction(self.db):
            self._lock_unfrozen(account_id)
            if self.whitelisted(account_id, asset, address, memo):
                raise AlreadyExists(f"{asset} address {address!r} is already on the whitelist")
            if self._address_count.run(self.db, {_S_ACCOUNT: account_id}).fetchone()[0] >= max_addresses:
                raise LimitExceeded(
                    f"account {account_id!r} already has the maximum of {max_addresses} whitelisted addresses"
                )
            created, usable_from_us = now, now + hold_us
            new_id = AddressModel.insert(
                account_id=account_id,
                asset=asset,
                address=address,
                memo=memo,
                label=label,
                created_at_us=created,
                usable_from_us=usable_from_us,
            ).execute()
            self._audit(
                caller,
                AuditAction.ADDRESS_ADDED,
                account_id,
                id=new_id,
                asset=asset,
                address=address,
                memo=memo,
                usable_from_us=usable_from_us,
            )
        return WithdrawalAddress(
            int(new_id), asset, address, memo, label, to_datetime(created), to_datetime(usable_from_us)
        )

    def list_addresses(self, account_id: str) -> list[WithdrawalAddress]:
        query = AddressModel.select().where(AddressModel.account_id == account_id).order_by(AddressModel.id)
        return [
            WithdrawalAddress(
                a.id, a.asset, a.address, a.memo, a.label, to_datetime(a.created_at_us), to_datetime(a.usable_from_us)
            )
            for a in query
        ]

    def remove_address(self, *, caller: str, account_id: str, address_id: int) -> None:
        with _transaction(self.db):
            this_address: dict[object, object] = {_S_ACCOUNT: account_id, _S_ID: address_id}
            entry = self._address_select.run(self.db, this_address).fetchone()
            if entry is None:
                raise NotFound(f"account {account_id!r} has no whitelisted address with id {address_id}")
            self._address_delete.run(self.db, this_address)
            asset, address, memo = entry
            self._audit(
                caller, AuditAction.ADDRESS_REMOVED, account_id, id=address_id, asset=asset, address=address, memo=memo
            )

    # -- audit ----------------------------------------------------------------

    def audit_events(self, account_id: str, *, before_id: int | None, limit: int) -> list[AuditEvent]:
        """Newest first; ``before_id`` pages on (ids only grow)."""
        query = AuditModel.select().order_by(AuditModel.id.desc()).limit(limit)
        if account_id:
            query = query.where(AuditModel.account_id == account_id)
        if before_id is not None:
            query = query.where(AuditModel.id < before_id)
        return [
            AuditEvent(
                id=e.id,
                time=to_datetime(e.time_us),
                caller=e.caller,
                action=AuditAction(e.action),
                account_id=e.account_id,
                access_key=e.access_key,
                details=json.loads(e.details),
            )
            for e in query
        ]


class _LoopLookups:
    """Authorize's key lookups on PostgreSQL, made by the event loop itself: psycopg2's
    asynchronous mode on one connection whose socket the loop watches, every lookup waiting when
    the connection is free sent in one statement (``access_key = ANY(...)``, prepared once per
    connection).

    No thread is involved on the way, so a lookup costs no thread hop, no GIL hand-over and no
    wake-up of the loop from outside: sending a query and reading its answer are a non-blocking
    ``send`` and ``recv`` on the loop, which never waits for them. While one statement is on its
    way, the lookups arriving meanwhile queue and share the next, so under load a round trip
    serves many. Each lookup still reads the row as it is after it arrived: a delete on any
    replica holds on the very next call.

    Every waiter gives up at its own deadline (``Unavailable``). A connection that fails is
    replaced and its statement sent again once (reads are safe to repeat); one that stops
    answering (a partition) is abandoned after the statement timeout. Opening a connection
    (``PQconnectStart``, which resolves the host name) runs on a thread, never on the loop; a
    connection that cannot be opened fails the lookups waiting for it at once, and the next
    attempt waits ``RECONNECT_PAUSE``, so a refusing database is never hammered.
    """

    MAX_BATCH = 256
    MAX_WAITING = 10_000
    RECONNECT_PAUSE = 0.5  # after a failed connection, lookups fail at once for this long
    EXPIRY_STEP = 0.02  # the least time between two passes over the waiters for their deadlines

    def __init__(self, db: pw.Database, sql: str, settings: DatabaseSettings) -> None:
        self._connect_args: dict[str, Any] = {"database": db.database, **db.connect_params, "async_": True}
        self._prepare = f"PREPARE keyguard_lookup(text[]) AS {sql.replace('%s', '$1')}"
        self._connect_timeout = settings.connect_timeout
        self._answer_timeout = settings.statement_timeout + 1.0  # the server's own timeout, then ours
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiting: deque[_Lookup] = deque()
        self._batch: list[_Lookup] = []
        self._conn: Any = None
        self._cursor: Any = None
        self._fd = -1
        self._writing = False
        self._state = "down"  # down, opening (on a thread), connecting, preparing, ready, busy
        self._attempt = 0  # which connection attempt is current: a stale one's result is dropped
        self._stall: asyncio.TimerHandle | None = None
        # Fails waiters at their deadlines: due at the earliest one still waiting, or later.
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at = math.inf
        self._down_until = 0.0
        self._closed = False

    async def lookup(self, access_key: str, within: float) -> tuple[Any, ...] | None:
        """The key's row (its columns before the access key), or None; ``Unavailable`` after ``within``."""
        loop = self._loop = self._loop or asyncio.get_running_loop()
        if self._closed:
            raise Unavailable("the server is shutting down")
        if len(self._waiting) >= self.MAX_WAITING:
            raise Unavailable("too many key lookups are waiting for the database")
        answer: asyncio.Future[tuple[Any, ...] | None] = loop.create_future()
        deadline = loop.time() + within
        self._waiting.append(_Lookup(access_key, answer, deadline, within))
        if self._expiry is None or deadline < self._expiry_at:
            self._expire_at(deadline)
        if self._state == "ready":
            self._send()
        elif self._state == "down":
            self._open()
        return await answer

    # -- deadlines: one timer for all waiters, not one each (a timer each cost ~7k instructions) --

    def _expire_at(self, when: float) -> None:
        assert self._loop is not None
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry, self._expiry_at = self._loop.call_at(when, self._expire_due), when

    def _expire_due(self) -> None:
        """Fails the waiters whose deadline has come, drops the answered ones from the queue;
        the timer waits for the next deadline, at least EXPIRY_STEP from now: while the database
        stalls with thousands waiting, each pass walks them all (~1.4 ms for 10,000), so passes
        are spaced, and a deadline is kept to within that step."""
        assert self._loop is not None
        self._expiry = None
        now, next_at = self._loop.time(), math.inf
        for waiter in (*self._waiting, *self._batch):
            if waiter.answer.done():
                continue
            if waiter.deadline <= now:
                waiter.answer.set_exception(Unavailable(f"the database did not answer within {waiter.within:g} s"))
            else:
                next_at = min(next_at, waiter.deadline)
        self._waiting = deque(w for w in self._waiting if not w.answer.done())
        if next_at < math.inf:
            self._expire_at(max(next_at, now + self.EXPIRY_STEP))

    # -- the connection's life, driven by its socket's readiness ------------------------

    def _open(self) -> None:
        if time.monotonic() < self._down_until:
            self._fail_waiting(Unavailable("the database is unreachable"))
            return
        assert self._loop is not None
        self._attempt += 1
        self._state = "opening"
        self._stall = self._loop.call_later(self._connect_timeout, self._stalled)
        opening = self._loop.run_in_executor(None, _start_connection, self._connect_args)
        opening.add_done_callback(functools.partial(self._opened, self._attempt))

    def _opened(self, attempt: int, opening: asyncio.Future[Any]) -> None:
        conn = None if opening.cancelled() or opening.exception() else opening.result()
        if attempt != self._attempt or self._closed:  # given up on meanwhile (stall, close)
            if conn is not None:
                conn.close()
            return
        if conn is None:
            self._unreachable()
            return
        self._conn, self._state = conn, "connecting"
        self._on_io()

    def _on_io(self) -> None:
        """The socket is ready (or a statement was just sent): let psycopg2 move on."""
        if self._conn is None:  # dropped after this readiness was already queued
            return
        try:
            status = self._conn.poll()
            fd = self._conn.fileno()  # libpq may move to a new socket (another host or address)
        except psycopg2.Error as exc:
            self._failed(exc)
            return
        if fd != self._fd or self._state == "connecting":
            # While connecting, libpq may close its socket and open another (the next host or
            # address), which can get the same number: register it anew each time.
            self._unwatch()
            self._fd = fd
            assert self._loop is not None
            self._loop.add_reader(fd, self._on_io)
        if status == psycopg2.extensions.POLL_OK:
            self._watch_writes(False)
            try:
                self._completed()
            except psycopg2.Error as exc:
                self._failed(exc)
        else:
            self._watch_writes(status == psycopg2.extensions.POLL_WRITE)

    def _watch_writes(self, writing: bool) -> None:
        assert self._loop is not None
        if writing != self._writing:
            self._writing = writing
            if writing:
                self._loop.add_writer(self._fd, self._on_io)
            else:
                self._loop.remove_writer(self._fd)

    def _completed(self) -> None:
        if self._state == "connecting":
            self._cursor = self._conn.cursor()
            self._state = "preparing"
            self._cursor.execute(self._prepare)
            self._on_io()
        elif self._state == "preparing":
            self._stop_stall_timer()
            self._state = "ready"
            self._send()
        elif self._state == "busy":
            self._stop_stall_timer()
            rows = {row[-1]: row[:-1] for row in self._cursor.fetchall()}
            batch, self._batch = self._batch, []
            self._state = "ready"
            for waiter in batch:
                if not waiter.answer.done():
                    waiter.answer.set_result(rows.get(waiter.access_key))
            self._send()
        # "ready": the idle connection's socket was readable and nothing was wrong with it.

    def _send(self) -> None:
        batch: list[_Lookup] = []
        while self._waiting and len(batch) < self.MAX_BATCH:
            waiter = self._waiting.popleft()
            if not waiter.answer.done():
                batch.append(waiter)
        if not batch:
            return
        assert self._loop is not None
        self._batch, self._state = batch, "busy"
        self._stall = self._loop.call_later(self._answer_timeout, self._stalled)
        try:
            self._cursor.execute("EXECUTE keyguard_lookup(%s)", (sorted({w.access_key for w in batch}),))
        except psycopg2.Error as exc:
            self._failed(exc)
            return
        self._on_io()

    def _failed(self, exc: psycopg2.Error) -> None:
        if self._state in ("connecting", "preparing"):  # the connection never became usable
            self._unreachable()
        elif self._state == "busy" and not self._conn.closed and exc.pgcode == _QUERY_CANCELED:
            self._stop_stall_timer()  # the server's statement timeout: the connection is fine
            batch, self._batch = self._batch, []
            self._state = "ready"
            _fail(batch, Unavailable("the database did not answer in time (statement timeout)"))
            self._send()
        else:
            self._reconnect(retry=True)

    def _stalled(self) -> None:
        """No answer within the timeout: a partition or a stuck server. Abandon the connection."""
        self._stall = None
        if self._state in ("opening", "connecting", "preparing"):
            self._unreachable()
        else:
            self._reconnect(retry=False)

    def _unreachable(self) -> None:
        """A connection could not be opened: everyone waiting is told at once, and the next
        attempt waits RECONNECT_PAUSE."""
        self._drop_connection()
        self._down_until = time.monotonic() + self.RECONNECT_PAUSE
        self._fail_waiting(Unavailable("the database is unreachable"))

    def _reconnect(self, *, retry: bool) -> None:
        """Drops the connection; its statement's lookups are sent again on a new one (once)."""
        self._drop_connection()
        batch, self._batch = self._batch, []
        again = [w for w in batch if not w.retried and not w.answer.done()] if retry else []
        _fail([w for w in batch if w not in again], Unavailable("the database is unreachable"))
        for waiter in reversed(again):
            waiter.retried = True
            self._waiting.appendleft(waiter)
        self._waiting = deque(w for w in self._waiting if not w.answer.done())
        if self._waiting and not self._closed:
            self._open()

    def _unwatch(self) -> None:
        if self._loop is not None and self._fd >= 0:
            # The socket may already be closed (libpq moved on): nothing left to unregister then.
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_reader(self._fd)
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_writer(self._fd)
        self._fd, self._writing = -1, False

    def _drop_connection(self) -> None:
        self._state = "down"
        self._attempt += 1  # an open still running on its thread is now stale
        self._stop_stall_timer()
        self._unwatch()
        conn, self._conn, self._cursor = self._conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _stop_stall_timer(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _fail_waiting(self, exc: Unavailable) -> None:
        waiting, self._waiting = list(self._waiting), deque()
        _fail(waiting, exc)

    def close(self) -> None:
        """Closes the connection (on the loop); lookups still waiting fail with ``Unavailable``."""
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        batch, self._batch = self._batch, []
        self._drop_connection()
        _fail(batch, Unavailable("the server is shutting down"))
        self._fail_waiting(Unavailable("the server is shutting down"))


def _start_connection(args: dict[str, Any]) -> Any:
    """``psycopg2.connect`` (asynchronous) with every host name resolved first, on this thread.

    psycopg2 keeps the GIL while libpq starts a connection, and libpq resolves host names
    there: a slow DNS answer would stall every thread, the event loop included. Resolved here
    (``getaddrinfo`` releases the GIL) and passed as ``hostaddr``, libpq has nothing to resolve;
    ``host`` stays as given, for TLS and pg_hba.
    """
    hosts = str(args.get("host") or "").split(",")
    if "hostaddr" not in args and any(h and not h.startswith("/") and not _is_ip(h) for h in hosts):
        addresses = [
            ""
            if not h or h.startswith("/")
            else h
            if _is_ip(h)
            else socket.getaddrinfo(h, None, type=socket.SOCK_STREAM)[0][4][0]
            for h in hosts
        ]
        args = {**args, "hostaddr": ",".join(str(a) for a in addresses)}
    return psycopg2.connect(**args)


def _address_of(host: str) -> str:
    """A libpq ``hostaddr`` entry for ``host``: "" for a socket directory, the address itself,
    or the first address the name resolves to."""
    if not host or host.startswith("/") or _is_ip(host):
        return "" if not host or host.startswith("/") else host
    return str(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@dataclass(eq=False)
class _Lookup:
    access_key: str
    answer: asyncio.Future[tuple[Any, ...] | None]
    deadline: float  # loop time at which it gives up (Unavailable)
    within: float
    retried: bool = False


def _fail(waiters: list[_Lookup], exc: Unavailable) -> None:
    for waiter in waiters:
        if not waiter.answer.done():
            waiter.answer.set_exception(exc)


@contextlib.contextmanager
def _unavailable_to_authorize() -> Iterator[None]:
    """For Authorize: a lock it cannot get in time, or a full disk for a signed request's nonce,
    is the database being unavailable to it (the gateway fails closed on UNAVAILABLE); ABORTED
    and RESOURCE_EXHAUSTED are for changes a caller may retry."""
    try:
        yield
    except (Aborted, StorageFull) as exc:
        raise Unavailable(exc.message) from None


Query = Callable[Concatenate["_Queries", P], T]
OffLoop = Callable[Concatenate["Store", P], Coroutine[Any, Any, T]]


def _on_writes(query: Query[P, T]) -> OffLoop[P, T]:
    """A :class:`Store` method running ``query`` on the write threads (one transaction each)."""

    @functools.wraps(query)
    async def method(store: Store, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await store._writes.call(store._timeout, query, store._q, *args, **kwargs)

    return method


def _on_reads(query: Query[P, T]) -> OffLoop[P, T]:
    """A :class:`Store` method running ``query`` on the read threads."""

    @functools.wraps(query)
    async def method(store: Store, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return await store._reads.call(store._timeout, query, store._q, *args, **kwargs)

    return method


class Store:
    """keyguard's database for the event loop: every method is a coroutine that never blocks it.

    Raises :class:`keyguard.Unavailable` when the database does not answer in
    time or cannot be reached, :class:`keyguard.Aborted` when a change cannot
    get its lock in time (both: nothing was changed, unless the message says
    the outcome is unknown), and the domain's own errors (``NotFound``, ...).
    """

    def __init__(self, settings: DatabaseSettings, *, unrestricted_lapse_us: int = 0) -> None:
        """Use :meth:`open`, which also migrates the schema. ``unrestricted_lapse_us``: the
        unrestricted-key policy (0: off), which keys' ``unrestricted_until`` shows."""
        self.settings = settings
        self.db = open_database(settings)
        self._reads = _DatabaseThreads(self.db, "db-read", settings.read_threads, changes=False)
        self.writes = WriteState()  # the nonces' pool is left out: its pruning often writes nothing
        self._writes = _DatabaseThreads(self.db, "db-write", settings.write_threads, changes=True, writes=self.writes)
        self._nonce_db = open_database(settings, role="nonces")
        self._nonces = _DatabaseThreads(self._nonce_db, "db-nonce", 1, changes=True)
        self._inline = open_database(settings, role="inline") if settings.is_sqlite else None
        self._inline_cursor: Any = None  # on the loop thread's sqlite3 connection, used without peewee
        self._rows: dict[tuple[Any, ...], KeyRow] = {}
        # SQLite: each key's row as last read inline, valid while the database's data_version
        # is the one read before it (see auth_row_now).
        self._data_version = -1
        self._current: dict[str, KeyRow | None] = {}
        # SQLite in WAL mode: the wal-index, and its header as it was before data_version was
        # last read (see auth_row_now); None: data_version is read on every lookup.
        self._wal_index: mmap.mmap | None = None  # the mapped header, when usable
        self._wal_header = b""
        self._q = _Queries(self.db, unrestricted_lapse_us)
        self._lookups: _LoopLookups | None = None  # PostgreSQL: made once the lookup's SQL is built
        self._timeout = settings.call_timeout

    @classmethod
    async def open(cls, settings: DatabaseSettings, *, unrestricted_lapse_us: int = 0) -> Store:
        store = cls(settings, unrestricted_lapse_us=unrestricted_lapse_us)
        try:
            await store._writes.call(MIGRATION_TIMEOUT, store._migrate)
            if store._inline is not None:  # opened now, before serving, not by the first Authorize
                store._inline_cursor = _connection(store._inline).cursor()
                store._inline_cursor.execute("PRAGMA data_version").fetchone()  # the WAL's files exist from now on
                store._wal_index = _WalIndex.header_of(store._inline)
            else:
                lookups_db = open_database(settings, role="lookups")
                store._lookups = _LoopLookups(lookups_db, store._q.auth_many_sql, settings)
        except BaseException:
            await store.close()
            raise
        return store

    def _migrate(self) -> None:
        migrate(self.db)
        self._q.build()

    async def close(self) -> None:
        """Closes every connection; a database that is already gone is not an error here."""
        if self._lookups is not None:
            self._lookups.close()
        self._wal_index = None
        if self._inline is not None:
            self._inline_cursor = None
            with contextlib.suppress(pw.DatabaseError):
                self._inline.close()
        # A connection busy in a stalled statement can block close(): never on the loop.
        closing = asyncio.get_running_loop().run_in_executor(None, self._close_threads)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(closing, self.settings.connect_timeout)

    def _close_threads(self) -> None:
        for threads in (self._reads, self._writes, self._nonces):
            threads.close()

    async def ping(self, within: float) -> bool:
        """Whether the database answers within ``within`` seconds, on the connections Authorize
        uses too (on PostgreSQL: through the lookup batcher, so health sees what bots see)."""
        checks: list[Coroutine[Any, Any, object]] = [self._reads.call(within, self._q.ping)]
        if self._lookups is not None:
            checks.append(self._lookups.lookup("", within))
        try:
            await asyncio.gather(*checks)
        except (Unavailable, Aborted, pw.DatabaseError):
            return False
        return True

    async def writes_land(self, within: float) -> bool:
        """Whether writes land: as the last write found, and while that met a full disk, as a
        probe write (which leaves nothing behind) finds now, within ``within`` seconds."""
        if not self.writes.landing:
            with contextlib.suppress(KeyguardError):
                await self._writes.call(within, self._q.probe_write)
        return self.writes.landing

    # -- hot path -------------------------------------------------------------

    def _read_now(self, sql: str, params: tuple[object, ...]) -> tuple[Any, ...] | Later | None:
        """A point read made on the loop itself (SQLite in WAL mode: a read never waits for a
        writer), or LATER when it cannot be made without waiting: on PostgreSQL, or when SQLite
        asks to wait (e.g. WAL recovery); then a database thread reads it (``_read_one``)."""
        if self._inline is None:
            return LATER
        try:
            if self._inline_cursor is None:  # peewee's connections are per thread: the loop's own
                self._inline_cursor = _connection(self._inline).cursor()
            # One cursor, reused: each read is executed and fetched (to its end) without an await.
            row: tuple[Any, ...] | None = self._inline_cursor.execute(sql, params).fetchone()
            return row
        except sqlite3.OperationalError:
            return LATER

    async def _read_one(self, sql: str, params: tuple[object, ...], within: float) -> tuple[Any, ...] | None:
        row = self._read_now(sql, params)
        if row is LATER:
            return await self._reads.call(within, self._q.fetch_one, sql, params)
        return row

    @property
    def reads_inline(self) -> bool:
        """Whether :meth:`auth_row_now` can ever answer (SQLite), rather than always LATER."""
        return self._inline is not None

    def auth_row_now(self, access_key: str) -> KeyRow | Later | None:
        """:meth:`auth_lookup` answered without an await when it can be (SQLite), else LATER.

        SQLite's ``PRAGMA data_version`` changes whenever any other connection (thread, worker
        process) commits a change to the database. The row as read after a data_version is
        therefore the current row for as long as data_version reads the same: the key's row is
        read again only when something was committed since. A string that is no access key is
        None at once, and never kept.

        Reading data_version costs a read transaction (~10k instructions, a sixth of a cached
        Authorize's own cost). In WAL mode every commit rewrites the wal-index header in the
        database's shared memory (``-shm``) before it returns: that is how SQLite's own readers
        find it. So data_version is read only when the header differs from the one read just
        before data_version was last read (a checkpoint may change it too: one more read).
        """
        if self._inline is None:
            return LATER
        try:
            if self._inline_cursor is None:  # peewee's connections are per thread: the loop's own
                self._inline_cursor = _connection(self._inline).cursor()
            cursor = self._inline_cursor
            # Read before data_version: a commit between the two is seen by the next call.
            header = None if self._wal_index is None else self._wal_index[:WAL_INDEX_HEADER]
            if header is None or header != self._wal_header:
                version = cursor.execute("PRAGMA data_version").fetchone()[0]
                self._wal_header = header or b""
                if version != self._data_version:
                    self._current.clear()
                    self._data_version = version
            if (known := self._current.get(access_key, LATER)) is not LATER:
                return known
            if not ACCESS_KEY_RE.fullmatch(access_key):  # no such key: not looked up, not kept
                return None
            row = cursor.execute(self._q.auth_sql, (access_key,)).fetchone()
        except sqlite3.OperationalError:
            return LATER
        current = None if row is None else self._auth_row(row)
        if len(self._current) >= MAX_MEMOISED_ROWS:
            self._current.clear()
        self._current[access_key] = current
        return current

    async def auth_lookup(self, access_key: str, within: float) -> KeyRow | None:
        """The key's current state, read within ``within`` seconds (else ``Unavailable``)."""
        with _unavailable_to_authorize():
            if self._lookups is not None:
                row = await self._lookups.lookup(access_key, within)
            else:
                row = await self._read_one(self._q.auth_sql, (access_key,), within)
        return None if row is None else self._auth_row(row)

    def _auth_row(self, row: tuple[Any, ...]) -> KeyRow:
        # The row is read on every call; only what follows from its value alone is kept, keyed
        # by that whole value, so a changed row (any column) is a new entry, never a stale one.
        known = self._rows.get(row)
        if known is None:
            if len(self._rows) >= MAX_MEMOISED_ROWS:
                self._rows.clear()
            known = self._rows[row] = _auth_row(row)
        return known

    async def address_usable_from(
        self, account_id: str, asset: str, address: str, memo: str, within: float
    ) -> int | None:
        """When the whitelisted destination becomes usable (µs since the epoch), None if it is
        not whitelisted: one point lookup answers both."""
        params = (account_id, asset, address, memo)
        with _unavailable_to_authorize():
            row = await self._read_one(self._q.whitelisted_sql, params, within)
        return None if row is None else int(row[0])

    async def use_nonce(self, access_key: str, nonce: str, timestamp_ms: int, within: float) -> bool:
        """Records a signed request's nonce with the request's own timestamp; False if this key
        already used it (a replay)."""
        with _unavailable_to_authorize():
            return await self._nonces.call(within, self._insert_nonce, access_key, nonce, timestamp_ms * 1000)

    def _insert_nonce(self, access_key: str, nonce: str, timestamp_us: int) -> bool:
        # In a transaction, so that a connection lost while committing is reported as such,
        # not retried into a replay of the caller's own nonce.
        try:
            with _transaction(self._nonce_db):
                _execute(self._nonce_db, self._q.nonce_sql, (access_key, nonce, timestamp_us))
        except pw.IntegrityError:
            return False
        return True

    async def prune_nonces(self, before_us: int) -> int:
        """Forgets nonces of requests timestamped before ``before_us``."""
        return await self._nonces.call(self._timeout, self._prune_nonces, before_us)

    def _prune_nonces(self, before_us: int) -> int:
        # On the nonce threads the models are bound to the nonce connection: one connection, one lock.
        with _transaction(self._nonce_db):
            return int(NonceModel.delete().where(NonceModel.seen_at_us < before_us).execute())

    async def record_last_used(self, usage: dict[str, tuple[int, str]]) -> None:
        await self._writes.call(self._timeout, self._q.record_last_used, usage)

    # -- management: _Queries' methods, each on the pool its work needs ----------

    insert_key = _on_writes(_Queries.insert_key)
    update_key = _on_writes(_Queries.update_key)
    rotate_key = _on_writes(_Queries.rotate_key)
    delete_key = _on_writes(_Queries.delete_key)
    delete_all_keys = _on_writes(_Queries.delete_all_keys)
    set_address_management = _on_writes(_Queries.set_address_management)
    set_frozen = _on_writes(_Queries.set_frozen)
    add_address = _on_writes(_Queries.add_address)
    remove_address = _on_writes(_Queries.remove_address)
    check_key_room = _on_reads(_Queries.check_key_room)
    check_unfrozen = _on_reads(_Queries.check_unfrozen)
    list_keys = _on_reads(_Queries.list_keys)
    get_key = _on_reads(_Queries.get_key)
    account_settings = _on_reads(_Queries.account_settings)
    list_addresses = _on_reads(_Queries.list_addresses)
    audit_events = _on_reads(_Queries.audit_events)


def _frozen(account_id: str) -> FailedPrecondition:
    return FailedPrecondition(f"account {account_id!r} is frozen; unfreeze it first")


def _auth_row(row: tuple[Any, ...]) -> KeyRow:
    """The KeyRow of a lookup's row: (the JSON array of _Queries.build's columns,)."""
    (account_id, name, permission, allowed_ips, secret_hash, address_management, enabled, expires, prev, until,
     key_type, public_key, previous_public_key, last_used_ip,
     frozen, management_off_at, symbols, unrestricted_since) = json.loads(row[0])  # fmt: skip
    return KeyRow(
        account_id,
        name,
        Permission(permission),
        allowed_ips,
        secret_hash,
        bool(address_management),
        bool(enabled),
        expires,
        prev,
        until,
        KeyType(key_type),
        public_key,
        previous_public_key,
        last_used_ip,
        bool(frozen),
        management_off_at,
        symbols,
        unrestricted_since,
    )


def _key_row(key: Any, lapse_us: int = 0) -> ApiKey:
    """``lapse_us``: the unrestricted-key policy (0: off), for ``unrestricted_until``."""
    lapses = (
        lapse_us > 0
        and not key.allowed_ips
        and key.permission >= Permission.TRADE
        and key.unrestricted_since_us is not None
    )
    return ApiKey(
        key.account_id,
        key.access_key,
        key.name,
        Permission(key.permission),
        tuple(key.allowed_ips.split()),
        to_datetime(key.created_at_us),
        to_datetime(key.last_used_at_us) if key.last_used_at_us is not None else None,
        key.last_used_ip,
        to_datetime(key.expires_at_us) if key.expires_at_us is not None else None,
        bool(key.enabled),
        to_datetime(key.previous_valid_until_us) if key.previous_valid_until_us is not None else None,
        KeyType(key.key_type),
        key.public_key,
        tuple(key.symbols.split()),
        to_datetime(key.unrestricted_since_us + lapse_us) if lapses else None,
    )
