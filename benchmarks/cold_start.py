"""Time to serve N cold keys: a restart's stampede of correct secrets, with real argon2.

Starts `keyguard serve` (default argon2 parameters, SQLite in a temporary data
dir), creates N keys in N accounts, restarts the server (every verification
cache is empty again), then lets N bots send 5 concurrent requests each, from
their own addresses, through a client whose deadline is 1 s (a gateway's); a
refused request is retried after 0.2 s. It prints how long until every bot had
its first ALLOW, and every answer on the way (RATE_LIMITED: argon2 could not
have answered within the deadline, so it was not started).

Run: .venv/bin/python benchmarks/cold_start.py [--keys 10 50]
"""

from __future__ import annotations

import argparse
import collections
import re
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from keyguard import Client, CreatedKey, Decision, KeyguardError

KEYGUARD = str(Path(sys.executable).parent / "keyguard")
REQUESTS_PER_BOT = 5
RETRY_AFTER = 0.2  # seconds a refused bot waits before it asks again


def serve(data: Path, log_name: str) -> tuple[subprocess.Popen[bytes], str, str]:
    log = data / log_name
    with log.open("w") as out:
        proc = subprocess.Popen(
            [KEYGUARD, "serve", "--listen", "127.0.0.1:0", "--data-dir", str(data)], stdout=out, stderr=out
        )
    deadline = time.monotonic() + 30
    while not (match := re.search(r"\(port (\d+)", log.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"keyguard did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{match[1]}", (data / "admin.token").read_text().strip()


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def measure(keys: int) -> str:
    with tempfile.TemporaryDirectory(prefix="keyguard-cold-") as tmp:
        data = Path(tmp)
        proc, target, token = serve(data, "first.log")
        try:
            with Client(target, token=token, timeout=30) as client:
                created = [client.create_key(f"acct-{i}", "bot", "read", []) for i in range(keys)]
        finally:
            stop(proc)
        proc, target, token = serve(data, "second.log")  # a restart: every cache is cold
        try:
            return stampede(target, token, created)
        finally:
            stop(proc)


def stampede(target: str, token: str, created: list[CreatedKey]) -> str:
    first_allow: dict[int, float] = {}
    outcomes: collections.Counter[str] = collections.Counter()
    with Client(target, token=token, timeout=1.0) as gateway:

        def bot_request(index: int) -> None:
            bot = index // REQUESTS_PER_BOT
            key = created[bot]
            ip = f"198.18.{bot // 250}.{bot % 250 + 1}"
            while time.monotonic() - started < 60:  # a bot retries what was refused, as bots do
                try:
                    decision = gateway.authorize(key.key.access_key, key.private_key, ip, "read").decision
                except KeyguardError as exc:
                    outcomes[exc.code.name] += 1
                    continue
                outcomes[decision.name] += 1
                if decision is Decision.ALLOW:
                    first_allow.setdefault(bot, time.monotonic() - started)
                    return
                time.sleep(RETRY_AFTER)

        started = time.monotonic()
        with ThreadPoolExecutor(len(created) * REQUESTS_PER_BOT) as pool:
            list(pool.map(bot_request, range(len(created) * REQUESTS_PER_BOT)))
    served = sorted(first_allow.values())
    if not served:
        return f"{len(created):4d} cold keys: none served; answers {dict(outcomes)}"
    return (
        f"{len(created):4d} cold keys x {REQUESTS_PER_BOT} concurrent requests: {len(served)}/{len(created)} bots "
        f"served; half after {served[len(served) // 2] * 1000:.0f} ms, all after {served[-1] * 1000:.0f} ms; "
        f"answers {dict(outcomes)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, nargs="+", default=[10, 50], help="numbers of cold keys to try")
    args = parser.parse_args()
    for keys in args.keys:
        print(measure(keys), flush=True)


if __name__ == "__main__":
    main()
