"""Authorize throughput and latency against the gRPC ceiling, measured in one run.

Starts `keyguard serve` (real argon2 parameters, SQLite in a temporary data
dir), creates keys, and drives load with h2load (nghttp2-client; installed with
apt-get if missing) pinned to the other core:

  (a) a no-op unary RPC on the same server setup (grpc.health.v1 Check): the ceiling;
  (b) Authorize with a good, already verified secret;
  (c) the same while another process floods wrong secrets at 100/s;
  (d) (b) again on `--workers 2`.

Prints requests/s, p50 and p99 for each, and the ratios b/a and c/b.
Run: .venv/bin/python benchmarks/authorize.py [--requests 40000] [--streams 16]
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from keyguard import Client, Decision
from keyguard.v1 import keyguard_pb2 as pb

KEYGUARD = str(Path(sys.executable).parent / "keyguard")
BOT_IP = "203.0.113.7"


@dataclass
class Result:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    failed: int
    cpu_us: float  # server CPU time per request (single-worker rows), steadier than req/s on a noisy VM


def ensure_h2load() -> str:
    path = shutil.which("h2load")
    if path:
        return path
    print("h2load not found: installing nghttp2-client", file=sys.stderr)
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True)
    subprocess.run([*sudo, "apt-get", "install", "-y", "-qq", "nghttp2-client"], check=True)
    return shutil.which("h2load") or sys.exit("h2load still missing")


def pinned(cpu: int, command: list[str]) -> list[str]:
    """Runs the command on one core when taskset exists and there are two."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(cpu), *command]
    return command


class Server:
    def __init__(self, data_dir: Path, workers: int) -> None:
        self.data_dir = data_dir
        self.log = (data_dir / f"serve-{workers}.log").open("w")
        command = [KEYGUARD, "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data_dir)]
        command += ["--workers", str(workers)]
        self.proc = subprocess.Popen(
            pinned(0, command) if workers == 1 else command, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        text = ""
        while not (match := re.search(r"\(port (\d+)", text)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"keyguard did not start:\n{text}")
            time.sleep(0.1)
            text = (data_dir / f"serve-{workers}.log").read_text()
        self.port = int(match[1])
        self.token = (data_dir / "admin.token").read_text().strip()
        time.sleep(0.5 * workers)  # let every worker bind

    def client(self) -> Client:
        return Client(f"127.0.0.1:{self.port}", token=self.token)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.log.close()


def grpc_frame(message: bytes) -> bytes:
    return struct.pack(">?I", False, len(message)) + message


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def h2load(server: Server, path: str, body: bytes, name: str, requests: int, streams: int, work: Path) -> Result:
    body_file = work / f"{name}.bin"
    body_file.write_bytes(body)
    log_file = work / f"{name}.tsv"
    connections = max(1, streams // 4)
    command = [
        ensure_h2load(),
        "-n",
        str(requests),
        "-c",
        str(connections),
        "-m",
        str(streams // connections),
        "-t",
        "1",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "-H",
        f"authorization: Bearer {server.token}",
        "-d",
        str(body_file),
        f"--log-file={log_file}",
        f"http://127.0.0.1:{server.port}{path}",
    ]
    cpu_before = cpu_seconds(server.proc.pid)
    out = subprocess.run(pinned(1, command), capture_output=True, text=True, check=True).stdout
    cpu_us = (cpu_seconds(server.proc.pid) - cpu_before) / requests * 1e6
    rps = float(re.search(r"finished in [\d.]+s, ([\d.]+) req/s", out)[1])  # type: ignore[index]
    failed = int(re.search(r"requests: .* (\d+) failed", out)[1])  # type: ignore[index]
    latencies = sorted(int(line.split("\t")[2]) / 1000 for line in log_file.read_text().splitlines() if line)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return Result(name, rps, statistics.median(latencies), p99, failed, cpu_us)


def flood(port: int, token: str, access_key: str, rate: float, stop: multiprocessing.synchronize.Event) -> None:
    """Wrong but well-formed secrets from many IPs at ``rate`` per second; prints decisions seen."""
    seen: collections.Counter[str] = collections.Counter()
    wrong = "kgsk_" + "A" * 43 + "_" + "000000"
    with Client(f"127.0.0.1:{port}", token=token) as client:
        interval, next_at, i = 1 / rate, time.monotonic(), 0
        while not stop.is_set():
            result = client.authorize(access_key, wrong, f"198.51.100.{i % 250}", "trade")
            seen[result.decision.name] += 1
            i += 1
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
    print(f"  flood: {i} wrong secrets sent, decisions {dict(seen)}", file=sys.stderr)


def median_result(results: list[Result]) -> Result:
    return Result(
        results[0].name,
        statistics.median(r.rps for r in results),
        statistics.median(r.p50_ms for r in results),
        statistics.median(r.p99_ms for r in results),
        sum(r.failed for r in results),
        statistics.median(r.cpu_us for r in results),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (a), (b), (c); medians are reported")
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams (4 per connection)")
    parser.add_argument("--flood-rate", type=float, default=100.0, help="wrong secrets per second in (c)")
    args = parser.parse_args()
    ensure_h2load()
    rows: dict[str, list[Result]] = collections.defaultdict(list)
    health = "/grpc.health.v1.Health/Check"
    auth = "/keyguard.v1.Authorization/Authorize"
    with tempfile.TemporaryDirectory(prefix="keyguard-bench-") as tmp:
        work = Path(tmp)
        for workers in (1, 2):
            data = work / f"data-{workers}"
            data.mkdir()
            server = Server(data, workers)
            try:
                with server.client() as client:
                    created = client.create_key("acct-bench", "bot", "trade", [BOT_IP])
                    victim = client.create_key("acct-bench", "victim", "read").key.access_key
                    ak, sk = created.key.access_key, created.private_key
                request = pb.AuthorizeRequest(
                    access_key=ak, private_key=sk, client_ip=BOT_IP, required_permission=pb.PERMISSION_TRADE
                )
                body = grpc_frame(request.SerializeToString())
                # Every worker verifies once with argon2, then serves from its cache.
                for _ in range(workers * 20):
                    with server.client() as fresh:
                        assert fresh.authorize(ak, sk, BOT_IP, "trade").decision is Decision.ALLOW
                assert _raw_authorize_ok(server, request)
                if workers == 2:
                    rows["d"].append(
                        h2load(server, auth, body, "d-authorize-2-workers", args.requests, args.streams, work)
                    )
                    continue
                for _ in range(args.rounds):
                    rows["a"].append(
                        h2load(server, health, grpc_frame(b""), "a-noop", args.requests, args.streams, work)
                    )
                    rows["b"].append(h2load(server, auth, body, "b-authorize", args.requests, args.streams, work))
                    stop = multiprocessing.Event()
                    flooder = multiprocessing.Process(
                        target=flood, args=(server.port, server.token, victim, args.flood_rate, stop)
                    )
                    flooder.start()
                    time.sleep(1)
                    rows["c"].append(h2load(server, auth, body, "c-authorize+flood", args.requests, args.streams, work))
                    stop.set()
                    flooder.join()
                rows["e"].append(h2load(server, auth, body, "e-authorize-1-stream", args.requests // 4, 1, work))
                with server.client() as client:
                    assert client.authorize(ak, sk, BOT_IP, "trade").decision is Decision.ALLOW
            finally:
                server.stop()

    results = {name: median_result(runs) for name, runs in rows.items()}
    print(
        f"\nAuthorize benchmark: medians of {args.rounds} rounds of {args.requests} requests, "
        f"{args.streams} concurrent streams (e: 1), {os.cpu_count()} cores; h2load on core 1, "
        "one keyguard worker on core 0 (d: two workers, unpinned)\n"
    )
    print(f"{'':24} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7} {'server CPU us/req':>18}")
    for r in sorted(results.values(), key=lambda r: r.name):
        cpu = f"{r.cpu_us:18.0f}" if not r.name.startswith("d") else f"{'-':>18}"
        print(f"{r.name:24} {r.rps:9.0f} {r.p50_ms:8.2f} {r.p99_ms:8.2f} {r.failed:7d} {cpu}")
    a, b, c, d = (results[k] for k in "abcd")
    print(f"\nb/a = {b.rps / a.rps:.2f} (goal >= 0.7; by server CPU per request: {a.cpu_us / b.cpu_us:.2f})")
    print(f"c/b = {c.rps / b.rps:.2f} (goal >= 0.8)")
    print(
        f"p99(b) = {b.p99_ms:.2f} ms at {args.streams} streams (goal < 2 ms); at 1 stream: {results['e'].p99_ms:.2f} ms"
    )
    print(f"2 workers / 1 worker = {d.rps / b.rps:.2f}")


def _raw_authorize_ok(server: Server, request: pb.AuthorizeRequest) -> bool:
    """The exact bytes h2load sends, through a real gRPC client: they must be ALLOW."""
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        rpc = channel.unary_unary(
            "/keyguard.v1.Authorization/Authorize",
            request_serializer=lambda b: b,
            response_deserializer=pb.AuthorizeResponse.FromString,
        )
        response = rpc(request.SerializeToString(), metadata=(("authorization", f"Bearer {server.token}"),), timeout=10)
    return bool(response.allowed)


if __name__ == "__main__":
    main()
