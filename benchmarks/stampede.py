"""Correct secrets under pressure: a stampede from one address, and other accounts during a flood.

Starts `keyguard-server serve` (the server's default argon2 parameters, SQLite in a temporary
data dir, unpinned) and measures, with real clients on loopback:

  stampede, fresh   --keys keys never verified, --per-key concurrent correct requests each, all
                    from one client address (a trading firm's bots behind one NAT), deadlines
                    of --deadline s: how many were allowed, and when the last one was;
  stampede, after   the same with other fresh keys, right after a flood of --flood-seconds of
                    distinct wrong secrets at --flood-rate/s from one /24 (2 s deadlines);
  many accounts     wrong secrets spread over --accounts keys of as many accounts from as many
                    IPv6 /64s (one flooding thread each, --many-rate/s in all, 5 s deadlines;
                    0: each thread back to back) while
                    --victims other accounts make their keys' first verification, 5 s
                    deadlines: how many were allowed, and how long each took.

Run: .venv/bin/python benchmarks/stampede.py [--keys 30] [--per-key 3] [--deadline 20]
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _harness import KeyguardProcess
from keyguard import Client, CreatedKey, KeyguardError
from keyguard_server._secrets import new_private_key

NAT_ADDRESS = "203.0.113.7"


def ask(client: Client, key: CreatedKey, secret: str, ip: str) -> tuple[str, float]:
    """One Authorize: its decision (or gRPC status) by name, and its latency in seconds."""
    started = time.monotonic()
    try:
        name = client.authorize(key.key.access_key, secret, ip, "read").decision.name
    except KeyguardError as exc:
        name = f"gRPC {exc.code.name}"
    return name, time.monotonic() - started


def summary(answers: list[tuple[str, float]]) -> str:
    counts = collections.Counter(name for name, _ in answers)
    allowed = sorted(seconds for name, seconds in answers if name == "ALLOW")
    times = f"median {statistics.median(allowed):.2f} s, last {allowed[-1]:.2f} s" if allowed else "none allowed"
    return f"{counts['ALLOW']}/{len(answers)} ALLOW ({times}); answers {dict(counts)}"


def stampede(server: KeyguardProcess, keys: list[CreatedKey], per_key: int, deadline: float) -> str:
    with Client(server.target, token=server.token, timeout=deadline) as gateway, ThreadPoolExecutor(200) as pool:
        requests = [key for key in keys for _ in range(per_key)]
        return summary(list(pool.map(lambda key: ask(gateway, key, key.private_key, NAT_ADDRESS), requests)))


def flood(server: KeyguardProcess, key: CreatedKey, rate: float, seconds: float) -> str:
    """Distinct wrong secrets from random addresses of one /24 at ``rate``/s for ``seconds``."""
    with Client(server.target, token=server.token, timeout=2) as flooder, ThreadPoolExecutor(64) as pool:
        started, futures = time.monotonic(), []
        for i in range(int(rate * seconds)):
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
            ip = f"198.51.100.{random.randrange(256)}"
            futures.append(pool.submit(ask, flooder, key, new_private_key(), ip))
        counts = collections.Counter(f.result()[0] for f in futures)
    return f"{len(futures)} wrong secrets in {seconds:g} s: {dict(counts)}"


def many_accounts(server: KeyguardProcess, accounts: int, victims: int, rate: float) -> str:
    with Client(server.target, token=server.token, timeout=30) as admin:
        targets = [admin.create_key(f"flooded-{i}", "bot", "read", []) for i in range(accounts)]
        others = [admin.create_key(f"other-{i}", "bot", "read", []) for i in range(victims)]
    stop = threading.Event()
    flood_answers: collections.Counter[str] = collections.Counter()

    def flood_one(i: int) -> None:
        with Client(server.target, token=server.token, timeout=5) as flooder:
            while not stop.is_set():
                ip = f"2001:db8:{i:x}:{random.randrange(65536):x}::1"
                flood_answers[ask(flooder, targets[i], new_private_key(), ip)[0]] += 1
                if rate:
                    stop.wait(accounts / rate)

    with ThreadPoolExecutor(accounts) as pool:
        flooding = [pool.submit(flood_one, i) for i in range(accounts)]
        time.sleep(3)  # the flood has failed and fills argon2's queue
        with Client(server.target, token=server.token, timeout=5) as victim, ThreadPoolExecutor(victims) as them:
            answers = list(them.map(lambda key: ask(victim, key, key.private_key, NAT_ADDRESS), others))
        stop.set()
        for f in flooding:
            f.result()
    return f"{summary(answers)}; the flood got {dict(flood_answers)}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=30)
    parser.add_argument("--per-key", type=int, default=3)
    parser.add_argument("--deadline", type=float, default=20.0)
    parser.add_argument("--flood-rate", type=float, default=100.0)
    parser.add_argument("--flood-seconds", type=float, default=5.0)
    parser.add_argument("--accounts", type=int, default=64)
    parser.add_argument("--victims", type=int, default=12)
    parser.add_argument("--many-rate", type=float, default=66.0, help="the many-accounts flood's rate (0: flat out)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="keyguard-stampede-") as tmp:
        server = KeyguardProcess(Path(tmp), pin=False)
        try:
            with Client(server.target, token=server.token, timeout=60) as admin:
                fresh = [admin.create_key(f"fresh-{i}", "bot", "read", []) for i in range(args.keys)]
                after = [admin.create_key(f"after-{i}", "bot", "read", []) for i in range(args.keys)]
                flooded = admin.create_key("flooded", "bot", "read", [])
            print(f"stampede, fresh ({args.keys} keys x {args.per_key}, one address):", flush=True)
            print("  " + stampede(server, fresh, args.per_key, args.deadline), flush=True)
            print("flood from one /24:", flush=True)
            print("  " + flood(server, flooded, args.flood_rate, args.flood_seconds), flush=True)
            print("stampede, right after the flood:", flush=True)
            print("  " + stampede(server, after, args.per_key, args.deadline), flush=True)
            print(
                f"many accounts ({args.accounts} flooded from as many IPv6 /64s at {args.many_rate:g}/s, "
                f"{args.victims} others):",
                flush=True,
            )
            print("  " + many_accounts(server, args.accounts, args.victims, args.many_rate), flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
