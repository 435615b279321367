"""Configuration layers: defaults < TOML file < KEYGUARD_* env < flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyguard_server import Config


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
