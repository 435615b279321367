"""OpenTelemetry spans per RPC (tracing = "otlp"): what they say, what they never say, and
that with tracing off nothing of OpenTelemetry is even imported."""

from __future__ import annotations

import base64
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from keyguard import Decision, InvalidArgument, KeyType, Unauthenticated, sign_request
from keyguard.v1 import keyguard_pb2 as pb
from keyguard.v1 import keyguard_pb2_grpc as pb_grpc
from keyguard_server import Config, KeyguardServer
from keyguard_server._tracing import DECISION_ATTRIBUTE
from tests.conftest import FAST_ARGON2, LoopThread, RunningServer
from tests.processes import ServeProcess

BOT_IP = "203.0.113.7"
AUTHORIZE = "/keyguard.v1.Authorization/Authorize"


@pytest.fixture
def traced(loop_thread: LoopThread, tmp_path: Path) -> Iterator[tuple[RunningServer, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = Config(listen="127.0.0.1:0", data_dir=str(tmp_path / "data"), **FAST_ARGON2)  # type: ignore[arg-type]
    server = KeyguardServer(config, tracer_provider=provider)
    loop_thread.run(server.start())
    running = RunningServer(server, loop_thread)
    yield running, exporter
    running.stop()
    provider.shutdown()


def everything_in(span: ReadableSpan) -> str:
    """Every string a span exports: name, attributes, status, events and their attributes."""
    parts: list[Any] = [span.name, dict(span.attributes or {}), span.status.description]
    for event in span.events:
        parts += [event.name, dict(event.attributes or {})]
    parts += [dict(link.attributes or {}) for link in span.links]
    return repr(parts)


def test_spans_carry_the_decision_and_never_a_secret(traced: tuple[RunningServer, InMemorySpanExporter]) -> None:
    server, exporter = traced
    account = "acct-traced"
    with server.client() as client:
        key = client.create_key(account, "bot", "trade", [BOT_IP])
        signer = client.create_key(account, "signer", "trade", [BOT_IP], key_type=KeyType.ED25519)
        rotated = client.rotate_key(account, key.key.access_key, grace_seconds=0)
        assert client.authorize(key.key.access_key, rotated.private_key, BOT_IP, "trade").decision is Decision.ALLOW
        assert client.authorize(key.key.access_key, key.private_key, BOT_IP, "trade").decision is Decision.BAD_SECRET
        signed = sign_request(signer.private_key, signer.key.access_key, "POST /api/v3/order symbol=BTCUSDT")
        assert client.authorize(signer.key.access_key, "", BOT_IP, "trade", signed=signed).decision is Decision.ALLOW
        with pytest.raises(InvalidArgument):  # a malformed request: the status message is on the span
            client.authorize(key.key.access_key, rotated.private_key + "\x00", "not an ip", "trade")
        assert client.authorizer(streams=1).authorize(
            key.key.access_key, rotated.private_key, BOT_IP, "trade"
        ).decision is Decision.ALLOW  # fmt: skip
    wrong_token = "kgt_" + "w" * 40
    with server.client(token=wrong_token) as stranger, pytest.raises(Unauthenticated):
        stranger.list_keys(account)
    with grpc.insecure_channel(server.target) as channel:  # the authorization header, in user-agent's place
        stub = pb_grpc.AuthorizationStub(channel)
        stub.Authorize(
            pb.AuthorizeRequest(access_key=key.key.access_key, private_key=rotated.private_key, client_ip=BOT_IP,
                                required_permission=pb.PERMISSION_TRADE),
            metadata=(("authorization", f"Bearer {server.admin_token}"), ("x-api-secret", rotated.private_key)),
            timeout=10,
        )  # fmt: skip

    spans = exporter.get_finished_spans()
    by_name: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    decisions = [span.attributes.get(DECISION_ATTRIBUTE) for span in by_name[AUTHORIZE] if span.attributes]
    assert decisions == ["ALLOW", "BAD_SECRET", "ALLOW", None, "ALLOW"]  # None: INVALID_ARGUMENT, no decision
    (invalid,) = [s for s in by_name[AUTHORIZE] if s.attributes and s.attributes.get("rpc.grpc.status_code") == 3]
    # The caller's error, not the server's (semantic conventions), and no traceback of what it replaced:
    # exception messages and tracebacks belong in the log.
    assert invalid.status.status_code is StatusCode.UNSET
    assert "not an ip" not in everything_in(invalid) and "InvalidArgument" not in everything_in(invalid)
    assert by_name["/keyguard.v1.KeyManagement/ListKeys"][0].attributes["rpc.grpc.status_code"] == 16  # type: ignore[index]
    assert {"/keyguard.v1.KeyManagement/CreateKey", "/keyguard.v1.KeyManagement/RotateKey"} <= set(by_name)
    assert "/keyguard.v1.Authorization/AuthorizeStream" not in by_name  # streams are not traced

    signature_bytes = base64.b64decode(signed.signature)
    secrets = {
        "private key": key.private_key,
        "rotated private key": rotated.private_key,
        "ED25519 private key (PEM)": signer.private_key,
        "ED25519 private key (base64 body)": signer.private_key.splitlines()[1],
        "signature": signed.signature,
        "signature (hex)": signature_bytes.hex(),
        "admin token": server.admin_token,
        "wrong token": wrong_token,
        "authorization header": "Bearer ",
    }
    for span in spans:
        text = everything_in(span)
        for what, secret in secrets.items():
            assert secret not in text, f"{what} in span {span.name}: {text}"


def test_tracing_off_imports_nothing_of_opentelemetry(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from keyguard import Client
        from keyguard_server import Config, KeyguardServer

        async def main():
            server = KeyguardServer(Config(listen="127.0.0.1:0", data_dir={str(tmp_path)!r}, argon2_time_cost=1,
                                           argon2_memory_kib=1024, argon2_parallelism=1))
            await server.start()
            token = server.config.admin_token_file.read_text().strip()
            def use():
                with Client(f"127.0.0.1:{{server.port}}", token=token) as client:
                    key = client.create_key("acct", "bot", "read", [])
                    client.authorize(key.key.access_key, key.private_key, "192.0.2.1", "read")
            await asyncio.to_thread(use)
            await server.stop(0)

        asyncio.run(main())
        print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_tracing_without_the_packages_says_what_to_install(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import importlib.abc, sys

        class Uninstalled(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "opentelemetry":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
                return None

        sys.meta_path.insert(0, Uninstalled())
        from keyguard_server.cli import main
        sys.exit(main(["serve", "--listen", "127.0.0.1:0", "--data-dir", sys.argv[1]]))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "data")],
        capture_output=True, text=True, timeout=60, env={"KEYGUARD_TRACING": "otlp", "PATH": ""},
    )  # fmt: skip
    assert out.returncode == 1, out
    assert "pip install 'keyguard-server[tracing]'" in out.stderr, out.stderr
    assert not (tmp_path / "data").exists()  # refused before anything started


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver, as an OpenTelemetry collector listens on 4317."""

    def __init__(self) -> None:
        self.spans: list[Any] = []

    def Export(self, request: Any, context: Any) -> Any:
        for resource_spans in request.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}["service.name"]
            for scope in resource_spans.scope_spans:
                self.spans += [(service, span) for span in scope.spans]
        return trace_service_pb2.ExportTraceServiceResponse()


def test_keyguard_serve_exports_to_an_otlp_collector(tmp_path: Path) -> None:
    collector = Collector()
    receiver = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)  # type: ignore[no-untyped-call]
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    try:
        env = {"KEYGUARD_TRACING": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
               "OTEL_SERVICE_NAME": "keyguard-test"}  # fmt: skip
        server = ServeProcess(tmp_path, env=env)
        try:
            with server.client() as client:
                key = client.create_key("acct-otlp", "bot", "read", [])
                client.authorize(key.key.access_key, key.private_key, "192.0.2.1", "read")
        finally:
            assert server.terminate() == 0  # flushes what is buffered
    finally:
        receiver.stop(0)
    names = {(service, span.name) for service, span in collector.spans}
    assert ("keyguard-test", AUTHORIZE) in names, names
    (authorize,) = [span for _, span in collector.spans if span.name == AUTHORIZE]
    attributes = {a.key: a.value.string_value for a in authorize.attributes}
    assert attributes[DECISION_ATTRIBUTE] == "ALLOW"
    assert key.private_key not in str(collector.spans)
