"""`keyguard audit`'s text output: no key name, memo or reason can pass for another detail or line."""

from __future__ import annotations

import json
import re
import time

import pytest

from keyguard import Client
from keyguard.cli import main
from tests.conftest import RunningServer

_PART = r'[A-Za-z0-9._:/@+,-]+|"(?:[^"\\]|\\.)*"'
_PAIR = re.compile(rf"({_PART})=({_PART})(?: |$)")


def _unquoted(part: str) -> str:
    value: str = json.loads(part) if part.startswith('"') else part
    return value


def parse_details(text: str) -> dict[str, str]:
    """The details column as the help describes it: pairs of plain words or JSON strings."""
    details: dict[str, str] = {}
    position = 0
    while position < len(text):
        pair = _PAIR.match(text, position)
        assert pair is not None, text[position:]
        details[_unquoted(pair[1])] = _unquoted(pair[2])
        position = pair.end()
    return details


def audit_details(server: RunningServer, account: str, capsys: pytest.CaptureFixture[str]) -> list[dict[str, str]]:
    """The details of each event `keyguard audit` prints for ``account``, as a reader would parse them."""
    capsys.readouterr()
    argv = ["--target", server.target, "--token-file", str(server.config.admin_token_file), "audit", account]
    assert main(argv) == 0
    header, *lines = capsys.readouterr().out.splitlines()
    start = header.index("DETAILS")
    return [parse_details(line[start:]) for line in lines]


def test_a_key_name_cannot_pass_for_another_detail(
    server: RunningServer, client: Client, account: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client.create_key(account, "x actor=root", "read")
    client.add_withdrawal_address(account, "BTC", "bc1q", memo='7 label="" id=1', label="a=b")
    printed = audit_details(server, account, capsys)
    events, _ = client.list_audit_events(account)
    assert printed == [dict(e.details) for e in events]
    assert printed[-1]["name"] == "x actor=root"
    assert "actor" not in printed[-1]


def test_a_stored_newline_or_control_character_stays_on_its_line(
    server: RunningServer, client: Client, account: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Details written before today's input rules (or by hand) may hold anything."""
    details = {"memo": "7\n2030-01-01 00:00:00 UTC  root  KEY_DELETED", "label": "", "note": 'a"\\\x00\u202eb'}
    server.sql(
        "INSERT INTO audit_model (time_us, caller, action, account_id, access_key, details) VALUES (?, ?, ?, ?, ?, ?)",
        (int(time.time() * 1e6), "admin", 1, account, "", json.dumps(details)),
    )
    assert audit_details(server, account, capsys) == [details]
