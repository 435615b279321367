"""Authorize throughput and latency against the gRPC ceiling, on SQLite and PostgreSQL, in one run.

Starts `keyguard-server serve` (real argon2 parameters) once per backend: SQLite in a
temporary data dir, and PostgreSQL in a fresh database kg_bench_authorize_<random>
on 127.0.0.1:5432 (user postgres, trust auth; created with psycopg2 and dropped
again WITH (FORCE), also on failure). Creates keys, and drives load with h2load
(nghttp2-client; installed with apt-get if missing) pinned to core 1, the
single-worker servers pinned to core 0. Rows, named <row>/<backend>:

  (a) a no-op unary RPC on the same server setup (grpc.health.v1 Check): the ceiling;
  (b) Authorize with a good, already verified secret;
  (g) AuthorizeStream: 100 framed messages per h2load request, per decision;
  (h) an Envoy ext_authz Check (gRPC, straight from h2load) for the same key's order;
  (f) (b) while another process performs 100 management writes/s (audited, cheap:
      update_key enabled off/on, add/remove a withdrawal address, address
      management on/off) on 10 OTHER accounts through keyguard.Client, from
      --writer-threads threads on an absolute schedule;
  (c) (b) while another process floods wrong secrets at 100/s (SQLite only);
  (e) (b) with 1 stream (SQLite only);
  (d) (b) again on `--workers 2` (SQLite only, unpinned).

a, b, f (and c on SQLite) run in --rounds interleaved rounds, both backends'
servers up side by side; the table shows medians. Columns: requests/s, p50, p99,
failed requests, the server's CPU time per request (single-worker rows) and, on
PostgreSQL, the CPU time per request of the database's backends (utime+stime from
/proc for the pids in pg_stat_activity, 10 ms tick resolution). Per backend it
prints b/a by req/s and by server CPU per request, keyguard's own CPU per
Authorize (cpu(b) - cpu(a)), p99(b)/p99(a) and p99(f)/p99(b); then c/b, e and d.

Run: .venv/bin/python benchmarks/authorize.py [--requests 20000] [--rounds 3] [--streams 16]
     [--no-pg] [--write-rate 100] [--writer-threads 4]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import multiprocessing
import multiprocessing.queues
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import psycopg2

from _harness import KeyguardProcess, Measured, cpu_seconds, ensure_h2load, grpc_frame, pinned
from keyguard import Aborted, Client, CreatedKey, Decision, KeyguardError
from keyguard.v1 import keyguard_pb2 as pb
from keyguard_server._secrets import new_private_key
from keyguard_server.envoy.service.auth.v3 import external_auth_pb2 as ext

BOT_IP = "203.0.113.7"
PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
OTHER_ACCOUNTS = 10  # written to in (f), one key each
WRITE_STEPS = 6  # per account: disable, enable, add address, remove it, management on, off


@dataclass
class Result(Measured):
    cpu_us: float  # server CPU time per request (single-worker rows), steadier than req/s on a noisy VM
    pg_cpu_us: float | None = None  # PostgreSQL backends' CPU time per request


@dataclass
class Writes:
    done: int
    failed: int
    seconds: float
    p99_ms: float  # of the writes' own latency (a write waits for the loop and a database thread)


def pg_admin() -> Any:
    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres")
    conn.autocommit = True
    return conn


@contextlib.contextmanager
def pg_database() -> Iterator[str]:
    """A fresh database for one run, dropped again afterwards; yields its name."""
    name = f"kg_bench_authorize_{secrets.token_hex(4)}"
    admin = pg_admin()
    try:
        with admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
        yield name
    finally:
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


class PgBackendCpu:
    """utime+stime of one database's backends, read from /proc."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.conn = pg_admin()  # connected to `postgres`, so it never counts itself

    def snapshot(self) -> dict[int, float] | None:
        with self.conn.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.database,))
            pids = [int(row[0]) for row in cur.fetchall()]
        seconds: dict[int, float] = {}
        for pid in pids:
            try:
                seconds[pid] = cpu_seconds(pid)
            except FileNotFoundError:
                continue  # exited in between
            except OSError:
                return None  # not readable (other user, other host): no backend numbers
        return seconds

    @staticmethod
    def spent(before: dict[int, float] | None, after: dict[int, float] | None) -> float | None:
        if before is None or after is None:
            return None
        return sum(s - before.get(pid, 0.0) for pid, s in after.items())

    def close(self) -> None:
        self.conn.close()


class Server(KeyguardProcess):
    def __init__(self, data_dir: Path, workers: int, backend: str, database: str | None = None, **process: Any) -> None:
        self.backend = backend
        config = data_dir / "keyguard.toml"  # the Envoy Check rows need a route
        config.write_text('[[envoy_routes]]\npath_prefix = "/api/v3/order"\npermission = "trade"\n')
        args = ["--config", str(config)]
        if database:
            args += ["--database", f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"]
        self.pg = PgBackendCpu(database) if database else None
        super().__init__(data_dir, *args, workers=workers, log_name=f"serve-{workers}.log", **process)

    def client(self) -> Client:
        return Client(self.target, token=self.token)

    def stop(self, label: str = "") -> None:
        super().stop(label or f" ({self.backend})")
        if self.pg:
            self.pg.close()


def h2load(server: Server, path: str, body: bytes, name: str, requests: int, streams: int, work: Path) -> Result:
    file_stem = name.replace("/", "-")
    body_file = work / f"{file_stem}.bin"
    body_file.write_bytes(body)
    log_file = work / f"{file_stem}.tsv"
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
    pg_before = server.pg.snapshot() if server.pg else None
    cpu_before = cpu_seconds(server.proc.pid)
    out = subprocess.run(pinned(1, command), capture_output=True, text=True, check=True).stdout
    cpu_us = (cpu_seconds(server.proc.pid) - cpu_before) / requests * 1e6
    pg_cpu_us = None
    if server.pg and (spent := server.pg.spent(pg_before, server.pg.snapshot())) is not None:
        pg_cpu_us = spent / requests * 1e6
    rps = float(re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", out)[1])  # type: ignore[index]
    failed = int(re.search(r"requests: .* (\d+) failed", out)[1])  # type: ignore[index]
    latencies = sorted(int(line.split("\t")[2]) / 1000 for line in log_file.read_text().splitlines() if line)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return Result(name, rps, statistics.median(latencies), p99, failed, cpu_us, pg_cpu_us)


def flood(port: int, token: str, access_key: str, rate: float, stop: multiprocessing.synchronize.Event) -> None:
    """Wrong but well-formed secrets (a new one each call, so each reaches argon2) from many IPs at
    ``rate`` per second; prints decisions seen."""
    seen: collections.Counter[str] = collections.Counter()
    with Client(f"127.0.0.1:{port}", token=token) as client:
        interval, next_at, i = 1 / rate, time.monotonic(), 0
        while not stop.is_set():
            result = client.authorize(access_key, new_private_key(), f"198.51.100.{i % 250}", "trade")
            seen[result.decision.name] += 1
            i += 1
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
    print(f"  flood: {i} wrong secrets sent, decisions {dict(seen)}", file=sys.stderr)


def write_once(client: Client, account: str, access_key: str, step: int, addresses: dict[str, int]) -> None:
    """One cheap audited management write: step ``step`` of the account's cycle."""
    if step == 0:
        client.update_key(account, access_key, enabled=False)
    elif step == 1:
        client.update_key(account, access_key, enabled=True)
    elif step == 2 or (step == 3 and account not in addresses):
        address = f"bench{os.getpid()}x{secrets.token_hex(6)}"
        addresses[account] = client.add_withdrawal_address(account, "BTC", address, label="bench").id
    elif step == 3:
        client.remove_withdrawal_address(account, addresses.pop(account))
    else:
        client.set_address_management(account, step == 4)


def write_loop(
    target: str,
    token: str,
    accounts: list[tuple[str, str]],
    interval: float,
    next_at: float,
    stop: multiprocessing.synchronize.Event,
    counts: collections.Counter[str],
    latencies: list[float],
) -> None:
    """Cycles through ``accounts`` (owned by this thread alone), one write every ``interval`` seconds."""
    addresses: dict[str, int] = {}
    with Client(target, token=token) as client:
        i = 0
        while not stop.is_set():
            time.sleep(max(0.0, next_at - time.monotonic()))
            account, access_key = accounts[i % len(accounts)]
            try:
                started = time.perf_counter()
                write_once(client, account, access_key, (i // len(accounts)) % WRITE_STEPS, addresses)
                latencies.append(time.perf_counter() - started)
                counts["done"] += 1
            except KeyguardError as exc:
                counts["failed"] += 1
                counts[f"failed: {type(exc).__name__}"] += 1
            i += 1
            next_at += interval


def writer(
    port: int,
    token: str,
    accounts: list[tuple[str, str]],
    rate: float,
    threads: int,
    stop: multiprocessing.synchronize.Event,
    report: multiprocessing.queues.Queue[Writes],
) -> None:
    """Management writes on ``accounts`` at ``rate`` per second in all, split over ``threads`` threads."""
    start = time.monotonic()
    per_thread = [collections.Counter[str]() for _ in range(threads)]
    latencies: list[float] = []  # list.append is atomic: shared by the threads
    workers = [
        threading.Thread(
            target=write_loop,
            args=(
                f"127.0.0.1:{port}",
                token,
                accounts[t::threads],
                threads / rate,
                start + t / rate,
                stop,
                counts,
                latencies,
            ),
        )
        for t, counts in enumerate(per_thread)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    seconds = time.monotonic() - start
    total = sum(per_thread, collections.Counter[str]())
    errors = {k: v for k, v in total.items() if k.startswith("failed:")}
    latencies.sort()
    p99_ms = latencies[int(len(latencies) * 0.99)] * 1000 if latencies else float("nan")
    print(
        f"  writer: {total['done']} writes in {seconds:.1f}s = {total['done'] / seconds:.0f}/s "
        f"(target {rate:.0f}/s, {threads} threads), p99 {p99_ms:.0f} ms, {total['failed']} failed {errors or ''}",
        file=sys.stderr,
    )
    report.put(Writes(total["done"], total["failed"], seconds, p99_ms))


def median_result(results: list[Result]) -> Result:
    pg = [r.pg_cpu_us for r in results if r.pg_cpu_us is not None]
    return Result(
        results[0].name,
        statistics.median(r.rps for r in results),
        statistics.median(r.p50_ms for r in results),
        statistics.median(r.p99_ms for r in results),
        sum(r.failed for r in results),
        statistics.median(r.cpu_us for r in results),
        statistics.median(pg) if pg else None,
    )


@dataclass
class Setup:
    """One single-worker server with its keys and the exact Authorize request h2load sends."""

    server: Server
    body: bytes
    victim: str  # a key of the bot's account, for the wrong-secret flood
    others: list[tuple[str, str]]  # (account, access key) written to in (f)
    access_key: str
    private_key: str

    @property
    def check_body(self) -> bytes:
        """The Envoy ext_authz Check a bot's order through Envoy makes (h: per Check)."""
        request = ext.CheckRequest()
        http = request.attributes.request.http
        http.method, http.path = "POST", "/api/v3/order"
        http.headers.update({"x-api-key": self.access_key, "x-api-secret": self.private_key, ":authority": "api"})
        request.attributes.source.address.socket_address.address = BOT_IP
        return grpc_frame(request.SerializeToString())

    @property
    def stream_body(self) -> bytes:
        """STREAM_BATCH framed AuthorizeStream messages: one h2load request, that many decisions."""
        request = pb.AuthorizeRequest(
            access_key=self.access_key,
            private_key=self.private_key,
            client_ip=BOT_IP,
            required_permission=pb.PERMISSION_TRADE,
        )
        return b"".join(
            grpc_frame(pb.AuthorizeStreamRequest(id=i, request=request).SerializeToString())
            for i in range(STREAM_BATCH)
        )


def create_key(client: Client, account: str, name: str, permission: str, ips: list[str] | None = None) -> CreatedKey:
    """``client.create_key``, retried when it meets a lock timeout (seen on SQLite while the server prunes nonces)."""
    for attempt in range(3):
        try:
            return client.create_key(account, name, permission, ips or [])
        except Aborted:
            if attempt == 2:
                raise
            print(f"  create_key {account}/{name}: lock timeout, retrying", file=sys.stderr)
    raise AssertionError("unreachable")


def set_up(server: Server, workers: int, others: int = OTHER_ACCOUNTS) -> Setup:
    with server.client() as client:
        created = create_key(client, "acct-bench", "bot", "trade", [BOT_IP])
        victim = create_key(client, "acct-bench", "victim", "read").key.access_key
        accounts = [
            (f"acct-other-{i}", create_key(client, f"acct-other-{i}", "other", "trade").key.access_key)
            for i in range(others)
        ]
        ak, sk = created.key.access_key, created.private_key
    request = pb.AuthorizeRequest(
        access_key=ak, private_key=sk, client_ip=BOT_IP, required_permission=pb.PERMISSION_TRADE
    )
    # Every worker verifies once with argon2, then serves from its cache.
    for _ in range(workers * 20):
        with server.client() as fresh:
            assert fresh.authorize(ak, sk, BOT_IP, "trade").decision is Decision.ALLOW
    assert _raw_authorize_ok(server, request)
    return Setup(server, grpc_frame(request.SerializeToString()), victim, accounts, ak, sk)


HEALTH = "/grpc.health.v1.Health/Check"
AUTH = "/keyguard.v1.Authorization/Authorize"
STREAM = "/keyguard.v1.Authorization/AuthorizeStream"
CHECK = "/envoy.service.auth.v3.Authorization/Check"
STREAM_BATCH = 100  # AuthorizeStream messages per h2load request (g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of a, b, f (and c); medians are reported")
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams (4 per connection)")
    parser.add_argument("--flood-rate", type=float, default=100.0, help="wrong secrets per second in (c)")
    parser.add_argument("--write-rate", type=float, default=100.0, help="management writes per second in (f)")
    parser.add_argument(
        "--writer-threads", type=int, default=4, help="threads sharing the writes in (f): one alone falls behind fsyncs"
    )
    parser.add_argument("--no-pg", action="store_true", help="SQLite only")
    args = parser.parse_args()
    ensure_h2load()
    backends = ("sqlite",) if args.no_pg else ("sqlite", "postgresql")
    rows: dict[tuple[str, str], list[Result]] = collections.defaultdict(list)
    writes: dict[str, list[Writes]] = collections.defaultdict(list)

    def measure(row: str, name: str, setup: Setup, path: str, body: bytes, requests: int, streams: int) -> None:
        backend = setup.server.backend
        started = time.strftime("%H:%M:%S")
        result = h2load(setup.server, path, body, f"{name}/{backend}", requests, streams, work)
        if path == STREAM:  # per decision, not per h2load request of STREAM_BATCH of them
            result = dataclasses.replace(
                result,
                rps=result.rps * STREAM_BATCH,
                cpu_us=result.cpu_us / STREAM_BATCH,
                pg_cpu_us=None if result.pg_cpu_us is None else result.pg_cpu_us / STREAM_BATCH,
            )
        print(f"  {started} {result.name}: {result.rps:.0f} req/s, p99 {result.p99_ms:.2f} ms", file=sys.stderr)
        rows[row, backend].append(result)

    with tempfile.TemporaryDirectory(prefix="keyguard-bench-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        setups: list[Setup] = []
        for backend in backends:
            data = work / f"data-{backend}-1"
            data.mkdir()
            database = stack.enter_context(pg_database()) if backend == "postgresql" else None
            server = Server(data, 1, backend, database)
            stack.callback(server.stop)
            setups.append(set_up(server, 1))
        for _ in range(args.rounds):
            for setup in setups:
                server, body = setup.server, setup.body
                measure("a", "a-noop", setup, HEALTH, grpc_frame(b""), args.requests, args.streams)
                measure("b", "b-authorize", setup, AUTH, body, args.requests, args.streams)
                measure("g", "g-stream-decision", setup, STREAM, setup.stream_body, args.requests // STREAM_BATCH, 4)
                measure("h", "h-envoy-check", setup, CHECK, setup.check_body, args.requests, args.streams)
                if server.backend == "sqlite":
                    stop = multiprocessing.Event()
                    flooder = multiprocessing.Process(
                        target=flood, args=(server.port, server.token, setup.victim, args.flood_rate, stop)
                    )
                    flooder.start()
                    time.sleep(1)
                    measure("c", "c-authorize+flood", setup, AUTH, body, args.requests, args.streams)
                    stop.set()
                    flooder.join()
                stop = multiprocessing.Event()
                report: multiprocessing.queues.Queue[Writes] = multiprocessing.Queue()
                write_args = (server.port, server.token, setup.others, args.write_rate, args.writer_threads)
                writing = multiprocessing.Process(target=writer, args=(*write_args, stop, report))
                writing.start()
                time.sleep(1)
                measure("f", "f-authorize+writes", setup, AUTH, body, args.requests, args.streams)
                stop.set()
                writes[server.backend].append(report.get(timeout=60))
                writing.join()
        sqlite = setups[0]
        measure("e", "e-authorize-1-stream", sqlite, AUTH, sqlite.body, args.requests // 4, 1)
        for setup in setups:
            with setup.server.client() as client:
                assert client.authorize(setup.access_key, setup.private_key, BOT_IP, "trade").decision is Decision.ALLOW
        stack.close()  # stops the single-worker servers, drops the database

        data = work / "data-sqlite-2"
        data.mkdir()
        server = Server(data, 2, "sqlite")
        try:
            two = set_up(server, 2, others=0)
            measure("d", "d-authorize-2-workers", two, AUTH, two.body, args.requests, args.streams)
        finally:
            server.stop()

    report_results({key: median_result(runs) for key, runs in rows.items()}, writes, backends, args)


def report_results(
    results: dict[tuple[str, str], Result],
    writes: dict[str, list[Writes]],
    backends: tuple[str, ...],
    args: argparse.Namespace,
) -> None:
    print(
        f"\nAuthorize benchmark: medians of {args.rounds} rounds of {args.requests} requests, "
        f"{args.streams} concurrent streams (e: 1), {os.cpu_count()} cores; h2load on core 1, "
        "one keyguard worker on core 0 (d: two workers, unpinned; PostgreSQL unpinned)\n"
    )
    header = f"{'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'failed':>7} {'server CPU us/req':>18} {'PG CPU us/req':>14}"
    print(f"{'':30} {header}")
    for (row, _), r in sorted(results.items(), key=lambda item: (backends.index(item[0][1]), item[0][0])):
        cpu = f"{r.cpu_us:18.0f}" if row != "d" else f"{'-':>18}"
        pg = f"{r.pg_cpu_us:14.1f}" if r.pg_cpu_us is not None else f"{'-':>14}"
        print(f"{r.name:30} {r.rps:9.0f} {r.p50_ms:8.2f} {r.p99_ms:8.2f} {r.failed:7d} {cpu} {pg}")
    for backend in backends:
        a, b, f = (results[row, backend] for row in "abf")
        w = writes[backend]
        rate = statistics.median(x.done / x.seconds for x in w)
        goal = " (goal >= 0.7)" if backend == "postgresql" else ""
        print(f"\n{backend}:")
        print(f"  b/a = {b.rps / a.rps:.2f} by req/s{goal}, {a.cpu_us / b.cpu_us:.2f} by server CPU per request")
        print(f"  keyguard CPU per Authorize = cpu(b) - cpu(a) = {b.cpu_us - a.cpu_us:.0f} us (goal <= 40)")
        h = results["h", backend]
        print(f"  keyguard CPU per Envoy Check = cpu(h) - cpu(a) = {h.cpu_us - a.cpu_us:.0f} us (goal <= 60)")
        g = results["g", backend]
        print(
            f"  AuthorizeStream: {g.rps:.0f} decisions/s at {g.cpu_us:.0f} us server CPU per decision: "
            f"CPU/decision = {g.cpu_us / b.cpu_us:.2f} of unary (goal <= 0.33), "
            f"decisions/s = {g.rps / b.rps:.1f}x unary (goal >= 3)"
        )
        print(f"  p99(b)/p99(a) = {b.p99_ms / a.p99_ms:.2f} ({b.p99_ms:.2f} / {a.p99_ms:.2f} ms)")
        print(
            f"  p99(f)/p99(b) = {f.p99_ms / b.p99_ms:.2f} (goal <= 1.5); f/b = {f.rps / b.rps:.2f} by req/s; "
            f"writer {rate:.0f} writes/s (target {args.write_rate:.0f}), "
            f"write p99 {statistics.median(x.p99_ms for x in w):.0f} ms, {sum(x.failed for x in w)} failed"
        )
        if b.pg_cpu_us is not None and f.pg_cpu_us is not None:
            print(f"  PostgreSQL backends' CPU per request: b {b.pg_cpu_us:.1f} us, f {f.pg_cpu_us:.1f} us")
    b, c, d, e = (results[row, "sqlite"] for row in "bcde")
    print(f"\nc/b = {c.rps / b.rps:.2f} (goal >= 0.8, sqlite)")
    print(f"p99(e) at 1 stream = {e.p99_ms:.2f} ms (sqlite)")
    print(f"2 workers / 1 worker = {d.rps / b.rps:.2f} (sqlite)")


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
