"""Server configuration: defaults < TOML file < KEYGUARD_* env vars < flags.

Every scalar field of :class:`Config` is a top-level key of the TOML file and
has an environment variable named ``KEYGUARD_`` + the field name in upper case.
Callers are TOML only, as ``[[callers]]`` tables (see :class:`Caller`).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import importlib.util
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from keyguard import Permission
from keyguard_server._metrics import metrics_address
from keyguard_server._secrets import Argon2Params
from keyguard_server.store import DatabaseSettings


class Role(enum.StrEnum):
    """What a caller may call. Health checking is open to everyone."""

    AUTHORIZER = "authorizer"  # Authorization (the API gateway)
    MANAGER = "manager"  # KeyManagement (admin tooling, website backend)
    ADMIN = "admin"  # both (the generated local admin token)


@dataclasses.dataclass(frozen=True)
class Caller:
    """A service allowed to call keyguard, known by a token or a client certificate.

    ``token_sha256`` is the hex SHA-256 of the bearer token, so the config file
    holds nothing a reader could replay; ``cert_common_name`` matches the CN of
    a client certificate verified against ``tls_client_ca_file``.
    """

    name: str
    role: Role
    token_sha256: str = ""
    cert_common_name: str = ""

    def __post_init__(self) -> None:
        if not self.token_sha256 and not self.cert_common_name:
            raise ValueError(f"caller {self.name!r} needs token_sha256 or cert_common_name")
        if self.token_sha256 and not re.fullmatch(r"[0-9a-f]{64}", self.token_sha256):
            raise ValueError(f"caller {self.name!r}: token_sha256 must be 64 lower-case hex digits")


# A canonical request path: "/" or "/"-separated segments of RFC 3986 path
# characters, with an optional trailing "/". What it leaves out is what makes
# two spellings of one path: empty segments ("//"), segments of dots ("." and
# ".." but also "...", which some servers trim), "%" escapes (decoding,
# double decoding), "\\" (a separator to some servers) and ";" (path
# parameters that Java servers strip: "/withdraw;x" is "/withdraw" to them).
CANONICAL_PATH = re.compile(r"/|(?:/[A-Za-z0-9\-._~!$&'()*+,=:@]*[A-Za-z0-9\-_~!$&'()*+,=:@])+/?")
CANONICAL_PATH_RULE = (
    "a canonical path: segments of letters, digits and -._~!$&'()*+,=:@ between single slashes, "
    "none ending in '.' ('.', '..', 'withdraw.': some servers trim trailing dots), "
    "no '%' escapes, no '\\' or ';'"
)


_SUFFIX = re.compile(r"[.!].*")


def route_key(path: str) -> str:
    """What a route matches a canonical path by: lower case (an upstream may route
    "/Withdraw" to "/withdraw"), and each segment up to its first dot or "!" (frameworks
    that match suffixes serve "/withdraw.json" as "/withdraw", and Struts-style ones run
    "/withdraw!execute" as the withdraw action)."""
    return "/".join(_SUFFIX.sub("", segment) for segment in path.lower().split("/"))


@dataclasses.dataclass(frozen=True)
class EnvoyRoute:
    """Envoy ext_authz: requests whose path is ``path_prefix`` or below it need ``permission``.

    Prefixes match whole segments ("/api/v3/account" covers "/api/v3/account"
    and "/api/v3/account/x", not "/api/v3/accountTransfer") and ignore case,
    since an upstream may route "/sapi/v1/Withdraw" to "/sapi/v1/withdraw".
    The longest matching prefix wins, and at equal prefixes a route naming the
    request's method beats "*"; ``method`` is an HTTP method or "*".
    """

    path_prefix: str
    permission: Permission
    method: str = "*"

    def __post_init__(self) -> None:
        if not CANONICAL_PATH.fullmatch(self.path_prefix):
            raise ValueError(f"path_prefix {self.path_prefix!r} must be {CANONICAL_PATH_RULE}")
        if self.method != "*" and not re.fullmatch(r"[A-Za-z]+", self.method):
            raise ValueError(f"method {self.method!r} must be an HTTP method or '*'")
        object.__setattr__(self, "path_prefix", self.path_prefix.lower())
        object.__setattr__(self, "method", self.method.upper())

    @functools.cached_property
    def key(self) -> str:
        """The paths this route covers, as matched (see :func:`route_key`); longer is more specific."""
        return route_key(self.path_prefix.rstrip("/"))

    def matches(self, method: str, path: str) -> bool:
        """``path`` is canonical (the caller refuses any other)."""
        return self.covers(method.upper(), route_key(path))

    def covers(self, method: str, key: str) -> bool:
        """:meth:`matches` for a request whose upper-case method and :func:`route_key` are known,
        so that a request checked against every route computes them once."""
        base = self.key
        return (key == base or key.startswith(base + "/")) and self.method in ("*", method)


@dataclasses.dataclass(frozen=True)
class Config:
    # Where to listen. Loopback by default: keyguard is an internal service.
    listen: str = "127.0.0.1:50051"
    # Local state (the default SQLite database) lives here.
    data_dir: str = "data"
    # A playhouse.db_url URL; empty means sqlite:///<data_dir>/keyguard.db.
    database: str = ""
    # Every wait for the database is bounded (a call that runs out answers
    # UNAVAILABLE, or ABORTED for a lock, and changes nothing): opening a
    # connection; one statement (PostgreSQL statement_timeout; an Authorize
    # waits at most this, or less when its caller's deadline is sooner);
    # another transaction's lock (PostgreSQL lock_timeout, SQLite busy_timeout).
    database_connect_timeout_seconds: float = 3.0
    database_statement_timeout_seconds: float = 5.0
    database_lock_timeout_seconds: float = 2.0
    # PostgreSQL TCP keepalive idle time; a silent peer is dropped after ~3x it.
    database_keepalive_seconds: float = 5.0
    # Threads (each with its own connection) for reads and for changes.
    database_read_threads: int = 4
    database_write_threads: int = 2
    max_keys_per_account: int = 16
    max_allowed_ips: int = 30
    # Refuse WITHDRAW keys with an empty IP allowlist (what exchanges do).
    withdraw_requires_ip_allowlist: bool = True
    # WITHDRAW keys' allowlist entries (and TRADE keys' too while unrestricted_key_days
    # is on) must be at least this specific: a wide network would let anyone in it use
    # a stolen key, and 0.0.0.0/1 + 128.0.0.0/1 would "restrict" a key to the internet.
    withdraw_min_prefix_ipv4: int = 24
    withdraw_min_prefix_ipv6: int = 48
    max_withdrawal_addresses: int = 200
    # A newly whitelisted withdrawal address is usable only after this many
    # seconds (ADDRESS_ON_HOLD until then), and turning address management off
    # takes effect only after as long: whoever steals a session cannot add
    # their own address and withdraw to it at once. 0 = at once; at most 30 days.
    address_hold_seconds: int = 24 * 3600
    # Unrestricted keys lapse: a TRADE or WITHDRAW key without an IP allowlist
    # loses its trade and withdraw rights (IP_RESTRICTION_REQUIRED; READ keeps
    # working) this many days after it became unrestricted, until an allowlist
    # is set. 0 = never (off).
    unrestricted_key_days: int = 0
    # Trading symbols a key may be restricted to.
    max_symbols_per_key: int = 100
    argon2_time_cost: int = Argon2Params.time_cost
    argon2_memory_kib: int = Argon2Params.memory_kib
    argon2_parallelism: int = Argon2Params.parallelism
    # argon2 verifications that run at once, each in a process of its own (as many
    # again for suspect ones, at the lowest CPU priority); each holds argon2_memory_kib
    # while it works.
    argon2_threads: int = 2
    # The budget: argon2 verifications may use this share of the machine's cores on
    # average (measured CPU seconds), however many wrong secrets arrive. 0.5 on two
    # cores: one core's worth. Suspect verifications (where wrong secrets came from
    # lately) have a budget of their own: even at the lowest CPU priority, argon2
    # competes with the event loop for the caches and memory bandwidth the cores share.
    argon2_cpu_share: float = 0.5
    argon2_suspect_cpu_share: float = 0.05
    # Verifications (of distinct secrets; identical ones share one run) that may run or
    # wait: a memory bound. The real bound is time: proven networks go first, then
    # accounts and networks that failed no verification lately, then the rest; a
    # verification that could not finish before its caller's deadline in that order is
    # refused at once (Authorize answers VERIFICATION_BUSY). One that is not suspect and
    # can start within argon2_max_wait_seconds is still run after its caller gave up,
    # and remembered, so the bot's next request is answered at once.
    argon2_max_pending: int = 1024
    argon2_max_wait_seconds: float = 5.0
    # Hashing new secrets (CreateKey, RotateKey) has a thread and a queue of its
    # own, so key creation never delays verification; past this many waiting
    # hashes a create answers UNAVAILABLE at once.
    argon2_max_pending_hashes: int = 64
    # AuthorizeStream: messages of one stream decided (or answered and waiting
    # to be written) at a time. At this many the server stops reading that
    # stream until one is answered, so a fast sender is held back by HTTP/2
    # flow control instead of filling the server's memory.
    authorize_stream_max_in_flight: int = 64
    # Secrets remembered (as HMAC digests) after argon2 accepted them.
    verify_cache_size: int = 100_000
    # Failed Authorize attempts allowed per access key and per client IP
    # (IPv6: per /64) in a burst, and refilled per second after it.
    failure_burst: int = 10
    failure_refill_per_second: float = 0.2
    # ED25519 signed requests: how far a request's timestamp may be from now
    # (1 ms to 10 minutes).
    signature_window_ms: int = 5000
    # How often last-used times and IPs are written (one transaction each time).
    last_used_flush_seconds: float = 5.0
    # Processes serving the same port (SO_REUSEPORT), to use every core.
    workers: int = 1
    log_level: str = "INFO"
    # How often health checking asks the database whether it answers, and how
    # long it waits for the answer before reporting NOT_SERVING.
    health_check_seconds: float = 5.0
    health_check_timeout_seconds: float = 1.0
    # Seconds in-flight calls get to finish on SIGTERM/SIGINT.
    shutdown_grace: float = 5.0
    # TLS: server certificate and key (PEM files); with a client CA, callers
    # must present a certificate it signed (mTLS).
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # With callers configured, a non-loopback address needs TLS (their bearer
    # tokens would cross the network in the clear) unless this says otherwise,
    # e.g. behind a TLS-terminating sidecar on the same host.
    allow_plaintext: bool = False
    # Who may call. Empty: loopback only, with a generated admin token in
    # <data_dir>/admin.token that the CLI picks up.
    callers: tuple[Caller, ...] = ()
    # Prometheus metrics over HTTP ("" = off), at HOST:PORT (see _metrics.metrics_address);
    # unauthenticated: beyond loopback the start logs a warning. With --workers N the supervisor
    # serves it alone: the sum over every worker (prometheus_client's
    # multiprocess mode, files in a fresh <data_dir>/metrics-* directory).
    metrics_listen: str = ""
    # "text" or "json" (one JSON object per line).
    log_format: str = "text"
    # OpenTelemetry spans per RPC: "" (off: nothing of OpenTelemetry is imported)
    # or "otlp" (exported over OTLP/gRPC to OTEL_EXPORTER_OTLP_ENDPOINT; needs
    # pip install 'keyguard-server[tracing]').
    tracing: str = ""
    # Envoy ext_authz (envoy.service.auth.v3.Authorization/Check): where the
    # bot's credentials and the withdrawal destination are in its HTTP request
    # (header names, any case: stored in lower case), where the client IP comes
    # from, and which permission each route needs ([[envoy_routes]] tables).
    envoy_access_key_header: str = "x-api-key"
    envoy_private_key_header: str = "x-api-secret"
    # The client IP: "" = the peer address of Envoy's downstream connection
    # (what it reports, whatever X-Forwarded-For says). Behind a load balancer:
    # a header it appends to (x-forwarded-for) and the proxies to trust
    # (addresses or networks, separated by spaces or commas; required with
    # the header): the client is the right-most address, of that header's list
    # followed by the peer, that is not a trusted proxy.
    envoy_client_ip_header: str = ""
    envoy_trusted_proxies: str = ""
    # ED25519 keys: the signed request's parts.
    envoy_timestamp_header: str = "x-api-timestamp"
    envoy_nonce_header: str = "x-api-nonce"
    envoy_signature_header: str = "x-api-signature"
    envoy_withdraw_asset_header: str = "x-withdraw-asset"
    envoy_withdraw_address_header: str = "x-withdraw-address"
    envoy_withdraw_memo_header: str = "x-withdraw-memo"
    # The trading symbol of a request on a TRADE route, for keys restricted to
    # symbols; on ALLOW the upstream gets it as x-keyguard-symbol.
    envoy_symbol_header: str = "x-api-symbol"
    envoy_routes: tuple[EnvoyRoute, ...] = ()

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{Path(self.data_dir) / 'keyguard.db'}"

    @property
    def database_settings(self) -> DatabaseSettings:
        return DatabaseSettings(
            self.database_url,
            connect_timeout=self.database_connect_timeout_seconds,
            statement_timeout=self.database_statement_timeout_seconds,
            lock_timeout=self.database_lock_timeout_seconds,
            keepalive_seconds=self.database_keepalive_seconds,
            read_threads=self.database_read_threads,
            write_threads=self.database_write_threads,
        )

    @property
    def argon2(self) -> Argon2Params:
        return Argon2Params(self.argon2_time_cost, self.argon2_memory_kib, self.argon2_parallelism)

    @property
    def admin_token_file(self) -> Path:
        return Path(self.data_dir) / "admin.token"

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert_file)

    def __post_init__(self) -> None:
        positive = (
            "max_keys_per_account",
            "max_allowed_ips",
            "max_withdrawal_addresses",
            "max_symbols_per_key",
            "argon2_threads",
            "argon2_max_pending",
            "argon2_max_pending_hashes",
            "database_read_threads",
            "database_write_threads",
            "verify_cache_size",
            "authorize_stream_max_in_flight",
            "failure_burst",
            "workers",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"config {name} must be at least 1")
        timeouts = (
            "database_connect_timeout_seconds",
            "database_statement_timeout_seconds",
            "database_lock_timeout_seconds",
            "database_keepalive_seconds",
            "health_check_seconds",
            "health_check_timeout_seconds",
            "last_used_flush_seconds",
            "argon2_max_wait_seconds",
        )
        for name in timeouts:
            if not 0 < getattr(self, name) <= 3600:
                raise ValueError(f"config {name} must be more than 0 and at most 3600")
        if not 0 <= self.shutdown_grace <= 3600:
            raise ValueError("config shutdown_grace must be 0 to 3600")
        for share in ("argon2_cpu_share", "argon2_suspect_cpu_share"):
            if not 0 < getattr(self, share) <= 1:
                raise ValueError(f"config {share} must be more than 0 and at most 1")
        if not 0 < self.failure_refill_per_second <= 1000:
            raise ValueError("config failure_refill_per_second must be more than 0 and at most 1000")
        if not 0 <= self.address_hold_seconds <= 30 * 24 * 3600:
            raise ValueError("config address_hold_seconds must be 0 to 2592000 (30 days)")
        if not 0 <= self.unrestricted_key_days <= 3650:
            raise ValueError("config unrestricted_key_days must be 0 (off) to 3650")
        if self.max_symbols_per_key > 1000:
            raise ValueError("config max_symbols_per_key must be at most 1000")
        if not 1 <= self.signature_window_ms <= 600_000:
            raise ValueError("config signature_window_ms must be 1 to 600000 (10 minutes)")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError("config log_level must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        self._check_envoy_settings()
        if not 0 <= self.withdraw_min_prefix_ipv4 <= 32:
            raise ValueError("config withdraw_min_prefix_ipv4 must be 0 to 32")
        if not 0 <= self.withdraw_min_prefix_ipv6 <= 128:
            raise ValueError("config withdraw_min_prefix_ipv6 must be 0 to 128")
        if self.database_lock_timeout_seconds >= self.database_statement_timeout_seconds:
            raise ValueError(
                "config database_lock_timeout_seconds must be less than database_statement_timeout_seconds"
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("config tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("config tls_client_ca_file needs tls_cert_file and tls_key_file")
        if self.log_format not in ("text", "json"):
            raise ValueError("config log_format must be text or json")
        if self.metrics_listen:
            metrics_address(self.metrics_listen)  # a clear ValueError for anything but HOST:PORT
        if self.tracing not in ("", "otlp"):
            raise ValueError('config tracing must be "" (off) or "otlp"')
        if self.tracing and (missing := _missing_modules(TRACING_MODULES)):
            raise ValueError(
                f"config tracing = {self.tracing!r} needs OpenTelemetry, and {missing[0]} is not installed: "
                "pip install 'keyguard-server[tracing]'"
            )
        seen: dict[tuple[str, str], EnvoyRoute] = {}
        for route in self.envoy_routes:
            other = seen.setdefault((route.key, route.method), route)
            if other is not route:
                raise ValueError(
                    f"config envoy_routes {other.path_prefix!r} and {route.path_prefix!r} ({route.method}) cover the "
                    f"same paths ({route.key!r}: routes match by each segment up to its first dot): keep one"
                )
        if not self.callers and not _is_loopback(self.listen):
            raise ValueError(
                f"refusing to listen on {self.listen} with no callers configured: "
                "configure [[callers]] (see docs/security.md) or listen on loopback"
            )
        if not self.tls and not self.allow_plaintext and not _is_loopback(self.listen):
            raise ValueError(
                f"refusing to listen on {self.listen} without TLS: callers' bearer tokens would cross the "
                "network in the clear; configure tls_cert_file and tls_key_file, or set allow_plaintext = true"
            )

    def _check_envoy_settings(self) -> None:
        """Header names in lower case (as Envoy passes them), each a valid, distinct name.

        Refused: names Envoy never forwards (underscores, with the documented
        headers_with_underscores_action) and x-keyguard-* (keyguard's own
        answer to the upstream, which it overwrites or removes).
        """
        names = [f.name for f in dataclasses.fields(self) if f.name.startswith("envoy_") and f.name.endswith("_header")]
        seen: dict[str, str] = {}
        for name in names:
            value = getattr(self, name).lower()
            object.__setattr__(self, name, value)
            if not value and name == "envoy_client_ip_header":
                continue
            if not re.fullmatch(r"[a-z0-9]+(?:-[a-z0-9]+)*", value) or value.startswith("x-keyguard-"):
                raise ValueError(
                    f"config {name} {value!r} must be a header name of letters, digits and '-' (not x-keyguard-*)"
                )
            if value in seen:
                raise ValueError(f"config {name} and {seen[value]} name the same header {value!r}")
            seen[value] = name
        proxies = trusted_networks(self.envoy_trusted_proxies)
        if bool(self.envoy_client_ip_header) != bool(proxies):
            raise ValueError(
                "config envoy_client_ip_header and envoy_trusted_proxies go together: the header is believed "
                "only when the proxy that sent it is trusted"
            )

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Config:
        """Merge the layers; unknown keys and wrong types are errors, not ignored."""
        env = os.environ if env is None else env
        path = path or env.get("KEYGUARD_CONFIG")
        values: dict[str, Any] = {}
        if path:
            with open(path, "rb") as f:
                document = tomllib.load(f)
            values["callers"] = _callers(document.pop("callers", []), source=str(path))
            values["envoy_routes"] = _routes(document.pop("envoy_routes", []), source=str(path))
            values.update(_typed(document, source=str(path)))
        fields = {f.name for f in dataclasses.fields(cls)} - TABLES
        from_env = {name: env[f"KEYGUARD_{name.upper()}"] for name in fields if f"KEYGUARD_{name.upper()}" in env}
        values.update(_typed(from_env, source="environment", parse_strings=True))
        values.update(_typed({k: v for k, v in overrides.items() if v is not None}, source="flags"))
        return cls(**values)


def trusted_networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """``envoy_trusted_proxies``: addresses or networks separated by spaces or commas."""
    try:
        return tuple(ipaddress.ip_network(entry) for entry in text.replace(",", " ").split())
    except ValueError as exc:
        raise ValueError(f"config envoy_trusted_proxies: {exc}") from None


# What tracing = "otlp" imports (the packages of the keyguard-server[tracing] extra).
TRACING_MODULES = (
    "opentelemetry.sdk.trace",
    "opentelemetry.instrumentation.grpc",
    "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
)


def _missing_modules(names: tuple[str, ...]) -> list[str]:
    """The modules of ``names`` that cannot be found (found, not imported)."""
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except ImportError:  # a parent package is missing
            found = False
        if not found:
            missing.append(name)
    return missing


def _is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _callers(raw: Any, *, source: str) -> tuple[Caller, ...]:
    if not isinstance(raw, list) or not all(isinstance(c, dict) for c in raw):
        raise ValueError(f"{source}: callers must be [[callers]] tables")
    known = {f.name for f in dataclasses.fields(Caller)}
    callers = []
    for entry in raw:
        unknown = set(entry) - known
        if unknown:
            raise ValueError(f"{source}: unknown caller setting {sorted(unknown)[0]!r}")
        if not all(isinstance(v, str) for v in entry.values()):
            raise ValueError(f"{source}: caller settings are strings")
        try:
            callers.append(Caller(**{**entry, "role": Role(entry.get("role", ""))}))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: caller {entry.get('name', '?')!r}: {exc}") from None
    names = [c.name for c in callers]
    if len(set(names)) != len(names):
        raise ValueError(f"{source}: caller names must be unique")
    return tuple(callers)


def _routes(raw: Any, *, source: str) -> tuple[EnvoyRoute, ...]:
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise ValueError(f"{source}: envoy_routes must be [[envoy_routes]] tables")
    routes = []
    for entry in raw:
        unknown = set(entry) - {"path_prefix", "permission", "method"}
        if unknown:
            raise ValueError(f"{source}: unknown envoy_routes setting {sorted(unknown)[0]!r}")
        try:
            routes.append(
                EnvoyRoute(
                    path_prefix=str(entry["path_prefix"]),
                    permission=Permission.parse(str(entry["permission"])),
                    method=str(entry.get("method", "*")).upper(),
                )
            )
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{source}: envoy_routes entry {entry!r}: {exc}") from None
    return tuple(routes)


# Settings given as [[tables]] in TOML only.
TABLES = frozenset({"callers", "envoy_routes"})


def _typed(raw: Mapping[str, Any], *, source: str, parse_strings: bool = False) -> dict[str, Any]:
    types = {f.name: f.type for f in dataclasses.fields(Config) if f.name not in TABLES}
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in types:
            raise ValueError(f"{source}: unknown setting {name!r}")
        kind = {"str": str, "int": int, "bool": bool, "float": float}[str(types[name])]
        if parse_strings and isinstance(value, str) and kind is not str:
            value = _parse(value, kind, f"{source}: {name}")
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not kind:
            raise ValueError(f"{source}: {name} must be {kind.__name__}, got {value!r}")
        out[name] = value
    return out


def _parse(text: str, kind: type, what: str) -> Any:
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{what} must be true or false, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"{what} must be {kind.__name__}, got {text!r}") from None
