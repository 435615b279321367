"""The store's SQL other than Authorize's inline and loop lookups: every change (keys, account
settings, the whitelist, each with its audit row, in one transaction), management reads, last-used
times. Run on database threads, never on the event loop."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import peewee as pw

from keyguard import (
    AlreadyExists,
    ApiKey,
    AuditAction,
    AuditEvent,
    FailedPrecondition,
    KeyType,
    LimitExceeded,
    NotFound,
    Permission,
    WithdrawalAddress,
)
from keyguard_server.authorize._domain import now_us
from keyguard_server.store._connections import execute, transaction
from keyguard_server.store._rows import AccountState, LookupSql, StoredKey, key_row, to_datetime
from keyguard_server.store._schema import KEY_SETTINGS, AccountModel, AddressModel, AuditModel, KeyModel, NonceModel

# Placeholder values a _Statement's query is built with, each standing for one parameter.
_S_ACCOUNT = "\x00account_id"
_S_ACCESS_KEY = "\x00access_key"
_S_CALLER = "\x00caller"
_S_DETAILS = "\x00details"
_S_TIME = -7_000_001
_S_ACTION = -7_000_002


class _Statement:
    """A query's SQL, built once; each run binds its placeholder values (``_S_*``) anew and keeps
    the rest of the parameters peewee made (column defaults) as they were."""

    def __init__(self, query: pw.Query | None = None) -> None:
        self.sql, self._params = query.sql() if query is not None else ("", [])

    def params(self, values: dict[object, object]) -> tuple[object, ...]:
        return tuple(values.get(p, p) for p in self._params)

    def run(self, db: pw.Database, values: dict[object, object]) -> Any:
        return execute(db, self.sql, self.params(values))


_S_ID = "\x00id"
_S_ON = "\x00on"
_S_OFF_AT = "\x00off_at"
_S_COLUMN = {field.name: f"\x00column {field.name}" for field in KEY_SETTINGS}


class Queries:
    """The store's SQL, run on database threads (never on the event loop); see the module docstring."""

    def __init__(self, db: pw.Database) -> None:
        self.db = db
        self._row_locks = isinstance(db, pw.PostgresqlDatabase)
        self.lookups = LookupSql()
        # Every change's own statements, built once too (peewee builds SQL anew on each
        # execute: ~90-100 µs a statement on this project's VM).
        self._account_insert = self._account_select = self._audit_insert = _Statement()
        self._key_select = self._key_update = self._key_count = _Statement()
        self._account_state = self._management_update = _Statement()
        self._address_count = self._address_select = self._address_delete = _Statement()

    def build(self) -> None:
        """Builds the SQL once (on a thread whose models are bound)."""
        self.lookups = LookupSql.build(postgres=self._row_locks)
        self._account_insert = _Statement(AccountModel.insert(account_id=_S_ACCOUNT).on_conflict_ignore())
        frozen = AccountModel.select(AccountModel.frozen).where(AccountModel.account_id == _S_ACCOUNT)
        self._account_select = _Statement(frozen.for_update() if self._row_locks else frozen)
        self._key_select = _Statement(
            KeyModel.select().where((KeyModel.account_id == _S_ACCOUNT) & (KeyModel.access_key == _S_ACCESS_KEY))
        )
        self._key_update = _Statement(
            KeyModel.update({field: pw.Value(_S_COLUMN[field.name], converter=False) for field in KEY_SETTINGS}).where(
                KeyModel.id == pw.Value(_S_ID, converter=False)
            )
        )
        self._key_count = _Statement(KeyModel.select(pw.fn.COUNT(KeyModel.id)).where(KeyModel.account_id == _S_ACCOUNT))
        self._account_state = _Statement(
            AccountModel.select(
                AccountModel.address_management, AccountModel.address_management_off_at_us, AccountModel.frozen
            ).where(AccountModel.account_id == _S_ACCOUNT)
        )
        self._management_update = _Statement(
            AccountModel.update(
                {
                    AccountModel.address_management: pw.Value(_S_ON, converter=False),
                    AccountModel.address_management_off_at_us: pw.Value(_S_OFF_AT, converter=False),
                }
            ).where(AccountModel.account_id == _S_ACCOUNT)
        )
        self._address_count = _Statement(
            AddressModel.select(pw.fn.COUNT(AddressModel.id)).where(AddressModel.account_id == _S_ACCOUNT)
        )
        this_address = (AddressModel.account_id == _S_ACCOUNT) & (AddressModel.id == pw.Value(_S_ID, converter=False))
        self._address_select = _Statement(
            AddressModel.select(AddressModel.asset, AddressModel.address, AddressModel.memo).where(this_address)
        )
        self._address_delete = _Statement(AddressModel.delete().where(this_address))
        self._audit_insert = _Statement(
            AuditModel.insert(
                time_us=_S_TIME,
                caller=_S_CALLER,
                action=_S_ACTION,
                account_id=_S_ACCOUNT,
                access_key=_S_ACCESS_KEY,
                details=_S_DETAILS,
            )
        )

    def ping(self) -> None:
        execute(self.db, "SELECT 1").fetchone()

    def fetch_one(self, sql: str, params: tuple[object, ...]) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = execute(self.db, sql, params).fetchone()
        return row

    def probe_write(self) -> None:
        """A write that leaves nothing behind when it lands: a nonce row (of no key, so no request
        can ever match it) inserted and deleted in one transaction, whose commit still writes."""
        probe = f"write-probe-{uuid.uuid4().hex}"
        with transaction(self.db):
            NonceModel.insert(access_key="", nonce=probe, seen_at_us=0).execute()
            NonceModel.delete().where((NonceModel.access_key == "") & (NonceModel.nonce == probe)).execute()

    def whitelisted(self, account_id: str, asset: str, address: str, memo: str) -> bool:
        params = (account_id, asset, address, memo)
        return execute(self.db, self.lookups.whitelisted, params).fetchone() is not None

    def record_last_used(self, usage: dict[str, tuple[int, str]]) -> None:
        """Batch of access key -> (time, ip); never moves a last-used time backwards."""
        with transaction(self.db):
            for access_key, (at_us, ip) in sorted(usage.items()):  # one order: replicas never deadlock
                KeyModel.update(last_used_at_us=at_us, last_used_ip=ip).where(
                    (KeyModel.access_key == access_key)
                    & (KeyModel.last_used_at_us.is_null() | (KeyModel.last_used_at_us < at_us))
                ).execute()

    def _key(self, account_id: str, access_key: str) -> KeyModel | None:
        """The account's key as a model instance, or None."""
        params = self._key_select.params({_S_ACCOUNT: account_id, _S_ACCESS_KEY: access_key})
        return next(iter(KeyModel.raw(self._key_select.sql, *params)), None)

    def _save_key(self, row: KeyModel) -> None:
        """Writes ``row``'s settings and credentials (``KEY_SETTINGS``) back."""
        values: dict[object, object] = {
            _S_COLUMN[f.name]: f.db_value(getattr(row, f.name))  # type: ignore[no-untyped-call]  # peewee is untyped
            for f in KEY_SETTINGS
        }
        values[_S_ID] = row.id
        self._key_update.run(self.db, values)

    def _lock_account(self, account_id: str) -> bool:
        """Inside a transaction: serialise this account's changes across processes. Returns
        whether the account is frozen, read under the lock: a freeze committed before it is seen,
        and one not yet committed waits for this transaction (it locks the same row)."""
        self._account_insert.run(self.db, {_S_ACCOUNT: account_id})
        row = self._account_select.run(self.db, {_S_ACCOUNT: account_id}).fetchone()
        return bool(row[0])

    def _lock_unfrozen(self, account_id: str) -> None:
        """``_lock_account`` for a change that widens or creates access: refused (nothing
        written) while the account is frozen."""
        if self._lock_account(account_id):
            raise _frozen(account_id)

    def check_unfrozen(self, account_id: str) -> None:
        """Outside a transaction, before costly work (argon2): an early answer only; the change's
        own transaction decides (``_lock_unfrozen``)."""
        if AccountModel.select().where((AccountModel.account_id == account_id) & AccountModel.frozen).exists():
            raise _frozen(account_id)

    def _audit(
        self, caller: str, action: AuditAction, account_id: str, access_key: str = "", **details: object
    ) -> None:
        self._audit_insert.run(
            self.db,
            {
                _S_TIME: now_us(),
                _S_CALLER: caller,
                _S_ACTION: int(action),
                _S_ACCOUNT: account_id,
                _S_ACCESS_KEY: access_key,
                _S_DETAILS: json.dumps({k: str(v) for k, v in details.items()}, sort_keys=True),
            },
        )

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
        symbols: tuple[str, ...] = (),
        now: int | None = None,
    ) -> StoredKey:
        """Insert a key unless the account is full or the name taken, atomically (``now``: the
        domain's clock, else the system's)."""
        with transaction(self.db):
            self._lock_unfrozen(account_id)
            self.check_key_room(account_id, name, max_keys)
            created = now_us() if now is None else now
            row = KeyModel(
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
                symbols=" ".join(symbols),
                unrestricted_since_us=None if allowed_ips else created,
            )
            row.save(force_insert=True)
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
                **({"symbols": " ".join(symbols)} if symbols else {}),
            )
        return key_row(row)

    def check_key_room(self, account_id: str, name: str, max_keys: int) -> None:
        if KeyModel.select().where((KeyModel.account_id == account_id) & (KeyModel.name == name)).exists():
            raise AlreadyExists(f"account {account_id!r} already has a key named {name!r}")
        if KeyModel.select().where(KeyModel.account_id == account_id).count() >= max_keys:
            raise LimitExceeded(f"account {account_id!r} already has the maximum of {max_keys} keys")

    def list_keys(self, account_id: str) -> list[StoredKey]:
        query = KeyModel.select().where(KeyModel.account_id == account_id).order_by(KeyModel.id)
        return [key_row(k) for k in query]

    def get_key(self, account_id: str, access_key: str) -> StoredKey:
        key = self._key(account_id, access_key)
        if key is None:
            raise NotFound(f"account {account_id!r} has no key {access_key!r}")
        return key_row(key)

    def update_key(
        self,
        *,
        caller: str,
        account_id: str,
        access_key: str,
        changes: dict[str, Any],
        check: Callable[[ApiKey], None],
        now: int | None = None,
    ) -> StoredKey:
        """Applies ``changes`` (setting -> value, every one saved: see ``KEY_SETTINGS``) if ``check``
        accepts the resulting key, atomically; a column that is no setting is a ValueError. An
        allowlist emptied ``now`` (the domain's clock, else the system's) starts the key's
        unrestricted period; one set ends it."""
        if unknown := changes.keys() - _S_COLUMN.keys():
            raise ValueError(f"not settings of a key: {', '.join(sorted(unknown))}")
        with transaction(self.db):
            self._lock_unfrozen(account_id)  # any field: support unfreezes first
            row = self._key(account_id, access_key)
            if row is None:
                raise NotFound(f"account {account_id!r} has no key {access_key!r}")
            if "name" in changes and changes["name"] != row.name:
                taken = KeyModel.select().where(
                    (KeyModel.account_id == account_id) & (KeyModel.name == changes["name"])
                )
                if taken.exists():
                    raise AlreadyExists(f"account {account_id!r} already has a key named {changes['name']!r}")
            if "allowed_ips" in changes and bool(changes["allowed_ips"]) != bool(row.allowed_ips):
                # Unrestricted from now (the policy counts from here), or restricted again.
                row.unrestricted_since_us = None if changes["allowed_ips"] else (now_us() if now is None else now)
            for column, value in changes.items():
                setattr(row, column, value)
            updated = key_row(row)
            check(updated.key)
            if changes:
                self._save_key(row)
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
    ) -> StoredKey:
        """New credential (hash for SECRET keys, public key for ED25519); the old one
        stays valid for ``grace_us`` (0: not at all)."""
        with transaction(self.db):
            self._lock_unfrozen(account_id)
            row = self._key(account_id, access_key)
            if row is None:
                raise NotFound(f"account {account_id!r} has no key {access_key!r}")
            row.previous_secret_hash = row.secret_hash if grace_us else ""
            row.previous_public_key = row.public_key if grace_us else ""
            row.previous_valid_until_us = now_us() + grace_us if grace_us else None
            row.secret_hash = secret_hash
            row.public_key = public_key
            self._save_key(row)
            self._audit(caller, AuditAction.KEY_ROTATED, account_id, access_key, grace_seconds=grace_us // 10**6)
            return key_row(row)

    def delete_key(self, *, caller: str, account_id: str, access_key: str) -> None:
        with transaction(self.db):
            deleted = (
                KeyModel.delete()
                .where((KeyModel.account_id == account_id) & (KeyModel.access_key == access_key))
                .execute()
            )
            if not deleted:
                raise NotFound(f"account {account_id!r} has no key {access_key!r}")
            self._audit(caller, AuditAction.KEY_DELETED, account_id, access_key)

    def delete_all_keys(self, *, caller: str, account_id: str) -> int:
        with transaction(self.db):
            keys = [k.access_key for k in KeyModel.select(KeyModel.access_key).where(KeyModel.account_id == account_id)]
            KeyModel.delete().where(KeyModel.account_id == account_id).execute()
            self._audit(caller, AuditAction.ALL_KEYS_DELETED, account_id, count=len(keys), access_keys=" ".join(keys))
        return len(keys)

    # -- account settings -----------------------------------------------------

    def account_settings(self, account_id: str) -> AccountState:
        """The account's stored settings and key count; defaults for an account never seen."""
        account = self._account_state.run(self.db, {_S_ACCOUNT: account_id}).fetchone()
        count = int(self._key_count.run(self.db, {_S_ACCOUNT: account_id}).fetchone()[0])
        if account is None:
            return AccountState(False, None, False, count)
        management, off_at_us, frozen = account
        return AccountState(bool(management), off_at_us, bool(frozen), count)

    def set_address_management(self, *, caller: str, account_id: str, enabled: bool, now: int, hold_us: int) -> None:
        """On: at once, cancelling a pending off. Off: after ``hold_us`` (0: at once); while an
        off is pending, asking again changes nothing (the hold is not restarted, nor audited).
        Off is refused while the account is frozen."""
        with transaction(self.db):
            if self._lock_account(account_id) and not enabled:
                raise _frozen(account_id)  # on narrows access, so it is allowed
            management, off_at, _ = self._account_state.run(self.db, {_S_ACCOUNT: account_id}).fetchone()
            pending = bool(management) and off_at is not None and now < off_at
            on = bool(management) and (off_at is None or now < off_at)

            def set_management(on: bool, off_at_us: int | None) -> None:
                self._management_update.run(self.db, {_S_ACCOUNT: account_id, _S_ON: on, _S_OFF_AT: off_at_us})

            if enabled:
                set_management(True, None)
                if pending:
                    self._audit(caller, AuditAction.ADDRESS_MANAGEMENT_OFF_CANCELLED, account_id, off_at_us=off_at)
                else:
                    self._audit(caller, AuditAction.ADDRESS_MANAGEMENT_ENABLED, account_id)
            elif pending:
                return
            elif on and hold_us > 0:
                set_management(True, now + hold_us)
                self._audit(
                    caller, AuditAction.ADDRESS_MANAGEMENT_OFF_REQUESTED, account_id, effective_at_us=now + hold_us
                )
            else:
                set_management(False, None)
                self._audit(caller, AuditAction.ADDRESS_MANAGEMENT_DISABLED, account_id)

    def set_frozen(self, *, caller: str, account_id: str, frozen: bool, reason: str) -> None:
        """Freezes or unfreezes the account's API access (every call audited, repeated or not)."""
        with transaction(self.db):
            self._lock_account(account_id)
            AccountModel.update(frozen=frozen).where(AccountModel.account_id == account_id).execute()
            action = AuditAction.ACCOUNT_FROZEN if frozen else AuditAction.ACCOUNT_UNFROZEN
            self._audit(caller, action, account_id, **({"reason": reason} if reason else {}))

    # -- withdrawal whitelist -------------------------------------------------

    def add_address(
        self,
        *,
        caller: str,
        account_id: str,
        asset: str,
        address: str,
        memo: str,
        label: str,
        max_addresses: int,
        now: int,
        hold_us: int,
    ) -> WithdrawalAddress:
        """Whitelists the destination at ``now``, usable for withdrawals ``hold_us`` later
        (refused while the account is frozen)."""
        with transaction(self.db):
            self._lock_unfrozen(account_id)
            if self.whitelisted(account_id, asset, address, memo):
                raise AlreadyExists(f"{asset} address {address!r} is already on the whitelist")
            if self._address_count.run(self.db, {_S_ACCOUNT: account_id}).fetchone()[0] >= max_addresses:
                raise LimitExceeded(
                    f"account {account_id!r} already has the maximum of {max_addresses} whitelisted addresses"
                )
            created, usable_from_us = now, now + hold_us
            new_id = AddressModel.insert(
                account_id=account_id,
                asset=asset,
                address=address,
                memo=memo,
                label=label,
                created_at_us=created,
                usable_from_us=usable_from_us,
            ).execute()
            self._audit(
                caller,
                AuditAction.ADDRESS_ADDED,
                account_id,
                id=new_id,
                asset=asset,
                address=address,
                memo=memo,
                usable_from_us=usable_from_us,
            )
        return WithdrawalAddress(
            int(new_id), asset, address, memo, label, to_datetime(created), to_datetime(usable_from_us)
        )

    def list_addresses(self, account_id: str) -> list[WithdrawalAddress]:
        query = AddressModel.select().where(AddressModel.account_id == account_id).order_by(AddressModel.id)
        return [
            WithdrawalAddress(
                a.id, a.asset, a.address, a.memo, a.label, to_datetime(a.created_at_us), to_datetime(a.usable_from_us)
            )
            for a in query
        ]

    def remove_address(self, *, caller: str, account_id: str, address_id: int) -> None:
        with transaction(self.db):
            this_address: dict[object, object] = {_S_ACCOUNT: account_id, _S_ID: address_id}
            entry = self._address_select.run(self.db, this_address).fetchone()
            if entry is None:
                raise NotFound(f"account {account_id!r} has no whitelisted address with id {address_id}")
            self._address_delete.run(self.db, this_address)
            asset, address, memo = entry
            self._audit(
                caller, AuditAction.ADDRESS_REMOVED, account_id, id=address_id, asset=asset, address=address, memo=memo
            )

    # -- audit ----------------------------------------------------------------

    def audit_events(self, account_id: str, *, before_id: int | None, limit: int) -> list[AuditEvent]:
        """Newest first; ``before_id`` pages on (ids only grow)."""
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


def _frozen(account_id: str) -> FailedPrecondition:
    return FailedPrecondition(f"account {account_id!r} is frozen; unfreeze it first")
