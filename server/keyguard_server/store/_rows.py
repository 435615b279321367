"""What the store reads and hands out: Authorize's lookups (their SQL, built once) and the mapping
of rows to the domain's values (keyguard's models, the domain's KeyRow, AccountState)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

import peewee as pw

from keyguard import ApiKey, KeyType, Permission
from keyguard_server.authorize._domain import KeyRow
from keyguard_server.store._schema import AccountModel, AddressModel, KeyModel, NonceModel

# Distinct key rows whose derived state (KeyRow) is kept; all are dropped when full.
MAX_MEMOISED_ROWS = 20_000


@dataclass(frozen=True)
class AccountState:
    """An account's settings as stored; the domain decides what they mean now."""

    address_management: bool
    # A pending "off": management stays on until then.
    address_management_off_at_us: int | None
    frozen: bool
    key_count: int


def to_datetime(microseconds: int) -> datetime:
    return datetime.fromtimestamp(microseconds / 1e6, tz=UTC)


@dataclass(frozen=True)
class LookupSql:
    """Authorize's point lookups, built once into SQL text (see the package docstring);
    :func:`auth_row` reads the rows ``key`` and ``keys`` return."""

    key: str = ""  # a key's row and its account's settings, by access key
    keys: str = ""  # PostgreSQL: many keys' rows in one statement, each followed by its access key
    whitelisted: str = ""  # when a whitelisted destination becomes usable (the hold), by account, asset, address, memo
    nonce: str = ""  # records a signed request's nonce

    @classmethod
    def build(cls, *, postgres: bool) -> LookupSql:
        """On a thread whose models are bound (the SQL is that database's dialect)."""
        columns = (
            KeyModel.account_id,
            KeyModel.name,
            KeyModel.permission,
            KeyModel.allowed_ips,
            KeyModel.secret_hash,
            pw.fn.COALESCE(AccountModel.address_management, pw.SQL("FALSE")),
            KeyModel.enabled,
            KeyModel.expires_at_us,
            KeyModel.previous_secret_hash,
            KeyModel.previous_valid_until_us,
            KeyModel.key_type,
            KeyModel.public_key,
            KeyModel.previous_public_key,
            KeyModel.last_used_ip,
            pw.fn.COALESCE(AccountModel.frozen, pw.SQL("FALSE")),
            AccountModel.address_management_off_at_us,
            KeyModel.symbols,
            KeyModel.unrestricted_since_us,
        )
        # The row as one JSON array text (the memo key of its KeyRow as it comes): the driver
        # hands over one value instead of 18 (measured on SQLite: 17 -> 10 µs per lookup).
        # (PostgreSQL: cast to text, or psycopg2 would parse it on every read.)
        row = pw.fn.json_build_array(*columns).cast("text") if postgres else pw.fn.json_array(*columns)
        key_and_account = KeyModel.select(row).join(
            AccountModel, pw.JOIN.LEFT_OUTER, on=AccountModel.account_id == KeyModel.account_id
        )
        whitelisted = AddressModel.select(AddressModel.usable_from_us).where(
            (AddressModel.account_id == "")
            & (AddressModel.asset == "")
            & (AddressModel.address == "")
            & (AddressModel.memo == "")
        )
        return cls(
            key=key_and_account.where(KeyModel.access_key == "").sql()[0],
            # PostgreSQL: every lookup waiting at once, in one statement (see LoopLookups).
            keys=key_and_account.select_extend(KeyModel.access_key)
            .where(KeyModel.access_key == pw.fn.ANY(pw.SQL("%s")))
            .sql()[0],
            whitelisted=whitelisted.sql()[0],
            nonce=NonceModel.insert(access_key="", nonce="", seen_at_us=0).sql()[0],
        )


def auth_row(row: tuple[Any, ...]) -> KeyRow:
    """The KeyRow of a lookup's row: (the JSON array of LookupSql.build's columns,)."""
    (account_id, name, permission, allowed_ips, secret_hash, address_management, enabled, expires, prev, until,
     key_type, public_key, previous_public_key, last_used_ip,
     frozen, management_off_at, symbols, unrestricted_since) = json.loads(row[0])  # fmt: skip
    return KeyRow(
        account_id,
        name,
        Permission(permission),
        allowed_ips,
        secret_hash,
        bool(address_management),
        bool(enabled),
        expires,
        prev,
        until,
        KeyType(key_type),
        public_key,
        previous_public_key,
        last_used_ip,
        bool(frozen),
        management_off_at,
        symbols,
        unrestricted_since,
    )


class StoredKey(NamedTuple):
    """A key as stored: what callers see of it, less what policy makes of it (the key-management
    use case shows ``unrestricted_until`` from ``unrestricted_since_us`` and its config)."""

    key: ApiKey  # unrestricted_until: None
    # When its IP allowlist last became empty; None while it has one.
    unrestricted_since_us: int | None


def key_row(key: Any) -> StoredKey:
    return StoredKey(
        ApiKey(
            key.account_id,
            key.access_key,
            key.name,
            Permission(key.permission),
            tuple(key.allowed_ips.split()),
            to_datetime(key.created_at_us),
            to_datetime(key.last_used_at_us) if key.last_used_at_us is not None else None,
            key.last_used_ip,
            to_datetime(key.expires_at_us) if key.expires_at_us is not None else None,
            bool(key.enabled),
            to_datetime(key.previous_valid_until_us) if key.previous_valid_until_us is not None else None,
            KeyType(key.key_type),
            key.public_key,
            tuple(key.symbols.split()),
        ),
        key.unrestricted_since_us,
    )
