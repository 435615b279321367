"""Database outages and waits: no database wait may stop the server from answering.

Every in-process server runs on one event loop; a query that blocks that loop
(a lost connection, a row lock another transaction holds, a network partition
that neither drops nor answers) would stall every call of every account,
health checks included. These tests hold the database up in those ways, from
outside keyguard, and check that everything not waiting for that very lock or
connection still answers promptly, that what does wait gives up in bounded
time with an honest status (ABORTED or UNAVAILABLE, never DEADLINE_EXCEEDED),
and that keyguard recovers by itself once the database is back.

Every wait here is bounded (client timeouts, polling deadlines), so a server
that does block fails these tests within seconds instead of hanging them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import grpc
import psycopg2
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from keyguard import Aborted, Client, CreatedKey, Decision, KeyguardError, Permission, StorageFull, Unavailable
from keyguard_server._config import EnvoyRoute
from keyguard_server.envoy.service.auth.v3 import external_auth_pb2 as ext
from keyguard_server.envoy.service.auth.v3 import external_auth_pb2_grpc as ext_grpc
from tests.conftest import RunningServer, StartServer
from tests.databases import Postgres
from tests.proxy import TcpProxy

# Storage-dependent: database outages, timeouts and reconnection differ per driver.
pytestmark = pytest.mark.all_backends

T = TypeVar("T")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
BOT_IP = "192.0.2.10"
# database_lock_timeout_seconds of the servers that meet a held lock.
LOCK_TIMEOUT = 1.0
# Client deadlines: long enough for a healthy server, short enough that a
# blocked one fails the test quickly.
READ_TIMEOUT = 2.0
CHANGE_TIMEOUT = 5.0

# These tests need one particular database; the backend is pinned so that
# each runs once (start_server would otherwise run it for both backends).
on_postgres = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
on_sqlite = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


# -- talking to the server ------------------------------------------------------


def client_for(server: RunningServer, timeout: float) -> Client:
    return Client(server.target, token=server.admin_token, timeout=timeout)


def allow(client: Client, key: CreatedKey) -> Decision:
    return client.authorize(key.key.access_key, key.private_key, BOT_IP, "read").decision


def health(server: RunningServer, timeout: float = READ_TIMEOUT) -> int:
    """The server's overall health status (service ""); a Check that fails (say, by its deadline) fails the test."""
    with grpc.insecure_channel(server.target) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # the stubs' HealthStub declares no methods
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError as exc:
            status = f"{exc.code().name} {exc.details()}" if isinstance(exc, grpc.Call) else repr(exc)
            raise AssertionError(f"health Check did not answer: {status}") from None
    return int(response.status)


def envoy_check_error(server: RunningServer, key: CreatedKey) -> tuple[grpc.StatusCode, str]:
    """The status of an Envoy ext_authz Check for ``key`` that is expected to fail."""
    request = ext.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path = "GET", "/api/balance"
    http.headers["x-api-key"] = key.key.access_key
    http.headers["x-api-secret"] = key.private_key
    request.attributes.source.address.socket_address.address = BOT_IP
    with grpc.insecure_channel(server.target) as channel:
        stub = ext_grpc.AuthorizationStub(channel)
        with pytest.raises(grpc.RpcError) as raised:
            stub.Check(request, timeout=1.5, metadata=(("authorization", f"Bearer {server.admin_token}"),))
    error: Any = raised.value  # a grpc.Call too
    return error.code(), error.details() or ""


def footprint(client: Client, account: str) -> tuple[int, int]:
    """What changes to an account leave behind: (its keys, its audit events)."""
    events, _ = client.list_audit_events(account, page_size=500)  # the most one page holds; these tests write far fewer
    return len(client.list_keys(account)), len(events)


# -- timing -----------------------------------------------------------------------


def quickly(call: Callable[[], T], limit: float, what: str) -> T:
    """call()'s result, which must come within ``limit`` seconds and without an error."""
    started = time.monotonic()
    try:
        result = call()
    except KeyguardError as exc:
        raise AssertionError(f"{what} failed after {time.monotonic() - started:.2f} s: {exc!r}") from exc
    took = time.monotonic() - started
    assert took < limit, f"{what} took {took:.2f} s (at most {limit} s allowed)"
    return result


def failure_of(call: Callable[[], object]) -> tuple[KeyguardError, float]:
    """The error call() must fail with, and after how many seconds."""
    started = time.monotonic()
    try:
        outcome = call()
    except KeyguardError as exc:
        return exc, time.monotonic() - started
    raise AssertionError(f"expected an error, got {outcome!r} after {time.monotonic() - started:.2f} s")


def eventually(
    expected: object,
    probe: Callable[[], object],
    *,
    within: float,
    what: str,
    tolerate: tuple[type[Exception], ...] = (),
) -> None:
    """Polls probe() every 50 ms until it returns ``expected``; errors of the ``tolerate`` types
    count as "not yet"; fails after ``within`` seconds, with the last thing seen."""
    deadline = time.monotonic() + within
    while True:
        seen: object
        try:
            seen = probe()
        except tolerate as exc:
            seen = exc
        if seen == expected:
            return
        assert time.monotonic() < deadline, f"{what}: expected {expected!r} within {within} s, last saw {seen!r}"
        time.sleep(0.05)


# -- holding the database up from outside ---------------------------------------


def terminate_connections(postgres: Postgres, database_url: str) -> int:
    """Terminates every session on the database (as a failover or an administrator would); how many."""
    name = urlsplit(database_url).path.lstrip("/")
    conn = psycopg2.connect(postgres.admin_url, connect_timeout=3)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            return len(cursor.fetchall())
    finally:
        conn.close()


@contextlib.contextmanager
def pg_row_lock(database_url: str, account_id: str) -> Iterator[None]:
    """Holds the account's row lock in another session's open transaction (as another replica's
    change would) until the block ends, then rolls that transaction back."""
    conn = psycopg2.connect(database_url, connect_timeout=3)
    try:
        with conn.cursor() as cursor:  # psycopg2 opens the transaction (BEGIN) itself
            cursor.execute("SELECT * FROM account_model WHERE account_id = %s FOR UPDATE", (account_id,))
            assert cursor.rowcount == 1, f"account {account_id!r} has no row to lock"
        yield
    finally:
        conn.rollback()
        conn.close()


HOLD_SQLITE_WRITE_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
sys.stdin.readline()  # until the test releases it (or goes away)
db.execute("ROLLBACK")
"""


@contextlib.contextmanager
def sqlite_write_lock(path: Path) -> Iterator[None]:
    """Another process holds the SQLite file's write lock (BEGIN IMMEDIATE, nothing written) until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_SQLITE_WRITE_LOCK, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    try:
        ready, _, _ = select.select([holder.stdout], [], [], 10)
        assert ready and holder.stdout.readline().strip() == "locked", "the other process never took the lock"
        yield
    finally:
        try:
            _, errors = holder.communicate("release\n", timeout=10)
        except subprocess.TimeoutExpired:
            holder.kill()
            _, errors = holder.communicate()
    assert holder.returncode == 0, f"the lock holder failed: {errors}"


# -- shared checks ------------------------------------------------------------------


def assert_reads_answer(
    server: RunningServer, client: Client, cached: CreatedKey, uncached: CreatedKey | None = None
) -> None:
    """Authorize (cached: 20 times, each < 0.5 s; uncached: < 1 s) and health (< 0.5 s) answer promptly."""
    for _ in range(20):
        assert quickly(lambda: allow(client, cached), 0.5, "a cached Authorize") is Decision.ALLOW
    if uncached is not None:
        assert quickly(lambda: allow(client, uncached), 1.0, "an uncached Authorize (argon2)") is Decision.ALLOW
    assert quickly(lambda: health(server), 0.5, "a health Check") == SERVING


def assert_create_gives_up_on_the_lock(
    server: RunningServer, account: str, while_it_waits: Callable[[], None]
) -> tuple[int, int]:
    """A CreateKey for ``account``, whose lock someone else holds, waits for it; meanwhile
    ``while_it_waits()`` runs; then the CreateKey fails with ABORTED (or UNAVAILABLE) naming
    the lock, after the lock timeout and within 3 s, and leaves no key and no audit event.
    Returns the account's footprint from before."""
    with client_for(server, CHANGE_TIMEOUT) as creator, client_for(server, READ_TIMEOUT) as reader:
        before = footprint(reader, account)
        with ThreadPoolExecutor(1) as pool:
            attempt = pool.submit(failure_of, lambda: creator.create_key(account, "while-locked", "read"))
            time.sleep(0.2)  # the CreateKey now waits for the lock
            assert not attempt.done(), f"CreateKey did not wait for the lock: {attempt.result()}"
            while_it_waits()
            error, took = attempt.result(timeout=CHANGE_TIMEOUT + 5)
        assert isinstance(error, (Aborted, Unavailable)), f"CreateKey under a held lock: {error.code.name} {error!r}"
        assert "lock" in error.message.lower(), f"the refusal does not say why: {error.message!r}"
        assert LOCK_TIMEOUT <= took < 3.0, f"CreateKey gave up after {took:.2f} s (lock timeout {LOCK_TIMEOUT} s)"
        assert footprint(reader, account) == before, "the refused CreateKey left a key or an audit event"
    return before


def assert_create_works_again(client: Client, account: str, before: tuple[int, int]) -> None:
    """Once the lock is free, a CreateKey succeeds, and the account holds exactly one key and one
    audit event more than ``before`` the refused one (which did not linger and commit later)."""
    client.create_key(account, "after-the-lock", "read")
    keys, events = before
    assert footprint(client, account) == (keys + 1, events + 1), "the refused CreateKey was applied after all"


# -- the tests ------------------------------------------------------------------------


@on_postgres
def test_postgres_drops_every_connection_and_keyguard_recovers(
    start_server: StartServer, postgres: Postgres, account: str
) -> None:
    """PostgreSQL terminating every keyguard session (failover, restart, an administrator) heals
    by itself: Authorize answers ALLOW again within 5 s, CreateKey/ListKeys/DeleteKey work and
    health is SERVING; a second termination right after heals the same way."""
    database = postgres.create()
    server = start_server(database=database, health_check_seconds=0.1)
    with client_for(server, READ_TIMEOUT) as client:
        key = client.create_key(account, "bot", "read", [])
        assert allow(client, key) is Decision.ALLOW  # the secret is cached from now on
        for termination in (1, 2):
            assert terminate_connections(postgres, database) > 0, "keyguard had no session to terminate"
            eventually(
                Decision.ALLOW,
                lambda: allow(client, key),
                within=5,
                what=f"Authorize after termination {termination}",
                tolerate=(KeyguardError,),
            )
            spare = client.create_key(account, f"spare-{termination}", "read", [])
            assert spare.key.access_key in {k.access_key for k in client.list_keys(account)}
            client.delete_key(account, spare.key.access_key)
            eventually(SERVING, lambda: health(server), within=5, what=f"health after termination {termination}")


@on_postgres
def test_a_locked_account_row_stalls_only_its_own_account(
    start_server: StartServer, postgres: Postgres, account: str
) -> None:
    """While another session holds account B's row lock, a CreateKey for B waits for it, and
    meanwhile account A's Authorize calls and health checks answer promptly; the CreateKey then
    gives up after the lock timeout (ABORTED or UNAVAILABLE, naming the lock) and changes
    nothing; once the lock is released, creating B's key works."""
    database = postgres.create()
    server = start_server(database=database, database_lock_timeout_seconds=LOCK_TIMEOUT)
    account_a, account_b = f"{account}-a", f"{account}-b"
    with client_for(server, READ_TIMEOUT) as client:
        key_a = client.create_key(account_a, "bot", "read", [])
        client.create_key(account_b, "bot", "read", [])  # B's row exists from now on
        assert allow(client, key_a) is Decision.ALLOW  # cached
        with pg_row_lock(database, account_b):
            before = assert_create_gives_up_on_the_lock(
                server, account_b, lambda: assert_reads_answer(server, client, key_a)
            )
        assert_create_works_again(client, account_b, before)


@on_postgres
def test_a_silent_partition_turns_health_not_serving_and_authorize_unavailable(
    start_server: StartServer, postgres: Postgres, account: str
) -> None:
    """When the network to PostgreSQL goes silent (no reset, no answer), health turns NOT_SERVING
    within 3 s and still answers, and Authorize fails fast with UNAVAILABLE rather than running
    into the caller's deadline; when the network comes back, everything heals by itself."""
    database = postgres.create()
    parts = urlsplit(database)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
        credentials = parts.netloc.rpartition("@")[0]
        proxied = urlunsplit(parts._replace(netloc=f"{credentials}@{proxy.address}" if credentials else proxy.address))
        server = start_server(
            database=proxied,
            health_check_seconds=0.2,
            health_check_timeout_seconds=0.5,
            database_statement_timeout_seconds=1.0,
            database_lock_timeout_seconds=0.5,  # must stay below the statement timeout
            envoy_routes=(EnvoyRoute("/api/", Permission.READ),),
        )
        with client_for(server, timeout=1.5) as client:
            key = client.create_key(account, "bot", "read", [])
            assert allow(client, key) is Decision.ALLOW  # cached
            assert health(server) == SERVING
            proxy.stall()
            try:
                eventually(NOT_SERVING, lambda: health(server, timeout=2.0), within=3, what="health in the partition")
                error, took = failure_of(lambda: allow(client, key))
                assert isinstance(error, Unavailable), f"Authorize in the partition: {error.code.name} {error!r}"
                assert error.code is grpc.StatusCode.UNAVAILABLE
                assert took < 1.5, f"Authorize took {took:.2f} s to give up"
                code, details = envoy_check_error(server, key)
                assert code is grpc.StatusCode.UNAVAILABLE, f"Envoy Check in the partition: {code} {details}"
                for internal in ("peewee", "psycopg", "Error", "<class", "Traceback"):
                    assert internal not in details, f"Envoy Check leaked {internal!r}: {details}"
            finally:
                proxy.resume()
            eventually(SERVING, lambda: health(server), within=10, what="health after the partition")
            eventually(
                Decision.ALLOW,
                lambda: allow(client, key),
                within=10,
                what="Authorize after the partition",
                tolerate=(KeyguardError,),
            )
            client.create_key(account, "after-the-partition", "read", [])


@on_sqlite
def test_another_process_holding_the_sqlite_write_lock_does_not_stop_reads(
    start_server: StartServer, tmp_path: Path, account: str
) -> None:
    """While another process holds the SQLite file's write lock, a CreateKey waits for it, and
    meanwhile Authorize (cached and uncached) and health checks answer promptly; the CreateKey
    then gives up after the lock timeout (ABORTED or UNAVAILABLE, naming the lock) and changes
    nothing; once the other process lets go, creating a key works."""
    path = tmp_path / "kg.db"
    server = start_server(database=f"sqlite:///{path}", database_lock_timeout_seconds=LOCK_TIMEOUT)
    with client_for(server, READ_TIMEOUT) as client:
        cached = client.create_key(account, "cached", "read", [])
        uncached = client.create_key(account, "uncached", "read", [])
        assert allow(client, cached) is Decision.ALLOW
        with sqlite_write_lock(path):
            before = assert_create_gives_up_on_the_lock(
                server, account, lambda: assert_reads_answer(server, client, cached, uncached)
            )
        assert_create_works_again(client, account, before)


# -- outages that every call meets: the database gone, or its disk full ------------------------

# Management calls during an outage, with deadlines well above the server's own bound on a
# call (database_connect_timeout + database_statement_timeout + 0.5 s = 2.5 s here).
OUTAGE_TIMEOUT = 5.0
OUTAGE_SETTINGS: dict[str, Any] = {
    "database_connect_timeout_seconds": 1.0,
    "database_statement_timeout_seconds": 1.0,
    "database_lock_timeout_seconds": 0.5,
    "health_check_seconds": 0.2,
    "health_check_timeout_seconds": 0.5,
    "last_used_flush_seconds": 0.2,
}
WRITES = "keyguard.writes"


class Probe:
    """Management calls made while the database is in trouble: each call's status code counted
    ("OK" for a success), and what each change answered remembered, to be checked afterwards
    against what is really stored (:meth:`assert_honest`)."""

    def __init__(self, client: Client, account: str, victims: list[str]) -> None:
        self.client, self.account = client, account
        self.victims = list(victims)  # access keys that rounds delete, one each
        self.codes: Counter[str] = Counter()
        self.messages: Counter[str] = Counter()
        self.created: dict[str, str] = {}  # key name -> "OK" or the refusal's message
        self.deleted: dict[str, str] = {}  # access key -> "OK" or the refusal's message
        self._rounds = 0

    def _call(self, call: Callable[[], object]) -> str:
        try:
            call()
        except KeyguardError as exc:
            self.codes[exc.code.name] += 1
            self.messages[f"{exc.code.name}: {exc.message}"] += 1
            return exc.message
        self.codes["OK"] += 1
        return "OK"

    def round(self) -> None:
        """Three reads and two changes (a create, a delete)."""
        self._rounds += 1
        name = f"outage-{self._rounds}"
        self._call(lambda: self.client.list_keys(self.account))
        self._call(lambda: self.client.get_account_settings(self.account))
        self._call(lambda: self.client.list_audit_events(self.account, page_size=10))
        self.created[name] = self._call(lambda: self.client.create_key(self.account, name, "read"))
        if self.victims:
            victim = self.victims.pop()
            self.deleted[victim] = self._call(lambda: self.client.delete_key(self.account, victim))

    def assert_honest(self, client: Client) -> None:
        """Every change that answered OK is stored; every one that said "nothing was changed" is not."""
        stored = client.list_keys(self.account)
        names, keys = {k.name for k in stored}, {k.access_key for k in stored}
        for name, answer in self.created.items():
            if answer == "OK":
                assert name in names, f"CreateKey {name!r} answered OK but the key is not stored"
            elif "nothing was changed" in answer:
                assert name not in names, f"CreateKey {name!r} said {answer!r} but the key is stored"
        for key, answer in self.deleted.items():
            if answer == "OK":
                assert key not in keys, f"DeleteKey {key!r} answered OK but the key is still stored"
            elif "nothing was changed" in answer:
                assert key in keys, f"DeleteKey {key!r} said {answer!r} but the key is gone"


def all_unavailable(probe: Probe, authorize: Callable[[], object], case: str) -> None:
    """Two more rounds of the probe's calls, and an Authorize: every one UNAVAILABLE."""
    for _ in range(2):
        probe.round()
    auth_error, _ = failure_of(authorize)
    print(f"{case}: {dict(probe.codes)} {dict(probe.messages)}")
    assert auth_error.code is grpc.StatusCode.UNAVAILABLE
    assert probe.codes == Counter(UNAVAILABLE=10), f"status codes ({case}): {dict(probe.codes)}"


def assert_outage_logged_quietly(caplog: pytest.LogCaptureFixture, seconds: float, outages: int = 1) -> None:
    """``outages`` expected outages, over ``seconds``, log no traceback and no ERROR, and their
    WARNINGs are rate-limited: at most four per outage (health's two, the store's, the last-used
    flush's) and per 10 s, however many calls met them."""
    most = 4 * outages * (1 + int(seconds // 10))
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
    assert not tracebacks, f"tracebacks logged for an expected outage: {tracebacks}"
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, f"ERRORs logged for an expected outage: {errors}"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) <= most, f"{len(warnings)} WARNINGs (at most {most}): {warnings}"


def health_of(server: RunningServer, service: str) -> int:
    with grpc.insecure_channel(server.target) as channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=READ_TIMEOUT).status)


def proxied_url(database: str, proxy: TcpProxy) -> str:
    parts = urlsplit(database)
    credentials = parts.netloc.rpartition("@")[0]
    return urlunsplit(parts._replace(netloc=f"{credentials}@{proxy.address}" if credentials else proxy.address))


def ride_out(server: RunningServer, client: Client, account: str, rounds: int) -> tuple[Probe, list[CreatedKey]]:
    """Before the outage: a key for Authorize (cached) and ``rounds`` keys to delete during it."""
    bot = client.create_key(account, "bot", "read", [])
    assert allow(client, bot) is Decision.ALLOW
    victims = [client.create_key(account, f"victim-{i}", "read").key.access_key for i in range(rounds)]
    return Probe(client, account, victims), [bot]


@on_postgres
@pytest.mark.parametrize("outage", ["refused", "connect_timeout"])
def test_an_unreachable_postgres_answers_unavailable_never_internal(
    start_server: StartServer, postgres: Postgres, account: str, outage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL unreachable: its port refusing connections (every connection reset, nothing
    listening), or accepting them and never answering (a partition: connects time out). Every
    management call answers UNAVAILABLE (never INTERNAL), saying whether anything changed, within
    the server's bound; health is NOT_SERVING; the log holds no traceback, and a few rate-limited
    WARNINGs at most. After it: everything works, and whatever answered OK is stored."""
    database = postgres.create()
    parts = urlsplit(database)
    host, port = parts.hostname or "127.0.0.1", parts.port or 5432
    proxy = TcpProxy(host, port)
    try:
        server = start_server(database=proxied_url(database, proxy), **OUTAGE_SETTINGS)
        with client_for(server, OUTAGE_TIMEOUT) as client:
            probe, (bot,) = ride_out(server, client, account, rounds=2)
            caplog.set_level(logging.INFO)
            caplog.clear()
            outage_began = time.monotonic()
            listen = proxy.port
            proxy.close()  # every connection reset; nothing listens: connection refused
            if outage == "connect_timeout":
                proxy = TcpProxy(host, port, port=listen)  # listens again, forwards nothing
                proxy.stall()
            eventually(NOT_SERVING, lambda: health(server), within=5, what="health in the outage")
            all_unavailable(probe, lambda: allow(client, bot), outage)
            for message in probe.messages:
                assert "nothing was changed" in message or "may or may not" in message, message
            assert_outage_logged_quietly(caplog, time.monotonic() - outage_began)
            if outage == "connect_timeout":
                proxy.resume()
            else:
                proxy = TcpProxy(host, port, port=listen)
            eventually(SERVING, lambda: health(server), within=10, what="health after the outage")
            eventually(
                Decision.ALLOW, lambda: allow(client, bot), within=10, what="Authorize after", tolerate=(KeyguardError,)
            )
            client.create_key(account, "after-the-outage", "read")
            probe.assert_honest(client)
    finally:
        proxy.close()


# -- a PostgreSQL server of the test's own, to stop and start ----------------------------------

PG_BINS = sorted(Path("/usr/lib/postgresql").glob("*/bin"))


class OwnPostgres:
    """A PostgreSQL server of its own (initdb in a temporary directory, owned by the postgres
    user), which a test may stop and start: the shared server cannot be stopped under other tests."""

    def __init__(self, bin_dir: Path) -> None:
        self._bin = bin_dir
        self._base = Path(tempfile.mkdtemp(prefix="keyguard-pg-"))
        shutil.chown(self._base, "postgres", "postgres")
        self._data = self._base / "data"
        with socket.socket() as free:
            free.bind(("127.0.0.1", 0))
            self.port = free.getsockname()[1]
        self._as_postgres("initdb", "-D", str(self._data), "-A", "trust", "-U", "postgres", "--no-sync")
        self.start()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_postgres(self, program: str, *args: str) -> None:
        command = ["runuser", "-u", "postgres", "--", str(self._bin / program), *args]
        subprocess.run(command, check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        options = f"-p {self.port} -k {self._base} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._as_postgres("pg_ctl", "-D", str(self._data), "-o", options, "-l", str(self._base / "log"), "-w", "start")

    def stop(self) -> None:
        self._as_postgres("pg_ctl", "-D", str(self._data), "-m", "fast", "-w", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self._base, ignore_errors=True)


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    if os.geteuid() != 0 or not PG_BINS or shutil.which("runuser") is None:
        pytest.skip("a PostgreSQL server of the test's own needs root, runuser and PostgreSQL's binaries")
    server = OwnPostgres(PG_BINS[-1])
    try:
        yield server
    finally:
        server.close()


@on_postgres
def test_a_stopped_postgres_answers_unavailable_and_a_restart_costs_nothing(
    start_server: StartServer, own_postgres: OwnPostgres, account: str, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL stopped (``pg_ctl stop -m fast``: every session terminated, then nothing
    listens): every management call answers UNAVAILABLE, never INTERNAL, saying whether anything
    changed; health is NOT_SERVING; no traceback is logged. Started again, everything works by
    itself; a restart between two calls costs them nothing (each reconnects), and whatever
    answered OK is stored."""
    server = start_server(database=own_postgres.url, **OUTAGE_SETTINGS)
    with client_for(server, OUTAGE_TIMEOUT) as client:
        probe, (bot,) = ride_out(server, client, account, rounds=3)
        caplog.set_level(logging.INFO)
        caplog.clear()
        outage_began = time.monotonic()
        own_postgres.stop()
        eventually(NOT_SERVING, lambda: health(server), within=5, what="health while PostgreSQL is stopped")
        all_unavailable(probe, lambda: allow(client, bot), "stopped")
        assert_outage_logged_quietly(caplog, time.monotonic() - outage_began)
        own_postgres.start()
        eventually(SERVING, lambda: health(server), within=10, what="health once PostgreSQL is back")
        own_postgres.restart()  # between two calls: the next ones reconnect
        probe.codes.clear()
        probe.round()
        print(f"after a restart: {dict(probe.codes)} {dict(probe.messages)}")
        assert probe.codes == Counter(OK=5), f"status codes right after a restart: {dict(probe.codes)}"
        eventually(
            Decision.ALLOW, lambda: allow(client, bot), within=10, what="Authorize after", tolerate=(KeyguardError,)
        )
        assert_outage_logged_quietly(caplog, time.monotonic() - outage_began, outages=2)  # the stop, the restart
        probe.assert_honest(client)


# -- a full disk ------------------------------------------------------------------------------


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (needs root), unmounted at the end."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], check=False)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Fills the disk to its last byte with one file; the file."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    return filler


def gauge(name: str) -> float | None:
    """A metric's value in this process (the in-process servers')."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name)


@on_sqlite
def test_a_full_disk_refuses_changes_with_resource_exhausted_and_says_so_in_health(
    start_server: StartServer, tmp_path: Path, account: str, caplog: pytest.LogCaptureFixture
) -> None:
    """SQLite on a disk that fills up: every change that cannot land answers RESOURCE_EXHAUSTED
    ("the database's disk is full; nothing was changed", with a retry hint: keyguard.StorageFull),
    never INTERNAL; reads and Authorize go on; health "" stays SERVING while keyguard.writes turns
    NOT_SERVING and keyguard_database_writable 0; the last-used flush backs off and logs once; no
    traceback. Freed, writes land again by themselves (health and gauge too), the last-used times
    recorded meanwhile land, and whatever answered OK is stored."""
    with small_disk(tmp_path / "disk", "2m") as disk:
        server = start_server(database=f"sqlite:///{disk / 'kg.db'}", **OUTAGE_SETTINGS)
        with client_for(server, OUTAGE_TIMEOUT) as client:
            probe, (bot,) = ride_out(server, client, account, rounds=3)
            assert health_of(server, WRITES) == SERVING
            caplog.set_level(logging.INFO)
            caplog.clear()
            outage_began, used_from = time.monotonic(), datetime.now(UTC)
            filler = fill(disk)
            for _ in range(3):
                probe.round()
                assert quickly(lambda: allow(client, bot), 0.5, "Authorize on a full disk") is Decision.ALLOW
            print(f"disk full: {dict(probe.codes)} {dict(probe.messages)}")
            assert probe.codes["OK"] >= 9, f"reads failed on a full disk: {dict(probe.codes)}"
            assert set(probe.codes) <= {"OK", "RESOURCE_EXHAUSTED"}, f"status codes: {dict(probe.codes)}"
            assert probe.codes["RESOURCE_EXHAUSTED"] >= 4, f"changes landed on a full disk: {dict(probe.codes)}"
            assert set(probe.messages) == {"RESOURCE_EXHAUSTED: the database's disk is full; nothing was changed"}
            error, _ = failure_of(lambda: client.create_key(account, "one-more", "read"))
            assert isinstance(error, StorageFull), f"not told apart from a per-account limit: {error!r}"
            eventually(NOT_SERVING, lambda: health_of(server, WRITES), within=3, what="keyguard.writes on a full disk")
            assert health(server) == SERVING, "reads and Authorize still work: the server itself is serving"
            assert gauge("keyguard_database_writable") == 0
            time.sleep(1.5)  # several flush periods: the failing flush must back off, logging once
            assert_outage_logged_quietly(caplog, time.monotonic() - outage_began)
            flush_warnings = [r for r in caplog.records if "last-used" in r.getMessage()]
            assert len(flush_warnings) == 1, [r.getMessage() for r in flush_warnings]
            filler.unlink()
            eventually(SERVING, lambda: health_of(server, WRITES), within=3, what="keyguard.writes once freed")
            assert gauge("keyguard_database_writable") == 1
            client.create_key(account, "after-the-disk-full", "read")
            eventually(
                True,
                lambda: (client.get_key(account, bot.key.access_key).last_used_at or used_from) > used_from,
                within=70,  # the flush's backoff, at most 60 s
                what="the last-used time recorded while the disk was full",
            )
            probe.assert_honest(client)


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
def test_postgres_on_a_full_disk_refuses_changes_with_resource_exhausted(
    start_server: StartServer, postgres: Postgres, account: str
) -> None:
    """PostgreSQL whose database lives on a disk that fills up (a tablespace on a small tmpfs;
    its WAL stays on the server's own disk, as a full data disk leaves it): a change that cannot
    land answers RESOURCE_EXHAUSTED (keyguard.StorageFull, 53100), never INTERNAL, keyguard.writes
    turns NOT_SERVING, and Authorize goes on."""
    reachable = Path(tempfile.mkdtemp(prefix="kg-pg-disk-"))  # pytest's own tmp is root's alone
    reachable.chmod(0o755)
    with small_disk(reachable / "disk", "8m") as disk:
        owner = pwd.getpwnam("postgres")
        os.chown(disk, owner.pw_uid, owner.pw_gid)
        name = f"kg_full_{uuid.uuid4().hex[:8]}"
        url = urlunsplit(urlsplit(postgres.admin_url)._replace(path=f"/{name}"))
        admin = psycopg2.connect(postgres.admin_url, connect_timeout=3)
        admin.autocommit = True  # CREATE TABLESPACE / DATABASE cannot run in a transaction
        admin.cursor().execute(f"CREATE TABLESPACE {name} LOCATION '{disk}'")
        try:
            admin.cursor().execute(f"CREATE DATABASE {name} TABLESPACE {name}")
            server = start_server(database=url, **OUTAGE_SETTINGS)
            with client_for(server, OUTAGE_TIMEOUT) as client:
                bot = client.create_key(account, "bot", "read", [])
                assert allow(client, bot) is Decision.ALLOW
                fill(disk)
                codes: Counter[str] = Counter()
                refusals: list[KeyguardError] = []
                for i in range(60):  # until a change needs a page the disk has no room for
                    try:
                        client.create_key(f"{account}-{i // 16}", f"key-{i}", "read")
                        codes["OK"] += 1
                    except KeyguardError as exc:
                        codes[exc.code.name] += 1
                        refusals.append(exc)
                print(f"PostgreSQL on a full disk: {dict(codes)}")
                assert codes["RESOURCE_EXHAUSTED"] > 0, dict(codes)
                assert all(isinstance(exc, StorageFull) for exc in refusals), refusals
                assert all("nothing was changed" in str(exc) for exc in refusals), refusals
                eventually(NOT_SERVING, lambda: health_of(server, WRITES), within=3, what="keyguard.writes")
                assert allow(client, bot) is Decision.ALLOW
        finally:
            postgres.drop(url)
            admin.cursor().execute(f"DROP TABLESPACE IF EXISTS {name}")
            admin.close()
    shutil.rmtree(reachable, ignore_errors=True)
