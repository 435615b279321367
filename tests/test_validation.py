"""Every RPC refuses malformed input with INVALID_ARGUMENT naming the field, and stores nothing.

Requests are built with the raw generated stubs, so the server is tested, not
the typed client's own checks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from keyguard import Client, InvalidArgument
from keyguard.v1 import keyguard_pb2 as pb
from keyguard_server._secrets import PRIVATE_KEY_PREFIX, is_well_formed_private_key, new_private_key
from tests.conftest import RawStubs, RunningServer

READ, TRADE, WITHDRAW = pb.PERMISSION_READ, pb.PERMISSION_TRADE, pb.PERMISSION_WITHDRAW
ACCOUNT = "acct-validation"


def _create(**fields: Any) -> pb.CreateKeyRequest:
    base: dict[str, Any] = {"account_id": ACCOUNT, "name": "bot", "permission": TRADE, "allowed_ips": []}
    return pb.CreateKeyRequest(**{**base, **fields})


CREATE_CASES = [
    (_create(account_id=""), ["account_id"]),
    (_create(account_id="a b"), ["account_id"]),
    (_create(account_id="x" * 129), ["account_id"]),
    (_create(account_id="acct\x00"), ["account_id"]),
    (_create(name=""), ["name"]),
    (_create(name="x" * 65), ["name"]),
    (_create(name=" bot"), ["name"]),
    (_create(name="bot\n"), ["name"]),
    (_create(name="b\x07t"), ["name"]),
    (_create(name="\u200bbot"), ["name"]),
    (_create(permission=0), ["permission"]),
    (_create(permission=7), ["permission"]),
    (_create(allowed_ips=["1.2.3"]), ["allowed_ips[0]"]),
    (_create(allowed_ips=["10.0.0.1", "10.0.0.5/24"]), ["allowed_ips[1]"]),
    (_create(allowed_ips=["10.0.0.0/33"]), ["allowed_ips[0]"]),
    (_create(allowed_ips=["0.0.0.0/0"]), ["allowed_ips[0]"]),
    (_create(allowed_ips=["::/0"]), ["allowed_ips[0]"]),
    (_create(allowed_ips=["::ffff:0.0.0.0/96"]), ["allowed_ips[0]"]),
    (_create(allowed_ips=["fe80::1%eth0"]), ["allowed_ips[0]"]),
    (_create(allowed_ips=["example.com"]), ["allowed_ips[0]"]),
    (_create(allowed_ips=[""]), ["allowed_ips[0]"]),
    (_create(allowed_ips=[" 10.0.0.1"]), ["allowed_ips[0]"]),
    (_create(allowed_ips=["10.0.0.1\n"]), ["allowed_ips[0]"]),
    (_create(allowed_ips=["\t10.0.0.0/8"]), ["allowed_ips[0]"]),
    (_create(allowed_ips=["10.0.0.1", "2001:db8::/32\r\n"]), ["allowed_ips[1]"]),
    (_create(allowed_ips=["0.0.0.0"]), ["allowed_ips[0]"]),
    (_create(allowed_ips=["::"]), ["allowed_ips[0]"]),
    (_create(allowed_ips=["::ffff:0.0.0.0"]), ["allowed_ips[0]"]),
    (_create(allowed_ips=["0.0.0.0/32"]), ["allowed_ips[0]"]),
    (_create(allowed_ips=[f"10.0.{i}.1" for i in range(31)]), ["allowed_ips"]),
    (_create(permission=WITHDRAW), ["allowed_ips"]),
    (_create(account_id="", name="", permission=0), ["account_id", "name", "permission"]),
]


@pytest.mark.parametrize(("request_", "fields"), CREATE_CASES)
def test_create_key_refusals(
    raw: RawStubs, server: RunningServer, request_: pb.CreateKeyRequest, fields: list[str]
) -> None:
    with pytest.raises(InvalidArgument) as err:
        raw.call(raw.keys.CreateKey, request_)
    assert list(err.value.fields) == fields
    assert all(v.description for v in err.value.violations)
    assert server.sql("SELECT count(*) FROM key_model WHERE account_id = ?", (ACCOUNT,)) == [(0,)]


def test_thirty_ips_is_fine(raw: RawStubs) -> None:
    request = _create(account_id="acct-thirty", allowed_ips=[f"10.0.{i}.1" for i in range(30)])
    assert len(raw.call(raw.keys.CreateKey, request).key.allowed_ips) == 30


def test_error_message_says_why(client: Client) -> None:
    with pytest.raises(InvalidArgument) as err:
        client.create_key("acct-msg", "bot", "read", ["10.0.0.5/24"])
    assert "did you mean 10.0.0.0/24" in str(err.value)


KEY = "kg_" + "A" * 24

OTHER_CASES = [
    ("ListKeys", pb.ListKeysRequest(account_id=""), ["account_id"]),
    ("GetKey", pb.GetKeyRequest(account_id=ACCOUNT, access_key=""), ["access_key"]),
    ("GetKey", pb.GetKeyRequest(account_id=ACCOUNT, access_key="kg_short"), ["access_key"]),
    ("GetKey", pb.GetKeyRequest(account_id="", access_key=KEY), ["account_id"]),
    ("DeleteKey", pb.DeleteKeyRequest(account_id=ACCOUNT, access_key="nope"), ["access_key"]),
    ("DeleteKey", pb.DeleteKeyRequest(account_id="a\tb", access_key=KEY), ["account_id"]),
    ("DeleteAllKeys", pb.DeleteAllKeysRequest(account_id=""), ["account_id"]),
    ("GetAccountSettings", pb.GetAccountSettingsRequest(account_id=""), ["account_id"]),
    ("SetAddressManagement", pb.SetAddressManagementRequest(account_id="", enabled=True), ["account_id"]),
    ("AddWithdrawalAddress", pb.AddWithdrawalAddressRequest(account_id=ACCOUNT, asset="", address="x"), ["asset"]),
    ("AddWithdrawalAddress", pb.AddWithdrawalAddressRequest(account_id=ACCOUNT, asset="B/TC", address="x"), ["asset"]),
    (
        "AddWithdrawalAddress",
        pb.AddWithdrawalAddressRequest(account_id=ACCOUNT, asset="X" * 33, address="x"),
        ["asset"],
    ),
    ("AddWithdrawalAddress", pb.AddWithdrawalAddressRequest(account_id=ACCOUNT, asset="BTC", address=""), ["address"]),
    (
        "AddWithdrawalAddress",
        pb.AddWithdrawalAddressRequest(account_id=ACCOUNT, asset="BTC", address="a d"),
        ["address"],
    ),
    (
        "AddWithdrawalAddress",
        pb.AddWithdrawalAddressRequest(account_id=ACCOUNT, asset="BTC", address="bc1é"),
        ["address"],
    ),
    (
        "AddWithdrawalAddress",
        pb.AddWithdrawalAddressRequest(account_id=ACCOUNT, asset="BTC", address="x" * 257),
        ["address"],
    ),
    (
        "AddWithdrawalAddress",
        pb.AddWithdrawalAddressRequest(account_id=ACCOUNT, asset="BTC", address="x", memo="m\r"),
        ["memo"],
    ),
    (
        "AddWithdrawalAddress",
        pb.AddWithdrawalAddressRequest(account_id=ACCOUNT, asset="BTC", address="x", label="l" * 65),
        ["label"],
    ),
    ("RemoveWithdrawalAddress", pb.RemoveWithdrawalAddressRequest(account_id=ACCOUNT, address_id=0), ["address_id"]),
    ("RemoveWithdrawalAddress", pb.RemoveWithdrawalAddressRequest(account_id="", address_id=1), ["account_id"]),
    (
        "RemoveWithdrawalAddress",
        pb.RemoveWithdrawalAddressRequest(account_id=ACCOUNT, address_id=2**64 - 1),
        ["address_id"],
    ),
    ("ListAuditEvents", pb.ListAuditEventsRequest(page_token="9" * 19), ["page_token"]),
]


@pytest.mark.parametrize(("method", "request_", "fields"), OTHER_CASES)
def test_management_refusals(
    raw: RawStubs, server: RunningServer, method: str, request_: Any, fields: list[str]
) -> None:
    with pytest.raises(InvalidArgument) as err:
        raw.call(getattr(raw.keys, method), request_)
    assert list(err.value.fields) == fields
    for table in ("key_model", "address_model", "account_model"):
        assert server.sql(f"SELECT count(*) FROM {table} WHERE account_id = ?", (ACCOUNT,)) == [(0,)]


@pytest.mark.parametrize("permission", [0, 4, -1])
def test_authorize_refuses_unknown_permission_values(raw: RawStubs, permission: int) -> None:
    request = pb.AuthorizeRequest(
        access_key=KEY,
        private_key="kgsk_x",
        client_ip="192.0.2.1",
        required_permission=pb.Permission.ValueType(permission),
    )
    with pytest.raises(InvalidArgument) as err:
        raw.call(raw.auth.Authorize, request)
    assert err.value.fields == ("required_permission",)


def test_an_unknown_permission_is_named_with_every_other_malformed_field(raw: RawStubs) -> None:
    """The servicer turns the wire number into a Permission before Authorize; a number that is
    none still gets the whole request validated, as every other malformed request does."""
    request = pb.AuthorizeRequest(
        access_key="", client_ip="not an ip", required_permission=pb.Permission.ValueType(9), symbol="b t c"
    )
    with pytest.raises(InvalidArgument) as err:
        raw.call(raw.auth.Authorize, request)
    assert err.value.fields == ("access_key", "client_ip", "required_permission", "symbol")


KEY = new_private_key()
# A pasted private key, and the forms a slip of the hand gives it: each a secret all the same.
SECRETS = [KEY, KEY.upper(), KEY[:20], KEY[:-7], KEY[len(PRIVATE_KEY_PREFIX) :], f"10.0.0.1{KEY}", f"{KEY} "]


def _refusal(call: Any) -> tuple[str, str]:
    """An INVALID_ARGUMENT call's status message, and its BadRequest details, as a reader sees them."""
    with pytest.raises(grpc.RpcError) as raised:
        call()
    return _texts(raised.value)


def _texts(error: Any) -> tuple[str, str]:
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    return status.message, str(bad_request)


@pytest.mark.parametrize("secret", SECRETS, ids=range(len(SECRETS)))
def test_no_refusal_echoes_a_private_key(raw: RawStubs, secret: str) -> None:
    assert is_well_formed_private_key(KEY)
    md, body = raw.metadata, KEY[len(PRIVATE_KEY_PREFIX) : len(PRIVATE_KEY_PREFIX) + 12]
    authorize: dict[str, Any] = {"access_key": "kg_" + "a" * 24, "private_key": KEY, "required_permission": READ}
    calls: list[Callable[[], Any]] = [
        lambda: raw.auth.Authorize(pb.AuthorizeRequest(**authorize, client_ip=secret), metadata=md),
        lambda: raw.auth.Authorize(pb.AuthorizeRequest(**authorize, client_ip="192.0.2.1", symbol=secret), metadata=md),
        lambda: raw.keys.CreateKey(_create(allowed_ips=["192.0.2.1", secret]), metadata=md),
        lambda: raw.keys.CreateKey(_create(account_id="acct-symbol-secret", symbols=[secret]), metadata=md),
        lambda: raw.keys.CreateKey(_create(name="dup", symbols=["BTCUSDT", secret, secret]), metadata=md),
    ]
    refused = 0
    for call in calls:
        try:
            call()  # some forms are valid symbols ("KGSK_..."): accepted, nothing echoed
            continue
        except grpc.RpcError as exc:
            texts = _texts(exc)
        refused += 1
        for text in texts:
            assert body not in text and body.upper() not in text, text
            assert PRIVATE_KEY_PREFIX not in text.lower(), text
    assert refused >= 3  # client_ip, allowed_ips and the duplicate symbol at least


def test_refusals_still_echo_a_value_that_is_no_secret(raw: RawStubs) -> None:
    message, _ = _refusal(lambda: raw.keys.CreateKey(_create(allowed_ips=["10.0.0.5/24"]), metadata=raw.metadata))
    assert "'10.0.0.5/24' has host bits set; did you mean 10.0.0.0/24?" in message
    message, _ = _refusal(lambda: raw.keys.CreateKey(_create(allowed_ips=["a-" * 250]), metadata=raw.metadata))
    assert f"'{'a-' * 30}...'" in message  # echoes are bounded
