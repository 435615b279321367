"""The loop's share of the core (``_threads``) on the loop the server runs on, uvloop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import uvloop

from keyguard_server import _threads
from keyguard_server._threads import SHARE_INTERVAL, share_core_until


def test_while_work_is_pending_the_loop_yields_once_per_interval_not_on_every_pass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvloop runs a timer of less than a millisecond on the next loop pass: a 0.5 ms interval
    made the loop yield on every pass, and past PATIENCE sleep 0.1 ms on every pass, so one
    pending argon2 run cut every other call's rate by 4x."""
    gives = 0
    give = _threads._Sharing._give

    def counted(self: Any) -> None:
        nonlocal gives
        gives += 1
        give(self)

    monkeypatch.setattr(_threads._Sharing, "_give", counted)
    seconds = 0.1

    async def pending_for_a_while() -> None:
        work = asyncio.get_running_loop().create_future()
        share_core_until(work)
        await asyncio.sleep(seconds)
        work.set_result(None)
        await asyncio.sleep(3 * SHARE_INTERVAL)  # the chain notices and stops

    uvloop.run(pending_for_a_while())
    assert 0 < gives <= 1.5 * seconds / SHARE_INTERVAL + 5
