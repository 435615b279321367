"""Server configuration: defaults < TOML file < KEYGUARD_* env vars < flags.

Every field of :class:`Config` is a top-level key of the TOML file and has an
environment variable named ``KEYGUARD_`` + the field name in upper case.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from keyguard_server._secrets import Argon2Params


@dataclasses.dataclass(frozen=True)
class Config:
    # Where to listen. Loopback by default: keyguard is an internal service.
    listen: str = "127.0.0.1:50051"
    # Local state (the default SQLite database) lives here.
    data_dir: str = "data"
    # A playhouse.db_url URL; empty means sqlite:///<data_dir>/keyguard.db.
    database: str = ""
    max_keys_per_account: int = 16
    max_allowed_ips: int = 30
    # Refuse WITHDRAW keys with an empty IP allowlist (what exchanges do).
    withdraw_requires_ip_allowlist: bool = True
    max_withdrawal_addresses: int = 200
    argon2_time_cost: int = Argon2Params.time_cost
    argon2_memory_kib: int = Argon2Params.memory_kib
    argon2_parallelism: int = Argon2Params.parallelism
    # Threads that run argon2; each holds argon2_memory_kib while it works.
    argon2_threads: int = 2
    log_level: str = "INFO"
    # Seconds in-flight calls get to finish on SIGTERM/SIGINT.
    shutdown_grace: float = 5.0

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{Path(self.data_dir) / 'keyguard.db'}"

    @property
    def argon2(self) -> Argon2Params:
        return Argon2Params(self.argon2_time_cost, self.argon2_memory_kib, self.argon2_parallelism)

    def __post_init__(self) -> None:
        for name in ("max_keys_per_account", "max_allowed_ips", "max_withdrawal_addresses", "argon2_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"config {name} must be at least 1")

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
                values.update(_typed(tomllib.load(f), source=str(path)))
        fields = {f.name for f in dataclasses.fields(cls)}
        from_env = {name: env[f"KEYGUARD_{name.upper()}"] for name in fields if f"KEYGUARD_{name.upper()}" in env}
        values.update(_typed(from_env, source="environment", parse_strings=True))
        values.update(_typed({k: v for k, v in overrides.items() if v is not None}, source="flags"))
        return cls(**values)


def _typed(raw: Mapping[str, Any], *, source: str, parse_strings: bool = False) -> dict[str, Any]:
    types = {f.name: f.type for f in dataclasses.fields(Config)}
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
