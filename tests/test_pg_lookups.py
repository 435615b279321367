"""PostgreSQL's Authorize lookups on the event loop (``store._postgres.LoopLookups``) when the database
misbehaves: a failover host list, a database that refuses sessions, a slow DNS answer.

Each test drives the real lookup machinery against the real local PostgreSQL, or against a real
TCP peer that refuses PostgreSQL sessions. The outage tests (``test_outages.py``) cover the same
path through a whole server: dropped connections, a stalled proxy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import peewee as pw
import pytest
import uvloop

from keyguard import Unavailable
from keyguard_server.store import DatabaseSettings
from keyguard_server.store._postgres import LoopLookups
from tests.databases import ADMIN_URL, REQUIRED, Postgres

LOOKUP = "SELECT 1, 'kg_x' WHERE 'kg_x' = ANY(%s)"  # one row for the access key "kg_x", like the real lookup

_problem = Postgres().problem()
pytestmark = pytest.mark.skipif(_problem is not None and not REQUIRED, reason=f"PostgreSQL unavailable: {_problem}")
_ADMIN = urlsplit(ADMIN_URL)


def database(host: str, port: str) -> pw.PostgresqlDatabase:
    """A peewee database as ``open_database`` makes one, only for its connection parameters."""
    return pw.PostgresqlDatabase(
        _ADMIN.path.lstrip("/") or "postgres", host=host, port=port, user=_ADMIN.username or "postgres"
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lookups(db: pw.Database, **settings: Any) -> LoopLookups:
    return LoopLookups(db, LOOKUP, DatabaseSettings("postgresql://unused", **settings))


def test_a_failover_host_list_reaches_the_live_host() -> None:
    """host=db1,db2 with db1 down: libpq moves to db2 on a new socket, often with the old
    socket's number, which the loop must watch anew (else every lookup times out for good)."""

    async def run() -> list[Any]:
        found = lookups(database("127.0.0.1,127.0.0.1", f"{closed_port()},{_ADMIN.port or 5432}"), connect_timeout=2.0)
        try:
            return [await found.lookup("kg_x", 2.0) for _ in range(3)]
        finally:
            found.close()

    assert uvloop.run(run()) == [(1,)] * 3


@dataclasses.dataclass
class Peer:
    port: int
    seen: list[int]  # connections accepted so far

    def connections(self) -> int:
        return self.seen[0]


@pytest.fixture
def refusing_peer() -> Iterator[Peer]:
    """A TCP peer that accepts and hangs up at once (a database refusing sessions, as when it is
    starting up or out of connections), counting the connections it sees."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen = [0]

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            seen[0] += 1
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield Peer(listener.getsockname()[1], seen)
    listener.close()
    thread.join(5)


def test_each_lookup_gives_up_at_its_own_deadline() -> None:
    """Lookups waiting behind a slow statement fail at their own deadlines (one timer serves
    them all): a later one with a sooner deadline first, the others left waiting meanwhile."""
    slow = "SELECT 1, 'kg_x' FROM pg_sleep(1.2) WHERE 'kg_x' = ANY(%s)"

    async def run() -> list[tuple[str, float]]:
        found = LoopLookups(
            database(_ADMIN.hostname or "127.0.0.1", str(_ADMIN.port or 5432)),
            slow,
            DatabaseSettings("postgresql://unused", statement_timeout=3.0),
        )
        started = time.monotonic()

        async def timed(within: float) -> tuple[str, float]:
            try:
                await found.lookup("kg_x", within)
            except Unavailable:
                return "gave up", time.monotonic() - started
            return "answered", time.monotonic() - started

        try:
            patient = asyncio.create_task(timed(5.0))  # its statement is the slow one on its way
            await asyncio.sleep(0.05)
            later = asyncio.create_task(timed(0.7))
            await asyncio.sleep(0.1)
            sooner = asyncio.create_task(timed(0.2))
            return list(await asyncio.gather(patient, later, sooner))
        finally:
            found.close()

    (patient, patient_at), (later, later_at), (sooner, sooner_at) = uvloop.run(run())
    assert (patient, later, sooner) == ("answered", "gave up", "gave up")
    assert 0.3 <= sooner_at < 0.6, sooner_at
    assert 0.7 <= later_at < 1.1, later_at
    assert patient_at >= 1.2


def test_a_refusing_database_is_not_hammered(refusing_peer: Peer) -> None:
    """A connection that cannot be opened fails the lookups waiting for it at once; nothing
    reconnects while nobody waits, and lookups within the pause fail without a new attempt."""

    async def run() -> tuple[float, int, int, int]:
        found = lookups(database("127.0.0.1", str(refusing_peer.port)))
        try:
            started = time.monotonic()
            with pytest.raises(Unavailable, match="unreachable"):
                await found.lookup("kg_x", 3.0)
            failed_after = time.monotonic() - started
            first = refusing_peer.connections()
            with pytest.raises(Unavailable, match="unreachable"):  # within the pause: no new attempt
                await found.lookup("kg_x", 3.0)
            during_pause = refusing_peer.connections() - first
            await asyncio.sleep(1.0)  # nobody waiting: nothing reconnects
            return failed_after, first, during_pause, refusing_peer.connections() - first
        finally:
            found.close()

    failed_after, first, during_pause, idle = uvloop.run(run())
    assert failed_after < 1.0  # told at once, not at the lookup's deadline
    assert first == 1
    assert during_pause == 0
    assert idle == 0


def test_a_slow_dns_answer_never_stalls_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Host names are resolved on a thread: a DNS answer taking 1 s delays that connection, never
    the loop (other lookups' deadlines still fire on time)."""
    resolve = socket.getaddrinfo

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(1.0)
        return resolve(*args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", slow)  # the resolver keyguard calls, made slow

    async def tick(gaps: list[float]) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    async def run() -> tuple[float, float, Any]:
        gaps: list[float] = []
        ticker = asyncio.create_task(tick(gaps))
        found = lookups(database("localhost", str(_ADMIN.port or 5432)))
        try:
            started = time.monotonic()
            with pytest.raises(Unavailable, match=r"within 0\.3 s"):
                await found.lookup("kg_x", 0.3)
            gave_up_after = time.monotonic() - started
            row = await found.lookup("kg_x", 3.0)  # the connection opens once DNS has answered
            return gave_up_after, max(gaps), row
        finally:
            found.close()
            ticker.cancel()

    gave_up_after, longest_stall, row = uvloop.run(run())
    assert gave_up_after < 0.6
    assert longest_stall < 0.25
    assert row == (1,)
