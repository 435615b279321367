"""Fixtures: real keyguard servers on real loopback ports, on real databases.

In-process servers run on one shared asyncio loop in a background thread (as
``keyguard-server serve`` runs them on its main loop); tests talk to them through the
generated stubs via :class:`keyguard.Client` over a real TCP channel. Tests
whose behaviour depends on the database (marked ``all_backends``) run twice: on
SQLite files and on PostgreSQL (``tests/databases.py``); the others on SQLite.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import uvloop

from keyguard import Client
from keyguard._client import domain_error
from keyguard.v1 import keyguard_pb2_grpc as pb_grpc
from keyguard_server import Config, KeyguardServer
from tests.databases import ADMIN_URL, REQUIRED, Postgres, run_sql

T = TypeVar("T")

# Real argon2id, at the cheapest parameters, so the suite stays fast.
FAST_ARGON2 = {"argon2_time_cost": 1, "argon2_memory_kib": 1024, "argon2_parallelism": 1}


class LoopThread:
    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()  # the server's loop, as in production (_server.run_loop)
        self._thread = threading.Thread(target=self.loop.run_forever, name="server-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


class RunningServer:
    def __init__(self, server: KeyguardServer, loop: LoopThread) -> None:
        self.server = server
        self.config = server.config
        self.target = f"127.0.0.1:{server.port}"
        self.database_url = self.config.database_url
        self.backend = "sqlite" if self.database_url.startswith("sqlite") else "postgresql"
        self._loop = loop

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A statement on this server's database from outside it ("?" placeholders)."""
        return run_sql(self.database_url, query, params)

    @property
    def admin_token(self) -> str:
        return self.config.admin_token_file.read_text().strip()

    def client(self, **credentials: Any) -> Client:
        """A client with the generated admin token unless other credentials are given."""
        return Client(self.target, timeout=10, **(credentials or {"token": self.admin_token}))

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs a coroutine on the server's own loop (to call its domain directly)."""
        return self._loop.run(coro)

    def stop(self) -> None:
        self._loop.run(self.server.stop(0))


@pytest.fixture(scope="session")
def loop_thread() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


StartServer = Callable[..., RunningServer]


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    pg = Postgres()
    problem = pg.problem()
    if problem is not None:
        if REQUIRED:
            pytest.fail(f"KEYGUARD_REQUIRE_POSTGRES=1 but PostgreSQL at {ADMIN_URL} is unreachable: {problem}")
        pytest.skip(f"PostgreSQL at {ADMIN_URL} is unreachable ({problem}); set KEYGUARD_TEST_POSTGRES_URL")
    yield pg
    pg.drop_all()


BACKENDS = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Which databases a test's servers run on: both for tests marked ``all_backends`` (whose
    behaviour depends on the backend: storage, outages, replicas, durability, migrations,
    concurrency limits), SQLite alone for every other (what they prove is the same on both).
    A test that parametrizes ``backend`` itself keeps its own choice."""
    if "backend" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        if "backend" in ([n.strip() for n in names.split(",")] if isinstance(names, str) else names):
            return
    backends = BACKENDS if metafunc.definition.get_closest_marker("all_backends") else BACKENDS[:1]
    metafunc.parametrize("backend", backends, indirect=True, scope="session", ids=list(backends))


@pytest.fixture(scope="session")
def backend(request: pytest.FixtureRequest) -> str:
    """The database of the test's servers (see ``pytest_generate_tests``)."""
    return str(request.param)


@pytest.fixture(scope="session")
def database_for(backend: str, request: pytest.FixtureRequest) -> Callable[[str], str]:
    """The database URL for a data dir: the same data dir always gets the same database."""
    if backend == "sqlite":
        return lambda data_dir: f"sqlite:///{Path(data_dir) / 'keyguard.db'}"
    pg: Postgres = request.getfixturevalue("postgres")
    databases: dict[str, str] = {}

    def database(data_dir: str) -> str:
        if data_dir not in databases:
            databases[data_dir] = pg.create()
        return databases[data_dir]

    return database


@pytest.fixture
def serve_database(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> tuple[list[str], str]:
    """For `keyguard-server serve` processes run in tmp_path: (extra flags, database URL)."""
    if backend == "sqlite":
        return [], f"sqlite:///{tmp_path / 'data' / 'keyguard.db'}"
    url = request.getfixturevalue("postgres").create()
    return ["--database", url], url


@pytest.fixture(scope="session")
def launch(
    loop_thread: LoopThread, tmp_path_factory: pytest.TempPathFactory, database_for: Callable[[str], str]
) -> StartServer:
    """Starts a server with test defaults plus the given Config overrides; the caller stops it."""

    def start(**overrides: Any) -> RunningServer:
        settings: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "data_dir": str(tmp_path_factory.mktemp("data")),
            **FAST_ARGON2,
            **overrides,
        }
        settings.setdefault("database", database_for(settings["data_dir"]))
        server = KeyguardServer(Config(**settings))
        loop_thread.run(server.start())
        return RunningServer(server, loop_thread)

    return start


@pytest.fixture
def start_server(launch: StartServer) -> Iterator[StartServer]:
    """Starts servers for one test (see ``launch``) and stops them after it, so their database
    connections do not pile up over the session."""
    started: list[RunningServer] = []

    def start(**overrides: Any) -> RunningServer:
        running = launch(**overrides)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


@pytest.fixture(scope="session")
def server(launch: StartServer) -> Iterator[RunningServer]:
    """The shared server with default limits; tests isolate by account id.

    Its failure limits are wide: they are per client IP, and unrelated tests
    sharing one IP must not rate-limit each other (the limits have tests of
    their own, on servers of their own). Whitelisted addresses and address
    management off take effect at once here: the holds have tests of their
    own (tests/test_protections.py).
    """
    running = launch(failure_burst=100_000, address_hold_seconds=0)
    yield running
    running.stop()


@pytest.fixture
def client(server: RunningServer) -> Iterator[Client]:
    with server.client() as c:
        yield c


class RawStubs:
    """The generated stubs, for requests the typed client would refuse to build."""

    def __init__(self, channel: grpc.Channel, token: str) -> None:
        self.keys = pb_grpc.KeyManagementStub(channel)
        self.auth = pb_grpc.AuthorizationStub(channel)
        self.metadata = (("authorization", f"Bearer {token}"),)

    def call(self, method: Callable[..., T], request: Any) -> T:
        """Calls one RPC; a failure raises the keyguard error it stands for."""
        try:
            return method(request, timeout=10, metadata=self.metadata)
        except grpc.RpcError as exc:
            raise domain_error(exc) from None


@pytest.fixture
def raw(server: RunningServer) -> Iterator[RawStubs]:
    with grpc.insecure_channel(server.target) as channel:
        yield RawStubs(channel, server.admin_token)


_accounts = itertools.count(1)


@pytest.fixture
def account() -> str:
    """An account id no other test uses."""
    return f"acct-{next(_accounts)}-{uuid.uuid4().hex[:8]}"
