"""Time to serve N cold keys: a restart's stampede of correct secrets, with real argon2.

Starts `keyguard-server serve` (default argon2 parameters, SQLite in a temporary data
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
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _harness import KeyguardProcess
from keyguard import Client, CreatedKey, Decision, KeyguardError

REQUESTS_PER_BOT = 5
RETRY_AFTER = 0.2  # seconds a refused bot waits before it asks again


def measure(keys: int) -> str:
    with tempfile.TemporaryDirectory(prefix="keyguard-cold-") as tmp:
        data = Path(tmp)
        server = KeyguardProcess(data, log_name="first.log", pin=False)
        try:
            with Client(server.target, token=server.token, timeout=30) as client:
                created = [client.create_key(f"acct-{i}", "bot", "read", []) for i in range(keys)]
        finally:
            server.stop()
        server = KeyguardProcess(data, log_name="second.log", pin=False)  # a restart: every cache is cold
        try:
            return stampede(server.target, server.token, created)
        finally:
            server.stop()


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
