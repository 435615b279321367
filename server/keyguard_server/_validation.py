"""Input rules of the API, as plain functions that know nothing of gRPC.

Each checker returns the normalised value or records a FieldViolation named
after the proto field path, so one refused request reports every bad field at
once. Callers raise with :meth:`Violations.raise_if_any` before touching
storage or argon2.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keyguard import FieldViolation, InvalidArgument, KeyType, Permission, SignedRequest, signing
from keyguard_server._secrets import ACCESS_KEY_RE, ACCESS_KEY_RULE, PRIVATE_KEY_PREFIX

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_ASSET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}")
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{8,64}")
# A trading symbol, after upper-casing: BTCUSDT, or two parts joined as in ETH-USDT, ETH_USDT, ETH/USDT.
SYMBOL_RE = re.compile(r"[A-Z0-9]{2,20}(?:[-_/][A-Z0-9]{2,20})?")
SYMBOL_RULE = "must be 2-20 letters or digits, or two such parts joined by '-', '_' or '/' (e.g. BTCUSDT, ETH-USDT)"

# The canonical encodings of the eight Ed25519 points of small order (the
# blocklist of libsodium's crypto_sign_ed25519, also listed in Chalkias et al.,
# "Taming the many EdDSAs", 2020).
_SMALL_ORDER_POINTS = tuple(
    bytes.fromhex(point)
    for point in (
        "0100000000000000000000000000000000000000000000000000000000000000",  # order 1: the identity
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
        "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
        "0000000000000000000000000000000000000000000000000000000000000080",  # order 4
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",  # order 8
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",  # order 8
    )
)
_ED25519_P = 2**255 - 19
_Y_BITS = (1 << 255) - 1  # the top bit of an encoding is the sign of x
_SMALL_ORDER_Y = frozenset(int.from_bytes(point, "little") & _Y_BITS for point in _SMALL_ORDER_POINTS)


class Violations:
    """Collects the violations of one request."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)

    def text(
        self,
        field: str,
        value: str,
        *,
        max_len: int,
        required: bool = True,
        spaces: bool = True,
        ascii_only: bool = False,
    ) -> str:
        """A printable string of at most ``max_len`` characters.

        ``spaces=False`` also refuses white space anywhere (ids, addresses);
        otherwise only leading/trailing white space is refused, since it is
        invisible on a web page and would make two "equal" names differ.
        """
        if not value:
            if required:
                self.add(field, "is required")
            return value
        if len(value) > max_len:
            self.add(field, f"must be at most {max_len} characters, got {len(value)}")
        elif not value.isprintable():
            self.add(field, "must not contain control or non-printable characters")
        elif ascii_only and not value.isascii():
            self.add(field, "must be ASCII")
        elif not spaces and any(c.isspace() for c in value):
            self.add(field, "must not contain white space")
        elif value != value.strip():
            self.add(field, "must not start or end with white space")
        return value

    def account_id(self, value: str, field: str = "account_id") -> str:
        return self.text(field, value, max_len=128, spaces=False)

    def key_name(self, value: str, field: str = "name") -> str:
        return self.text(field, value, max_len=64)

    def access_key(self, value: str, field: str = "access_key") -> str:
        if not value:
            self.add(field, "is required")
        elif not ACCESS_KEY_RE.fullmatch(value):
            self.add(field, ACCESS_KEY_RULE)
        return value

    def permission(self, value: int, field: str = "permission") -> Permission:
        try:
            return Permission(value)
        except ValueError:
            self.add(field, "must be READ, TRADE or WITHDRAW")
            return Permission.READ

    def key_type(self, value: int, field: str = "key_type") -> KeyType:
        try:
            return KeyType(value)
        except ValueError:
            self.add(field, "must be SECRET or ED25519")
            return KeyType.SECRET

    def signed_request(self, signed: SignedRequest, field: str = "signed") -> None:
        self.text(f"{field}.payload", signed.payload, max_len=8192, required=False)
        if not _NONCE_RE.fullmatch(signed.nonce):
            self.add(f"{field}.nonce", "must be 8-64 letters, digits, '_' or '-'")
        if not signed.signature or len(signed.signature) > 200:
            self.add(f"{field}.signature", "must be the base64 of an Ed25519 signature")
        if signed.timestamp_ms <= 0:
            self.add(f"{field}.timestamp_ms", "must be milliseconds since the Unix epoch")

    def asset(self, value: str, field: str = "asset") -> str:
        if not value:
            self.add(field, "is required")
        elif not _ASSET_RE.fullmatch(value):
            self.add(field, "must be 1-32 letters, digits, '.', '_' or '-' (e.g. BTC, USDT-TRC20)")
        return value.upper()

    def address(self, value: str, field: str = "address") -> str:
        return self.text(field, value, max_len=256, spaces=False, ascii_only=True)

    def memo(self, value: str, field: str = "memo") -> str:
        return self.text(field, value, max_len=256, required=False)

    def label(self, value: str, field: str = "label") -> str:
        return self.text(field, value, max_len=64, required=False)

    def symbol(self, value: str, field: str = "symbol") -> str:
        """A trading symbol, upper-cased; "" stays "" (none given)."""
        if value and not is_symbol(value):
            self.add(field, f"{_shown(value)} {SYMBOL_RULE}")
        return value.upper()

    def symbols(self, values: Iterable[str], *, max_count: int, field: str = "symbols") -> tuple[str, ...]:
        """A key's symbol list: upper-cased, in the order given, each at most once.

        A duplicate (in any case) is refused rather than dropped: a list that
        names a symbol twice was probably meant to name another one.
        """
        values = list(values)
        if len(values) > max_count:
            self.add(field, f"at most {max_count} entries, got {len(values)}")
            return ()
        seen: dict[str, int] = {}
        for i, raw in enumerate(values):
            symbol = raw.upper()
            if not (raw.isascii() and SYMBOL_RE.fullmatch(symbol)):
                self.add(f"{field}[{i}]", f"{_shown(raw)} {SYMBOL_RULE}")
            elif symbol in seen:
                self.add(f"{field}[{i}]", f"{_shown(symbol)} is already {field}[{seen[symbol]}]")
            else:
                seen[symbol] = i
        return tuple(seen)

    def client_ip(self, value: str, field: str = "client_ip") -> IPAddress | None:
        if not value:
            self.add(field, "is required")
            return None
        try:
            return client_address(value)
        except ValueError:
            self.add(field, f"{_shown(value)} is not an IPv4 or IPv6 address")
            return None

    def allowed_ips(self, values: Iterable[str], *, max_count: int, field: str = "allowed_ips") -> list[str]:
        """Normalised, de-duplicated, in the order given.

        A network with host bits set (10.0.0.5/24) is refused rather than
        silently widened, and /0 is refused because "any IP" is spelled as an
        empty list, which the WITHDRAW policy can see. The unspecified address
        (0.0.0.0, ::) is never a client's, so an entry naming it is a mistake.
        (Refused here, on input, not in :func:`parse_allowed_ip`: lists stored
        before this rule must still parse.)
        """
        values = list(values)
        if len(values) > max_count:
            self.add(field, f"at most {max_count} entries, got {len(values)}")
            return []
        normalised: dict[str, None] = {}
        for i, raw in enumerate(values):
            try:
                entry = parse_allowed_ip(raw)
                if entry.is_unspecified:
                    raise ValueError(f"{_shown(raw)} is the unspecified address, never a client's")
                normalised[str(entry)] = None
            except ValueError as exc:
                self.add(f"{field}[{i}]", str(exc))
        return list(normalised)


def ed25519_public_key(text: str) -> Ed25519PublicKey:
    """A key owner's Ed25519 public key (PEM, or base64 of its 32 bytes); ValueError says why not."""
    key = signing.load_public_key(text)
    weakness = weak_ed25519_public_key(key.public_bytes_raw())
    if weakness:
        raise ValueError(f"not a usable Ed25519 public key: {weakness}")
    return key


def weak_ed25519_public_key(raw: bytes) -> str | None:
    """Why ``raw`` must not be anyone's public key, or None if it may be.

    With a point of small order as the public key A, [k]A takes at most eight
    values whatever the message, so signatures can be forged without any
    private key: for the identity, R = identity and S = 0 verify for every
    message, and whoever knows the access key would be the key. Refused by
    their y coordinate, which also catches the two non-canonical twins (x = 0
    with the sign bit set); y >= p is a non-canonical encoding that Ed25519
    implementations disagree about, so it is refused too.
    """
    if len(raw) != 32:
        return "must be 32 bytes"
    y = int.from_bytes(raw, "little") & _Y_BITS
    if y >= _ED25519_P:
        return "not canonically encoded (y >= 2^255 - 19)"
    if y in _SMALL_ORDER_Y:
        return "a point of small order, for which signatures can be forged"
    return None


def plain_address(ip: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (::ffff:1.2.3.4) is the IPv4 address it carries."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            raise ValueError("scoped IPv6 addresses are not supported")
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
    return ip


def parse_allowed_ip(raw: str) -> IPNetwork | IPAddress:
    """An allowlist entry: an address (kept as an address) or a network.

    Taken as given, never trimmed: white space or a control character in an
    entry is a sign of mangled input, refused like any other.
    """
    if not raw.isprintable() or any(c.isspace() for c in raw):
        raise ValueError(f"{_shown(raw)} must not contain white space or control characters")
    if "%" in raw:
        raise ValueError(f"{_shown(raw)}: scoped IPv6 addresses are not supported")
    try:
        if "/" not in raw:
            return plain_address(ipaddress.ip_address(raw))
        network = ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            suggestion = ipaddress.ip_network(raw, strict=False)
            raise ValueError(f"{_shown(raw)} has host bits set; did you mean {suggestion}?") from None
        raise ValueError(f"{_shown(raw)} is not an IPv4/IPv6 address or CIDR network") from None
    mapped = network.network_address.ipv4_mapped if network.version == 6 else None
    if mapped is not None and network.prefixlen >= 96:
        network = ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}")
    if network.prefixlen == 0:
        raise ValueError(f"{_shown(raw)} allows every IP; leave the list empty for that")
    if network.num_addresses == 1:
        return network.network_address
    return network


def is_symbol(value: str) -> bool:
    """Whether ``value`` is a trading symbol (in any case)."""
    return value.isascii() and SYMBOL_RE.fullmatch(value.upper()) is not None


# What an error message may echo of a value: at most this many characters of it.
MAX_SHOWN = 60
# A run of letters and digits this long is no address, symbol or name anyone mistypes: a secret
# (a private key's body without its prefix, a caller token) more likely than not.
_SECRET_LIKE = re.compile(r"[A-Za-z0-9]{32}")


def _shown(value: str) -> str:
    """A value as every violation echoes it (the one place): quoted, and at most MAX_SHOWN characters
    of it. Never one that may be a secret: people paste private keys into the wrong field, and
    error messages end up in logs, tickets and screenshots. Anything containing the private key
    prefix (in any case: a mistyped or truncated key is still a secret) or a long run of letters
    and digits is not shown at all."""
    if PRIVATE_KEY_PREFIX in value.lower() or _SECRET_LIKE.search(value):
        return "(a value that looks like a secret, not shown)"
    return repr(value if len(value) <= MAX_SHOWN else value[:MAX_SHOWN] + "...")


@functools.lru_cache(maxsize=65536)
def client_address(value: str) -> IPAddress:
    """Parsed client addresses: the same bots send from the same few addresses on every call,
    and parsing costs more than the rest of an IP check. ValueError if not an address."""
    return plain_address(ipaddress.ip_address(value))
