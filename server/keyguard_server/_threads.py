"""The event loop's share of the core with the threads it hands work to.

CPython's GIL lets a waiting thread force a hand-over only after a whole switch interval
(5 ms) in which the GIL did not change hands. The event loop under load drops and retakes the
GIL every few microseconds (every SQLite read, every gRPC batch), so each of those counts as a
change of hands, the waiting thread never forces one, and on a busy core it rarely wins the
race after a drop: measured with the server on one core and Authorize at saturation, a
management write (a few ms idle) took 0.4-2 s and a last-used flush timed out after 8.5 s
(its COMMIT done, its thread waiting for the GIL to return, with the SQLite write lock held, so
other writes failed on the lock timeout). So while a database or argon2 thread has work, the
loop yields the core every :data:`SHARE_INTERVAL`: ``os.sched_yield`` drops the GIL and lets the
woken thread run, and once the work has waited :data:`PATIENCE`, a 0.1 ms sleep does (measured:
writes 6-25 ms under the same load, no flush timed out).
"""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from concurrent.futures import Future
from typing import Any

# Seconds between the loop's yields while a thread has work. Not below 1 ms: uvloop's timers count
# whole milliseconds and run a shorter delay on the next loop pass, which made the loop yield, and
# after PATIENCE sleep, on every pass (a no-op call's rate fell 4x while one argon2 run was pending).
SHARE_INTERVAL = 0.001
# A yield lets the waiting thread run only if the scheduler picks it (gRPC's threads are
# runnable too); work still pending after PATIENCE gets a short sleep instead, which it always gets.
PATIENCE = 0.02
PAUSE = 0.0001


class _Sharing:
    """One loop's yields: a single timer chain while any work is pending, however much is (a
    chain per work would yield, and past PATIENCE sleep, once per pending work each interval)."""

    def __init__(self) -> None:  # holds no reference to its loop: _SHARING's key must be able to die
        self._pending: dict[Future[Any] | asyncio.Future[Any], float] = {}  # work -> when it turns impatient
        self._ticking = False

    def add(self, loop: asyncio.AbstractEventLoop, work: Future[Any] | asyncio.Future[Any]) -> None:
        self._pending[work] = loop.time() + PATIENCE
        if not self._ticking:
            self._ticking = True
            loop.call_later(SHARE_INTERVAL, self._give)

    def _give(self) -> None:
        loop = asyncio.get_running_loop()
        for work in [work for work in self._pending if work.done()]:
            del self._pending[work]
        if not self._pending:
            self._ticking = False
            return
        if loop.time() < min(self._pending.values()):
            os.sched_yield()  # releases the GIL while it yields
        else:
            time.sleep(PAUSE)  # releases the GIL while it sleeps
        loop.call_later(SHARE_INTERVAL, self._give)


_SHARING: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Sharing] = weakref.WeakKeyDictionary()


def share_core_until(work: Future[Any] | asyncio.Future[Any]) -> None:
    """From now until ``work`` is done, the running loop yields the core every SHARE_INTERVAL."""
    loop = asyncio.get_running_loop()
    sharing = _SHARING.get(loop)
    if sharing is None:
        sharing = _SHARING[loop] = _Sharing()
    sharing.add(loop, work)
