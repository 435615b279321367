"""The KeyManagement use cases: create, change, rotate and delete keys; account settings (address
management, freezing); the withdrawal whitelist; the audit log. Plain Python that knows nothing of
gRPC.

Methods take and return plain values and raise :mod:`keyguard` errors. Every
input is validated before storage or argon2 is touched.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Callable
from datetime import datetime

from keyguard import (
    AccountSettings,
    ApiKey,
    AuditEvent,
    CreatedKey,
    FieldViolation,
    InvalidArgument,
    KeyType,
    Permission,
    Unavailable,
    WithdrawalAddress,
    signing,
)
from keyguard_server._config import Config
from keyguard_server._secrets import (
    HasherBusy,
    SecretHasher,
    new_access_key,
    new_private_key,
)
from keyguard_server._validation import (
    Violations,
    ed25519_public_key,
)
from keyguard_server._verify import IPV4_EMBEDDING
from keyguard_server.authorize._domain import DAY_US, now_us
from keyguard_server.authorize._rules import management_on
from keyguard_server.store import Store, StoredKey, to_datetime

log = logging.getLogger("keyguard.service")

DEFAULT_AUDIT_PAGE = 50
MAX_AUDIT_PAGE = 500
MAX_ID = 2**63 - 1  # row ids are signed 64-bit in SQLite and PostgreSQL
DEFAULT_ROTATION_GRACE = 24 * 3600
MAX_ROTATION_GRACE = 30 * 24 * 3600


class KeyManager:
    """KeyManagement: create, list and delete keys; the withdrawal whitelist."""

    def __init__(self, store: Store, hasher: SecretHasher, config: Config) -> None:
        self._store = store
        self._hasher = hasher
        self._config = config
        # Microseconds since the epoch, for holds and pending changes; replaceable, so tests
        # move time instead of waiting (as Authorizer.clock).
        self.clock: Callable[[], int] = now_us
        self._hold_us = config.address_hold_seconds * 10**6
        self._lapse_us = config.unrestricted_key_days * DAY_US  # the unrestricted-key policy (0: off)

    async def create_key(
        self,
        caller: str,
        account_id: str,
        name: str,
        permission: int,
        allowed_ips: list[str],
        expires_at: datetime | None = None,
        key_type: int = 0,
        public_key: str = "",
        symbols: list[str] | None = None,
    ) -> CreatedKey:
        """The key and its private key, which nothing else ever sees again.

        ED25519 keys store only the public key: the owner's, or that of a pair
        generated here whose private key is returned and forgotten.
        """
        v = Violations()
        v.account_id(account_id)
        v.key_name(name)
        level = v.permission(permission)
        ips = v.allowed_ips(allowed_ips, max_count=self._config.max_allowed_ips)
        tickers = v.symbols(symbols or [], max_count=self._config.max_symbols_per_key)
        expires_us = self._future(v, expires_at)
        self._allowlist_policy(v, level, ips)
        kind = KeyType.SECRET if key_type == 0 else v.key_type(key_type)
        if public_key and kind is not KeyType.ED25519:
            v.add("public_key", "is only for ED25519 keys")
        v.raise_if_any()
        # A frozen or full account or a taken name is refused before argon2 spends anything on it
        # (the insert's transaction checks each again).
        await self._store.check_unfrozen(account_id)
        await self._store.check_key_room(account_id, name, self._config.max_keys_per_account)
        private_key, secret_hash, public_key = await self._credential(kind, public_key)
        stored = await self._store.insert_key(
            caller=caller,
            account_id=account_id,
            access_key=new_access_key(),
            name=name,
            permission=level,
            allowed_ips=ips,
            secret_hash=secret_hash,
            max_keys=self._config.max_keys_per_account,
            expires_at_us=expires_us,
            key_type=kind,
            public_key=public_key,
            symbols=tickers,
            now=self.clock(),
        )
        key = self._shown(stored)
        log.info(
            "key created account_id=%s access_key=%s permission=%s ips=%d",
            account_id,
            key.access_key,
            level.name,
            len(ips),
        )
        return CreatedKey(key, private_key)

    async def update_key(
        self,
        caller: str,
        account_id: str,
        access_key: str,
        *,
        name: str | None = None,
        permission: int | None = None,
        allowed_ips: list[str] | None = None,
        expires_at: datetime | None = None,
        clear_expires_at: bool = False,
        enabled: bool | None = None,
        symbols: list[str] | None = None,
    ) -> ApiKey:
        """Changes what is given, under the same rules as creation, checked against the key as it
        results (permission and allowlist together). Emptying the IP allowlist starts the
        unrestricted-key period afresh; setting one ends it. Refused while the account is frozen."""
        v = Violations()
        v.account_id(account_id)
        v.access_key(access_key)
        changes: dict[str, object] = {}
        if name is not None:
            changes["name"] = v.key_name(name)
        if permission is not None:
            changes["permission"] = int(v.permission(permission))
        if allowed_ips is not None:
            changes["allowed_ips"] = " ".join(v.allowed_ips(allowed_ips, max_count=self._config.max_allowed_ips))
        if expires_at is not None and clear_expires_at:
            v.add("clear_expires_at", "cannot be set together with expires_at")
        elif expires_at is not None:
            changes["expires_at_us"] = self._future(v, expires_at)
        elif clear_expires_at:
            changes["expires_at_us"] = None
        if enabled is not None:
            changes["enabled"] = enabled
        if symbols is not None:
            changes["symbols"] = " ".join(v.symbols(symbols, max_count=self._config.max_symbols_per_key))
        v.raise_if_any()

        def check(result: ApiKey) -> None:
            after = Violations()
            self._allowlist_policy(after, result.permission, list(result.allowed_ips))
            after.raise_if_any()

        stored = await self._store.update_key(
            caller=caller, account_id=account_id, access_key=access_key, changes=changes, check=check, now=self.clock()
        )
        key = self._shown(stored)
        log.info("key updated account_id=%s access_key=%s fields=%s", account_id, access_key, ",".join(changes))
        return key

    async def rotate_key(
        self, caller: str, account_id: str, access_key: str, grace_seconds: int | None, public_key: str = ""
    ) -> CreatedKey:
        """A new private key (ED25519: a new pair, or the owner's new public key) for the
        same access key; the old one works for the grace period."""
        v = Violations()
        v.account_id(account_id)
        v.access_key(access_key)
        grace = DEFAULT_ROTATION_GRACE if grace_seconds is None else grace_seconds
        if not 0 <= grace <= MAX_ROTATION_GRACE:
            v.add("grace_seconds", f"must be between 0 and {MAX_ROTATION_GRACE}")
        v.raise_if_any()
        kind = (await self._store.get_key(account_id, access_key)).key.key_type  # NOT_FOUND before any work
        if public_key and kind is not KeyType.ED25519:
            raise InvalidArgument([FieldViolation("public_key", "is only for ED25519 keys")])
        await self._store.check_unfrozen(account_id)  # before argon2; the rotation's transaction decides
        private_key, secret_hash, public_key = await self._credential(kind, public_key)
        stored = await self._store.rotate_key(
            caller=caller,
            account_id=account_id,
            access_key=access_key,
            grace_us=grace * 10**6,
            secret_hash=secret_hash,
            public_key=public_key,
        )
        key = self._shown(stored)
        log.info("key rotated account_id=%s access_key=%s grace=%ds", account_id, access_key, grace)
        return CreatedKey(key, private_key)

    def _shown(self, stored: StoredKey) -> ApiKey:
        """The key with ``unrestricted_until``: when the unrestricted-key policy lapses its trade
        and withdraw rights (a TRADE or WITHDRAW key without an IP allowlist), else None."""
        key, since_us = stored
        if not self._lapse_us or key.allowed_ips or key.permission < Permission.TRADE or since_us is None:
            return key
        return dataclasses.replace(key, unrestricted_until=to_datetime(since_us + self._lapse_us))

    async def _credential(self, kind: KeyType, public_key: str) -> tuple[str, str, str]:
        """(private key to show once or "", argon2id hash or "", public key PEM or "").

        SECRET: a new private key and its hash. ED25519: the owner's public key, or a new pair.
        """
        if kind is KeyType.SECRET:
            private_key = new_private_key()
            try:
                return private_key, await self._hasher.hash(private_key), ""
            except HasherBusy:
                raise Unavailable("too many keys are being created or rotated right now; retry shortly") from None
        if not public_key:
            private_pem, public_pem = signing.new_key_pair()
            return private_pem, "", public_pem
        try:
            return "", "", signing.public_pem(ed25519_public_key(public_key))
        except ValueError as exc:
            raise InvalidArgument([FieldViolation("public_key", str(exc))]) from None

    def _allowlist_policy(self, v: Violations, level: Permission, ips: list[str]) -> None:
        """Which allowlists count as a restriction. WITHDRAW keys need one
        (``withdraw_requires_ip_allowlist``). A list counts only if every entry is at least
        ``withdraw_min_prefix_ipv4``/``_ipv6`` long: without a minimum, 0.0.0.0/1 + 128.0.0.0/1
        (+ ::/1 + 8000::/1) would be "restricted" to the whole internet. The minimum applies to
        WITHDRAW keys under that rule, and to TRADE and WITHDRAW keys whenever unrestricted keys
        lapse (``unrestricted_key_days``), else such a list would dodge the lapse for good.
        READ keys are never restricted by it."""
        withdraw_rule = level is Permission.WITHDRAW and self._config.withdraw_requires_ip_allowlist
        lapse_rule = level >= Permission.TRADE and self._config.unrestricted_key_days > 0
        if withdraw_rule and not ips:
            v.add("allowed_ips", "a WITHDRAW key must be restricted to at least one IP address or network")
        if not (withdraw_rule or lapse_rule):
            return
        v4, v6 = self._config.withdraw_min_prefix_ipv4, self._config.withdraw_min_prefix_ipv6
        for i, entry in enumerate(ips):
            network = ipaddress.ip_network(entry)
            if network.version == 4:
                shortest = v4
            elif any(network.overlaps(prefix) for prefix in IPV4_EMBEDDING):
                shortest = 128 - 32 + v4  # e.g. 64:ff9b::/96 is all of IPv4 behind NAT64
            else:
                shortest = v6
            if network.prefixlen < shortest:
                v.add(f"allowed_ips[{i}]", f"a {level.name} key's networks must be /{shortest} or narrower")

    @staticmethod
    def _future(v: Violations, moment: datetime | None, field: str = "expires_at") -> int | None:
        if moment is None:
            return None
        at_us = int(moment.timestamp() * 1e6)
        if at_us <= now_us():
            v.add(field, "must be in the future")
        return at_us

    async def list_keys(self, account_id: str) -> list[ApiKey]:
        v = Violations()
        v.account_id(account_id)
        v.raise_if_any()
        return [self._shown(key) for key in await self._store.list_keys(account_id)]

    async def get_key(self, account_id: str, access_key: str) -> ApiKey:
        self._check_key_ref(account_id, access_key)
        return self._shown(await self._store.get_key(account_id, access_key))

    async def delete_key(self, caller: str, account_id: str, access_key: str) -> None:
        self._check_key_ref(account_id, access_key)
        await self._store.delete_key(caller=caller, account_id=account_id, access_key=access_key)
        log.info("key deleted account_id=%s access_key=%s", account_id, access_key)

    async def delete_all_keys(self, caller: str, account_id: str) -> int:
        v = Violations()
        v.account_id(account_id)
        v.raise_if_any()
        count = await self._store.delete_all_keys(caller=caller, account_id=account_id)
        log.info("all keys deleted account_id=%s count=%d", account_id, count)
        return count

    async def account_settings(self, account_id: str) -> AccountSettings:
        """As Authorize sees them now: address management stays on while an off is pending."""
        v = Violations()
        v.account_id(account_id)
        v.raise_if_any()
        state = await self._store.account_settings(account_id)
        off_at = state.address_management_off_at_us
        pending = state.address_management and off_at is not None and self.clock() < off_at
        return AccountSettings(
            account_id,
            management_on(state.address_management, off_at, self.clock()),
            state.key_count,
            self._config.max_keys_per_account,
            state.frozen,
            to_datetime(off_at) if pending and off_at is not None else None,
        )

    async def set_address_management(self, caller: str, account_id: str, enabled: bool) -> AccountSettings:
        """On at once (cancelling a pending off); off only after ``address_hold_seconds``."""
        v = Violations()
        v.account_id(account_id)
        v.raise_if_any()
        await self._store.set_address_management(
            caller=caller, account_id=account_id, enabled=enabled, now=self.clock(), hold_us=self._hold_us
        )
        log.info("address management %s account_id=%s", "on" if enabled else "off requested", account_id)
        return await self.account_settings(account_id)

    async def set_frozen(self, caller: str, account_id: str, frozen: bool, reason: str = "") -> AccountSettings:
        """Freezes (or unfreezes) every key of the account at once; the keys are kept.
        Who may call it (admins only) is the caller interceptor's rule."""
        v = Violations()
        v.account_id(account_id)
        v.text("reason", reason, max_len=256, required=False)
        v.raise_if_any()
        await self._store.set_frozen(caller=caller, account_id=account_id, frozen=frozen, reason=reason)
        log.warning("account %s account_id=%s", "frozen" if frozen else "unfrozen", account_id)
        return await self.account_settings(account_id)

    async def add_address(
        self, caller: str, account_id: str, asset: str, address: str, memo: str, label: str
    ) -> WithdrawalAddress:
        v = Violations()
        v.account_id(account_id)
        asset = v.asset(asset)
        v.address(address)
        v.memo(memo)
        v.label(label)
        v.raise_if_any()
        row = await self._store.add_address(
            caller=caller,
            account_id=account_id,
            asset=asset,
            address=address,
            memo=memo,
            label=label,
            max_addresses=self._config.max_withdrawal_addresses,
            now=self.clock(),
            hold_us=self._hold_us,
        )
        log.info("withdrawal address added account_id=%s id=%d asset=%s", account_id, row.id, asset)
        return row

    async def list_addresses(self, account_id: str) -> list[WithdrawalAddress]:
        v = Violations()
        v.account_id(account_id)
        v.raise_if_any()
        return await self._store.list_addresses(account_id)

    async def remove_address(self, caller: str, account_id: str, address_id: int) -> None:
        v = Violations()
        v.account_id(account_id)
        if address_id <= 0:
            v.add("address_id", "is required")
        elif address_id > MAX_ID:
            v.add("address_id", "is not an id this server issued")
        v.raise_if_any()
        await self._store.remove_address(caller=caller, account_id=account_id, address_id=address_id)
        log.info("withdrawal address removed account_id=%s id=%d", account_id, address_id)

    async def audit_events(self, account_id: str, page_size: int, page_token: str) -> tuple[list[AuditEvent], str]:
        """A page of events, newest first, and the token for the next page ("" at the end)."""
        v = Violations()
        if account_id:
            v.account_id(account_id)
        if page_size > MAX_AUDIT_PAGE:
            v.add("page_size", f"must be at most {MAX_AUDIT_PAGE}")
        if page_token and not (
            page_token.isascii() and page_token.isdigit() and len(page_token) < 20 and int(page_token) <= MAX_ID
        ):
            v.add("page_token", "is not a token this server returned")
        v.raise_if_any()
        limit = page_size or DEFAULT_AUDIT_PAGE
        before_id = int(page_token) if page_token else None
        events = await self._store.audit_events(account_id, before_id=before_id, limit=limit)
        next_token = str(events[-1].id) if len(events) == limit else ""
        return events, next_token

    @staticmethod
    def _check_key_ref(account_id: str, access_key: str) -> None:
        v = Violations()
        v.account_id(account_id)
        v.access_key(access_key)
        v.raise_if_any()
