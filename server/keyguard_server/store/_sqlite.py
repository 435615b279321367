"""SQLite: Authorize's point reads made on the event loop itself (:class:`InlineReads`)."""

from __future__ import annotations

import contextlib
import mmap
import os
import sqlite3
import sys
from collections.abc import Callable
from typing import Any, ClassVar

import peewee as pw

from keyguard_server._secrets import ACCESS_KEY_RE
from keyguard_server.authorize._domain import LATER, KeyRow, Later
from keyguard_server.store._connections import DatabaseSettings, connection_of, open_database
from keyguard_server.store._rows import MAX_MEMOISED_ROWS

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
        connection = connection_of(database)
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
        # SQLite in WAL mode: the wal-index, and its header as it was before data_version was
        # last read (see key_row_now); None: data_version is read on every lookup.
        self._wal_index: mmap.mmap | None = None  # the mapped header, when usable
        self._wal_header = b""

    def open(self) -> None:
        """Opens the connection now, before serving, not on the first Authorize."""
        self._cursor = connection_of(self._db).cursor()
        self._cursor.execute("PRAGMA data_version").fetchone()  # the WAL's files exist from now on
        self._wal_index = _WalIndex.header_of(self._db)

    def close(self) -> None:
        self._wal_index = None
        self._cursor = None
        with contextlib.suppress(pw.DatabaseError):
            self._db.close()

    def read_now(self, sql: str, params: tuple[object, ...]) -> tuple[Any, ...] | Later | None:
        """The row (or None), or LATER when it cannot be read without waiting."""
        try:
            if self._cursor is None:  # peewee's connections are per thread: the loop's own
                self._cursor = connection_of(self._db).cursor()
            # One cursor, reused: each read is executed and fetched (to its end) without an await.
            row: tuple[Any, ...] | None = self._cursor.execute(sql, params).fetchone()
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

        Reading data_version costs a read transaction (~10k instructions, a sixth of a cached
        Authorize's own cost). In WAL mode every commit rewrites the wal-index header in the
        database's shared memory (``-shm``) before it returns: that is how SQLite's own readers
        find it. So data_version is read only when the header differs from the one read just
        before data_version was last read (a checkpoint may change it too: one more read).
        """
        try:
            if self._cursor is None:  # peewee's connections are per thread: the loop's own
                self._cursor = connection_of(self._db).cursor()
            cursor = self._cursor
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
            row = cursor.execute(sql, (access_key,)).fetchone()
        except sqlite3.OperationalError:
            return LATER
        current = None if row is None else to_row(row)
        if len(self._current) >= MAX_MEMOISED_ROWS:
            self._current.clear()
        self._current[access_key] = current
        return current
