"""Shutdown: what is cut short by it ends quietly, and every call in flight is answered."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import pytest

from keyguard_server._secrets import Argon2Params, SecretHasher, new_private_key


def test_a_hash_cut_short_by_shutdown_ends_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """A CreateKey answered UNAVAILABLE at the end of the grace leaves its hash running; the
    hasher's close then ends the hashing process under it. That is the shutdown, not a failure:
    no ERROR, no process started again, no "exception was never retrieved" traceback."""

    async def scenario() -> list[dict[str, Any]]:
        reported: list[dict[str, Any]] = []
        asyncio.get_running_loop().set_exception_handler(lambda _, context: reported.append(context))
        hasher = SecretHasher(Argon2Params(time_cost=3, memory_kib=65536, parallelism=1), 1, 8)
        await hasher.calibrate()
        caller = asyncio.create_task(hasher.hash(new_private_key()))
        await asyncio.sleep(0.02)  # the hash is under way
        caller.cancel()
        await hasher.close()
        await asyncio.sleep(0.1)  # the hashing task sees its process gone
        assert hasher._hash_worker is not None and hasher._hash_worker.process.poll() is not None
        gc.collect()  # an unretrieved exception is reported when its task is collected
        await asyncio.sleep(0)
        return reported

    caplog.set_level(logging.ERROR, logger="keyguard.argon2")
    assert asyncio.run(scenario()) == []
    assert not caplog.records
