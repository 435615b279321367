"""Instructions per call in the server under callgrind: a figure that does not move with the VM.

Server CPU per call moves by tens of percent between runs on a shared VM; the instructions the
server executes per call do not (the same phase measured twice agrees within 1 %). This starts
`keyguard-server serve` under `valgrind --tool=callgrind --instr-atstart=no` (SQLite, or
PostgreSQL in a fresh database with --pg), sets up the key `authorize.py` uses, and for each
phase sends a warm-up burst with h2load, then turns instrumentation on with `callgrind_control`
around --calls calls (4 streams on one connection) and dumps the count. The server is not pinned
to a core: sharing one with h2load changes how often grpc's completion-queue thread wakes, and
with it the count (a no-op call 313k -> 353k instructions).

  noop       grpc.health.v1 Health/Check: grpcio's own cost per call
  authorize  a cached Authorize
  check      an Envoy ext_authz Check of the same key's order
  stream     AuthorizeStream, 100 framed messages per h2load request, per decision

Prints instructions per call (per decision for the stream) and each phase beyond the no-op;
the callgrind files stay in --keep DIR for `callgrind_annotate` when given.
Needs valgrind (apt-get install valgrind) and h2load. About a minute per backend.

Run: .venv/bin/python benchmarks/instructions.py [--calls 1000] [--pg] [--keep DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from authorize import AUTH, CHECK, HEALTH, PG_HOST, PG_PORT, PG_USER, STREAM, STREAM_BATCH, Server, pg_database, set_up

from _harness import ensure_h2load, grpc_frame


def h2load(server: Server, path: str, body: bytes, requests: int, work: Path) -> None:
    body_file = work / "body.bin"
    body_file.write_bytes(body)
    command = [ensure_h2load(), "-n", str(requests), "-c", "1", "-m", "4", "-t", "1"]
    command += ["-H", "content-type: application/grpc", "-H", "te: trailers"]
    command += ["-H", f"authorization: Bearer {server.token}", "-d", str(body_file), f"http://{server.target}{path}"]
    subprocess.run(command, capture_output=True, check=True)


def callgrind_control(server: Server, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(server.proc.pid)], capture_output=True, check=True)


def measure(server: Server, work: Path, calls: int) -> dict[str, float]:
    setup = set_up(server, 1, others=0)
    phases = [
        ("noop", HEALTH, grpc_frame(b""), 1),
        ("authorize", AUTH, setup.body, 1),
        ("check", CHECK, setup.check_body, 1),
        ("stream", STREAM, setup.stream_body, STREAM_BATCH),
    ]
    per_call: dict[str, float] = {}
    for name, path, body, decisions in phases:
        requests = max(10, calls // decisions)
        h2load(server, path, body, max(5, 200 // decisions), work)
        callgrind_control(server, "--zero")
        callgrind_control(server, "--instr=on")
        h2load(server, path, body, requests, work)
        callgrind_control(server, "--instr=off")
        callgrind_control(server, f"--dump={name}")
        dump = _newest_dump(work)
        total = int(re.search(r"^totals: (\d+)", dump.read_text(), re.MULTILINE)[1])  # type: ignore[index]
        dump.rename(work / f"callgrind.{name}")
        per_call[name] = total / (requests * decisions)
    return per_call


def _newest_dump(work: Path) -> Path:
    deadline = time.monotonic() + 30
    while True:
        dumps = [p for p in work.glob("callgrind.out.*") if re.search(r"^totals: ", p.read_text(), re.MULTILINE)]
        if dumps:
            return max(dumps, key=lambda p: p.stat().st_mtime)
        if time.monotonic() > deadline:
            sys.exit("callgrind wrote no dump")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls (decisions for the stream) per phase")
    parser.add_argument("--pg", action="store_true", help="PostgreSQL on 127.0.0.1:5432 instead of SQLite")
    parser.add_argument("--keep", type=Path, help="a directory to keep the callgrind files in")
    args = parser.parse_args()
    if not shutil.which("valgrind"):
        sys.exit("valgrind is needed: apt-get install valgrind")
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        database = stack.enter_context(pg_database()) if args.pg else None
        wrapper = (
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={work}/callgrind.out.%p",
        )
        server = Server(
            work, 1, "postgresql" if database else "sqlite", database, wrapper=wrapper, start_timeout=600, pin=False
        )
        try:
            per_call = measure(server, work, args.calls)
        finally:
            server.stop()
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            for dump in work.glob("callgrind.[a-z]*"):
                shutil.copy(dump, args.keep)
    backend = f"PostgreSQL {PG_USER}@{PG_HOST}:{PG_PORT}" if args.pg else "SQLite"
    print(f"\ninstructions per call in the server ({backend}, {args.calls} calls per phase)")
    for name, count in per_call.items():
        beyond = "" if name in ("noop", "stream") else f"   {(count - per_call['noop']) / 1000:7.1f}k beyond the no-op"
        print(f"  {name:10} {count / 1000:8.1f}k{beyond}")
    print(f"  stream/authorize = {per_call['stream'] / per_call['authorize']:.2f}")


if __name__ == "__main__":
    main()
