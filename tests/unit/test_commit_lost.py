"""A connection lost during COMMIT: the outcome is unknown, so the change is never retried."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from keyguard import Unavailable
from keyguard_server.store import DatabaseSettings
from keyguard_server.store._connections import DatabaseThreads, execute, open_database, transaction


def test_a_connection_lost_while_committing_is_reported_as_unknown_and_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = open_database(DatabaseSettings(f"sqlite:///{tmp_path / 'keyguard.db'}"))
    threads = DatabaseThreads(db, "db-test", 1, changes=True)
    runs: list[int] = []

    def lost(*args: object, **kwargs: object) -> None:
        raise sqlite3.OperationalError("unable to open database file")  # what a vanished database says

    def change() -> None:
        runs.append(1)
        with transaction(db):
            execute(db, "CREATE TABLE IF NOT EXISTS changed (x)")

    monkeypatch.setattr(db, "commit", lost)  # the COMMIT itself fails

    try:
        with pytest.raises(Unavailable, match="lost while committing; the change may or may not"):
            asyncio.run(threads.call(5.0, change))
    finally:
        threads.close()
    assert runs == [1]
