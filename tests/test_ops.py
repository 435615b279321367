"""What operators rely on: metrics, structured logs, graceful shutdown."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from keyguard import Decision
from keyguard_server._metrics import WorkerMetrics
from tests.conftest import StartServer
from tests.databases import Postgres
from tests.processes import FAST_ARGON2_ENV, KEYGUARD, KEYGUARD_SERVER, ServeProcess


def metric(text: str, name: str, **labels: str) -> float:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{{{re.escape(label_text)}}} ([0-9.e+]+)$" if labels else rf"^{name} ([0-9.e+]+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match[1]) if match else 0.0


@pytest.mark.parametrize(("listen", "exposed"), [("0.0.0.0:0", "every interface"), ("127.0.0.1:0", None)])
def test_metrics_beyond_loopback_are_announced_with_a_warning(
    start_server: StartServer, caplog: pytest.LogCaptureFixture, listen: str, exposed: str | None
) -> None:
    caplog.set_level(logging.INFO, logger="keyguard")
    server = start_server(metrics_listen=listen)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    if exposed is None:
        assert warnings == []
        return
    (warning,) = warnings
    assert f"metrics_listen {listen}" in warning
    assert "without authentication" in warning and "decision counts" in warning and exposed in warning
    assert f":{server.server.metrics_port}/metrics" in warning


def test_the_supervisors_metrics_beyond_loopback_are_announced_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="keyguard")
    metrics = WorkerMetrics(str(tmp_path), "0.0.0.0:0")
    metrics.close()
    assert [r.levelno for r in caplog.records if "without authentication" in r.getMessage()] == [logging.WARNING]


def test_metrics_count_decisions_latency_and_argon2(start_server: StartServer, account: str) -> None:
    server = start_server(metrics_listen="127.0.0.1:0")
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"

    def scrape() -> str:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    before = scrape()
    with server.client() as client:
        key = client.create_key(account, "bot", "trade", ["192.0.2.1"])
        for _ in range(3):
            client.authorize(key.key.access_key, key.private_key, "192.0.2.1", "trade")
        client.authorize(key.key.access_key, key.private_key, "192.0.2.9", "trade")
        client.authorize("kg_" + "x" * 24, key.private_key, "192.0.2.1", "trade")
    after = scrape()

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("keyguard_authorize_decisions_total", decision="ALLOW") == 3
    assert delta("keyguard_authorize_decisions_total", decision="IP_NOT_ALLOWED") == 1
    assert delta("keyguard_authorize_decisions_total", decision="UNKNOWN_KEY") == 1
    assert delta("keyguard_argon2_verifications_total") == 1
    assert delta("keyguard_verify_cache_hits_total") == 2
    method = "/keyguard.v1.Authorization/Authorize"
    assert delta("keyguard_rpc_duration_seconds_count", method=method) == 5
    assert delta("keyguard_rpc_duration_seconds_count", method="/keyguard.v1.KeyManagement/CreateKey") == 1
    assert "keyguard_argon2_pending" in after
    assert key.private_key not in after and key.key.access_key not in after


def test_reflection_lists_every_service(start_server: StartServer) -> None:
    server = start_server()
    with grpc.insecure_channel(server.target) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {
        "keyguard.v1.KeyManagement",
        "keyguard.v1.Authorization",
        "envoy.service.auth.v3.Authorization",
        "grpc.health.v1.Health",
    } <= services


def test_json_logs_one_object_per_line_and_no_secrets(tmp_path: Path) -> None:
    env = {**os.environ, **FAST_ARGON2_ENV, "KEYGUARD_LOG_FORMAT": "json"}
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [KEYGUARD_SERVER, "serve", "--listen", "127.0.0.1:0"],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 20
            while not (match := re.search(r"\(port (\d+)", log_path.read_text())):
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.05)
            out = subprocess.run(
                [KEYGUARD, "--target", f"127.0.0.1:{match[1]}", "keys", "create", "acct", "--name", "b",
                 "--permission", "read", "--json"],
                cwd=tmp_path, capture_output=True, text=True, check=True,
            )  # fmt: skip
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(15) == 0
    secret = json.loads(out.stdout)["private_key"]
    lines = log_path.read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert {"time", "level", "logger", "process", "message"} <= set(entries[0])
    assert any("key created" in e["message"] for e in entries)
    assert secret not in log_path.read_text()


def test_sigterm_lets_in_flight_calls_finish(tmp_path: Path) -> None:
    # Slow argon2 (a hash verifies at the cost it was made with), so a call is still running
    # when SIGTERM arrives.
    server = ServeProcess(tmp_path, env={"KEYGUARD_ARGON2_TIME_COST": "8", "KEYGUARD_ARGON2_MEMORY_KIB": "65536"})
    results: list[Decision] = []
    with server.client() as client:
        key = client.create_key("acct-drain", "bot", "read", [])
        worker = threading.Thread(
            target=lambda: results.append(
                client.authorize(key.key.access_key, key.private_key, "192.0.2.1", "read").decision
            )
        )
        worker.start()
        time.sleep(0.1)  # the uncached verification is running now
        server.proc.send_signal(signal.SIGTERM)
        worker.join(20)
    assert results == [Decision.ALLOW]
    assert server.wait(20) == 0
    log = server.log.read_text()
    assert log.index("shutting down") < log.index("keyguard stopped")


def test_health_follows_the_database(start_server: StartServer, postgres: Postgres) -> None:
    """SERVING while the database answers; NOT_SERVING once it is gone (here: dropped under it)."""
    database = postgres.create()
    server = start_server(database=database, health_check_seconds=0.05)

    def status() -> int:
        with grpc.insecure_channel(server.target) as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)
            return int(health.Check(health_pb2.HealthCheckRequest(), timeout=5).status)

    assert status() == health_pb2.HealthCheckResponse.SERVING
    postgres.drop(database)
    deadline = time.monotonic() + 10
    while status() != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "health never noticed the database was gone"
        time.sleep(0.05)
