"""Two builds of keyguard side by side: the no-op and a cached Authorize, interleaved, in one run.

Single runs of ``authorize.py`` on these VMs move keyguard's own CPU per Authorize by a factor
of two and more (other tenants, steal time); a change is only measured fairly against the code
before it in the same minutes. This starts both builds' servers at once (SQLite, and PostgreSQL in
fresh databases on 127.0.0.1:5432, dropped afterwards), pinned to core 0 like ``authorize.py``, and
alternates h2load rounds between them.

The other build is any earlier checkout with its own virtualenv, e.g.:

    git worktree add /tmp/before <commit> && make -C /tmp/before .venv/.installed
    .venv/bin/python benchmarks/versus.py --before '/tmp/before/.venv/bin/keyguard serve' [--rounds 3]

(``keyguard serve`` before the client/server split, ``keyguard-server serve`` after it.) Prints,
per build and backend, server CPU µs per no-op and per Authorize, keyguard's own share (the
difference) per round and its median, and b/a by req/s.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shlex
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from authorize import BOT_IP, Result, Server, h2load, pg_database
from grpc_health.v1 import health_pb2

from _harness import KEYGUARD_SERVER, grpc_frame, pinned
from keyguard import Client
from keyguard.v1 import keyguard_pb2 as pb

NOOP = grpc_frame(health_pb2.HealthCheckRequest().SerializeToString())


class Build(Server):
    """A server of either build: ``Server``'s h2load interface, started from ``command``."""

    def __init__(self, command: list[str], data_dir: Path, database: str | None) -> None:
        self.backend, self.pg, self.data_dir = ("postgresql" if database else "sqlite"), None, data_dir
        self.log_path = data_dir / "serve.log"
        self.log = self.log_path.open("w")
        args = [*command, "--listen", "127.0.0.1:0", "--data-dir", str(data_dir)]
        if database:
            args += ["--database", f"postgresql://postgres@127.0.0.1:5432/{database}"]
        self.proc = subprocess.Popen(pinned(0, args), stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not (match := re.search(r"\(port (\d+)", self.log_path.read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{command} did not start:\n{self.log_path.read_text()}")
            time.sleep(0.1)
        self.port = int(match[1])
        self.target = f"127.0.0.1:{self.port}"
        self.token = (data_dir / "admin.token").read_text().strip()

    def authorize_body(self) -> bytes:
        with Client(self.target, token=self.token) as client:
            key = client.create_key("acct-versus", "bot", "trade", [BOT_IP])
            assert client.authorize(key.key.access_key, key.private_key, BOT_IP, "trade").allowed
        request = pb.AuthorizeRequest(
            access_key=key.key.access_key,
            private_key=key.private_key,
            client_ip=BOT_IP,
            required_permission=pb.PERMISSION_TRADE,
        )
        return grpc_frame(request.SerializeToString())


@contextlib.contextmanager
def databases(count: int) -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(pg_database()) for _ in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--before", required=True, help="the other build's serve command, e.g. '/tmp/b/.venv/bin/keyguard serve'"
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args()
    builds = {"before": shlex.split(args.before), "this": [KEYGUARD_SERVER, "serve"]}
    results: dict[tuple[str, str, str], list[Result]] = {}
    with databases(len(builds)) as names, contextlib.ExitStack() as stack:
        servers: dict[tuple[str, str], tuple[Build, bytes]] = {}
        for (build, command), database in zip(builds.items(), names, strict=True):
            for backend, db in (("sqlite", None), ("postgresql", database)):
                server = Build(command, Path(stack.enter_context(tempfile.TemporaryDirectory())), db)
                stack.callback(server.stop, f" ({build}, {backend})")
                servers[build, backend] = (server, server.authorize_body())
        work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for _ in range(args.rounds):
            for (build, backend), (server, body) in servers.items():
                for row, path, payload in (
                    ("a", "/grpc.health.v1.Health/Check", NOOP),
                    ("b", "/keyguard.v1.Authorization/Authorize", body),
                ):
                    name = f"{row}-{build}-{backend}"
                    results.setdefault((build, backend, row), []).append(
                        h2load(server, path, payload, name, args.requests, 16, work)
                    )
    print(f"\nmedians of {args.rounds} interleaved rounds of {args.requests} requests, 16 streams, server on core 0")
    for build, backend in servers:
        a, b = results[build, backend, "a"], results[build, backend, "b"]
        own = [y.cpu_us - x.cpu_us for x, y in zip(a, b, strict=True)]
        ratio = [y.rps / x.rps for x, y in zip(a, b, strict=True)]
        print(
            f"{build:6} {backend:10}  no-op {statistics.median(x.cpu_us for x in a):4.0f} us  "
            f"Authorize {statistics.median(x.cpu_us for x in b):4.0f} us  "
            f"keyguard's own {statistics.median(own):4.0f} us {[round(v) for v in own]}  "
            f"b/a {statistics.median(ratio):.2f} {[round(v, 2) for v in ratio]}"
        )


if __name__ == "__main__":
    main()
