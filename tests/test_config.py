"""Configuration layers: defaults < TOML file < KEYGUARD_* env < flags."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from keyguard import Permission
from keyguard_server import Config
from keyguard_server._config import Caller, EnvoyRoute, Role

CALLERS = (Caller("gateway", Role.AUTHORIZER, token_sha256="a" * 64),)


def test_defaults_are_loopback_and_a_local_sqlite_file() -> None:
    config = Config.load(env={})
    assert config.listen == "127.0.0.1:50051"
    assert config.database_url == "sqlite:///data/keyguard.db"
    assert config.max_keys_per_account == 16
    assert config.withdraw_requires_ip_allowlist
    assert (config.withdraw_min_prefix_ipv4, config.withdraw_min_prefix_ipv6) == (24, 48)


def test_layers_override_in_order(tmp_path: Path) -> None:
    path = tmp_path / "keyguard.toml"
    path.write_text('listen = "127.0.0.1:7000"\nmax_keys_per_account = 8\nmax_allowed_ips = 10\n')
    env = {"KEYGUARD_MAX_KEYS_PER_ACCOUNT": "4", "KEYGUARD_WITHDRAW_REQUIRES_IP_ALLOWLIST": "off"}
    config = Config.load(path, env=env, listen="127.0.0.1:9000", database=None)
    assert config.listen == "127.0.0.1:9000"
    assert config.max_keys_per_account == 4
    assert config.max_allowed_ips == 10
    assert not config.withdraw_requires_ip_allowlist


def test_config_file_can_come_from_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "k.toml"
    path.write_text('database = "sqlite:////var/lib/keyguard/k.db"\n')
    assert Config.load(env={"KEYGUARD_CONFIG": str(path)}).database_url == "sqlite:////var/lib/keyguard/k.db"


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ("max_key_per_account = 3\n", {}, "unknown setting 'max_key_per_account'"),
        ('max_keys_per_account = "3"\n', {}, "max_keys_per_account must be int"),
        ("withdraw_requires_ip_allowlist = 1\n", {}, "must be bool"),
        ("", {"KEYGUARD_MAX_ALLOWED_IPS": "many"}, "must be int"),
        ("", {"KEYGUARD_WITHDRAW_REQUIRES_IP_ALLOWLIST": "maybe"}, "must be true or false"),
        ("max_keys_per_account = 0\n", {}, "at least 1"),
        ("withdraw_min_prefix_ipv4 = 33\n", {}, "withdraw_min_prefix_ipv4 must be 0 to 32"),
        ("", {"KEYGUARD_WITHDRAW_MIN_PREFIX_IPV6": "-1"}, "withdraw_min_prefix_ipv6 must be 0 to 128"),
    ],
)
def test_mistakes_are_errors_not_silently_ignored(tmp_path: Path, toml: str, env: dict[str, str], message: str) -> None:
    path = tmp_path / "keyguard.toml"
    path.write_text(toml)
    with pytest.raises(ValueError, match=message):
        Config.load(path, env=env)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"address_hold_seconds": -1}, "address_hold_seconds must be 0 to 2592000"),
        ({"address_hold_seconds": 31 * 86400}, "address_hold_seconds must be 0 to 2592000"),
        ({"unrestricted_key_days": -1}, "unrestricted_key_days must be 0 \\(off\\) to 3650"),
        ({"max_symbols_per_key": 0}, "max_symbols_per_key must be at least 1"),
        ({"max_symbols_per_key": 5000}, "max_symbols_per_key must be at most 1000"),
        ({"envoy_symbol_header": "x-keyguard-symbol"}, "must be a header name"),  # keyguard's answer to upstream
        ({"envoy_symbol_header": "x-api-key"}, "name the same header"),
        ({"signature_window_ms": -1}, "signature_window_ms must be 1 to 600000"),
        ({"signature_window_ms": 10**12}, "signature_window_ms must be 1 to 600000"),
        ({"failure_refill_per_second": -0.5}, "failure_refill_per_second must be more than 0"),
        ({"failure_refill_per_second": 0.0}, "failure_refill_per_second must be more than 0"),
        ({"last_used_flush_seconds": 0.0}, "last_used_flush_seconds must be more than 0"),
        ({"health_check_seconds": 0.0}, "health_check_seconds must be more than 0"),
        ({"shutdown_grace": -1.0}, "shutdown_grace must be 0 to 3600"),
        ({"log_level": "LOUD"}, "log_level must be"),
        ({"envoy_access_key_header": "x_api_key"}, "must be a header name"),  # Envoy refuses underscores
        ({"envoy_private_key_header": "x api secret"}, "must be a header name"),
        ({"envoy_withdraw_address_header": "x-keyguard-withdraw-address"}, "not x-keyguard-"),
        ({"envoy_nonce_header": "X-API-Key"}, "name the same header 'x-api-key'"),
        ({"envoy_client_ip_header": "x-forwarded-for"}, "envoy_client_ip_header and envoy_trusted_proxies go together"),
        ({"envoy_trusted_proxies": "10.0.0.0/8"}, "envoy_client_ip_header and envoy_trusted_proxies go together"),
        ({"envoy_client_ip_header": "x-forwarded-for", "envoy_trusted_proxies": "10.0.0.1/8"}, "has host bits set"),
    ],
)
def test_nonsense_values_are_refused(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Config(**settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "listen", [":9464", "9464", "127.0.0.1", "127.0.0.1:", "127.0.0.1:99999", "localhost:http", "::1:9464", "[::1]"]
)
def test_metrics_listen_must_be_host_and_port(tmp_path: Path, listen: str) -> None:
    path = tmp_path / "keyguard.toml"
    path.write_text(f"metrics_listen = {json.dumps(listen)}\n")
    expected = f"config metrics_listen {listen!r} must be HOST:PORT, such as 127.0.0.1:9464"
    with pytest.raises(ValueError, match=re.escape(expected)):
        Config.load(path, env={})


@pytest.mark.parametrize("listen", ["127.0.0.1:9464", "0.0.0.0:0", "[::]:9464", "[::1]:0", "localhost:9464"])
def test_metrics_listen_takes_addresses_and_host_names(listen: str) -> None:
    assert Config(metrics_listen=listen).metrics_listen == listen


def test_header_names_are_stored_in_lower_case(tmp_path: Path) -> None:
    """Envoy passes header names in lower case: "X-Api-Key" would never match."""
    path = tmp_path / "keyguard.toml"
    path.write_text('envoy_access_key_header = "X-Api-Key"\nenvoy_client_ip_header = "X-Forwarded-For"\n')
    config = Config.load(path, env={"KEYGUARD_ENVOY_TRUSTED_PROXIES": "10.0.0.0/8 192.0.2.9"})
    assert (config.envoy_access_key_header, config.envoy_client_ip_header) == ("x-api-key", "x-forwarded-for")


@pytest.mark.parametrize("prefix", ["/api/../sapi", "/api//v3", "/api/%76", "api/v3", "/a;b", "/a\\b", ""])
def test_route_prefixes_must_be_canonical(tmp_path: Path, prefix: str) -> None:
    path = tmp_path / "keyguard.toml"
    path.write_text(f"[[envoy_routes]]\npath_prefix = {json.dumps(prefix)}\npermission = 'read'\n")
    with pytest.raises(ValueError, match="must be a canonical path"):
        Config.load(path, env={})


def test_route_prefixes_are_matched_in_lower_case(tmp_path: Path) -> None:
    path = tmp_path / "keyguard.toml"
    path.write_text("[[envoy_routes]]\npath_prefix = '/sapi/v1/Withdraw'\npermission = 'withdraw'\nmethod = 'post'\n")
    (route,) = Config.load(path, env={}).envoy_routes
    assert (route.path_prefix, route.method) == ("/sapi/v1/withdraw", "POST")


def test_plaintext_beyond_loopback_needs_saying_so() -> None:
    """With callers configured the client sends bearer tokens, which plaintext shows to the network."""
    with pytest.raises(ValueError, match=r"without TLS.*allow_plaintext = true"):
        Config(listen="0.0.0.0:50051", callers=CALLERS)
    Config(listen="0.0.0.0:50051", callers=CALLERS, allow_plaintext=True)
    Config(listen="0.0.0.0:50051", callers=CALLERS, tls_cert_file="server.crt", tls_key_file="server.key")
    Config(listen="127.0.0.1:50051", callers=CALLERS)  # loopback: no network to see it


def test_routes_that_match_the_same_paths_are_refused() -> None:
    """Routes match each segment up to its first dot: two prefixes that differ only after a dot
    cover the same requests, and which one won would depend on their lengths."""
    with pytest.raises(ValueError, match="cover the same paths"):
        Config(
            envoy_routes=(
                EnvoyRoute("/wapi/v3/withdraw.html", Permission.WITHDRAW),
                EnvoyRoute("/wapi/v3/withdraw.html.history", Permission.READ),
            )
        )
