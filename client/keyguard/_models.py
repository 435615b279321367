"""Values that cross the API, as frozen dataclasses and enums.

Enum values equal the proto enum numbers, so converting is ``Permission(n)``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime


class Permission(enum.IntEnum):
    """Access level of a key; a higher level includes every lower one."""

    READ = 1
    TRADE = 2
    WITHDRAW = 3

    @classmethod
    def parse(cls, value: Permission | str | int) -> Permission:
        """Accepts a Permission, its number, or its name in any case."""
        if isinstance(value, str):
            try:
                return cls[value.strip().upper()]
            except KeyError:
                raise ValueError(f"unknown permission {value!r}: use read, trade or withdraw") from None
        return cls(value)


class Decision(enum.IntEnum):
    """Authorize's answer; everything but ALLOW is a refusal."""

    ALLOW = 1
    UNKNOWN_KEY = 2
    IP_NOT_ALLOWED = 3
    BAD_SECRET = 4
    PERMISSION_DENIED = 5
    ADDRESS_NOT_WHITELISTED = 6
    RATE_LIMITED = 7
    KEY_DISABLED = 8
    KEY_EXPIRED = 9
    BAD_SIGNATURE = 10
    STALE_REQUEST = 11
    REPLAYED_REQUEST = 12
    ACCOUNT_FROZEN = 13
    IP_RESTRICTION_REQUIRED = 14
    SYMBOL_NOT_ALLOWED = 15
    ADDRESS_ON_HOLD = 16
    VERIFICATION_BUSY = 17


class KeyType(enum.IntEnum):
    SECRET = 1
    ED25519 = 2


class AuditAction(enum.IntEnum):
    KEY_CREATED = 1
    KEY_DELETED = 2
    ALL_KEYS_DELETED = 3
    ADDRESS_ADDED = 4
    ADDRESS_REMOVED = 5
    ADDRESS_MANAGEMENT_ENABLED = 6
    ADDRESS_MANAGEMENT_DISABLED = 7
    KEY_UPDATED = 8
    KEY_ROTATED = 9
    ACCOUNT_FROZEN = 10
    ACCOUNT_UNFROZEN = 11
    ADDRESS_MANAGEMENT_OFF_REQUESTED = 12
    ADDRESS_MANAGEMENT_OFF_CANCELLED = 13


@dataclass(frozen=True)
class ApiKey:
    account_id: str
    access_key: str
    name: str
    permission: Permission
    allowed_ips: tuple[str, ...]
    created_at: datetime
    last_used_at: datetime | None = None
    last_used_ip: str = ""
    expires_at: datetime | None = None
    enabled: bool = True
    previous_key_valid_until: datetime | None = None
    key_type: KeyType = KeyType.SECRET
    public_key: str = ""
    # Upper case; empty: any symbol (see the proto's ApiKey.symbols).
    symbols: tuple[str, ...] = ()
    # When trade and withdraw rights of this unrestricted key lapse (server policy
    # unrestricted_key_days); None when the policy does not apply to it.
    unrestricted_until: datetime | None = None


@dataclass(frozen=True)
class CreatedKey:
    """A new key and its private key: the only moment the secret exists in the clear."""

    key: ApiKey
    private_key: str = field(repr=False)


@dataclass(frozen=True)
class AccountSettings:
    account_id: str
    address_management: bool
    key_count: int
    max_keys: int
    frozen: bool = False
    # Set while turning address management off is pending: it is on until then.
    address_management_off_at: datetime | None = None


@dataclass(frozen=True)
class WithdrawalAddress:
    id: int
    asset: str
    address: str
    memo: str
    label: str
    created_at: datetime
    # Withdrawals to it are refused (ADDRESS_ON_HOLD) before this moment.
    usable_from: datetime | None = None


@dataclass(frozen=True)
class WithdrawalDestination:
    asset: str
    address: str
    memo: str = ""


@dataclass(frozen=True)
class SignedRequest:
    """A request signed with an ED25519 key; see :func:`keyguard.sign_request`."""

    payload: str
    timestamp_ms: int
    nonce: str
    signature: str


@dataclass(frozen=True)
class AuthorizeResult:
    """Identity fields are empty unless the caller proved it holds the key."""

    allowed: bool
    decision: Decision
    account_id: str = ""
    key_name: str = ""
    permission: Permission | None = None


@dataclass(frozen=True)
class AuditEvent:
    """One change: who (the calling service) did what to which account, and when."""

    id: int
    time: datetime
    caller: str
    action: AuditAction
    account_id: str
    access_key: str
    details: dict[str, str] = field(default_factory=dict)
