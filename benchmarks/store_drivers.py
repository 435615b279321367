"""Cost of ONE hot-path point lookup from an asyncio event loop, per store driver.

The lookup is the key row LEFT JOINed to its account (9 columns, by access_key),
with the same SQL text in every variant (only the placeholder differs per driver).
1,000 keys; each variant runs in its own event loop with 16 concurrent tasks that
look up random existing keys: 2,000 warm-up lookups, then 20,000 measured ones.

Per variant it reports lookups/s (wall), CPU µs per lookup of this process
(time.process_time, so helper threads count) and, for PostgreSQL, the CPU µs per
lookup of the server backends serving the benchmark's connections (utime+stime
from /proc for the pids in pg_stat_activity; 10 ms tick resolution). Every variant
runs --rounds times, interleaved, and the table shows medians.

Variants (see VARIANTS): a no-op harness baseline; SQLite (WAL, synchronous=FULL)
inline on the loop, in a thread pool, and through playhouse.pwasyncio (aiosqlite);
PostgreSQL through psycopg2 in a thread pool, pwasyncio (asyncpg), a raw asyncpg
pool, a psycopg 3 async pool, and psycopg2 inline on the loop. Rows marked `+` are
extras: pwasyncio releasing its connection after every lookup (what a fresh task
per RPC amounts to) and pwasyncio's greenlet bridge (`db.run`, which ORM calls use).

Needs, beyond the project's dependencies (deliberately not in pyproject.toml):
asyncpg, aiosqlite, greenlet, psycopg[binary], psycopg-pool; a variant whose
driver is missing is skipped. PostgreSQL on 127.0.0.1:5432 (user postgres, trust
auth); the database kg_bench_drivers is created and dropped again.

Run: .venv/bin/python benchmarks/store_drivers.py [--rounds 3] [--only s1,p3] [--no-pg]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import importlib.metadata
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import peewee as pw
import psycopg2

ROWS = 1_000
ACCOUNTS = 200
PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
PG_DB = "kg_bench_drivers"
PG_CONNINFO = f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname={PG_DB}"

# The one lookup, built once; only the placeholder style differs per driver.
LOOKUP_SQL = (
    "SELECT k.id, k.account_id, k.name, k.permission, k.allowed_ips, k.secret_hash, k.enabled,"
    " k.expires_at_us, a.address_management"
    " FROM key_model AS k LEFT JOIN account_model AS a ON a.account_id = k.account_id"
    " WHERE k.access_key = {param}"
)
SQL_QMARK = LOOKUP_SQL.format(param="?")  # sqlite3 (peewee SqliteDatabase, aiosqlite)
SQL_PYFORMAT = LOOKUP_SQL.format(param="%s")  # psycopg2, psycopg 3, pwasyncio's asyncpg wrapper
SQL_DOLLAR = LOOKUP_SQL.format(param="$1")  # raw asyncpg

SQLITE_DDL = (
    "CREATE TABLE account_model (account_id VARCHAR(128) NOT NULL PRIMARY KEY,"
    " address_management INTEGER NOT NULL DEFAULT 0)",
    "CREATE TABLE key_model (id INTEGER NOT NULL PRIMARY KEY, access_key VARCHAR(32) NOT NULL UNIQUE,"
    " account_id VARCHAR(128) NOT NULL, name VARCHAR(64) NOT NULL, permission SMALLINT NOT NULL,"
    " allowed_ips TEXT NOT NULL DEFAULT '', secret_hash TEXT NOT NULL, enabled INTEGER NOT NULL DEFAULT 1,"
    " expires_at_us BIGINT)",
)
PG_DDL = (
    "CREATE TABLE account_model (account_id VARCHAR(128) NOT NULL PRIMARY KEY,"
    " address_management BOOLEAN NOT NULL DEFAULT false)",
    "CREATE TABLE key_model (id BIGSERIAL PRIMARY KEY, access_key VARCHAR(32) NOT NULL UNIQUE,"
    " account_id VARCHAR(128) NOT NULL, name VARCHAR(64) NOT NULL, permission SMALLINT NOT NULL,"
    " allowed_ips TEXT NOT NULL DEFAULT '', secret_hash TEXT NOT NULL, enabled BOOLEAN NOT NULL DEFAULT true,"
    " expires_at_us BIGINT)",
)
SQLITE_PRAGMAS = {"journal_mode": "wal", "synchronous": "full"}

Lookup = Callable[[str], Awaitable[object]]
VariantFactory = Callable[["Env"], contextlib.AbstractAsyncContextManager[Lookup]]


@dataclass
class Env:
    sqlite_path: str
    concurrency: int


@dataclass
class Variant:
    name: str
    what: str
    factory: VariantFactory
    postgres: bool = False
    extra: bool = False


@dataclass
class Sample:
    rate: float  # lookups/s, wall clock
    cpu_us: float  # this process's CPU time per lookup, all threads
    pg_cpu_us: float | None  # PostgreSQL backends' CPU time per lookup


@dataclass
class Outcome:
    samples: list[Sample] = field(default_factory=list)
    skipped: str = ""


# --------------------------------------------------------------------------- data


def make_rows(rng: random.Random) -> tuple[list[tuple[str, bool]], list[tuple[Any, ...]]]:
    accounts = [(f"acct-{i:05d}", i % 3 == 0) for i in range(ACCOUNTS)]
    keys: list[tuple[Any, ...]] = []
    now_us = int(time.time() * 1e6)
    for i in range(ROWS):
        access_key = "AK" + "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", k=18))
        # One in eight keys' accounts has no account_model row (the LEFT JOIN yields NULL).
        account_id = f"acct-{rng.randrange(ACCOUNTS):05d}" if i % 8 else f"acct-x{i:05d}"
        allowed_ips = "" if i % 2 else "10.0.0.0/8 192.0.2.15 2001:db8::/32"
        secret_hash = "$argon2id$v=19$m=65536,t=3,p=4$" + rng.randbytes(16).hex() + "$" + rng.randbytes(32).hex()
        expires = now_us + 86_400_000_000 if i % 4 == 0 else None
        keys.append((access_key, account_id, f"key {i}", 1 + i % 3, allowed_ips, secret_hash, i % 50 != 0, expires))
    return accounts, keys


KEY_INSERT = (
    "INSERT INTO key_model (access_key, account_id, name, permission, allowed_ips, secret_hash, enabled,"
    " expires_at_us) VALUES ({p}, {p}, {p}, {p}, {p}, {p}, {p}, {p})"
)
ACCOUNT_INSERT = "INSERT INTO account_model (account_id, address_management) VALUES ({p}, {p})"


def populate_sqlite(path: str, accounts: list[tuple[str, bool]], keys: list[tuple[Any, ...]]) -> None:
    db = pw.SqliteDatabase(path, pragmas=SQLITE_PRAGMAS)
    conn = cast(Any, db).connection()  # peewee's stubs leave connection() untyped
    with db.atomic():
        for ddl in SQLITE_DDL:
            conn.execute(ddl)
        conn.executemany(ACCOUNT_INSERT.format(p="?"), accounts)
        conn.executemany(KEY_INSERT.format(p="?"), keys)
    conn.execute("ANALYZE")
    db.close()


def pg_admin() -> Any:
    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
    conn.autocommit = True
    return conn


def create_pg(accounts: list[tuple[str, bool]], keys: list[tuple[Any, ...]]) -> None:
    drop_pg()
    admin = pg_admin()
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE {PG_DB}")
    admin.close()
    conn = psycopg2.connect(PG_CONNINFO)
    with conn, conn.cursor() as cur:
        for ddl in PG_DDL:
            cur.execute(ddl)
        cur.executemany(ACCOUNT_INSERT.format(p="%s"), accounts)
        cur.executemany(KEY_INSERT.format(p="%s"), keys)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE")
    conn.close()


def drop_pg() -> None:
    admin = pg_admin()
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {PG_DB} WITH (FORCE)")
    admin.close()


class PgBackendCpu:
    """utime+stime of the benchmark database's client backends, read from /proc."""

    def __init__(self) -> None:
        self.conn = pg_admin()  # connected to `postgres`, so it never counts itself
        self.tick_us = 1e6 / os.sysconf("SC_CLK_TCK")

    def snapshot(self) -> dict[int, int] | None:
        with self.conn.cursor() as cur:
            cur.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND backend_type = 'client backend'", (PG_DB,)
            )
            pids = [int(row[0]) for row in cur.fetchall()]
        ticks: dict[int, int] = {}
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except FileNotFoundError:
                continue  # exited in between
            except OSError:
                return None  # not readable (other user, other host): no backend numbers
            ticks[pid] = int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
        return ticks

    def cpu_us(self, before: dict[int, int] | None, after: dict[int, int] | None) -> float | None:
        if before is None or after is None:
            return None
        return sum(t - before.get(pid, 0) for pid, t in after.items()) * self.tick_us

    def close(self) -> None:
        self.conn.close()


# ----------------------------------------------------------------------- variants


@contextlib.asynccontextmanager
async def noop(env: Env) -> AsyncIterator[Lookup]:
    async def lookup(key: str) -> object:
        await asyncio.sleep(0)
        return key

    yield lookup


def sync_lookup(db: pw.Database, sql: str) -> Callable[[str], object]:
    execute_sql = cast(Any, db).execute_sql  # untyped in peewee's stubs

    def lookup(key: str) -> object:
        return execute_sql(sql, (key,)).fetchone()

    return lookup


@contextlib.asynccontextmanager
async def inline(db: pw.Database, sql: str) -> AsyncIterator[Lookup]:
    """Runs the blocking driver call right on the event loop."""
    call = sync_lookup(db, sql)

    async def lookup(key: str) -> object:
        return call(key)

    try:
        yield lookup
    finally:
        db.close()


@contextlib.asynccontextmanager
async def in_executor(db: pw.Database, sql: str, threads: int) -> AsyncIterator[Lookup]:
    """Hops to a thread pool; peewee keeps one connection per thread."""
    call = sync_lookup(db, sql)
    executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="store")
    loop = asyncio.get_running_loop()

    async def lookup(key: str) -> object:
        return await loop.run_in_executor(executor, call, key)

    try:
        yield lookup
    finally:
        # Close each worker's thread-local connection in its own thread: the barrier
        # keeps any one thread from taking two of the close jobs.
        barrier = threading.Barrier(threads)

        def close() -> None:
            db.close()
            barrier.wait(timeout=10)

        for future in [executor.submit(close) for _ in range(threads)]:
            future.result()
        executor.shutdown()


def sqlite_db(env: Env) -> pw.SqliteDatabase:
    return pw.SqliteDatabase(env.sqlite_path, pragmas=SQLITE_PRAGMAS)


def psycopg2_db() -> pw.PostgresqlDatabase:
    return pw.PostgresqlDatabase(PG_DB, host=PG_HOST, port=PG_PORT, user=PG_USER)


@contextlib.asynccontextmanager
async def pwasyncio(db: Any, sql: str, mode: str) -> AsyncIterator[Lookup]:
    """playhouse.pwasyncio: direct aexecute_sql, with a release after each lookup, or via the greenlet bridge."""

    async def direct(key: str) -> object:
        return (await db.aexecute_sql(sql, (key,))).fetchone()

    async def release_each(key: str) -> object:
        row = (await db.aexecute_sql(sql, (key,))).fetchone()
        await db.aclose()  # back to the pool, as when the task serving one RPC ends
        return row

    call = sync_lookup(db, sql)

    async def bridged(key: str) -> object:
        return await db.run(call, key)

    lookups: dict[str, Lookup] = {"direct": direct, "release": release_each, "greenlet": bridged}
    try:
        yield lookups[mode]
    finally:
        await db.close_pool()


def s1(env: Env) -> contextlib.AbstractAsyncContextManager[Lookup]:
    return inline(sqlite_db(env), SQL_QMARK)


def s2(env: Env) -> contextlib.AbstractAsyncContextManager[Lookup]:
    return in_executor(sqlite_db(env), SQL_QMARK, threads=4)


def async_sqlite(env: Env, mode: str) -> contextlib.AbstractAsyncContextManager[Lookup]:
    from playhouse.pwasyncio import AsyncSqliteDatabase

    # pwasyncio pins a pooled connection to each task until the task ends (or aclose());
    # with the default pool_size=10, tasks 11..16 would wait out acquire_timeout (10 s) and fail.
    db = AsyncSqliteDatabase(env.sqlite_path, pragmas=SQLITE_PRAGMAS, pool_size=env.concurrency)
    return pwasyncio(db, SQL_QMARK, mode)


def async_postgres(env: Env, mode: str) -> contextlib.AbstractAsyncContextManager[Lookup]:
    from playhouse.pwasyncio import AsyncPostgresqlDatabase

    db = AsyncPostgresqlDatabase(
        PG_DB,
        host=PG_HOST,
        port=PG_PORT,
        user=PG_USER,
        pool_size=env.concurrency,
        pool_min_size=env.concurrency,
    )
    return pwasyncio(db, SQL_PYFORMAT, mode)


def p1(env: Env) -> contextlib.AbstractAsyncContextManager[Lookup]:
    return in_executor(psycopg2_db(), SQL_PYFORMAT, threads=8)


@contextlib.asynccontextmanager
async def p3(env: Env) -> AsyncIterator[Lookup]:
    import asyncpg  # type: ignore[import-untyped,import-not-found,unused-ignore]

    pool = await asyncpg.create_pool(host=PG_HOST, port=PG_PORT, user=PG_USER, database=PG_DB, min_size=8, max_size=8)

    async def lookup(key: str) -> object:
        return await pool.fetchrow(SQL_DOLLAR, key)  # statement cache: prepared once per connection

    try:
        yield lookup
    finally:
        await pool.close()


@contextlib.asynccontextmanager
async def p4(env: Env) -> AsyncIterator[Lookup]:
    import psycopg  # type: ignore[import-not-found,unused-ignore]
    import psycopg_pool  # type: ignore[import-not-found,unused-ignore]

    pool = psycopg_pool.AsyncConnectionPool(
        PG_CONNINFO,
        min_size=8,
        max_size=8,
        open=False,
        # autocommit: otherwise every checkout runs BEGIN ... and the pool a COMMIT/ROLLBACK.
        kwargs={"autocommit": True, "prepare_threshold": 0},
        connection_class=psycopg.AsyncConnection,
    )
    await pool.open(wait=True)

    async def lookup(key: str) -> object:
        async with pool.connection() as conn:
            cur = await conn.execute(SQL_PYFORMAT, (key,))
            return await cur.fetchone()

    try:
        yield lookup
    finally:
        await pool.close()


def p5(env: Env) -> contextlib.AbstractAsyncContextManager[Lookup]:
    return inline(psycopg2_db(), SQL_PYFORMAT)


VARIANTS = [
    Variant("n0", "no-op: await asyncio.sleep(0)", noop),
    Variant("s1", "sqlite peewee execute_sql inline on the loop", s1),
    Variant("s2", "sqlite peewee in ThreadPoolExecutor(4)", s2),
    Variant("s3", "sqlite pwasyncio aexecute_sql (aiosqlite)", lambda env: async_sqlite(env, "direct")),
    Variant("s3r", "  s3 + aclose() after each lookup", lambda env: async_sqlite(env, "release"), extra=True),
    Variant(
        "s3g", "  s3 via greenlet bridge db.run(execute_sql)", lambda env: async_sqlite(env, "greenlet"), extra=True
    ),
    Variant("p1", "pg psycopg2 peewee in ThreadPoolExecutor(8)", p1, postgres=True),
    Variant("p2", "pg pwasyncio aexecute_sql (asyncpg)", lambda env: async_postgres(env, "direct"), postgres=True),
    Variant(
        "p2r",
        "  p2 + aclose() after each lookup",
        lambda env: async_postgres(env, "release"),
        postgres=True,
        extra=True,
    ),
    Variant(
        "p2g",
        "  p2 via greenlet bridge db.run(execute_sql)",
        lambda env: async_postgres(env, "greenlet"),
        postgres=True,
        extra=True,
    ),
    Variant("p3", "pg raw asyncpg pool(8) fetchrow", p3, postgres=True),
    Variant("p4", "pg psycopg3 AsyncConnectionPool(8), prepared", p4, postgres=True),
    Variant("p5", "pg psycopg2 peewee inline on the loop (blocking)", p5, postgres=True),
]


# ------------------------------------------------------------------------ harness


async def drive(lookup: Lookup, keys: list[str], concurrency: int) -> None:
    it = iter(keys)  # shared by the tasks; the loop runs one at a time

    async def worker() -> None:
        for key in it:
            if await lookup(key) is None:
                raise RuntimeError(f"lookup of existing key {key!r} returned no row")

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def measure(
    variant: Variant, env: Env, warmup: list[str], keys: list[str], monitor: PgBackendCpu | None
) -> Sample:
    async with variant.factory(env) as lookup:
        await drive(lookup, warmup, env.concurrency)
        before = monitor.snapshot() if monitor else None
        wall0, cpu0 = time.perf_counter(), time.process_time()
        await drive(lookup, keys, env.concurrency)
        cpu1, wall1 = time.process_time(), time.perf_counter()
        after = monitor.snapshot() if monitor else None
    n = len(keys)
    pg_cpu = monitor.cpu_us(before, after) if monitor else None
    return Sample(n / (wall1 - wall0), (cpu1 - cpu0) * 1e6 / n, None if pg_cpu is None else pg_cpu / n)


def versions() -> str:
    names = ["peewee", "psycopg2-binary", "asyncpg", "aiosqlite", "greenlet", "psycopg", "psycopg-pool"]
    parts = []
    for name in names:
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{name} (missing)")
    return f"Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}; " + ", ".join(parts)


def fmt(value: float | None, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.1f}"


def report(variants: list[Variant], outcomes: dict[str, Outcome], rounds: int) -> None:
    print(f"\nmedians of {rounds} interleaved rounds")
    header = (
        f"{'':4} {'variant':46} {'lookups/s':>10} {'(min-max)':>15} {'proc µs/op':>10} {'pg µs/op':>9} {'sum µs/op':>9}"
    )
    print(header)
    print("-" * len(header))
    for variant in variants:
        outcome = outcomes[variant.name]
        if not outcome.samples:
            print(f"{variant.name:4} {variant.what:46} skipped: {outcome.skipped}")
            continue
        rates = [s.rate for s in outcome.samples]
        cpu = statistics.median(s.cpu_us for s in outcome.samples)
        pg_values = [s.pg_cpu_us for s in outcome.samples if s.pg_cpu_us is not None]
        pg = statistics.median(pg_values) if pg_values else None
        spread = f"{min(rates):,.0f}-{max(rates):,.0f}"
        print(
            f"{variant.name:4} {variant.what:46} {statistics.median(rates):>10,.0f} {spread:>17} "
            f"{cpu:>10.1f} {fmt(pg, 9)} {fmt(None if pg is None else cpu + pg, 9)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--total", type=int, default=20_000, help="measured lookups per run")
    parser.add_argument("--warmup", type=int, default=2_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--only", default="", help="comma-separated variant names, e.g. n0,s1,p3")
    parser.add_argument("--no-pg", action="store_true", help="SQLite variants only")
    parser.add_argument("--no-extras", action="store_true", help="skip the rows marked + (s3r, s3g, p2r, p2g)")
    args = parser.parse_args()

    wanted = {name.strip() for name in args.only.split(",") if name.strip()}
    variants = [
        v
        for v in VARIANTS
        if (not wanted or v.name in wanted) and not (args.no_pg and v.postgres) and not (args.no_extras and v.extra)
    ]
    rng = random.Random(1)
    accounts, rows = make_rows(rng)
    access_keys = [row[0] for row in rows]
    use_pg = any(v.postgres for v in variants)

    print(versions())
    print(
        f"{ROWS} keys; {args.concurrency} tasks on one event loop; {args.warmup} warm-up + {args.total} measured"
        f" lookups per run; {os.cpu_count()} cores (PostgreSQL shares them with this process)"
    )
    outcomes = {v.name: Outcome() for v in variants}
    monitor: PgBackendCpu | None = None
    with tempfile.TemporaryDirectory(prefix="kg-bench-drivers-") as tmp:
        env = Env(sqlite_path=str(Path(tmp) / "keyguard.db"), concurrency=args.concurrency)
        populate_sqlite(env.sqlite_path, accounts, rows)
        try:
            if use_pg:
                create_pg(accounts, rows)
                monitor = PgBackendCpu()
            for round_no in range(1, args.rounds + 1):
                for variant in variants:
                    outcome = outcomes[variant.name]
                    if outcome.skipped:
                        continue
                    warmup = rng.choices(access_keys, k=args.warmup)
                    keys = rng.choices(access_keys, k=args.total)
                    try:
                        sample = asyncio.run(measure(variant, env, warmup, keys, monitor if variant.postgres else None))
                    except ModuleNotFoundError as exc:
                        outcome.skipped = f"{exc.name} not installed"
                        continue
                    outcome.samples.append(sample)
                    print(
                        f"round {round_no} {variant.name:4} {sample.rate:>9,.0f}/s {sample.cpu_us:>7.1f} µs/op"
                        f"  pg {fmt(sample.pg_cpu_us, 6)} µs/op",
                        flush=True,
                    )
        finally:
            if monitor:
                monitor.close()
            if use_pg:
                drop_pg()
    report(variants, outcomes, args.rounds)


if __name__ == "__main__":
    main()
