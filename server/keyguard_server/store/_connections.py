"""Connections: the settings, opening a database, the database threads, and the one mapping of
what a driver raised to what it means to the caller (see the package docstring for the contract)."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import math
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import peewee as pw
from playhouse import db_url

from keyguard import Aborted, StorageFull, Unavailable
from keyguard_server._metrics import DATABASE_FAILURES, DATABASE_WRITABLE
from keyguard_server._threads import share_core_until
from keyguard_server.store._schema import MODELS

P = ParamSpec("P")
T = TypeVar("T")

log = logging.getLogger("keyguard.store")

# An outage's WARNINGs: at most one per kind in this many seconds (each call meets it).
OUTAGE_LOG_SECONDS = 10.0
# PostgreSQL SQLSTATEs: lock_timeout and statement_timeout expired.
_LOCK_NOT_AVAILABLE = "55P03"
QUERY_CANCELED = "57014"
_CONFLICTS = ("40P01", "40001")  # deadlock detected, serialization failure: rolled back, retry
_READ_ONLY = "25006"  # a primary turned standby (failover): a new connection finds the new primary


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
        try:  # the driver is the optional extra "postgres", imported only now
            from keyguard_server.store._postgres import open_postgres
        except ImportError as exc:
            if not (exc.name or "").startswith("psycopg2"):
                raise
            raise ValueError(
                f"a {scheme}:// database needs the PostgreSQL driver, psycopg2, which is not installed"
                f" ({exc}): pip install 'keyguard-server[postgres]'"
            ) from None
        return open_postgres(settings, role)
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
        database: pw.Database = db_url.connect(
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


class DatabaseThreads:
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
            _discard_connection(self.db)
            if _thread.committing:
                _report_outage("connection_lost", "the database connection was lost while committing", lost)
                raise Unavailable(
                    "the database connection was lost while committing; the change may or may not have been applied"
                ) from lost.__cause__
        try:
            return _mapped(fn, *args, **kwargs)
        except _ConnectionLost as lost:
            _discard_connection(self.db)
            _report_outage("unreachable", "the database is unreachable", lost)
            raise Unavailable("the database is unreachable; nothing was changed") from lost.__cause__
        finally:
            self._remember_connection()

    def _remember_connection(self) -> None:
        if not self.db.is_closed():
            with self._lock:
                self._connections.add(connection_of(self.db))

    def close(self) -> None:
        """Cancels queued calls and closes every connection (a thread still running a statement
        gets an error, which nobody waits for any more)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            with contextlib.suppress(Exception):
                connection.close()


def execute(db: Any, sql: str, params: tuple[object, ...] = ()) -> Any:
    """``db.execute_sql`` (peewee's stubs leave it untyped): the cursor."""
    return db.execute_sql(sql, params)


def connection_of(db: Any) -> Any:
    """This thread's open connection to ``db``."""
    return db.connection()


def _discard_connection(db: pw.Database) -> None:
    """Forgets this thread's connection to ``db`` (dead, or in doubt); the next call reconnects."""
    with contextlib.suppress(Exception):
        db.close()
    db.dispose()  # whatever close() managed


_thread = threading.local()  # per database thread: whether its transaction is committing


@contextlib.contextmanager
def transaction(db: pw.Database) -> Iterator[None]:
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


def _driver_errors() -> tuple[type[Exception], ...]:
    """The drivers' own errors: sqlite3's, and psycopg2's once it is imported (none before)."""
    psycopg2 = sys.modules.get("psycopg2")
    return (sqlite3.Error,) if psycopg2 is None else (sqlite3.Error, psycopg2.Error)


def _failure_of(exc: BaseException) -> _Failure | None:
    """The failure a database error stands for, read from the driver's own error wherever it is
    wrapped (the first one in ``_chain`` that says); None: not one keyguard expects."""
    psycopg2 = sys.modules.get("psycopg2")  # imported for a PostgreSQL database only (see open_database)
    for error in _chain(exc):
        if psycopg2 is not None and isinstance(error, psycopg2.Error):
            code = error.pgcode or ""
            if code == _LOCK_NOT_AVAILABLE:
                return _Failure.LOCKED
            if code in _CONFLICTS:
                return _Failure.CONFLICT
            if code == QUERY_CANCELED:
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
        errors = [e for e in _chain(exc) if isinstance(e, _driver_errors())]
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
    database_errors: tuple[type[Exception], ...] = (pw.PeeweeException, *_driver_errors())
    try:
        return fn(*args, **kwargs)
    except database_errors as exc:
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
