"""A good key's cached Authorize while another key of its account is flooded with wrong secrets.

Per row (flood source x offered rate) it starts a fresh `keyguard-server serve` (SQLite in a
temporary data dir, one worker pinned to core 0, the argon2 parameters of --argon2) and
creates two keys of one account with :func:`authorize.set_up`: the bot's TRADE key
(allowlisted to 203.0.113.7, its secret verified once, so every later call is a cache hit)
and a READ key without an allowlist, the flood's victim. Then two phases of --seconds each:

  alone  h2load (core 1, --streams streams) sends the bot's Authorize, nothing else runs;
  flood  the same, while a separate process (also on core 1) sends the victim's access key
         with wrong but well-formed secrets (``_secrets.new_private_key()``: right prefix and
         checksum, so each one reaches argon2) on an open-loop schedule at the offered rate,
         from an asyncio gRPC client (grpc.aio): at most --in-flight calls at once (a send
         due while that many are out is skipped and counted as such, never delayed), each
         with a --deadline. The flood starts 3 s before h2load (connected, and past the
         failure buckets' burst and its argon2 runs); only calls sent while h2load runs count.

A fresh server per row keeps rows independent of each other's failure buckets, caches and
argon2 timing; "alone" is measured on that same server just before its flood, so the ratio
cancels drift between rows. Compare figures within one run (one machine, one moment): the
absolute numbers move with the machine and whatever else it runs.

Flood sources (the AuthorizeRequest's client_ip, which the gateway fills in):

  one-address  192.0.2.10 every time
  one-/24      a random address of 198.51.100.0/24 per call
  all-ipv4     a random IPv4 address per call (any of the 2**32 but the bot's)
  ipv6-/64s    a random address of 2000::/3 per call: a random /64, a random host part
  repeat-5     the same 5 wrong secrets in turn, from random addresses of 198.51.100.0/24
  unknown-key  the control: access keys of no key (UNKNOWN_KEY, decided at once without a
               wait), from random addresses of 198.51.100.0/24: what any flood of that many
               Authorize calls costs the loop, argon2 or not

Columns, good key (h2load): req/s alone and with the flood, and flood / alone; p50 and p99
latency (ms) alone -> flood; the server process's own CPU per good request (utime+stime of
all its threads from /proc/<pid>/stat over the phase / good requests done; in the flood
phase this includes the flood's own cost outside argon2, all of it charged to the good
requests), and "loop": its main thread's (the event loop's) share of that in the flood phase.

argon2: the server runs argon2 (verifications, and hashing new secrets) in child processes
of its own (`<python> -I .../keyguard_server/_argon2_worker.py T M P`, at nice 19), so
their CPU time is on none of the server's threads. They inherit the server's pinning to core
0; with --argon2-cores all (the default) they are let onto every core again, as they are in
production, where nothing is pinned (the loop's pinning is a measuring device). Counted as
argon2: the utime+stime gained over the flood phase by the server's
child processes (found by their ppid in /proc/*/stat) whose command line names
_argon2_worker. Shown as a share of the machine's cores (argon2 CPU seconds / (phase
seconds x os.cpu_count()): what the server's budget, argon2_cpu_share, default 0.5, bounds)
and as a share of the CPU of the server and argon2 together. An
argon2 process that ends during a phase takes its CPU time with it (a warning says so).

Flood columns: the achieved send rate (calls sent during the phase / its seconds; skipped
sends, if any, follow in brackets), the client's own CPU use (of core 1, shared with h2load),
the decisions the flood got back, counted by name (Decision names, "gRPC <code>" for a call
that failed, e.g. gRPC DEADLINE_EXCEEDED), and the p50 latency of all its calls.

Run: .venv/bin/python benchmarks/flood.py [--seconds 8] [--rates 100,1000] [--sources one-address,...]
     [--argon2 default|moderate] [--server-arg=--config=extra.toml] [--quick]
(the machine needs two cores for the pinning to mean anything; h2load is installed with apt-get if missing)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ipaddress
import multiprocessing
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from authorize import AUTH, BOT_IP, Server, Setup, set_up

from _harness import KeyguardProcess, h2load_grpc
from keyguard.v1 import keyguard_pb2 as pb
from keyguard_server._secrets import new_access_key, new_private_key

SOURCES = ("one-address", "one-/24", "all-ipv4", "ipv6-/64s", "repeat-5", "unknown-key")
ONE_ADDRESS = "192.0.2.10"
ONE_24 = "198.51.100."
GLOBAL_UNICAST_V6 = 1 << 125  # 2000::/3: the top three bits 001
# --argon2 moderate, as the servers' environment (which overrides a --config file's values)
MODERATE_ARGON2 = {
    "KEYGUARD_ARGON2_TIME_COST": "2",
    "KEYGUARD_ARGON2_MEMORY_KIB": "16384",
    "KEYGUARD_ARGON2_PARALLELISM": "1",
}
FLOOD_CPU = 1  # the flooder's core: the clients' side, with h2load
SETTLE_SECONDS = 3.0  # the flood runs this long before h2load starts: past the failure buckets' burst
ARGON2_WORKER = b"_argon2_worker"  # in the command line of the server's argon2 processes


# -- the flooder (a process of its own) ---------------------------------------------------------


@dataclass
class FloodReport:
    records: list[tuple[float, float, str]]  # (sent at, seconds to its answer, outcome), monotonic clock
    skipped: list[float]  # when a send was due but --in-flight calls were out
    cpu_seconds: float  # the flooder's own CPU time
    seconds: float  # from its first send to its last answer


def client_ips(source: str, rng: random.Random) -> str:
    """The client_ip of the flood's next call."""
    if source == "one-address":
        return ONE_ADDRESS
    if source in ("one-/24", "repeat-5", "unknown-key"):
        return f"{ONE_24}{rng.randrange(256)}"
    if source == "all-ipv4":
        while (ip := str(ipaddress.IPv4Address(rng.getrandbits(32)))) == BOT_IP:
            pass
        return ip
    if source == "ipv6-/64s":
        return str(ipaddress.IPv6Address(GLOBAL_UNICAST_V6 | rng.getrandbits(125)))
    raise ValueError(f"unknown flood source {source!r}")


@dataclass(frozen=True)
class FloodPlan:
    """What the flood process sends, to whom, how fast."""

    target: str
    token: str
    access_key: str
    source: str
    rate: float
    max_in_flight: int
    deadline: float


async def _flood(plan: FloodPlan, ready: Any, stop: Any) -> FloodReport:
    target, token, access_key, source = plan.target, plan.token, plan.access_key, plan.source
    rate, max_in_flight, deadline = plan.rate, plan.max_in_flight, plan.deadline
    rng = random.Random()  # addresses, not secrets
    repeated = [new_private_key() for _ in range(5)]
    records: list[tuple[float, float, str]] = []
    skipped: list[float] = []
    tasks: set[asyncio.Task[None]] = set()
    metadata = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 30)
        call = channel.unary_unary(
            AUTH,
            request_serializer=pb.AuthorizeRequest.SerializeToString,
            response_deserializer=pb.AuthorizeResponse.FromString,
        )

        async def one(request: pb.AuthorizeRequest, sent: float) -> None:
            try:
                response = await call(request, metadata=metadata, timeout=deadline)
                outcome = pb.Decision.Name(response.decision).removeprefix("DECISION_")
            except grpc.aio.AioRpcError as exc:
                outcome = f"gRPC {exc.code().name}"
            records.append((sent, time.monotonic() - sent, outcome))

        cpu_before = time.process_time()
        ready.set()
        start = time.monotonic()
        sent = 0
        while not stop.is_set():
            due = start + sent / rate
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(min(due - now, 0.05))
                continue
            sent += 1
            if len(tasks) >= max_in_flight:
                skipped.append(due)
                continue
            secret = repeated[sent % len(repeated)] if source == "repeat-5" else new_private_key()
            request = pb.AuthorizeRequest(
                access_key=new_access_key() if source == "unknown-key" else access_key,
                private_key=secret,
                client_ip=client_ips(source, rng),
                required_permission=pb.PERMISSION_READ,
            )
            task = asyncio.create_task(one(request, now))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)  # each ends by its deadline
        return FloodReport(records, skipped, time.process_time() - cpu_before, time.monotonic() - start)


def flooder(plan: FloodPlan, ready: Any, stop: Any, results: Any) -> None:
    """The flood process: runs until ``stop``, then puts its :class:`FloodReport` on ``results``."""
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {FLOOD_CPU})
    results.put(asyncio.run(_flood(plan, ready, stop)))


# -- the server's CPU time, and its argon2 processes' ---------------------------------------------


def _seconds(stat_fields: list[str]) -> float:
    """utime + stime of a /proc/<pid>/stat (its fields after the comm)."""
    return (int(stat_fields[11]) + int(stat_fields[12])) / os.sysconf("SC_CLK_TCK")


def _stat_fields(path: Path) -> list[str]:
    return path.read_text().rsplit(")", 1)[1].split()  # from field 3, the state; ppid is [1]


def argon2_processes(pid: int) -> dict[int, float]:
    """The CPU seconds of each of the server's child processes that runs _argon2_worker, by pid."""
    found: dict[int, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):  # ended meanwhile, or not ours to read
            fields = _stat_fields(proc / "stat")
            if int(fields[1]) == pid and ARGON2_WORKER in (proc / "cmdline").read_bytes():
                found[int(proc.name)] = _seconds(fields)
    return found


@dataclass
class CpuSnapshot:
    server: float  # the server process, all its threads (exited ones included; its children not)
    loop: float  # its main thread: the event loop
    argon2: dict[int, float]  # its argon2 processes: pid -> CPU seconds

    @classmethod
    def of(cls, pid: int) -> CpuSnapshot:
        return cls(
            _seconds(_stat_fields(Path(f"/proc/{pid}/stat"))),
            _seconds(_stat_fields(Path(f"/proc/{pid}/task/{pid}/stat"))),
            argon2_processes(pid),
        )


@dataclass
class CpuSplit:
    server: float
    loop: float
    argon2: float


def cpu_split(before: CpuSnapshot, after: CpuSnapshot) -> CpuSplit:
    """CPU seconds between two snapshots: the server process's, its main thread's, argon2's."""
    if ended := sorted(set(before.argon2) - set(after.argon2)):
        print(f"  argon2 processes {ended} ended during the phase: their CPU time is not counted", file=sys.stderr)
    argon2 = sum(seconds - before.argon2.get(pid, 0.0) for pid, seconds in after.argon2.items())
    return CpuSplit(after.server - before.server, after.loop - before.loop, argon2)


# -- the phases ----------------------------------------------------------------------------------


class FloodServer(Server):
    """authorize.Server (for :func:`authorize.set_up`) without its Envoy config: `serve` with ``args``."""

    def __init__(self, data_dir: Path, args: list[str]) -> None:
        self.backend = "sqlite"
        self.pg = None
        KeyguardProcess.__init__(self, data_dir, *args)


@dataclass
class Phase:
    rps: float
    p50_ms: float
    p99_ms: float
    failed: int
    done: int
    cpu: CpuSplit
    seconds: float
    flood: dict[str, Any] = field(default_factory=dict)

    @property
    def server_us(self) -> float:
        """The server process's own CPU per good request (argon2's processes not included)."""
        return self.cpu.server / max(1, self.done) * 1e6

    @property
    def argon2_of_cores(self) -> float:
        """argon2's CPU as a share of the machine's cores over the phase (what its budget bounds)."""
        return self.cpu.argon2 / (self.seconds * (os.cpu_count() or 1))

    @property
    def argon2_of_cpu(self) -> float:
        """argon2's part of the CPU of the server and argon2 together."""
        return self.cpu.argon2 / ((self.cpu.server + self.cpu.argon2) or float("nan"))


def measure(
    setup: Setup,
    work: Path,
    name: str,
    args: argparse.Namespace,
    flood: tuple[str, float] | None,
) -> Phase:
    """One phase: h2load for --seconds, with a flood (source, rate) running or not."""
    server = setup.server
    body_file = work / f"{name}.bin"
    body_file.write_bytes(setup.body)
    context = multiprocessing.get_context("spawn")  # no fork of a process that has used gRPC
    ready, stop, results = context.Event(), context.Event(), context.Queue()
    process = None
    if flood:
        source, rate = flood
        plan = FloodPlan(server.target, server.token, setup.victim, source, rate, args.in_flight, args.deadline)
        process = context.Process(target=flooder, args=(plan, ready, stop, results))
        process.start()
        if not ready.wait(60):
            process.kill()
            sys.exit("the flooder did not connect")
        time.sleep(SETTLE_SECONDS)
    try:
        before = CpuSnapshot.of(server.proc.pid)
        started = time.monotonic()
        row, done = h2load_grpc(
            server.port, server.token, AUTH, body_file, work / f"{name}.tsv", streams=args.streams, seconds=args.seconds
        )
        ended = time.monotonic()
        after = CpuSnapshot.of(server.proc.pid)
    finally:
        stop.set()
    cpu = cpu_split(before, after)
    phase = Phase(row.rps, row.p50_ms, row.p99_ms, row.failed, done, cpu, ended - started)
    if process is not None:
        report: FloodReport = results.get(timeout=args.deadline + 60)
        process.join(30)
        phase.flood = flood_summary(report, started, ended)
    return phase


def flood_summary(report: FloodReport, started: float, ended: float) -> dict[str, Any]:
    """The flood's calls sent while h2load ran: achieved rate, outcomes by name, p50 latency."""
    window = [(seconds, outcome) for sent, seconds, outcome in report.records if started <= sent < ended]
    skipped = sum(started <= due < ended for due in report.skipped)
    outcomes = collections.Counter(outcome for _, outcome in window)
    latencies = [seconds for seconds, _ in window]
    return {
        "sent_per_s": len(window) / (ended - started),
        "skipped_per_s": skipped / (ended - started),
        "outcomes": outcomes,
        "p50_ms": statistics.median(latencies) * 1000 if latencies else float("nan"),
        "client_cpu": report.cpu_seconds / report.seconds if report.seconds else float("nan"),
    }


@dataclass
class Row:
    source: str
    rate: float
    alone: Phase
    flooded: Phase


def run_row(source: str, rate: float, args: argparse.Namespace, work: Path) -> Row:
    """A fresh server, its keys, a warm-up, then alone and flooded."""
    stem = f"{source.replace('/', '')}-{rate:g}"
    data = work / f"data-{stem}"
    data.mkdir()
    server = FloodServer(data, args.server_arg)
    try:
        setup = set_up(server, 1, others=0)
        if args.argon2_cores == "all":  # as in production: only the loop is pinned, to measure it
            for pid in argon2_processes(server.proc.pid):
                os.sched_setaffinity(pid, range(os.cpu_count() or 1))
        warm = work / f"warm-{stem}.bin"
        warm.write_bytes(setup.body)
        h2load_grpc(server.port, server.token, AUTH, warm, work / f"warm-{stem}.tsv", streams=args.streams, seconds=1)
        alone = measure(setup, work, f"alone-{stem}", args, None)
        flooded = measure(setup, work, f"flood-{stem}", args, (source, rate))
    finally:
        server.stop(f" ({source} at {rate:g}/s)")
    return Row(source, rate, alone, flooded)


# -- the report ----------------------------------------------------------------------------------


def outcome_text(outcomes: collections.Counter[str]) -> str:
    return ", ".join(f"{name} {count}" for name, count in outcomes.most_common()) or "-"


def print_header(args: argparse.Namespace) -> None:
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "?"
    argon2 = "time_cost 2, memory 16 MiB, parallelism 1" if args.argon2 == "moderate" else "the server's defaults"
    print(f"# keyguard flood benchmark, {time.strftime('%Y-%m-%d %H:%M')}\n")
    print(f"- commit {commit}; {platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    print(f"- load average at start {' '.join(os.getloadavg().__repr__().strip('()').split(', '))}")
    print(f"- Python {platform.python_version()}, grpcio {grpc.__version__}; argon2: {argon2}")
    print(
        f"- per row a fresh server (one worker, core 0); h2load {args.streams} streams on core 1 for "
        f"{args.seconds:g} s alone, then {args.seconds:g} s under the flood (flooder on core 1, "
        f"<= {args.in_flight} in flight, deadline {args.deadline:g} s)"
    )
    if args.server_arg:
        print(f"- serve arguments: {' '.join(args.server_arg)}")
    print()


def print_table(rows: list[Row]) -> None:
    print(
        "| source | offered/s | sent/s | flood CPU | good req/s alone | flooded | ratio | p50 ms | p99 ms "
        "| server CPU us/good | loop share | argon2 of cores | argon2 of server+argon2 "
        "| flood decisions | flood p50 ms |"
    )
    print("|" + "---|" * 15)
    for r in rows:
        a, f, fl = r.alone, r.flooded, r.flooded.flood
        sent = f"{fl['sent_per_s']:.0f}" + (f" ({fl['skipped_per_s']:.0f} skipped)" if fl["skipped_per_s"] else "")
        print(
            f"| {r.source} | {r.rate:g} | {sent} | {fl['client_cpu']:.0%} | {a.rps:.0f} | {f.rps:.0f} "
            f"| {f.rps / a.rps:.2f} | {a.p50_ms:.2f} -> {f.p50_ms:.2f} | {a.p99_ms:.2f} -> {f.p99_ms:.2f} "
            f"| {a.server_us:.0f} -> {f.server_us:.0f} | {f.cpu.loop / (f.cpu.server or float('nan')):.0%} "
            f"| {f.argon2_of_cores:.0%} | {f.argon2_of_cpu:.0%} "
            f"| {outcome_text(fl['outcomes'])} | {fl['p50_ms']:.0f} |"
        )
    failed = [(r.source, r.rate, r.alone.failed, r.flooded.failed) for r in rows if r.alone.failed or r.flooded.failed]
    for source, rate, alone, flooded in failed:
        print(f"\n{source} at {rate:g}/s: h2load failed requests: alone {alone}, flooded {flooded}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, help="seconds per phase (default 8; --quick 2)")
    parser.add_argument("--rates", help="offered wrong secrets per second, comma-separated (default 100,1000)")
    parser.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated, of {', '.join(SOURCES)}")
    parser.add_argument("--argon2", choices=("default", "moderate"), default="default")
    parser.add_argument(
        "--argon2-cores",
        choices=("all", "server"),
        default="all",
        help="where the argon2 processes may run: every core, as unpinned in production (default), "
        "or only the server's core 0, which they inherit from its pinning",
    )
    parser.add_argument("--streams", type=int, default=16, help="h2load's concurrent streams (4 per connection)")
    parser.add_argument("--in-flight", type=int, default=64, help="the flood's calls out at once, at most")
    parser.add_argument("--deadline", type=float, default=2.0, help="each flood call's deadline, seconds")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="appended to `keyguard-server serve`, repeatable (e.g. --server-arg=--config=x.toml)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 s phases, 100/s only")
    args = parser.parse_args()
    args.seconds = args.seconds or (2.0 if args.quick else 8.0)
    args.rates = [float(r) for r in (args.rates or ("100" if args.quick else "100,1000")).split(",")]
    sources = args.sources.split(",")
    if unknown := set(sources) - set(SOURCES):
        parser.error(f"unknown sources {sorted(unknown)}: pick from {', '.join(SOURCES)}")
    if args.argon2 == "moderate":
        os.environ.update(MODERATE_ARGON2)
    print_header(args)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="keyguard-flood-") as tmp:
        for source in sources:
            for rate in args.rates:
                row = run_row(source, rate, args, Path(tmp))
                print(
                    f"  {time.strftime('%H:%M:%S')} {source} at {rate:g}/s: good {row.alone.rps:.0f} -> "
                    f"{row.flooded.rps:.0f} req/s, flood {outcome_text(row.flooded.flood['outcomes'])}",
                    file=sys.stderr,
                )
                rows.append(row)
    print_table(rows)


if __name__ == "__main__":
    main()
