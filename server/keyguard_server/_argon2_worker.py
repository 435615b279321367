"""One argon2 process (``python -I .../_argon2_worker.py T M P background|foreground``), run as
a script: it imports argon2-cffi and nothing of keyguard's (whose import would, for one,
register metrics).

:class:`keyguard_server._secrets.SecretHasher` starts a few of these and talks to them over
their standard input and output, one job at a time each: a line ``verify<TAB><stored
hash><TAB><secret>`` in, ``<1 or 0> <CPU seconds>`` out; or ``hash<TAB><secret>`` in,
``<argon2id hash> <CPU seconds>`` out. Running argon2 in a process of its own, rather than a
thread of the server's, is what keeps a flood of wrong secrets from slowing anyone else:

- suspect verifications (where wrong secrets came from lately) run in background processes
  at the lowest CPU priority (SCHED_IDLE and nice 19, inherited by the lane threads argon2
  starts): a flood's argon2 only gets CPU the event loop leaves. The others run at normal
  priority, so a correct secret's first verification progresses however busy the machine is;

- no thread of the server has to win the GIL from a busy event loop to start a run or to
  hand its result back: the loop reads the answer from a pipe it polls itself;
- the process's own CPU time is argon2's alone, so each answer says what the run cost, and
  the server's argon2 budget is kept in measured CPU seconds.

Secrets only ever pass through the pipe; nothing is logged or written anywhere.
"""

from __future__ import annotations

import os
import sys
import time

import argon2

LOWEST_PRIORITY = 19
BACKGROUND, FOREGROUND = "background", "foreground"  # the last argument: at the lowest priority or not


def lowest_priority() -> None:
    """Linux's SCHED_IDLE where there is one (it runs only when nothing else wants the core:
    a weight of 3 against 15 for nice 19, and argon2's lane threads inherit it), and nice 19."""
    os.nice(LOWEST_PRIORITY - os.nice(0))
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def main() -> None:
    if sys.argv[4] == BACKGROUND:
        lowest_priority()
    time_cost, memory_kib, parallelism = (int(arg) for arg in sys.argv[1:4])
    hasher = argon2.PasswordHasher(
        time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism, type=argon2.Type.ID
    )
    for line in sys.stdin.buffer:
        command, *fields = line.decode().rstrip("\n").split("\t")
        started = time.process_time()
        answer: str
        if command == "hash":
            (secret,) = fields
            answer = hasher.hash(secret)
        else:
            stored_hash, secret = fields
            try:
                answer = str(int(hasher.verify(stored_hash, secret)))
            except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
                answer = "0"
        sys.stdout.write(f"{answer} {time.process_time() - started:.6f}\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
