"""`keyguard-server serve --workers 2`: one metrics endpoint, in the supervisor, with the sum over the workers."""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry, multiprocess

from keyguard.v1 import keyguard_pb2 as pb
from keyguard.v1 import keyguard_pb2_grpc as pb_grpc
from tests.processes import ServeProcess
from tests.test_ops import metric

BOT_IP = "203.0.113.7"
CONNECTIONS = 16
CALLS_PER_CONNECTION = 4


def wait_for_log(server: ServeProcess, pattern: str, count: int = 1) -> list[str]:
    deadline = time.monotonic() + 20
    while len(found := re.findall(pattern, server.log.read_text())) < count:
        assert server.proc.poll() is None and time.monotonic() < deadline, server.log.read_text()
        time.sleep(0.05)
    return found


def decisions(text: str) -> float:
    return sum(float(v) for v in re.findall(r"^keyguard_authorize_decisions_total\{[^}]*\} (\S+)$", text, re.M))


def per_worker_decisions(directory: Path, scratch: Path) -> dict[int, float]:
    """Each worker's own counts, read from its counter file alone (public API only)."""
    counts = {}
    base = Path(tempfile.mkdtemp(dir=scratch))  # a call of its own: it may be asked again
    for file in directory.glob("counter_*.db"):
        alone = base / file.stem
        alone.mkdir()
        shutil.copy(file, alone)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(alone))  # type: ignore[no-untyped-call]
        counts[int(file.stem.split("_")[1])] = sum(
            s.value for m in registry.collect() if m.name == "keyguard_authorize_decisions" for s in m.samples
        )
    return counts


def test_one_endpoint_sums_every_worker(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    stale = data / "metrics-left-by-a-killed-supervisor"
    stale.mkdir()
    (stale / "counter_1.db").write_bytes(b"")
    server = ServeProcess(tmp_path, "--workers", "2", env={"KEYGUARD_METRICS_LISTEN": "127.0.0.1:0"})
    try:
        (port,) = wait_for_log(server, r"metrics on http://127\.0\.0\.1:(\d+)/metrics")
        wait_for_log(server, "keyguard serving", count=2)
        assert not stale.exists()  # swept at start: its supervisor is gone
        (directory,) = data.glob("metrics-*")
        assert directory.stat().st_mode & 0o777 == 0o700

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return str(response.read().decode())

        assert decisions(scrape()) == 0
        with server.client() as client:
            key = client.create_key("acct-workers", "bot", "trade", [BOT_IP])
        request = pb.AuthorizeRequest(
            access_key=key.key.access_key,
            private_key=key.private_key,
            client_ip=BOT_IP,
            required_permission=pb.PERMISSION_TRADE,
        )
        wrong_ip = pb.AuthorizeRequest()
        wrong_ip.CopyFrom(request)
        wrong_ip.client_ip = "198.51.100.9"
        token = (data / "admin.token").read_text().strip()

        def drive() -> None:
            """Several connections at once (a local subchannel pool each: grpcio would otherwise
            share one); SO_REUSEPORT hands each connection to one worker."""
            channels = [
                grpc.insecure_channel(server.target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(CONNECTIONS)
            ]
            try:
                for channel in channels:
                    stub = pb_grpc.AuthorizationStub(channel)
                    for i in range(CALLS_PER_CONNECTION):
                        metadata = (("authorization", f"Bearer {token}"),)
                        answer = stub.Authorize(wrong_ip if i == 0 else request, timeout=10, metadata=metadata)
                        assert answer.decision == (pb.DECISION_IP_NOT_ALLOWED if i == 0 else pb.DECISION_ALLOW)
            finally:
                for channel in channels:
                    channel.close()

        # The kernel's hash of each connection picks the worker: seldom, every connection of a batch
        # lands on one. Another batch then (at most three): a worker that never gets one is a bug.
        batches = 0
        while batches < 3 and (batches == 0 or not all(per_worker_decisions(directory, tmp_path).values())):
            drive()
            batches += 1
        text = scrape()
        total = batches * CONNECTIONS * CALLS_PER_CONNECTION
        assert decisions(text) == total
        assert metric(text, "keyguard_authorize_decisions_total", decision="IP_NOT_ALLOWED") == batches * CONNECTIONS
        assert metric(text, "keyguard_rpc_duration_seconds_count", method="/keyguard.v1.Authorization/Authorize") == (
            total
        )
        assert re.search(r"^keyguard_argon2_pending 0\.0$", text, re.M)  # livesum: one series, no pid label
        workers = per_worker_decisions(directory, tmp_path)
        assert len(workers) == 2 and sum(workers.values()) == total
        assert all(workers.values()), f"every connection went to one worker: {workers}"

        # A worker that exits: its counts stay in the sum, its live gauge leaves it.
        first = min(workers)
        assert (directory / f"gauge_livesum_{first}.db").exists()
        os.kill(first, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while (directory / f"gauge_livesum_{first}.db").exists():
            assert time.monotonic() < deadline, "the exited worker was not marked dead"
            time.sleep(0.05)
        assert decisions(scrape()) == total
    finally:
        assert server.terminate() == 0
    assert not list(data.glob("metrics-*")), "the supervisor left its metrics directory behind"
