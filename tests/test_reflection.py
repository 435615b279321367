"""Server reflection v1 (what grpcurl and `buf curl` try first) next to v1alpha, open to anyone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2

from tests.conftest import RunningServer, StartServer

BUF = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
KEYGUARD_SERVICES = {"keyguard.v1.KeyManagement", "keyguard.v1.Authorization", "envoy.service.auth.v3.Authorization"}


@pytest.fixture(scope="module")
def keyguard(launch: StartServer) -> Any:
    running = launch()
    yield running
    running.stop()


def reflect(target: str, version: str, *requests: reflection_pb2.ServerReflectionRequest) -> list[Any]:
    """Raw reflection calls (no credentials) on /grpc.reflection.<version>.ServerReflection.
    v1's messages are v1alpha's under another package: same fields, same numbers, same bytes."""
    with grpc.insecure_channel(target) as channel:
        info = channel.stream_stream(
            f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        return list(info(iter(requests), timeout=10))


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_lists_services_and_resolves_files(keyguard: RunningServer, version: str) -> None:
    listed, by_symbol, by_name = reflect(
        keyguard.target,
        version,
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="keyguard.v1.KeyManagement"),
        reflection_pb2.ServerReflectionRequest(file_by_filename="grpc/reflection/v1/reflection.proto"),
    )
    services = {s.name for s in listed.list_services_response.service}
    assert {*KEYGUARD_SERVICES, "grpc.health.v1.Health"} <= services
    assert {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"} <= services
    files = {}
    for raw in by_symbol.file_descriptor_response.file_descriptor_proto:
        file = descriptor_pb2.FileDescriptorProto.FromString(raw)
        files[file.name] = file
    assert "keyguard/v1/keyguard.proto" in files  # with its dependencies, so a client can build every type
    assert "CreateKey" in {m.name for s in files["keyguard/v1/keyguard.proto"].service for m in s.method}
    (v1_file,) = (descriptor_pb2.FileDescriptorProto.FromString(raw)
                  for raw in by_name.file_descriptor_response.file_descriptor_proto)  # fmt: skip
    assert (v1_file.package, v1_file.service[0].name) == ("grpc.reflection.v1", "ServerReflection")
    assert v1_file.service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"


@pytest.mark.skipif(BUF is None, reason="buf not installed (pip install buf-bin)")
def test_buf_curl_calls_keyguard_through_reflection_v1(keyguard: RunningServer, account: str) -> None:
    """A third-party client that knows no keyguard proto: lists services and calls an RPC,
    resolving its schema over reflection v1 only."""
    assert BUF is not None
    base = ["--protocol", "grpc", "--http2-prior-knowledge", "--reflect-protocol", "grpc-v1"]
    url = f"http://{keyguard.target}"
    listed = subprocess.run([BUF, "curl", *base, "--list-services", url], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) >= KEYGUARD_SERVICES
    with keyguard.client() as client:
        client.create_key(account, "bot", "read", [])
    called = subprocess.run(
        [BUF, "curl", *base, "--header", f"authorization: Bearer {keyguard.admin_token}",
         "--data", json.dumps({"accountId": account}), f"{url}/keyguard.v1.KeyManagement/ListKeys"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert called.returncode == 0, called.stderr
    assert [k["name"] for k in json.loads(called.stdout)["keys"]] == ["bot"]
