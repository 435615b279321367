"""Every setting of a key that update_key is given is saved; a column that is no setting is refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import peewee as pw
import pytest
import uvloop

from keyguard import KeyType, Permission
from keyguard_server import Config
from keyguard_server.store import Store
from keyguard_server.store._schema import KEY_NOT_SETTINGS, KeyModel

ACCESS_KEY = "kg_" + "B" * 24
# Values a key's row must hold for the store to read it back (enums), for the columns that have them.
VALID = {"permission": int(Permission.WITHDRAW), "key_type": int(KeyType.ED25519), "allowed_ips": "198.51.100.0/24"}


def another_value(field: pw.Field, n: int) -> object:
    """A value the new key does not have yet, of the column's type."""
    if field.name in VALID:
        return VALID[field.name]
    if isinstance(field, pw.BooleanField):
        return False  # a new key's flags are on (enabled)
    if isinstance(field, pw.IntegerField):
        return 1_800_000_000_000_000 + n
    return f"{field.name}-{n}"


def test_update_key_saves_every_setting_it_is_given(tmp_path: Path) -> None:
    """Derived from the model, not from the store's own list: a column added to KeyModel (and
    not named in KEY_NOT_SETTINGS) that a change would not save fails here."""
    settings = [f for f in KeyModel._meta.sorted_fields if f.name not in KEY_NOT_SETTINGS]
    given = {field.name: another_value(field, n) for n, field in enumerate(settings)}

    async def run() -> None:
        store = await Store.open(Config(data_dir=str(tmp_path)).database_settings)
        try:
            await store.insert_key(
                caller="t",
                account_id="acct",
                access_key=ACCESS_KEY,
                name="bot",
                permission=Permission.READ,
                allowed_ips=["192.0.2.1"],
                secret_hash="h",
                max_keys=10,
            )
            for name, value in given.items():  # one at a time: each change on its own must land
                await store.update_key(
                    caller="t", account_id="acct", access_key=ACCESS_KEY, changes={name: value}, check=lambda _: None
                )
            for name in sorted(KEY_NOT_SETTINGS):
                with pytest.raises(ValueError, match=name):
                    await store.update_key(
                        caller="t", account_id="acct", access_key=ACCESS_KEY, changes={name: 1}, check=lambda _: None
                    )
        finally:
            await store.close()

    uvloop.run(run())
    with sqlite3.connect(tmp_path / "keyguard.db") as db:
        db.row_factory = sqlite3.Row
        row: Any = db.execute("SELECT * FROM key_model").fetchone()
    assert {name: row[name] for name in given} == {
        name: KeyModel._meta.fields[name].db_value(v) for name, v in given.items()
    }
    assert (row["access_key"], row["created_at_us"] > 0, row["last_used_at_us"]) == (ACCESS_KEY, True, None)
