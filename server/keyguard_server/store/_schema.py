"""The database schema: Peewee models, and the migrations that bring an existing database to them.

A ``schema_version`` table records the version. A new database gets every
table at the current version; an older one is upgraded in place, one step per
version, each step in the same transaction as its version bump (the whole
run holds the write lock, so servers starting together migrate once).
Databases made before versioning existed are version 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import peewee as pw
from playhouse import migrate as pw_migrate
from playhouse.shortcuts import ThreadSafeDatabaseMetadata


class _ThreadBoundMetadata(ThreadSafeDatabaseMetadata):  # type: ignore[misc]
    """A model's database, per thread: the store binds the models once per database thread
    (each thread its own connection), so stores on different databases share a process.

    peewee's ``set_database`` also stores the database on the model's
    ``SchemaManager``, which every thread shares: schema operations
    (``create_tables``, migrations) would then follow whichever thread bound
    last. Left unset, the SchemaManager asks this metadata, so they follow
    the calling thread's binding like every query does.
    """

    def set_database(self, database: pw.Database) -> None:
        with self._lock:
            self.database = database
            del self.table
            for hook in self._db_hooks:
                hook(database)


class _Model(pw.Model):
    class Meta:
        legacy_table_names = False
        model_metadata_class = _ThreadBoundMetadata


class SchemaVersion(_Model):
    version = pw.IntegerField()


class AccountModel(_Model):
    """Per-account settings; a row exists once an account has been touched."""

    account_id = pw.CharField(primary_key=True, max_length=128)
    address_management = pw.BooleanField(default=False)
    # Since version 6. Frozen: every key of the account is refused (ACCOUNT_FROZEN).
    frozen = pw.BooleanField(default=False)
    # A pending "address management off": on (address_management stays true) until this moment.
    address_management_off_at_us = pw.BigIntegerField(null=True)


class KeyModel(_Model):
    id = pw.BigAutoField()
    account_id = pw.CharField(max_length=128, index=True)
    access_key = pw.CharField(max_length=32, unique=True)
    name = pw.CharField(max_length=64)
    permission = pw.SmallIntegerField()
    # Normalised entries joined by single spaces; empty means any IP.
    allowed_ips = pw.TextField(default="")
    # argon2id PHC string; the private key itself is never stored.
    secret_hash = pw.TextField()
    created_at_us = pw.BigIntegerField()
    # Since version 2; written in batches (UsageRecorder).
    last_used_at_us = pw.BigIntegerField(null=True)
    last_used_ip = pw.CharField(max_length=45, default="")
    # Since version 3: the key's lifecycle.
    expires_at_us = pw.BigIntegerField(null=True)
    enabled = pw.BooleanField(default=True)
    previous_secret_hash = pw.TextField(default="")
    previous_valid_until_us = pw.BigIntegerField(null=True)
    # Since version 4: 1 = SECRET (argon2id hash above), 2 = ED25519 (public key PEM here, no hash).
    key_type = pw.SmallIntegerField(default=1)
    public_key = pw.TextField(default="")
    # Since version 5: an ED25519 key's rotated-out public key (valid until previous_valid_until_us).
    previous_public_key = pw.TextField(default="")
    # Since version 6: normalised trading symbols joined by single spaces; empty means any.
    symbols = pw.TextField(default="")
    # When allowed_ips last became empty (creation or an update that emptied it); None
    # while it is not empty. The unrestricted-key policy counts from here.
    unrestricted_since_us = pw.BigIntegerField(null=True)

    class Meta:
        indexes = ((("account_id", "name"), True),)


# The columns no change of a key writes (update_key, rotate_key): its identity, its creation time,
# and the last-used columns UsageRecorder writes (a change must not undo a flush). Every other
# column is a setting or credential, which each change writes back whole: a new column is one
# the moment it is added here, never silently left unsaved.
KEY_NOT_SETTINGS = frozenset({"id", "account_id", "access_key", "created_at_us", "last_used_at_us", "last_used_ip"})
KEY_SETTINGS: tuple[pw.Field, ...] = tuple(
    field for field in KeyModel._meta.sorted_fields if field.name not in KEY_NOT_SETTINGS
)


class AddressModel(_Model):
    id = pw.BigAutoField()
    account_id = pw.CharField(max_length=128)
    asset = pw.CharField(max_length=32)
    address = pw.CharField(max_length=256)
    memo = pw.CharField(max_length=256, default="")
    label = pw.CharField(max_length=64, default="")
    created_at_us = pw.BigIntegerField()
    # Since version 6: withdrawals to it are on hold until then (created_at_us + the hold).
    usable_from_us = pw.BigIntegerField(default=0)

    class Meta:
        indexes = ((("account_id", "asset", "address", "memo"), True),)


class AuditModel(_Model):
    """One change, written in the same transaction as the change itself."""

    id = pw.BigAutoField()
    time_us = pw.BigIntegerField()
    caller = pw.CharField(max_length=128)
    action = pw.SmallIntegerField()
    account_id = pw.CharField(max_length=128)
    access_key = pw.CharField(max_length=32, default="")
    # JSON object of strings: what changed (name, permission, count, ...). Never a secret.
    details = pw.TextField(default="{}")

    class Meta:
        indexes = ((("account_id", "id"), False),)


class NonceModel(_Model):
    """Nonces of signed requests seen within the receive window: a replay fails the unique index."""

    access_key = pw.CharField(max_length=32)
    nonce = pw.CharField(max_length=64)
    # The signed request's own timestamp (the name is older than that meaning): pruning
    # goes by it, since a request stamped ahead of time stays acceptable that much longer.
    seen_at_us = pw.BigIntegerField(index=True)

    class Meta:
        indexes = ((("access_key", "nonce"), True),)


MODELS: list[type[pw.Model]] = [SchemaVersion, AccountModel, KeyModel, AddressModel, AuditModel, NonceModel]


def _v2_last_used(migrator: pw_migrate.SchemaMigrator) -> None:
    pw_migrate.migrate(
        migrator.add_column("key_model", "last_used_at_us", KeyModel.last_used_at_us),
        migrator.add_column("key_model", "last_used_ip", KeyModel.last_used_ip),
    )


def _v3_lifecycle(migrator: pw_migrate.SchemaMigrator) -> None:
    pw_migrate.migrate(
        migrator.add_column("key_model", "expires_at_us", KeyModel.expires_at_us),
        migrator.add_column("key_model", "enabled", KeyModel.enabled),
        migrator.add_column("key_model", "previous_secret_hash", KeyModel.previous_secret_hash),
        migrator.add_column("key_model", "previous_valid_until_us", KeyModel.previous_valid_until_us),
    )


def _v4_signed_requests(migrator: pw_migrate.SchemaMigrator) -> None:
    pw_migrate.migrate(
        migrator.add_column("key_model", "key_type", KeyModel.key_type),
        migrator.add_column("key_model", "public_key", KeyModel.public_key),
    )
    migrator.database.create_tables([NonceModel])


def _v5_ed25519_rotation(migrator: pw_migrate.SchemaMigrator) -> None:
    pw_migrate.migrate(migrator.add_column("key_model", "previous_public_key", KeyModel.previous_public_key))


def _v6_protections(migrator: pw_migrate.SchemaMigrator) -> None:
    """Frozen accounts, delayed address management off, symbol lists, unrestricted-key lapse, address holds.

    Addresses already on a whitelist were usable: no hold for them. A key
    that was unrestricted before the upgrade counts as unrestricted since the
    upgrade: when its list was emptied was never recorded, and counting from
    its creation could cut off bots the moment the policy is switched on.
    """
    pw_migrate.migrate(
        migrator.add_column("account_model", "frozen", AccountModel.frozen),
        migrator.add_column("account_model", "address_management_off_at_us", AccountModel.address_management_off_at_us),
        migrator.add_column("key_model", "symbols", KeyModel.symbols),
        migrator.add_column("key_model", "unrestricted_since_us", KeyModel.unrestricted_since_us),
        migrator.add_column("address_model", "usable_from_us", AddressModel.usable_from_us),
    )
    AddressModel.update(usable_from_us=AddressModel.created_at_us).execute()
    KeyModel.update(unrestricted_since_us=time.time_ns() // 1000).where(KeyModel.allowed_ips == "").execute()


# STEPS[n] upgrades version n + 1 to n + 2.
STEPS: list[Callable[[pw_migrate.SchemaMigrator], None]] = [
    _v2_last_used,
    _v3_lifecycle,
    _v4_signed_requests,
    _v5_ed25519_rotation,
    _v6_protections,
]
VERSION = len(STEPS) + 1
MIGRATION_LOCK = 0x6B657967  # "keyg": the advisory lock key of schema migrations on PostgreSQL


def migrate(db: pw.Database) -> int:
    """Creates or upgrades the schema; returns the version it found. Call it on a thread whose
    models are bound to ``db``."""
    with db.atomic():
        if isinstance(db, pw.PostgresqlDatabase):
            # Replicas starting together: one migrates, the others wait, then find it done. A
            # migration may take longer than the statement and lock timeouts of ordinary calls.
            cast(Any, db).execute_sql("SET LOCAL statement_timeout = 0")
            cast(Any, db).execute_sql("SET LOCAL lock_timeout = '60s'")
            cast(Any, db).execute_sql("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        tables = set(db.get_tables())
        if "schema_version" not in tables:
            if "key_model" in tables:  # made before versioning: version 1
                db.create_tables([SchemaVersion])
                SchemaVersion.create(version=1)
            else:
                db.create_tables(MODELS)
                SchemaVersion.create(version=VERSION)
        found: int = SchemaVersion.get().version
        if found > VERSION:
            raise RuntimeError(f"database schema version {found} is newer than this keyguard ({VERSION})")
        migrator = pw_migrate.SchemaMigrator.from_database(db)
        for version in range(found, VERSION):
            STEPS[version - 1](migrator)
            SchemaVersion.update(version=version + 1).execute()
        return found
