"""The two storage backends the suite runs against: SQLite files and PostgreSQL databases.

PostgreSQL is the server at KEYGUARD_TEST_POSTGRES_URL (default: the local
one, as on CI machines), where each test server gets a fresh database that is
dropped at the end of the run. Without it, PostgreSQL cases skip, unless
KEYGUARD_REQUIRE_POSTGRES=1 (as .ci/run sets), which makes them fail instead.
"""

from __future__ import annotations

import itertools
import os
import sqlite3
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg2

ADMIN_URL = os.environ.get("KEYGUARD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REQUIRED = os.environ.get("KEYGUARD_REQUIRE_POSTGRES") == "1"


class Postgres:
    def __init__(self, admin_url: str = ADMIN_URL) -> None:
        self.admin_url = admin_url
        self._prefix = f"kg_test_{uuid.uuid4().hex[:8]}"
        self._counter = itertools.count(1)
        self._created: list[str] = []

    def problem(self) -> str | None:
        """Why PostgreSQL cannot be used, or None."""
        try:
            psycopg2.connect(self.admin_url, connect_timeout=3).close()
        except psycopg2.Error as exc:
            return str(exc).strip() or type(exc).__name__
        return None

    def _admin(self, statement: str) -> None:
        conn = psycopg2.connect(self.admin_url, connect_timeout=3)
        try:
            conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
            with conn.cursor() as cursor:
                cursor.execute(statement)
        finally:
            conn.close()

    def create(self) -> str:
        """A fresh, empty database; its URL."""
        name = f"{self._prefix}_{next(self._counter)}"
        self._admin(f'CREATE DATABASE "{name}"')
        self._created.append(name)
        return urlunsplit(urlsplit(self.admin_url)._replace(path=f"/{name}"))

    def drop(self, url: str) -> None:
        """Drops one database now, even with servers connected to it."""
        close_connections()
        self._admin(f'DROP DATABASE IF EXISTS "{urlsplit(url).path.lstrip("/")}" WITH (FORCE)')

    def drop_all(self) -> None:
        close_connections()
        for name in self._created:
            self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_connections: dict[str, Any] = {}


def run_sql(database_url: str, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Runs one statement on a keyguard database from outside the server (as another replica would)."""
    if database_url.startswith("sqlite:///"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as db:
            return db.execute(query, params).fetchall()
    conn = _connections.get(database_url)
    if conn is None or conn.closed:
        conn = _connections[database_url] = psycopg2.connect(database_url)
        conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(query.replace("?", "%s"), params)
        return cursor.fetchall() if cursor.description else []


def close_connections() -> None:
    for conn in _connections.values():
        conn.close()
    _connections.clear()
