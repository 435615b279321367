"""PostgreSQL: opening its connections, and Authorize's key lookups made by the event loop itself
(:class:`LoopLookups`). Its driver, psycopg2, is the optional extra ``postgres``: this module, the
only one importing it, is imported for a PostgreSQL database only."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import math
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import peewee as pw
import psycopg2
from playhouse import db_url

from keyguard import Unavailable
from keyguard_server.store._connections import QUERY_CANCELED, DatabaseSettings


def open_postgres(settings: DatabaseSettings, role: str) -> pw.Database:
    """A PostgreSQL Database with keyguard's timeouts and keepalives (see ``open_database``)."""
    url = settings.url
    options: dict[str, object] = {
        "statement_timeout": int(settings.statement_timeout * 1000),
        "lock_timeout": int(settings.lock_timeout * 1000),
        # A transaction left open by a stalled client must not hold its locks for ever.
        "idle_in_transaction_session_timeout": int(settings.call_timeout * 1000) + 1000,
    }
    if role == "nonces":
        options["synchronous_commit"] = "off"
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


class LoopLookups:
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
        elif self._state == "busy" and not self._conn.closed and exc.pgcode == QUERY_CANCELED:
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
