"""Storage: every query keyguard makes (the models are in ``_schema``).

Concurrency contract: all store calls run synchronously on the server's event
loop thread and never span an ``await``, so a transaction is never interleaved
with another call of the same process. Across processes the per-account limits
(count, then insert) are serialised per account:

- SQLite: every transaction starts with ``BEGIN IMMEDIATE``, taking the file's
  write lock first.
- PostgreSQL: the transaction locks the account's row (``SELECT ... FOR
  UPDATE``, after an ``INSERT ... ON CONFLICT DO NOTHING`` so the row exists).
  Creates for one account queue on that lock, other accounts are unaffected,
  and nothing ever fails spuriously. SERIALIZABLE would also prevent the race
  but aborts one of two conflicting transactions, which every caller would
  then have to retry.

The query builder is used on cold paths for clarity; the per-Authorize lookup
is built once into SQL text and run with ``execute_sql`` (DESIGN.md §9: ~110 µs
vs ~7 µs per call).
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import peewee as pw
from playhouse import db_url
from playhouse.pool import PooledDatabase

from keyguard import (
    AlreadyExists,
    ApiKey,
    AuditAction,
    AuditEvent,
    KeyType,
    LimitExceeded,
    NotFound,
    Permission,
    WithdrawalAddress,
)
from keyguard_server._schema import MODELS, AccountModel, AddressModel, AuditModel, KeyModel, NonceModel, migrate


@dataclass(frozen=True)
class AuthRow:
    """What Authorize needs about a key, read in one point lookup."""

    account_id: str
    name: str
    permission: Permission
    allowed_ips: str
    secret_hash: str
    address_management: bool
    enabled: bool
    expires_at_us: int | None
    # The rotated-out hash and until when it is still accepted ("" / None: none).
    previous_secret_hash: str
    previous_valid_until_us: int | None
    key_type: KeyType
    public_key: str
    previous_public_key: str

    def in_grace(self, now: int) -> bool:
        """Whether the rotated-out credential is still accepted."""
        return self.previous_valid_until_us is not None and now < self.previous_valid_until_us

    def accepts_hash(self, secret_hash: str, now: int) -> bool:
        """Whether a secret verified against ``secret_hash`` is valid for this key now."""
        if secret_hash == self.secret_hash:
            return True
        return (
            secret_hash == self.previous_secret_hash
            and self.previous_valid_until_us is not None
            and now < self.previous_valid_until_us
        )


def now_us() -> int:
    return time.time_ns() // 1000


def to_datetime(microseconds: int) -> datetime:
    return datetime.fromtimestamp(microseconds / 1e6, tz=UTC)


def open_database(url: str) -> pw.Database:
    """A Database from a URL; SQLite gets WAL, FULL sync and the write-lock-first rule.

    ``synchronous=FULL``: a delete acknowledged to the caller must survive a
    power cut, or a revoked key could come back. ``postgresql://`` URLs get
    peewee's connection pool (psycopg2): stale connections are replaced, and a
    server restart costs a reconnect, not a crash.
    """
    scheme = url.split("://", 1)[0]
    if scheme in ("postgres", "postgresql"):
        database: pw.Database = db_url.connect(
            "postgresql+pool://" + url.split("://", 1)[1], max_connections=8, stale_timeout=300
        )
        return database
    if url.startswith("sqlite"):
        path = url.split(":///", 1)[-1].split("?", 1)[0]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        database = db_url.connect(
            url,
            lock_type="IMMEDIATE",
            pragmas={
                "journal_mode": "wal",
                "synchronous": "full",
                "busy_timeout": 5000,
                "foreign_keys": 1,
            },
        )
        return database
    database = db_url.connect(url)
    return database


class Store:
    def __init__(self, database: pw.Database) -> None:
        self.db = database
        self._row_locks = isinstance(database, pw.PostgresqlDatabase)
        self._execute: Callable[[str, tuple[object, ...]], Any] = database.execute_sql
        migrate(self.db)
        with self._bound():
            auth = (
                KeyModel.select(
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
                )
                .join(AccountModel, pw.JOIN.LEFT_OUTER, on=AccountModel.account_id == KeyModel.account_id)
                .where(KeyModel.access_key == "")
            )
            self._auth_sql: str = auth.sql()[0]
            whitelisted = AddressModel.select(pw.SQL("1")).where(
                (AddressModel.account_id == "")
                & (AddressModel.asset == "")
                & (AddressModel.address == "")
                & (AddressModel.memo == "")
            )
            self._whitelisted_sql: str = whitelisted.sql()[0]

    @classmethod
    def open(cls, url: str) -> Store:
        return cls(open_database(url))

    def close(self) -> None:
        """Closes every connection; a database that is already gone is not an error here."""
        try:
            if isinstance(self.db, PooledDatabase):
                self.db.close_all()
            else:
                self.db.close()
        except pw.DatabaseError:
            pass

    def ping(self) -> bool:
        """Whether the database answers a trivial query now."""
        try:
            self._execute("SELECT 1", ()).fetchone()
        except pw.DatabaseError:
            return False
        return True

    @contextlib.contextmanager
    def _bound(self) -> Iterator[None]:
        # Models are bound per call, not globally, so several stores (tests,
        # replicas in one process) can live side by side on one thread.
        with self.db.bind_ctx(MODELS):
            yield

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._bound(), self.db.atomic():
            yield

    # -- hot path -------------------------------------------------------------

    def auth_lookup(self, access_key: str) -> AuthRow | None:
        row = self._execute(self._auth_sql, (access_key,)).fetchone()
        if row is None:
            return None
        (account_id, name, permission, allowed_ips, secret_hash, address_management, enabled, expires, prev, until,
         key_type, public_key, previous_public_key) = row  # fmt: skip
        return AuthRow(
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
        )

    def use_nonce(self, access_key: str, nonce: str) -> bool:
        """Records a signed request's nonce; False if this key already used it (a replay)."""
        try:
            with self._transaction():
                NonceModel.insert(access_key=access_key, nonce=nonce, seen_at_us=now_us()).execute()
        except pw.IntegrityError:
            return False
        return True

    def prune_nonces(self, before_us: int) -> int:
        """Forgets nonces older than the receive window: their requests are stale anyway."""
        with self._transaction():
            return int(NonceModel.delete().where(NonceModel.seen_at_us < before_us).execute())

    def is_whitelisted(self, account_id: str, asset: str, address: str, memo: str) -> bool:
        params = (account_id, asset, address, memo)
        return self._execute(self._whitelisted_sql, params).fetchone() is not None

    def record_last_used(self, usage: dict[str, tuple[int, str]]) -> None:
        """Batch of access key -> (time, ip); never moves a last-used time backwards."""
        with self._transaction():
            for access_key, (at_us, ip) in usage.items():
                KeyModel.update(last_used_at_us=at_us, last_used_ip=ip).where(
                    (KeyModel.access_key == access_key)
                    & (KeyModel.last_used_at_us.is_null() | (KeyModel.last_used_at_us < at_us))
                ).execute()

    # -- keys -----------------------------------------------------------------

    def _lock_account(self, account_id: str) -> None:
        """Inside a transaction: serialise this account's limited changes across processes."""
        AccountModel.insert(account_id=account_id).on_conflict_ignore().execute()
        if self._row_locks:
            AccountModel.select(AccountModel.account_id).where(
                AccountModel.account_id == account_id
            ).for_update().execute()

    def _audit(
        self, caller: str, action: AuditAction, account_id: str, access_key: str = "", **details: object
    ) -> None:
        AuditModel.insert(
            time_us=now_us(),
            caller=caller,
            action=int(action),
            account_id=account_id,
            access_key=access_key,
            details=json.dumps({k: str(v) for k, v in details.items()}, sort_keys=True),
        ).execute()

    def insert_key(
        self,
        *,
        caller: str,
        account_id: str,
        access_key: str,
        name: str,
        permission: Permission,
        allowed_ips: list[str],
        secret_hash: str,
        max_keys: int,
        expires_at_us: int | None = None,
        key_type: KeyType = KeyType.SECRET,
        public_key: str = "",
    ) -> ApiKey:
        """Insert a key unless the account is full or the name taken, atomically."""
        with self._transaction():
            self._lock_account(account_id)
            if KeyModel.select().where((KeyModel.account_id == account_id) & (KeyModel.name == name)).exists():
                raise AlreadyExists(f"account {account_id!r} already has a key named {name!r}")
            if KeyModel.select().where(KeyModel.account_id == account_id).count() >= max_keys:
                raise LimitExceeded(f"account {account_id!r} already has the maximum of {max_keys} keys")
            created = now_us()
            KeyModel.insert(
                account_id=account_id,
                access_key=access_key,
                name=name,
                permission=int(permission),
                allowed_ips=" ".join(allowed_ips),
                secret_hash=secret_hash,
                created_at_us=created,
                expires_at_us=expires_at_us,
                key_type=int(key_type),
                public_key=public_key,
            ).execute()
            self._audit(
                caller,
                AuditAction.KEY_CREATED,
                account_id,
                access_key,
                name=name,
                permission=permission.name,
                allowed_ips=" ".join(allowed_ips),
                **({"expires_at_us": expires_at_us} if expires_at_us else {}),
                **({"key_type": key_type.name} if key_type is not KeyType.SECRET else {}),
            )
        return ApiKey(
            account_id,
            access_key,
            name,
            permission,
            tuple(allowed_ips),
            to_datetime(created),
            expires_at=to_datetime(expires_at_us) if expires_at_us else None,
            key_type=key_type,
            public_key=public_key,
        )

    def list_keys(self, account_id: str) -> list[ApiKey]:
        with self._bound():
            query = KeyModel.select().where(KeyModel.account_id == account_id).order_by(KeyModel.id)
            return [_key_row(k) for k in query]

    def get_key(self, account_id: str, access_key: str) -> ApiKey:
        with self._bound():
            key = KeyModel.get_or_none((KeyModel.account_id == account_id) & (KeyModel.access_key == access_key))
        if key is None:
            raise NotFound(f"account {account_id!r} has no key {access_key!r}")
        return _key_row(key)

    def update_key(
        self,
        *,
        caller: str,
        account_id: str,
        access_key: str,
        changes: dict[str, Any],
        check: Callable[[ApiKey], None],
    ) -> ApiKey:
        """Applies ``changes`` (column -> value) if ``check`` accepts the resulting key, atomically."""
        with self._transaction():
            self._lock_account(account_id)
            row = KeyModel.get_or_none((KeyModel.account_id == account_id) & (KeyModel.access_key == access_key))
            if row is None:
                raise NotFound(f"account {account_id!r} has no key {access_key!r}")
            if "name" in changes and changes["name"] != row.name:
                taken = KeyModel.select().where(
                    (KeyModel.account_id == account_id) & (KeyModel.name == changes["name"])
                )
                if taken.exists():
                    raise AlreadyExists(f"account {account_id!r} already has a key named {changes['name']!r}")
            for column, value in changes.items():
                setattr(row, column, value)
            updated = _key_row(row)
            check(updated)
            if changes:
                row.save()
                self._audit(caller, AuditAction.KEY_UPDATED, account_id, access_key, **changes)
        return updated

    def rotate_key(
        self,
        *,
        caller: str,
        account_id: str,
        access_key: str,
        grace_us: int,
        secret_hash: str = "",
        public_key: str = "",
    ) -> ApiKey:
        """New credential (hash for SECRET keys, public key for ED25519); the old one
        stays valid for ``grace_us`` (0: not at all)."""
        with self._transaction():
            row = KeyModel.get_or_none((KeyModel.account_id == account_id) & (KeyModel.access_key == access_key))
            if row is None:
                raise NotFound(f"account {account_id!r} has no key {access_key!r}")
            row.previous_secret_hash = row.secret_hash if grace_us else ""
            row.previous_public_key = row.public_key if grace_us else ""
            row.previous_valid_until_us = now_us() + grace_us if grace_us else None
            row.secret_hash = secret_hash
            row.public_key = public_key
            row.save()
            self._audit(caller, AuditAction.KEY_ROTATED, account_id, access_key, grace_seconds=grace_us // 10**6)
            return _key_row(row)

    def delete_key(self, *, caller: str, account_id: str, access_key: str) -> None:
        with self._transaction():
            deleted = (
                KeyModel.delete()
                .where((KeyModel.account_id == account_id) & (KeyModel.access_key == access_key))
                .execute()
            )
            if not deleted:
                raise NotFound(f"account {account_id!r} has no key {access_key!r}")
            self._audit(caller, AuditAction.KEY_DELETED, account_id, access_key)

    def delete_all_keys(self, *, caller: str, account_id: str) -> int:
        with self._transaction():
            keys = [k.access_key for k in KeyModel.select(KeyModel.access_key).where(KeyModel.account_id == account_id)]
            KeyModel.delete().where(KeyModel.account_id == account_id).execute()
            self._audit(caller, AuditAction.ALL_KEYS_DELETED, account_id, count=len(keys), access_keys=" ".join(keys))
        return len(keys)

    # -- account settings -----------------------------------------------------

    def account_settings(self, account_id: str) -> tuple[bool, int]:
        """(address_management, key_count); defaults for an account never seen."""
        with self._bound():
            account = AccountModel.get_or_none(AccountModel.account_id == account_id)
            count = KeyModel.select().where(KeyModel.account_id == account_id).count()
        return (bool(account.address_management) if account else False), int(count)

    def set_address_management(self, *, caller: str, account_id: str, enabled: bool) -> None:
        with self._transaction():
            (
                AccountModel.insert(account_id=account_id, address_management=enabled)
                .on_conflict(
                    conflict_target=[AccountModel.account_id], update={AccountModel.address_management: enabled}
                )
                .execute()
            )
            action = AuditAction.ADDRESS_MANAGEMENT_ENABLED if enabled else AuditAction.ADDRESS_MANAGEMENT_DISABLED
            self._audit(caller, action, account_id)

    # -- withdrawal whitelist -------------------------------------------------

    def add_address(
        self, *, caller: str, account_id: str, asset: str, address: str, memo: str, label: str, max_addresses: int
    ) -> WithdrawalAddress:
        with self._transaction():
            self._lock_account(account_id)
            if self.is_whitelisted(account_id, asset, address, memo):
                raise AlreadyExists(f"{asset} address {address!r} is already on the whitelist")
            entries = AddressModel.select().where(AddressModel.account_id == account_id)
            if entries.count() >= max_addresses:
                raise LimitExceeded(
                    f"account {account_id!r} already has the maximum of {max_addresses} whitelisted addresses"
                )
            created = now_us()
            new_id = AddressModel.insert(
                account_id=account_id, asset=asset, address=address, memo=memo, label=label, created_at_us=created
            ).execute()
            self._audit(
                caller, AuditAction.ADDRESS_ADDED, account_id, id=new_id, asset=asset, address=address, memo=memo
            )
        return WithdrawalAddress(int(new_id), asset, address, memo, label, to_datetime(created))

    def list_addresses(self, account_id: str) -> list[WithdrawalAddress]:
        with self._bound():
            query = AddressModel.select().where(AddressModel.account_id == account_id).order_by(AddressModel.id)
            return [
                WithdrawalAddress(a.id, a.asset, a.address, a.memo, a.label, to_datetime(a.created_at_us))
                for a in query
            ]

    def remove_address(self, *, caller: str, account_id: str, address_id: int) -> None:
        with self._transaction():
            entry = AddressModel.get_or_none((AddressModel.account_id == account_id) & (AddressModel.id == address_id))
            if entry is None:
                raise NotFound(f"account {account_id!r} has no whitelisted address with id {address_id}")
            entry.delete_instance()
            self._audit(
                caller,
                AuditAction.ADDRESS_REMOVED,
                account_id,
                id=address_id,
                asset=entry.asset,
                address=entry.address,
                memo=entry.memo,
            )

    # -- audit ----------------------------------------------------------------

    def audit_events(self, account_id: str, *, before_id: int | None, limit: int) -> list[AuditEvent]:
        """Newest first; ``before_id`` pages on (ids only grow)."""
        with self._bound():
            query = AuditModel.select().order_by(AuditModel.id.desc()).limit(limit)
            if account_id:
                query = query.where(AuditModel.account_id == account_id)
            if before_id is not None:
                query = query.where(AuditModel.id < before_id)
            return [
                AuditEvent(
                    id=e.id,
                    time=to_datetime(e.time_us),
                    caller=e.caller,
                    action=AuditAction(e.action),
                    account_id=e.account_id,
                    access_key=e.access_key,
                    details=json.loads(e.details),
                )
                for e in query
            ]


def _key_row(key: Any) -> ApiKey:
    return ApiKey(
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
    )
