"""Hostile input through a real channel: refused cleanly, nothing stored, server stays up."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keyguard.v1 import keyguard_pb2 as pb
from keyguard_server.envoy.service.auth.v3 import external_auth_pb2 as ext
from tests.conftest import RunningServer, StartServer

TABLES = ("account_model", "key_model", "address_model", "audit_model")
METHODS = [
    (s.full_name, m)
    for f in (pb.DESCRIPTOR, ext.DESCRIPTOR)
    for s in f.services_by_name.values()
    for m in s.methods_by_name.values()
]

# Valid-looking values mixed with junk, so some requests get past validation.
_texts = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=80),
    st.sampled_from(["acct-h", "bot", "BTC", "bc1q", "192.0.2.1", "10.0.0.0/8", "::1", "kg_" + "a" * 24, ""]),
    st.text(st.characters(codec="ascii"), min_size=60, max_size=300),
)
_scalars: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_ENUM: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: st.integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: st.integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
}


def _field_value(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.message_type is not None:
        if field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            return st.dictionaries(_field_value(key), _field_value(value), max_size=5)
        return _message(field.message_type)
    return _scalars.get(field.type, _texts)


def _message(descriptor: Descriptor) -> st.SearchStrategy[Any]:
    cls = message_factory.GetMessageClass(descriptor)
    fields = {}
    for field in descriptor.fields:
        value = _field_value(field)
        is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
        if field.is_repeated and not is_map:
            value = st.lists(value, max_size=40)
        fields[field.name] = st.one_of(st.none(), value)
    return st.fixed_dictionaries(fields).map(lambda kw: cls(**{k: v for k, v in kw.items() if v is not None}))


def row_counts(server: RunningServer) -> dict[str, int]:
    return {t: server.sql(f"SELECT count(*) FROM {t}")[0][0] for t in TABLES}


@pytest.fixture(scope="module")
def target(launch: StartServer) -> Iterator[RunningServer]:
    running = launch(max_keys_per_account=4)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def channel(target: RunningServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(target.target) as ch:
        yield ch


def call_raw(
    channel: grpc.Channel, target: RunningServer, service: str, method: str, payload: bytes
) -> grpc.StatusCode:
    rpc: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        f"/{service}/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    try:
        rpc(payload, timeout=10, metadata=(("authorization", f"Bearer {target.admin_token}"),))
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        return code
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("service", "method"), [(s, m.name) for s, m in METHODS])
def test_arbitrary_field_values(channel: grpc.Channel, target: RunningServer, service: str, method: str) -> None:
    descriptor = dict((s, m) for s, m in METHODS if m.name == method and s == service)[service]

    # Derandomized: the same examples every run, so the suite stays deterministic.
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(request=_message(descriptor.input_type))
    def check(request: Any) -> None:
        before = row_counts(target)
        code = call_raw(channel, target, service, method, request.SerializeToString())
        assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), request
        if code is not grpc.StatusCode.OK:
            assert row_counts(target) == before, (code, request)

    check()
    health: Any = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING


def _utf8_breaking(field_number: int) -> bytes:
    """A length-delimited string field holding bytes that are not UTF-8."""
    junk = b"\xff\xfe\xc0\x80"
    return bytes([field_number << 3 | 2, len(junk)]) + junk


@pytest.mark.parametrize(("service", "method"), [(s, m.name) for s, m in METHODS])
def test_invalid_utf8_is_invalid_argument(
    channel: grpc.Channel, target: RunningServer, service: str, method: str
) -> None:
    before = row_counts(target)
    payload = pb.CreateKeyRequest(name="bot", permission=pb.PERMISSION_READ).SerializeToString()
    code = call_raw(channel, target, service, method, _utf8_breaking(1) + payload)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert row_counts(target) == before


def test_truncated_message_is_invalid_argument(channel: grpc.Channel, target: RunningServer) -> None:
    payload = pb.CreateKeyRequest(account_id="acct-trunc", name="bot").SerializeToString()[:-2]
    assert (
        call_raw(channel, target, "keyguard.v1.KeyManagement", "CreateKey", payload) is grpc.StatusCode.INVALID_ARGUMENT
    )


def test_oversized_request_is_refused_before_parsing(channel: grpc.Channel, target: RunningServer) -> None:
    before = row_counts(target)
    request = pb.CreateKeyRequest(account_id="acct-big", name="x" * 100_000, permission=pb.PERMISSION_READ)
    assert call_raw(channel, target, "keyguard.v1.KeyManagement", "CreateKey", request.SerializeToString()) is (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    huge_list = pb.CreateKeyRequest(
        account_id="acct-big", name="bot", permission=pb.PERMISSION_READ, allowed_ips=["10.0.0.1"] * 10_000
    )
    assert call_raw(channel, target, "keyguard.v1.KeyManagement", "CreateKey", huge_list.SerializeToString()) is (
        grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert row_counts(target) == before


def test_absurd_ip_list_within_the_size_limit(channel: grpc.Channel, target: RunningServer) -> None:
    request = pb.CreateKeyRequest(
        account_id="acct-ips", name="bot", permission=pb.PERMISSION_READ, allowed_ips=["10.0.0.1"] * 2_000
    )
    before = row_counts(target)
    code = call_raw(channel, target, "keyguard.v1.KeyManagement", "CreateKey", request.SerializeToString())
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert row_counts(target) == before


def test_health_list_is_unimplemented_without_a_traceback(
    channel: grpc.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    error = call_unparseable(channel, "/grpc.health.v1.Health/List", "unary_unary", b"", None)
    assert error.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "NotImplementedError" not in (error.details() or "")
    assert not caplog.records, caplog.text


# Every kind of method, keyguard's and the open ones (health, reflection v1 and v1alpha).
UNPARSEABLE_METHODS = [
    ("/grpc.health.v1.Health/Check", "unary_unary"),
    ("/grpc.health.v1.Health/Watch", "unary_stream"),
    ("/grpc.health.v1.Health/List", "unary_unary"),
    ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", "stream_stream"),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "stream_stream"),
    ("/keyguard.v1.KeyManagement/CreateKey", "unary_unary"),
    ("/keyguard.v1.Authorization/Authorize", "unary_unary"),
    ("/keyguard.v1.Authorization/AuthorizeStream", "stream_stream"),
    ("/envoy.service.auth.v3.Authorization/Check", "unary_unary"),
]
OPEN_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


def call_unparseable(channel: grpc.Channel, method: str, kind: str, payload: bytes, token: str | None) -> grpc.RpcError:
    """One call of ``method`` carrying ``payload`` as its request (for a stream: its one message), raw."""
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    raw: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}

    def call() -> None:
        if kind == "unary_unary":
            channel.unary_unary(method, **raw)(payload, timeout=10, metadata=metadata)
        elif kind == "unary_stream":
            list(channel.unary_stream(method, **raw)(payload, timeout=10, metadata=metadata))
        else:
            list(channel.stream_stream(method, **raw)(iter([payload]), timeout=10, metadata=metadata))

    with pytest.raises(grpc.RpcError) as raised:
        call()
    return raised.value


@pytest.mark.parametrize("with_token", [True, False], ids=["token", "no-token"])
@pytest.mark.parametrize(("method", "kind"), UNPARSEABLE_METHODS)
def test_a_request_that_does_not_parse_is_invalid_argument_for_every_method_and_not_logged(
    channel: grpc.Channel,
    target: RunningServer,
    caplog: pytest.LogCaptureFixture,
    method: str,
    kind: str,
    with_token: bool,
) -> None:
    caplog.set_level(logging.INFO)  # the least a server logs in production
    payloads = [b"\xff\xff\xff", b"\x0a\x05ab"]  # corrupt, truncated: no message type takes them
    for payload in payloads * 10:
        error = call_unparseable(channel, method, kind, payload, target.admin_token if with_token else None)
        if with_token or method.startswith(OPEN_PREFIXES):
            assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error
            assert "does not parse" in (error.details() or "")
            assert "class" not in (error.details() or "")
            assert "DecodeError" not in (error.details() or "")
        else:  # the caller is judged first
            assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert not caplog.records, caplog.text  # nothing, let alone a traceback per request
