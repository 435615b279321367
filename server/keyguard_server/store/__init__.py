"""Storage: every query keyguard makes, behind :class:`Store`.

One module per job: ``_connections`` (settings, opening databases, the database threads, the one
mapping of driver failures), ``_sqlite`` (SQLite's inline reads on the loop), ``_postgres``
(PostgreSQL's lookups made by the loop), ``_writes`` (every change and management read),
``_rows`` (Authorize's lookup SQL, rows to domain values), ``_schema`` (models, migrations).

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
  the hot path (see docs/dev/hot-path.md for the numbers).
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
import functools
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import peewee as pw

from keyguard import Aborted, KeyguardError, StorageFull, Unavailable
from keyguard_server.authorize._domain import LATER, KeyRow, Later
from keyguard_server.store._connections import (
    DatabaseSettings,
    DatabaseThreads,
    WriteState,
    execute,
    open_database,
    transaction,
)
from keyguard_server.store._rows import MAX_MEMOISED_ROWS, AccountState, StoredKey, auth_row, to_datetime
from keyguard_server.store._schema import NonceModel, migrate
from keyguard_server.store._sqlite import InlineReads
from keyguard_server.store._writes import Queries

if TYPE_CHECKING:  # imported for a PostgreSQL database only: psycopg2 is an optional extra
    from keyguard_server.store._postgres import LoopLookups

__all__ = ["AccountState", "DatabaseSettings", "Store", "StoredKey", "WriteState", "to_datetime"]

P = ParamSpec("P")
T = TypeVar("T")

# Replicas starting together wait for the one that migrates.
MIGRATION_TIMEOUT = 120.0


@contextlib.contextmanager
def _unavailable_to_authorize() -> Iterator[None]:
    """For Authorize: a lock it cannot get in time, or a full disk for a signed request's nonce,
    is the database being unavailable to it (the gateway fails closed on UNAVAILABLE); ABORTED
    and RESOURCE_EXHAUSTED are for changes a caller may retry."""
    try:
        yield
    except (Aborted, StorageFull) as exc:
        raise Unavailable(exc.message) from None


Query = Callable[Concatenate["Queries", P], T]
OffLoop = Callable[Concatenate["Store", P], Coroutine[Any, Any, T]]


def _off_loop(query: Query[P, T], *, writes: bool = False) -> OffLoop[P, T]:
    """A :class:`Store` method running ``query`` on the write threads (one transaction each), or
    on the read threads."""

    @functools.wraps(query)
    async def method(store: Store, /, *args: P.args, **kwargs: P.kwargs) -> T:
        threads = store._writes if writes else store._reads
        return await threads.call(store._timeout, query, store._q, *args, **kwargs)

    return method


class Store:
    """keyguard's database for the event loop: every method is a coroutine that never blocks it.

    Raises :class:`keyguard.Unavailable` when the database does not answer in
    time or cannot be reached, :class:`keyguard.Aborted` when a change cannot
    get its lock in time (both: nothing was changed, unless the message says
    the outcome is unknown), and the domain's own errors (``NotFound``, ...).
    """

    def __init__(self, settings: DatabaseSettings) -> None:
        """Use :meth:`open`, which also migrates the schema."""
        self.settings = settings
        self.db = open_database(settings)
        self._reads = DatabaseThreads(self.db, "db-read", settings.read_threads, changes=False)
        self.writes = WriteState()  # the nonces' pool is left out: its pruning often writes nothing
        self._writes = DatabaseThreads(self.db, "db-write", settings.write_threads, changes=True, writes=self.writes)
        self._nonce_db = open_database(settings, role="nonces")
        self._nonces = DatabaseThreads(self._nonce_db, "db-nonce", 1, changes=True)
        self._inline = InlineReads(settings) if settings.is_sqlite else None
        self._rows: dict[tuple[Any, ...], KeyRow] = {}
        self._q = Queries(self.db)
        self._lookups: LoopLookups | None = None  # PostgreSQL: made once the lookup's SQL is built
        self._timeout = settings.call_timeout

    @classmethod
    async def open(cls, settings: DatabaseSettings) -> Store:
        store = cls(settings)
        try:
            await store._writes.call(MIGRATION_TIMEOUT, store._migrate)
            if store._inline is not None:
                store._inline.open()
            else:
                from keyguard_server.store._postgres import LoopLookups  # psycopg2: for PostgreSQL only

                lookups_db = open_database(settings, role="lookups")
                store._lookups = LoopLookups(lookups_db, store._q.lookups.keys, settings)
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
        if self._inline is not None:
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

    async def _read_one(self, sql: str, params: tuple[object, ...], within: float) -> tuple[Any, ...] | None:
        """A point read: on SQLite made on the loop itself when it can be without waiting, else
        (PostgreSQL, or SQLite asking to wait, e.g. WAL recovery) on a read thread."""
        row = LATER if self._inline is None else self._inline.read_now(sql, params)
        if row is LATER:
            return await self._reads.call(within, self._q.fetch_one, sql, params)
        return row

    @property
    def reads_inline(self) -> bool:
        """Whether :meth:`auth_row_now` can ever answer (SQLite), rather than always LATER."""
        return self._inline is not None

    def auth_row_now(self, access_key: str) -> KeyRow | Later | None:
        """:meth:`auth_lookup` answered without an await when it can be (SQLite: see
        :meth:`InlineReads.key_row_now`), else LATER."""
        if self._inline is None:
            return LATER
        return self._inline.key_row_now(access_key, self._q.lookups.key, self._auth_row)

    async def auth_lookup(self, access_key: str, within: float) -> KeyRow | None:
        """The key's current state, read within ``within`` seconds (else ``Unavailable``)."""
        with _unavailable_to_authorize():
            if self._lookups is not None:
                row = await self._lookups.lookup(access_key, within)
            else:
                row = await self._read_one(self._q.lookups.key, (access_key,), within)
        return None if row is None else self._auth_row(row)

    def _auth_row(self, row: tuple[Any, ...]) -> KeyRow:
        # The row is read on every call; only what follows from its value alone is kept, keyed
        # by that whole value, so a changed row (any column) is a new entry, never a stale one.
        known = self._rows.get(row)
        if known is None:
            if len(self._rows) >= MAX_MEMOISED_ROWS:
                self._rows.clear()
            known = self._rows[row] = auth_row(row)
        return known

    async def address_usable_from(
        self, account_id: str, asset: str, address: str, memo: str, within: float
    ) -> int | None:
        """When the whitelisted destination becomes usable (µs since the epoch), None if it is
        not whitelisted: one point lookup answers both."""
        params = (account_id, asset, address, memo)
        with _unavailable_to_authorize():
            row = await self._read_one(self._q.lookups.whitelisted, params, within)
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
            with transaction(self._nonce_db):
                execute(self._nonce_db, self._q.lookups.nonce, (access_key, nonce, timestamp_us))
        except pw.IntegrityError:
            return False
        return True

    async def prune_nonces(self, before_us: int) -> int:
        """Forgets nonces of requests timestamped before ``before_us``."""
        return await self._nonces.call(self._timeout, self._prune_nonces, before_us)

    def _prune_nonces(self, before_us: int) -> int:
        # On the nonce threads the models are bound to the nonce connection: one connection, one lock.
        with transaction(self._nonce_db):
            return int(NonceModel.delete().where(NonceModel.seen_at_us < before_us).execute())

    # -- management: Queries' methods, each on the pool its work needs ----------

    record_last_used = _off_loop(Queries.record_last_used, writes=True)
    insert_key = _off_loop(Queries.insert_key, writes=True)
    update_key = _off_loop(Queries.update_key, writes=True)
    rotate_key = _off_loop(Queries.rotate_key, writes=True)
    delete_key = _off_loop(Queries.delete_key, writes=True)
    delete_all_keys = _off_loop(Queries.delete_all_keys, writes=True)
    set_address_management = _off_loop(Queries.set_address_management, writes=True)
    set_frozen = _off_loop(Queries.set_frozen, writes=True)
    add_address = _off_loop(Queries.add_address, writes=True)
    remove_address = _off_loop(Queries.remove_address, writes=True)
    check_key_room = _off_loop(Queries.check_key_room)
    check_unfrozen = _off_loop(Queries.check_unfrozen)
    list_keys = _off_loop(Queries.list_keys)
    get_key = _off_loop(Queries.get_key)
    account_settings = _off_loop(Queries.account_settings)
    list_addresses = _off_loop(Queries.list_addresses)
    audit_events = _off_loop(Queries.audit_events)
