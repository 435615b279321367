"""SQLite: Authorize's point reads made on the event loop itself (:class:`InlineReads`)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Callable
from typing import Any

import peewee as pw

from keyguard_server._secrets import ACCESS_KEY_RE
from keyguard_server.authorize._domain import LATER, KeyRow, Later
from keyguard_server.store._connections import DatabaseSettings, connection_of, open_database
from keyguard_server.store._rows import MAX_MEMOISED_ROWS


class InlineReads:
    """Point reads on the loop thread's own read-only connection, which never waits for a lock:
    in WAL mode a read never waits for a writer, and when SQLite would make it wait (e.g. WAL
    recovery after a crash) the read answers LATER and a database thread makes it instead."""

    def __init__(self, settings: DatabaseSettings) -> None:
        self._db = open_database(settings, role="inline")
        self._cursor: Any = None  # on the loop thread's sqlite3 connection, used without peewee
        # Each key's row as last read, valid while the database's data_version is the one read
        # before it (see key_row_now).
        self._data_version = -1
        self._current: dict[str, KeyRow | None] = {}

    def open(self) -> None:
        """Opens the connection now, before serving, not on the first Authorize."""
        self._cursor_now().execute("PRAGMA data_version").fetchone()

    def _cursor_now(self) -> Any:
        """The loop thread's cursor, reused: each read is executed and fetched (to its end)
        without an await. (peewee's connections are per thread: this is the loop's own.)"""
        if self._cursor is None:
            self._cursor = connection_of(self._db).cursor()
        return self._cursor

    def close(self) -> None:
        self._cursor = None
        with contextlib.suppress(pw.DatabaseError):
            self._db.close()

    def read_now(self, sql: str, params: tuple[object, ...]) -> tuple[Any, ...] | Later | None:
        """The row (or None), or LATER when it cannot be read without waiting."""
        try:
            row: tuple[Any, ...] | None = self._cursor_now().execute(sql, params).fetchone()
            return row
        except sqlite3.OperationalError:
            return LATER

    def key_row_now(
        self, access_key: str, sql: str, to_row: Callable[[tuple[Any, ...]], KeyRow]
    ) -> KeyRow | Later | None:
        """The key's row read by ``sql`` and mapped by ``to_row``, or None; LATER when it cannot
        be read without waiting.

        SQLite's ``PRAGMA data_version`` changes whenever any other connection (thread, worker
        process) commits a change to the database. The row as read after a data_version is
        therefore the current row for as long as data_version reads the same: the key's row is
        read again only when something was committed since. A string that is no access key is
        None at once, and never kept.

        data_version is read on every call (a read transaction, ~10k instructions, a sixth of a
        cached Authorize's own cost). It is SQLite's documented way to learn of other
        connections' commits; peeking at the wal-index in ``-shm`` to skip it instead relies on
        a layout SQLite leaves to each VFS, and twice caused locking bugs that could serve a
        revoked key.
        """
        try:
            cursor = self._cursor_now()
            version = cursor.execute("PRAGMA data_version").fetchone()[0]
            if version != self._data_version:
                self._current.clear()
                self._data_version = version
            if (known := self._current.get(access_key, LATER)) is not LATER:
                return known
            if not ACCESS_KEY_RE.fullmatch(access_key):  # no such key: not looked up, not kept
                return None
            row = cursor.execute(sql, (access_key,)).fetchone()
        except sqlite3.OperationalError:
            return LATER
        current = None if row is None else to_row(row)
        if len(self._current) >= MAX_MEMOISED_ROWS:
            self._current.clear()
        self._current[access_key] = current
        return current
